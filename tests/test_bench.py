"""``subnetdp bench`` and ``benchmarks/gpu_measure.py`` at tiny sizes: structure and exact counts only.

Timings are never asserted (DESIGN.md section 5).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import subnetdp as sd
from subnetdp.baselines import fsdp2_bytes
from subnetdp.cli import add_bench_parser
from subnetdp.measure.bench import memory_part, run_bench
from subnetdp.models import resnet18

TINY = {"kind": "image", "model": "resnet18", "width": 4, "batch": 4, "optimizer": "sgd-momentum"}
ROOT = Path(__file__).resolve().parents[1]


def test_memory_part_measures_every_strategy_and_worker():
    part = memory_part(TINY, 2, [0.5], ["block", "neuron"], 1, torch.device("cpu"), log=lambda s: None)
    rows = {r["name"]: r for r in part["rows"]}
    old = "SDP block C=0.5 (old default: keep, params)"
    assert list(rows) == ["DDP", "DDP+ckpt", "FSDP2 (K=2)", "FSDP2+ckpt (K=2)", "SDP block C=0.5", "SDP neuron C=0.5",
                          old, "SDP+ckpt block C=0.5", "SDP+ckpt neuron C=0.5"]
    assert "balance=memory" in rows["SDP block C=0.5"]["basis"] and "balance=params" in rows[old]["basis"]
    assert [n for n, r in rows.items() if r["old_default"]] == [old]  # the field plots and tables read, not the name
    n = sum(p.numel() for p in sd.materialize(_factory()).parameters())
    ddp = rows["DDP"]["workers"][0]["measured"]
    assert ddp["param_bytes"] == ddp["grad_bytes"] == ddp["optimizer_bytes"] == 4 * n
    assert rows["DDP"]["workers"][0]["derived"]["ddp_bucket_bytes"] == 4 * n
    assert ddp["activation_bytes"] == part["profile"]["total"]
    ckpt = rows["DDP+ckpt"]["workers"][0]["measured"]
    assert ckpt["param_bytes"] == 4 * n and ckpt["activation_bytes"] < ddp["activation_bytes"]
    fsdp = rows["FSDP2 (K=2)"]["workers"][0]["measured"]
    assert fsdp["param_bytes"] == 4 * n / 2 and fsdp["activation_bytes"] == ddp["activation_bytes"]
    for name in ("SDP block C=0.5", "SDP neuron C=0.5", old):
        workers = rows[name]["workers"]
        assert [w["worker"] for w in workers] == [0, 1]
        for w in workers:
            assert w["ratio"]["state_bytes"] == pytest.approx(1, abs=0.10)
            assert w["ratio"]["activation_bytes"] == pytest.approx(1, abs=0.15)
            assert w["measured"]["total_bytes"] < ddp["total_bytes"]
            # K=2, C=0.5: r=1, so only the always-held parts are shared (over both workers: ring = 1x)
            assert 0 < w["comm"]["collective_bytes"] < 4 * n
            assert w["comm"]["ring_bytes"] == pytest.approx(w["comm"]["collective_bytes"])
    assert rows["DDP"]["workers"][0]["comm"] == {"collective_bytes": 4 * n, "ring_bytes": 4 * n}
    assert rows["FSDP2 (K=2)"]["workers"][0]["comm"]["collective_bytes"] == fsdp2_bytes(4 * n, 2)[0]
    fsdp_ckpt = rows["FSDP2+ckpt (K=2)"]["workers"][0]["measured"]
    assert fsdp_ckpt["param_bytes"] == fsdp["param_bytes"] and fsdp_ckpt["activation_bytes"] == ckpt["activation_bytes"]
    for level in ("block", "neuron"):  # checkpointing-aware balance may move units; the workers' sums do not change
        plain, with_ckpt = rows[f"SDP {level} C=0.5"]["workers"], rows[f"SDP+ckpt {level} C=0.5"]["workers"]
        assert sum(w["measured"]["state_bytes"] for w in plain) == sum(w["measured"]["state_bytes"] for w in with_ckpt)
        assert (max(w["measured"]["activation_bytes"] for w in with_ckpt)
                < max(w["measured"]["activation_bytes"] for w in plain))
        assert (sum(w["comm"]["collective_bytes"] for w in with_ckpt)
                == pytest.approx(sum(w["comm"]["collective_bytes"] for w in plain)))


def _factory():
    import functools

    return functools.partial(resnet18, num_classes=10, in_channels=3, width=4)


def test_fsdp2_bytes():
    handed, ring = fsdp2_bytes(400, 4)
    assert handed == 2 * 100 + 400 and ring == 3 * 3 / 4 * 400


@pytest.mark.timeout(240)
def test_bench_end_to_end_with_torchrun(tmp_path):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--models", "resnet18", "--width", "4", "--batch", "4", "--workers", "2",
                              "--coverages", "0.5", "--repeats", "1", "--time-ranks", "2", "--time-steps", "1",
                              "--time-warmup", "1", "--rounds", "1", "--out", str(tmp_path)])
    result = run_bench(args, log=lambda s: None)
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["machine"] == result["meta"]["machine"]
    md = (tmp_path / "bench.md").read_text()
    assert "| SDP neuron C=0.5 |" in md and "| FSDP2 (K=2) | derived |" in md
    for png in result["workloads"][0]["plots"]:
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    timing = {r["name"]: r for r in result["workloads"][0]["timing"]["rows"]}
    assert set(timing) == {"DDP", "DDP+ckpt", "FSDP2 (K=2)", "FSDP2+ckpt (K=2)", "SDP block C=0.5", "SDP neuron C=0.5",
                           "SDP+ckpt block C=0.5", "SDP+ckpt neuron C=0.5"}
    n = sum(p.numel() for p in sd.materialize(_factory()).parameters())
    assert timing["DDP"]["bytes_per_rank"] == [4 * n, 4 * n] == timing["DDP+ckpt"]["bytes_per_rank"]
    memory = {r["name"]: r for r in result["workloads"][0]["rows"]}
    for name in ("SDP block C=0.5", "SDP neuron C=0.5", "SDP+ckpt block C=0.5", "SDP+ckpt neuron C=0.5"):
        assert timing[name]["bytes_per_rank"] == timing[name]["predicted_bytes_per_rank"]
        # the plan-derived traffic of the memory part is what the engine's counters measured
        assert timing[name]["bytes_per_rank"] == [w["comm"]["collective_bytes"] for w in memory[name]["workers"]]
        assert all(b < 4 * n for b in timing[name]["bytes_per_rank"])
    for name in ("FSDP2 (K=2)", "FSDP2+ckpt (K=2)"):
        local = timing[name]["local_state_per_rank"]
        assert sum(s["param_bytes"] for s in local) == 4 * n  # the shards add up to the model, measured
        # FSDP2's collective calls counted during the timed steps, equal to what fsdp2_traffic derives from its groups
        assert timing[name]["bytes_basis"].startswith("measured")
        assert timing[name]["bytes_per_rank"] == timing[name]["predicted_bytes_per_rank"]
    assert timing["SDP+ckpt block C=0.5"]["bytes_per_rank"] == timing["SDP block C=0.5"]["bytes_per_rank"]


def _tiny_cifar10_jpeg(folder: Path, train: int = 64, test: int = 8) -> None:
    """A cifar10_jpeg.npz in the shared file's layout (JPEG bytes concatenated), random pixels."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(train + test):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs.append(buf.getvalue())
    (folder / "cifar10-jpeg").mkdir(parents=True)
    np.savez(folder / "cifar10-jpeg" / "cifar10_jpeg.npz", blob=np.frombuffer(b"".join(blobs), dtype=np.uint8),
             ends=np.cumsum([len(b) for b in blobs]), y=rng.integers(0, 10, train + test),
             train=np.arange(train + test) < train)


