"""The argument parser both command lines use: a usage error is one line on stderr."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose errors are ``error: <problem>; <flag>: <its help>`` (exit code 2),
    so a bad flag names itself and what it allows instead of printing the whole usage."""

    def error(self, message: str) -> NoReturn:
        by_flag = {flag: action for action in self._actions for flag in action.option_strings}
        words = message.replace(":", " ").replace(",", " ").split()
        action = next((by_flag[word] for word in words if word in by_flag), None)
        if action is not None and action.help:
            hint = f"{action.option_strings[-1]}: {action.help}"
        else:
            hint = f"known flags: {', '.join(sorted(by_flag))}"
        self.exit(2, f"error: {message}; {hint}\n")
