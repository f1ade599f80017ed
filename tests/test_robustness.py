"""Safe checkpoints, guarded run folders, stalls and restarts (issue 11)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CIFAR10_JPEG
from distributed import run_ranks
from safetensors.torch import load_file

from subnetdp.checkpoint import CheckpointError, find_resumable, load_checkpoint, save_checkpoint
from subnetdp.files import RunFileError, atomic_write
from subnetdp.faults import TINY_RUN, run_env, signal_at_step, start_workers, worker_pid


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


def test_a_checkpoint_without_optimizer_state_is_refused_for_an_optimizer(tmp_path):
    """Loading on would restart the optimizer from scratch without a word."""
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, model, None)
    with pytest.raises(CheckpointError, match="holds no optimizer state, and this run has an optimizer"):
        load_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert load_checkpoint(tmp_path, model, None)["step"] == 1


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


# ---- the process group: a stalled rank is named ------------------------------------------------------

def _late_rank(rank: int, world: int) -> str:
    from subnetdp import supervise

    if rank == 1:
        time.sleep(6)  # stalled: arrives long after rank 0 gave up
    try:
        supervise.boundary("end of epoch 1", timeout_s=2)
    except supervise.StallError as e:
        return str(e)
    return "passed"


def test_a_rank_missing_at_a_boundary_is_named_by_rank_0():
    results = run_ranks(_late_rank, 2, timeout=60)
    assert "rank 1 stalled or died: did not arrive at the end of epoch 1 within --timeout 2 s" in results[0]["ok"]


# ---- the run folder and the main job (real data, 2 gloo processes) --------------------------------------

needs_data = pytest.mark.shared_data(CIFAR10_JPEG)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "subnetdp", "train", *TINY_RUN, *flags], capture_output=True,
                          text=True, timeout=timeout, env=run_env())


def _simulated(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return _cli("--simulate", "2", "--steps", "4", "--checkpoint-every", "2", "--out", str(out), *flags)


def _crashed_run(out: Path) -> None:
    """A run that stopped after its step-4 checkpoint and before writing its results."""
    proc = _simulated(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out / "summary.json").unlink()
    (out / "model.safetensors").unlink()


@needs_data
def test_run_folder_refusals_leave_every_file_byte_identical(tmp_path):
    out = tmp_path / "run"
    _crashed_run(out)
    before = _snapshot(out)
    refusals = [
        ((), "already holds another run's state"),  # no --resume, no --overwrite
        (("--resume", "--lr", "0.05", "--batch-size", "16"), "--batch-size 32 -> 16, --lr None -> 0.05"),
        (("--resume", "--coverage", "1.0"), "--coverage 0.5 -> 1.0"),
    ]
    for flags, message in refusals:
        proc = _simulated(out, *flags)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert _snapshot(out) == before, flags
    # a damaged metrics log (a resume trims it and appends to it): refused with the line named, nothing written
    log = out / "metrics.jsonl"
    intact = log.read_text()
    for damaged, message in [("[1]\n" + intact, "metrics.jsonl, line 1: expected a JSON object, found list"),
                             ('{"kind": "step", "step": "x"}\n' + intact, "a record with step 'x', not a number"),
                             ("{bad\n" + intact, "metrics.jsonl, line 1: not a JSON record")]:
        log.write_text(damaged)
        damaged_state = _snapshot(out)
        proc = _simulated(out, "--resume")
        assert proc.returncode != 0 and message in proc.stderr and "nothing was changed" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and _snapshot(out) == damaged_state
    log.unlink()
    log.mkdir()  # a folder in the log's place: refused on every rank too, not a traceback on the lead
    proc = _simulated(out, "--resume")
    assert proc.returncode != 0 and "Is a directory" in proc.stderr and "Traceback" not in proc.stderr
    log.rmdir()
    log.write_text(intact)
    # `latest` names a folder that is gone and no other checkpoint is intact: refuse, do not start over
    for d in (out / "checkpoints").glob("step-*"):
        (d / "manifest.json").unlink()
    (out / "checkpoints" / "latest").write_text("step-000000009\n")
    before = _snapshot(out)
    proc = _simulated(out, "--resume")
    assert proc.returncode != 0 and "no intact checkpoint" in proc.stderr and "step-000000009" in proc.stderr
    assert _snapshot(out) == before


@needs_data
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(tmp_path):
    out = tmp_path / "run"
    _crashed_run(out)
    (out / "checkpoints" / "latest").write_text("step-000000009\n")
    proc = _simulated(out, "--resume", "--log-every", "2")  # a setting that does not change the math
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "using step-000000004, the newest intact checkpoint" in proc.stdout
    assert "resumed from" in proc.stdout and json.loads((out / "summary.json").read_text())["steps"] == 4


@needs_data
def test_overwrite_replaces_the_previous_run(tmp_path):
    out = tmp_path / "run"
    _crashed_run(out)
    (out / "notes.txt").write_text("mine")  # not a run file: --overwrite leaves it
    proc = _simulated(out, "--overwrite", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2 and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000000002"]


@needs_data
def test_a_second_run_on_a_locked_folder_fails_fast_naming_the_holder(tmp_path):
    from subnetdp import rundir

    out = tmp_path / "run"
    claim = rundir.lock(out)  # as a running job holds it
    try:
        proc = _simulated(out)
        assert proc.returncode != 0 and f"is in use by another run (pid {os.getpid()}" in proc.stderr
        assert not (out / "config.json").exists()
    finally:
        claim.release()
    assert _simulated(out).returncode == 0  # a lock dies with its holder: nothing stale remains


def test_fault_helpers_find_a_rank_below_the_launcher_and_read_the_logged_step(tmp_path):
    """subnetdp.faults, which the tests below and experiments/fault_trials.py use: the worker is a grandchild of
    the launcher (the launcher runs torchrun as a child process), and only the given rank and attempt match."""
    from subnetdp.faults import steps_logged

    # launcher -> sh (as torchrun) -> sleep (as the worker; only it has the rank's environment)
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess; subprocess.run(['sh', '-c', "
                                 "'RANK=1 TORCHELASTIC_RESTART_COUNT=0 sleep 120; true'])"])
    pid = None
    try:
        deadline = time.monotonic() + 60
        while (pid := worker_pid(launcher.pid, 1)) is None and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid is not None and Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0")
        assert worker_pid(launcher.pid, 0) is None and worker_pid(launcher.pid, 1, attempt=1) is None
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()
    assert steps_logged(tmp_path) == 0  # no metrics.jsonl yet
    rows = [{"kind": "step", "step": 1}, {"kind": "step", "step": 2}, {"kind": "epoch", "step": 9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "st')
    assert steps_logged(tmp_path) == 2  # the last step row; a torn last line is ignored


def test_a_damaged_metrics_log_is_an_error_naming_its_line_and_a_torn_last_line_is_dropped(tmp_path):
    from subnetdp.metrics import read_jsonl, records_up_to

    log = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in (1, 2, 3))
    log.write_text(rows + '{"kind": "st')
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3]
    assert [r["step"] for r in records_up_to(log, 2)] == [1, 2]
    for damaged, message in [("\n{oops\n" + rows, r"metrics.jsonl, line 2: not a JSON record"),
                             (rows + "[1, 2]\n", r"metrics.jsonl, line 4: expected a JSON object, found list"),
                             (rows + '{"kind": "epoch", "step": null}\n', r"a record with step None, not a number"),
                             (rows + '{"step": true}\n', r"a record with step True, not a number")]:
        log.write_text(damaged)
        with pytest.raises(ValueError, match=message):
            records_up_to(log, 10)
    log.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match="not a readable JSON-lines log"):
        read_jsonl(log)


def _start_workers(out: Path, *flags: str) -> subprocess.Popen:
    return start_workers(out, "--steps", "8", *flags)


def _signal_rank_at_step(proc: subprocess.Popen, out: Path, step: int, sig: int) -> float:
    sent = signal_at_step(proc, out, step, sig, rank=1, timeout=240)
    assert sent is not None, f"the run ended, or rank 1's worker was not found, before step {step} (or 240 s passed)"
    return sent


@needs_data
def test_kill_a_rank_then_resume_or_restart_alone_is_bitwise_identical(tmp_path):
    straight = tmp_path / "straight"
    proc = _start_workers(straight)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    reference = load_file(straight / "model.safetensors")

    killed = tmp_path / "killed"  # no restarts: the job fails, then --resume continues it
    proc = _start_workers(killed)
    _signal_rank_at_step(proc, killed, 3, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (killed / "summary.json").exists()
    resumed = _start_workers(killed, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]

    restarted = tmp_path / "restarted"  # with restarts: the job resumes by itself
    proc = _start_workers(restarted, "--max-restarts", "2")
    _signal_rank_at_step(proc, restarted, 5, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out
    for run in (killed, restarted):
        model = load_file(run / "model.safetensors")
        assert model.keys() == reference.keys()
        for k in reference:
            assert torch.equal(model[k], reference[k]), (run.name, k)
        assert json.loads((run / "summary.json").read_text())["steps"] == 8


@needs_data
def test_a_stalled_rank_ends_the_run_naming_it_within_the_timeout(tmp_path):
    out = tmp_path / "stalled"
    proc = _start_workers(out, "--timeout", "5", "--steps", "200")
    stopped_at = _signal_rank_at_step(proc, out, 2, signal.SIGSTOP)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        pid = worker_pid(proc.pid, 1)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    waited = time.monotonic() - stopped_at
    assert proc.returncode != 0
    assert "rank 1 stalled or died" in err, err[-3000:]
    assert waited < 5 + 30 + 30  # the timeout, the probe (at most 30 s) and torchrun's teardown


@needs_data
def test_a_full_disk_ends_the_run_with_one_line_naming_the_file(tmp_path, monkeypatch):
    import subnetdp.train as train_module
    from subnetdp.cli import main

    real = train_module.atomic_write

    def full_at_summary(path, data):
        if Path(path).name == "summary.json":
            return real(path, lambda f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        return real(path, data)

    monkeypatch.setattr(train_module, "atomic_write", full_at_summary)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY_RUN, "--simulate", "2", "--steps", "1", "--out", str(out)])
    message = str(info.value.code)
    assert f"cannot write {out / 'summary.json'}: no space left" in message and len(message.splitlines()) == 1
    assert not list(out.glob(".*.tmp*")) and not (out / "summary.json").exists()


# ---- the --workers launcher's life (issue 19 item 2) ----------------------------------------------------

def _run_processes(launcher: int) -> list[int]:
    """torchrun and every rank below ``launcher``, found now (they die with it, so look before signalling)."""
    from subnetdp.launch import _children

    found, todo = [], [launcher]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _proc_file(pid: int, name: str) -> bytes:
    """``/proc/PID/NAME``, or nothing if the process is gone (it can exit between listing and reading)."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def _torchrun_started(launcher: int) -> bool:
    """Whether the launcher has started torchrun (not just a helper process of an import)."""
    from subnetdp.supervise import TORCHRUN

    return any(TORCHRUN.encode() in _proc_file(p, "cmdline") for p in _run_processes(launcher))


