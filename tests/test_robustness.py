"""Safe checkpoints, guarded run folders, stalls and restarts (issue 11)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from subnetdp.checkpoint import (CheckpointError, RunFileError, atomic_write, find_resumable, load_checkpoint,
                                 save_checkpoint)


class _Payload:
    """Pickles to a call that creates a marker file: what a planted checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant(step_dir: Path, marker: Path) -> Path:
    """Replace rank 0's file with a pickle payload and forge the manifest to match it."""
    f = step_dir / "rank-00000.pt"
    torch.save({"world_size": 1, "model": _Payload(str(marker))}, f)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    blob = f.read_bytes()
    manifest["files"]["rank-00000.pt"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    return f


def test_a_planted_pickle_payload_is_refused_not_run(tmp_path):
    model = torch.nn.Linear(2, 2)
    step_dir = save_checkpoint(tmp_path / "ckpt", 1, model, None)
    marker = tmp_path / "payload-ran"
    f = _plant(step_dir, marker)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ckpt", model, None)
    message = str(info.value)
    assert str(f) in message and "refused to load" in message and len(message.splitlines()) == 1
    assert not marker.exists()
    torch.load(f, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_checkpoint_round_trips_rng_states_as_plain_data(tmp_path):
    import random

    import numpy as np

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 3, model, opt, extra={"note": "x", "n": 1})
    expected = (torch.rand(2), random.random(), np.random.rand())
    payload = load_checkpoint(tmp_path, model, opt)
    assert payload["step"] == 3 and payload["extra"] == {"note": "x", "n": 1}
    assert torch.equal(torch.rand(2), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_a_damaged_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, model, None, keep=3)
    save_checkpoint(tmp_path, 2, model, None, keep=3)
    newest = save_checkpoint(tmp_path, 3, model, None, keep=3)
    with open(newest / "rank-00000.pt", "r+b") as f:  # one flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    found, skipped = find_resumable(tmp_path)
    assert found.name == "step-000000002" and "does not match its sha256" in skipped[0]
    assert load_checkpoint(tmp_path, model, None)["step"] == 2
    (tmp_path / "latest").write_text("step-000000009\n")  # names a folder that does not exist
    found, skipped = find_resumable(tmp_path)
    assert found.name == "step-000000002" and "step-000000009, which does not exist" in skipped[0]


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write(target, "old\n")

    def fails(f):
        f.write(b"half")
        raise ValueError("interrupted")

    with pytest.raises(ValueError, match="interrupted"):
        atomic_write(target, fails)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]

    def disk_full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunFileError) as info:
        atomic_write(target, disk_full)
    assert str(target) in str(info.value) and len(str(info.value).splitlines()) == 1
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_run_files_get_the_permissions_of_an_ordinary_file(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert (atomic_write(tmp_path / "a", b"x").stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
