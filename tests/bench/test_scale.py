"""bench/scale.py: its smallest configuration runs end to end and writes sane JSON; a case past
its timeout and a policy the head lacks are reported, not waited for or crashed on. Nothing is
timed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import scale

CLASSES, DIM, IDENTITIES = 2_000, 8, 2_000


@pytest.mark.slow
def test_smallest_configuration_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, scale.__file__, "--split-sizes", str(IDENTITIES),
         "--split-group-size", "20", "--ckpt-classes", str(CLASSES), "--ckpt-dim", str(DIM),
         "--ckpt-world-sizes", "1", "--ckpt-resume", "--step-classes", str(CLASSES),
         "--step-dim", str(DIM), "--steps", "dense", "--batch", "16", "--tmp-dir",
         str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert set(results) == {"meta", "split", "checkpoint", "step"}
    assert "split_identities" in done.stdout and "head checkpoint" in done.stdout

    ungrouped, grouped = results["split"]
    assert (ungrouped["groups"], grouped["groups"]) == (IDENTITIES, IDENTITIES // 20)
    for record in results["split"]:
        assert record["status"] == "ok" and record["partition_ok"]
        assert record["heldout"] == IDENTITIES // 10 and record["seconds"] > 0
        assert record["at_target"]["seconds"] == pytest.approx(
            record["seconds"] * scale.TARGET_CLASSES / IDENTITIES)

    shard_bytes = CLASSES * DIM * 4 * 2  # weight + momentum, float32
    save, load = results["checkpoint"]
    assert (save["op"], load["op"]) == ("save", "load")
    for record in (save, load):
        assert record["status"] == "ok", record.get("reason")
        assert record["shard_bytes"] == shard_bytes and record["rows"] == CLASSES
        assert record["seconds"] > 0 and len(record["per_rank"]) == 1
    assert save["disk_bytes"] >= shard_bytes and load["verified"]
    assert (save["created_bytes"], load["created_bytes"]) == (0, shard_bytes // 2)  # momentum

    (step,) = results["step"]
    assert step["status"] == "ok" and step["step"] == "dense"
    assert step["state_bytes"] == shard_bytes
    assert step["ms"] > 0 and step["extra_bytes"] > 0
    assert step["at_target"]["extra_bytes"] == pytest.approx(
        step["extra_bytes"] * scale.TARGET_ROWS * scale.TARGET_DIM / (CLASSES * DIM))


def test_a_case_past_its_timeout_is_reported() -> None:
    case = {"section": "split", "identities": 10**6, "group_size": 1, "heldout_fraction": 0.1}
    assert scale.run_worker(case, timeout=0.05) == {"status": "timeout",
                                                     "reason": "timeout after 0.05 s"}


def test_a_policy_the_head_lacks_is_named_unavailable() -> None:
    assert scale.policy_unavailable("dense") is None
    assert "unsampled_rows" in scale.policy_unavailable("no-such-policy")