def _gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_running(p) for p in pids)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (its state follows the command name's closing parenthesis)."""
    stat = _proc_file(pid, "stat")
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def _at_step(proc: subprocess.Popen, out: Path, step: int) -> list[int]:
    """Wait until the run has logged ``step`` and both ranks exist; its processes below the launcher."""
    from subnetdp.faults import steps_logged

    deadline = time.monotonic() + 240
    while (steps_logged(out) < step or worker_pid(proc.pid, 1) is None) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    return _run_processes(proc.pid)


@needs_data
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_to_the_launcher_stops_every_rank_at_a_step_boundary(tmp_path, sig):
    out = tmp_path / "run"
    proc = _start_workers(out, "--steps", "400")
    processes = _at_step(proc, out, 2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert len([x for x in stdout.splitlines() if x.startswith("interrupted:")]) == 1
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert _gone(processes, 10), "a rank outlived its launcher"
    assert (out / "checkpoints" / "latest").exists() and not (out / "summary.json").exists()


@needs_data
def test_a_launcher_killed_by_sigkill_takes_its_ranks_along_and_the_folder_stays_locked_meanwhile(tmp_path):
    from subnetdp import rundir

    out = tmp_path / "run"
    proc = _start_workers(out, "--steps", "400")
    processes = _at_step(proc, out, 2)
    proc.kill()
    proc.wait()
    with pytest.raises(SystemExit, match="is in use by another run"):  # its ranks still hold the folder
        rundir.lock(out)
    assert _gone(processes, 60), "torchrun or a rank outlived a launcher killed by SIGKILL"
    proc.communicate(timeout=10)
    rundir.lock(out).release()  # every process of the run is gone: so is the lock
    assert (out / "checkpoints" / "latest").exists()


@needs_data
def test_ctrl_c_before_the_ranks_exist_stops_the_run_at_its_first_step(tmp_path):
    out = tmp_path / "run"
    proc = _start_workers(out, "--steps", "400")
    deadline = time.monotonic() + 120
    while not _torchrun_started(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # torchrun has started; its ranks are still importing torch
    assert worker_pid(proc.pid, 0) is None or worker_pid(proc.pid, 1) is None
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted: stopped after step 1 of 400" in stdout, stdout[-2000:] + stderr[-2000:]
    assert not (out / "summary.json").exists()


def test_a_launchers_ranks_share_its_folder_lock_so_it_outlives_the_launcher(tmp_path, monkeypatch):
    from subnetdp import rundir

    out = tmp_path / "run"
    launcher = rundir.lock(out)
    launcher.share()
    monkeypatch.setenv(rundir.OWNER_ENV, launcher.token)
    rank = rundir.lock(out)  # a rank of this launch: a shared claim beside the launcher's
    monkeypatch.delenv(rundir.OWNER_ENV)
    launcher.release()  # as a launcher killed by SIGKILL
    with pytest.raises(SystemExit, match="is in use by another run"):
        rundir.lock(out)
    rank.release()
    rundir.lock(out).release()


# ---- no code run, no write or delete outside the run's own files (issue 19 items 3, 4, 5) -----------------

def test_evaluate_imports_a_run_folders_model_only_when_the_command_line_says_so(tmp_path, monkeypatch, capsys):
    from subnetdp.cli import main
    from subnetdp.data.text import write_token_file

    write_token_file(list(range(50)) * 40, tmp_path / "ok.bin", vocab_size=50)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "planted_eval:build", "dataset": str(tmp_path / "ok.bin"),
                                                 "seq_len": 8, "batch_size": 2}))
    (run / "model.safetensors").write_bytes(b"\0" * 64)
    (run / "planted_eval.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n"
                                         "import torch\ndef build(**kw):\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(run))
    assert main(["evaluate", str(run)]) == 2 and not (tmp_path / "RAN").exists()
    assert "--trust-run-code" in capsys.readouterr().err
    for flags in (["--model", "planted_eval:build"], ["--trust-run-code"]):  # the user says so: it runs
        assert main(["evaluate", str(run), *flags]) == 2  # ... and then the damaged weights are named
        assert (tmp_path / "RAN").exists() and "not a readable safetensors file" in capsys.readouterr().err


def test_atomic_write_never_writes_through_a_planted_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's file")
    run = tmp_path / "run"
    run.mkdir()
    for pid in range(os.getpid() - 5, os.getpid() + 5):  # the temporaries' old, predictable names
        (run / f".summary.json.tmp{pid}").symlink_to(outside)
    (run / "config.json").symlink_to(outside)  # the target's own name
    atomic_write(run / "summary.json", "{}")
    atomic_write(run / "config.json", "{}")
    assert outside.read_text() == "someone else's file"
    assert (run / "config.json").read_text() == "{}" and not (run / "config.json").is_symlink()
    assert len(list(run.glob(".*.tmp*"))) == 10  # the planted links only: none of ours is left


def test_report_out_never_writes_through_a_planted_link(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from subnetdp.cli import main

    outside = tmp_path / "outside.md"
    outside.write_text("someone else's file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "strategy": "ddp", "model": "m", "dataset": "d", "workers": 2, "simulated": False, "final": {"test_acc": 0.5},
        "params_per_worker": None, "full_params": 1, "model_state_bytes_per_worker": [1],
        "peak_memory_per_process": [{"peak_rss_bytes": 1}], "comm_bytes_per_step_per_worker": [None], "steps": 1,
        "wall_s": 1.0}))
    report = tmp_path / "report"
    report.mkdir()
    for name in ("report.md", "curves.png", "accuracy_vs_memory.png"):
        (report / name).symlink_to(outside)
    assert main(["report", str(run), "--out", str(report)]) == 0
    assert outside.read_text() == "someone else's file" and not (report / "report.md").is_symlink()


