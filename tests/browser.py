"""Headless Chromium driven over the DevTools protocol: open a page, wait for text, click,
read the page's text and take a screenshot — what a person sees, not what an API returns."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from tests.services import free_port, stop_process_group

#: Debian's package; ``.ci/run`` installs it
CHROMIUM = "chromium"


class Browser:
    """One headless Chromium page (``async with Browser(tmp) as page``)."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 900) -> None:
        executable = shutil.which(CHROMIUM)
        if executable is None:
            raise RuntimeError(f"{CHROMIUM} is not installed (apt-get install chromium)")
        self.port = free_port()
        profile.mkdir(parents=True, exist_ok=True)
        self.command = [executable, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", f"--user-data-dir={profile}",
                        f"--remote-debugging-port={self.port}",
                        f"--window-size={width},{height}", "about:blank"]
        self.log = profile / "chromium.log"
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Browser:
        with self.log.open("w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            target = await asyncio.to_thread(self._page_target)
            self.session = aiohttp.ClientSession()
            self.socket = await self.session.ws_connect(target["webSocketDebuggerUrl"],
                                                        max_msg_size=0)
        except BaseException:
            stop_process_group(self.process)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.socket.close()
        await self.session.close()
        stop_process_group(self.process, grace=10)

    def _page_target(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                url = f"http://127.0.0.1:{self.port}/json/list"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    pages = [t for t in json.load(answer) if t["type"] == "page"]
                if pages:
                    return pages[0]
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; returns its result (events in between are skipped)."""
        message_id = next(self._ids)
        await self.socket.send_json({"id": message_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.socket.receive()).data)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def text(self) -> str:
        """The page's visible text."""
        return await self.evaluate("document.body ? document.body.innerText : ''") or ""

    async def wait_for_text(self, *needles: str, timeout: float = 60.0) -> str:
        """Poll the page until every needle is in its text; returns that text."""
        deadline = time.monotonic() + timeout
        while True:
            text = await self.text()
            if all(needle in text for needle in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in text]
                raise AssertionError(f"page never showed {missing}; it shows: {text[:1500]}")
            await asyncio.sleep(0.5)

    async def screenshot(self, path: Path) -> None:
        """A PNG of the viewport."""
        result = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(result["data"]))