@pytest.mark.timeout(120)
def test_gpu_measure_smoke_on_cpu(tmp_path):
    _tiny_cifar10_jpeg(tmp_path / "data")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_measure.py"), "--device", "cpu", "--small", "--out",
           str(tmp_path)]
    env = {**os.environ, "SUBNETDP_SHARED_DATA": str(tmp_path / "data"), "SUBNETDP_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_measure.json").read_text())
    assert len(data["workloads"]) == 2 and not data["skipped"]
    for part in data["workloads"]:
        names = [r["name"] for r in part["summary"]]
        assert names[:4] == ["DDP", "DDP+ckpt", "FSDP2 (K=4)", "FSDP2+ckpt (K=4)"]
        assert {f"{s} {lv} C={c:g}" for s in ("SDP", "SDP+ckpt") for lv in ("block", "neuron")
                for c in (0.75, 0.5, 0.25)} <= set(names)
        rows = {r["name"]: r for r in part["summary"]}
        assert rows["FSDP2+ckpt (K=4)"]["peak_bytes"] < rows["FSDP2 (K=4)"]["peak_bytes"]
        for r in part["summary"]:
            if r["name"].startswith("SDP ") and "old default" not in r["name"]:
                assert r["peak_ratio_to_ddp"] < 1
                assert r["saved_plus_state_bytes"] == pytest.approx(r["predicted_bytes"], rel=0.15)
                ckpt = rows[r["name"].replace("SDP ", "SDP+ckpt ")]
                assert ckpt["saved_plus_state_bytes"] < r["saved_plus_state_bytes"]
    assert "| FSDP2 (K=4) | derived |" in (tmp_path / "gpu_measure.md").read_text()
    for r in data["workloads"][0]["summary"]:  # every configuration lists its gradient traffic
        assert r["collective_bytes"] > 0 and r["ring_bytes"] > 0
    for row in data["planner"]:  # the chosen plan fits and the prediction held
        assert row["predicted_bytes"] <= row["budget_bytes"] and row["ratio"] == pytest.approx(1, abs=0.15)
    align = data["alignment"]
    assert align["train_images"] == 64 and set(align["results"]) == {"block C=0.5", "neuron C=0.5"}
    for rows in align["results"].values():
        assert [r["step"] for r in rows] == [0, 2, 4] and all(-1 <= r["held"] <= 1 for r in rows)