def _model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(2, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_rotation_deletes_only_the_step_folders_this_run_wrote(tmp_path):
    root = tmp_path / "checkpoints"
    model, opt = _model_and_opt()
    save_checkpoint(root, 1, model, opt)
    (root / "step-000000001-good").mkdir()  # a user's copy
    (root / "step-000000001-good" / "rank-00000.pt").write_bytes(b"mine")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "step-000000000").mkdir(parents=True)
    (root / "step-000000000").symlink_to(elsewhere / "step-000000000")  # a link named like a checkpoint
    (root / "step-000000002").mkdir()  # no manifest: not a checkpoint this run completed
    for step in (3, 4, 5):
        save_checkpoint(root, step, model, opt, keep=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step-000000000", "step-000000001-good", "step-000000002", "step-000000004",
                     "step-000000005"]
    assert (elsewhere / "step-000000000").is_dir() and (root / "step-000000001-good" / "rank-00000.pt").exists()


def test_latest_cannot_name_a_folder_outside_the_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    model, opt = _model_and_opt()
    save_checkpoint(root, 1, model, opt)
    (tmp_path / "step-000000009").mkdir()
    (root / "latest").write_text("../step-000000009\n")
    found, skipped = find_resumable(root)
    assert found == root / "step-000000001" and "does not name a step-NNNNNNNNN folder" in skipped[0]


