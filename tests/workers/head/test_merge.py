"""``python -m workers.head.merge DIR OUT.pt``: one file from a sharded head checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.head import SampledSoftmaxHead, save_head_checkpoint
from workers.head.merge import main
from workers.losses import build_loss


def test_merge_cli_writes_the_full_matrix(tmp_path: Path) -> None:
    head = SampledSoftmaxHead(4, 9, build_loss("normface"), seed=2)
    save_head_checkpoint(head, None, tmp_path / "head")
    process = subprocess.run([sys.executable, "-m", "workers.head.merge", str(tmp_path / "head"),
                              str(tmp_path / "centres.pt")], capture_output=True, text=True,
                             timeout=60)
    assert process.returncode == 0, process.stderr
    assert process.stdout == f"wrote {tmp_path / 'centres.pt'}: 9 × 4 class centres\n"
    assert torch.equal(torch.load(tmp_path / "centres.pt"), head.weight.detach())


def test_merge_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), str(tmp_path / "out.pt")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: {tmp_path}/manifest.json: no head checkpoint manifest "
                                 "(save_head_checkpoint writes one)\n")
    assert not (tmp_path / "out.pt").exists()