def test_memory_part_measures_backward_masking_per_worker():
    part = memory_part(TINY, 2, [0.5], ["block", "neuron"], 1, torch.device("cpu"), log=lambda s: None,
                       maskings=("backward",))
    rows = {r["name"]: r for r in part["rows"]}
    assert list(rows) == ["DDP", "DDP+ckpt", "FSDP2 (K=2)", "FSDP2+ckpt (K=2)", "SDP backward block C=0.5",
                          "SDP backward neuron C=0.5"]
    n = sum(p.numel() for p in sd.materialize(_factory()).parameters())
    ddp = rows["DDP"]["workers"][0]["measured"]
    for name in ("SDP backward block C=0.5", "SDP backward neuron C=0.5"):
        for w in rows[name]["workers"]:
            assert w["measured"]["param_bytes"] == 4 * n  # every worker holds the full model
            assert w["ratio"]["state_bytes"] == pytest.approx(1, rel=1e-3)
            assert w["ratio"]["activation_bytes"] == pytest.approx(1, rel=1e-3)
            assert w["measured"]["total_bytes"] <= ddp["total_bytes"]
            # K=2, r=1: every unit is broadcast to the other worker after each step
            sent = w["comm"]["broadcast_bytes"]
            assert 0 < sent < w["comm"]["collective_bytes"] <= 4 * n + sent
    block = rows["SDP backward block C=0.5"]["workers"]
    assert all(w["measured"]["grad_bytes"] < 4 * n for w in block)


@pytest.mark.parametrize("argv", [["bench", "--models", "resnet18", "--width", "4", "--batch", "2", "--workers", "2",
                                   "--coverages", "0.5", "--repeats", "1", "--time-ranks", "0"],
                                  ["report", "no-such-run"]])
def test_plots_without_matplotlib_ask_for_the_extra_in_one_line(argv, monkeypatch, capsys, tmp_path):
    """matplotlib is the optional ``plots`` extra: its absence is one line naming the install, before any work."""
    from subnetdp.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'subnetdp[plots]'" in err
    assert not (tmp_path / "out").exists()  # it asked before measuring or writing anything