@needs_data
def test_a_symlinked_checkpoints_folder_is_refused_and_overwrite_removes_only_run_files(tmp_path):
    elsewhere = tmp_path / "other-project" / "checkpoints"
    (elsewhere / "step-000000001").mkdir(parents=True)
    (elsewhere / "step-000000001" / "manifest.json").write_text('{"step": 1}')
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    for flags in ((), ("--overwrite",), ("--resume",)):
        proc = _simulated(out, *flags)
        assert proc.returncode != 0 and "checkpoints is a symbolic link" in proc.stderr, proc.stderr[-2000:]
        assert (elsewhere / "step-000000001" / "manifest.json").exists()
    (out / "checkpoints").unlink()
    _crashed_run(out)
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "checkpoints" / "step-000000002-good").mkdir()
    proc = _simulated(out, "--overwrite", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "notes.txt", "step-000000002",
                                                                       "step-000000002-good"]


# ---- agreement after a resume (issue 19 item 6) ---------------------------------------------------------

def _replace_rank_file(step_dir: Path, rank: int, blob: bytes) -> None:
    """Put ``blob`` in as ``rank``'s file and edit the manifest to match, as an attacker would."""
    name = f"rank-{rank:05d}.pt"
    (step_dir / name).write_bytes(blob)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@needs_data
def test_rank_files_from_different_steps_are_refused_after_loading(tmp_path):
    import io

    out = tmp_path / "run"
    proc = _start_workers(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    (out / "summary.json").unlink()
    old, new = out / "checkpoints" / "step-000000007", out / "checkpoints" / "step-000000008"
    cases = []
    cases.append(((old / "rank-00001.pt").read_bytes(), "holds rank 1 at step 7, not rank 1 at the step"))
    edited = torch.load(old / "rank-00001.pt", weights_only=True)  # step and loop state made to match step 8
    edited.update(step=8, extra=torch.load(new / "rank-00001.pt", weights_only=True)["extra"])
    buffer = io.BytesIO()
    torch.save(edited, buffer)
    cases.append((buffer.getvalue(), "the holders' values differ"))
    original = (new / "rank-00001.pt").read_bytes()
    for blob, message in cases:
        _replace_rank_file(new, 1, blob)
        resumed = _start_workers(out, "--resume")
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode != 0 and message in err, err[-3000:]
        assert "Traceback" not in err and not (out / "summary.json").exists()
    _replace_rank_file(new, 1, original)  # the untouched checkpoint still resumes
    resumed = _start_workers(out, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]


# ---- what a resume cannot see in config.json (issue 19 item 8) -----------------------------------------------
def test_a_resume_on_other_data_is_refused_and_another_thread_count_is_said(tmp_path, capsys):
    """--data-dir may point elsewhere and a text file may change under the same name: the run's data digest,
    saved with every checkpoint, must match. Another thread count only loses bitwise equality: it is said."""
    from subnetdp.cli import main

    threads = torch.get_num_threads()
    try:
        _resume_other_data_and_threads(tmp_path, capsys, main)
    finally:
        torch.set_num_threads(threads)


def _resume_other_data_and_threads(tmp_path, capsys, main) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "run"
    base = ["train", "--model", "llama_tiny", "--dataset", str(text), "--simulate", "2", "--seq-len", "32",
            "--batch-size", "4", "--schedule", "constant", "--warmup", "0", "--checkpoint-every", "1",
            "--no-progress", "--eval-every", "0", "--out", str(out)]
    assert main([*base, "--steps", "2", "--threads", "1"]) == 0
    assert main([*base, "--steps", "3", "--threads", "2", "--resume"]) == 0
    assert "not bitwise equal to an uninterrupted run" in capsys.readouterr().out
    text.write_text("the lazy dog jumps over the quick brown fox. " * 400)  # the same characters, another text
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".owner" not in p.name}
    with pytest.raises(SystemExit, match="the training data differ from the run's"):
        main([*base, "--steps", "4", "--threads", "2", "--resume"])
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".owner" not in p.name}
