"""The main job: train with one strategy, log, checkpoint, assemble and evaluate the full model.

Runs as one worker per process under ``torchrun``, as K workers in one process (``--simulate K``),
or starts K local processes itself through torchrun's launcher (``--workers K``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from subnetdp import optimizers, rundir, supervise
from subnetdp.strategies import Distributed, SimulatedSDP, autocast_for
from subnetdp.checkpoint import CheckpointError, find_resumable, load_checkpoint, save_checkpoint
from subnetdp.files import RunFileError, atomic_write
from subnetdp.consistency import HolderDivergenceError
from subnetdp.config import TrainConfig, from_values, validate, world_size_of
from subnetdp.evaluation import evaluation_model
from subnetdp.init import materialize
from subnetdp.launch import LAUNCHED, launch_local
from subnetdp.metrics import MetricsLog, format_bytes, records_up_to
from subnetdp.planning import (ActivationProfile, Plan, main_job_plan, predict_sharded_worker, predict_worker,
                               storage_summary)
from subnetdp.report import summary_text
from subnetdp.tasks import make_task


def _device(cfg: TrainConfig) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _peak_memory(device: torch.device) -> dict[str, int]:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


class _StopRequest:
    """Ctrl-C (SIGINT), SIGTERM or the ``--workers`` launcher's stop file as a request to stop at the
    next step boundary.

    The handler only sets a flag: the step in progress (every simulated worker's forward, backward
    and optimizer step, or this rank's) finishes, then the loop saves a checkpoint and returns, so
    the saved state is one the uninterrupted run also passes through. A second Ctrl-C stops at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped = False
        self._previous: dict[int, Any] = {}
        self._file = Path(os.environ[supervise.STOP_ENV]) if os.environ.get(supervise.STOP_ENV) else None

    def poll(self) -> bool:
        """Whether a stop was asked for: a signal to this process, or the launcher's stop file."""
        if not self.requested and self._file is not None and self._file.exists():
            self.requested = True
        return self.requested

    def _handle(self, sig: int, _frame: object) -> None:
        if self.requested and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopRequest":
        import threading

        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(cfg: TrainConfig, argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the main job; returns the summary on the process that writes it (else None)."""
    validate(cfg)
    if supervise.restart_count() > 0:  # torchrun restarted the processes: continue this run, never replace it
        cfg = dataclasses.replace(cfg, resume=True, overwrite=False)
    if cfg.workers and "WORLD_SIZE" not in os.environ:
        code = launch_local(cfg, argv if argv is not None else sys.argv[2:])
        if code == 130:
            raise SystemExit(130)
        if code != 0:  # the failing rank's one line (or torchrun's, for a killed rank) is the last one printed
            raise SystemExit(code)
        summary = Path(cfg.run_dir()) / "summary.json"
        return json.loads(summary.read_text()) if summary.exists() else None
    distributed = "WORLD_SIZE" in os.environ and not cfg.simulate
    if distributed and os.environ.get(LAUNCHED):
        supervise.die_with_parent()  # torchrun's death (its launcher's SIGKILL) stops this rank too
    device = _device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if distributed and not dist.is_initialized():
        supervise.start("nccl" if device.type == "cuda" else "gloo", cfg.timeout)
    claim = None
    try:
        claim = _claim_run_dir(cfg, distributed)
        with _StopRequest() as stop:
            job = Run(cfg, device, distributed, stop)
            job.setup()
            result = job.train()
        supervise.boundary("end of the run")  # every rank leaves together: gloo can abort when a peer tears down early
        if stop.stopped:
            raise SystemExit(0 if os.environ.get(LAUNCHED) else 130)
        return result
    except (supervise.StallError, RunFileError) as e:  # one line: who stalled, or which file the full disk refused
        raise SystemExit(str(e)) from None
    finally:
        if claim is not None:
            claim.release()
        if distributed:
            supervise.stop()


def _claim_run_dir(cfg: TrainConfig, distributed: bool) -> rundir.RunLock | None:
    """Lock the run folder and check that this run may start there; every rank stops together, or none.

    The lead locks and admits; under the ``--workers`` launcher, which locked and admitted the folder once
    for the whole job, every rank joins its lock (shared), so the folder stays locked while any process
    of the run can write.
    """
    lead = not distributed or dist.get_rank() == 0
    claim, problem = None, None
    launched = bool(os.environ.get(LAUNCHED))
    if lead or launched:
        try:
            claim = rundir.lock(cfg.run_dir())
            if lead and not launched:  # the launcher admitted the whole job, before any rank started
                problem = rundir.admit(cfg, cfg.run_dir())
        except SystemExit as e:
            problem = str(e.code)
    if distributed:
        shared: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(shared, problem)
        problem = next((p for p in shared if p), None)
    if problem:
        if claim is not None:
            claim.release()
        raise SystemExit(problem)
    return claim


class Run:
    """One run of the main job in this process: what the loop needs, set up once, and its steps.

    ``setup()`` builds the task, plan and strategy, resumes from the newest checkpoint and writes the
    run's config; ``step(batches, started)`` trains one step on every worker here and logs it;
    ``end_epoch()`` logs the epoch and evaluates when due; ``evaluate()`` assembles and evaluates the
    full model; ``finish()`` writes the summary and the models. ``train()`` is the loop over them.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, distributed: bool, stop: _StopRequest) -> None:
        self.cfg, self.device, self.distributed, self.stop = cfg, device, distributed, stop
        self.rank = dist.get_rank() if distributed else 0
        self.world = world_size_of(cfg)
        if distributed and self.world != dist.get_world_size():
            raise SystemExit(f"WORLD_SIZE says {self.world} but the process group has {dist.get_world_size()} ranks")
        self.lead = self.rank == 0
        self.out = cfg.run_dir()
        self.ckpt_dir = self.out / "checkpoints"
        self.global_step = 0
        self.progress = _new_progress()
        self.plan: Plan | None = None
        self.profile: ActivationProfile | None = None
        self.last_eval: dict[str, Any] = {}
        self.model_state: dict[str, torch.Tensor] | None = None  # the evaluated model (conventions applied)
        self.evaluated_final = False

    # ---- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Task, plan, strategy and data streams; resume; the run's config and plan files; the header."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.task = make_task(cfg, self.device)
        self.factory = self.task.model_factory()
        self.steps_per_epoch = self.task.steps_per_epoch(self.world)
        self.total = total_steps(cfg, self.steps_per_epoch)
        self.n_epochs = math.ceil(self.total / self.steps_per_epoch)
        if cfg.strategy == "sdp":
            self.plan, self.profile = self._make_plan()
        strategy = SimulatedSDP if cfg.simulate else Distributed
        self.strategy = strategy(cfg, self.factory, self.plan, self.device, self.total)
        ranks_here = list(range(self.world)) if cfg.simulate else [self.rank]
        self.loaders = [self.task.loader(k, self.world) for k in ranks_here]
        self.autocast = autocast_for(cfg, self.device)
        self.progress["data"] = self.task.data_identity()
        self.progress["threads"] = torch.get_num_threads()
        self._resume()
        if self.lead:  # only now: a refused resume leaves the run's files as they were
            cfg.save(self.out / "config.json")
            if self.plan is not None:
                atomic_write(self.out / "plan.json", self.plan.to_json())
                atomic_write(self.out / "plan.txt", storage_summary(self.plan, _opt_name(cfg), self._storage()) + "\n")
        self.log = MetricsLog(self.out, enabled=self.lead, resume_from_step=self.global_step)
        if self.lead:
            self._print_header()
        self.start_time = time.perf_counter() - self.progress["wall_s"]  # wall time and samples cover the whole run

    def _make_plan(self) -> tuple[Plan, ActivationProfile | None]:
        """The run's plan, balanced on predicted memory (``--balance memory``) or on parameter counts, and
        with memory balance the activation profile behind it (also the summary's predicted peak per worker).

        The profile is the full model's saved activations, measured once on the CPU on two samples of the
        training data (scaled to ``--batch-size``), so every rank derives the same plan.
        """
        cfg, task = self.cfg, self.task
        sample = None
        if cfg.balance == "memory":
            with torch.random.fork_rng(devices=[]):  # drawing the sample leaves the training's random streams alone
                batch = next(task.epoch_batches(task.loader(0, self.world), 10_000, 0))
            sample = tuple(t[:2].cpu() for t in batch)
        return main_job_plan(self.factory, self.world, cfg.coverage, cfg.level, cfg.seed, balance=cfg.balance,
                             transitions=cfg.transitions, optimizer=_opt_name(cfg), batch_size=cfg.batch_size,
                             activation_checkpointing=cfg.recomputes_blocks, masking=cfg.masking,
                             sample=sample, loss_fn=task.loss, sharding=cfg.sharding)

    def _resume(self) -> None:
        """Continue from the newest intact checkpoint under ``--resume`` (or a restart), on every rank."""
        source = self._resume_point()
        if source is not None:
            data, threads = self.progress["data"], self.progress["threads"]
            payload = self._load_everywhere(self.ckpt_dir / source)
            self._check_resumed_settings(data, threads)
            self.global_step = payload["step"]
            if self.lead:
                print(f"resumed from {self.ckpt_dir / source} at step {self.global_step}")
        elif self.cfg.resume and self.lead:
            print(f"--resume: no checkpoint under {self.ckpt_dir}; starting from step 0")

    def _check_resumed_settings(self, data: str, threads: int) -> None:
        """What the config cannot show: the same data (``--data-dir`` may point elsewhere, a file may have
        changed), refused when it differs; and the thread count, said when it differs (the run continues,
        but CPU sums depend on it, so it is no longer bitwise equal to an uninterrupted run)."""
        saved_data, saved_threads = self.progress.get("data"), self.progress.get("threads")
        self.progress.update(data=data, threads=threads)
        if saved_data is not None and saved_data != data:
            raise SystemExit(f"--resume: the training data differ from the run's (--dataset {self.cfg.dataset}, "
                             f"--data-dir {self.cfg.data_dir}; digest {data}, the run's {saved_data}): resume on "
                             "the run's own data, or start a new run with another --out")
        if saved_threads is not None and saved_threads != threads and self.lead:
            print(f"--resume: {threads} CPU threads per process, the run had {saved_threads} (--threads): it continues, "
                  "but CPU sums depend on the thread count, so it is not bitwise equal to an uninterrupted run")

    def _resume_point(self) -> str | None:
        """The step directory to resume from (the newest intact one), agreed by every rank; None: from step 0.

        Refuses (SystemExit on every rank, nothing written) when a checkpoint was completed once but none
        is intact now: starting over would overwrite the run.
        """
        choice: list[str | None] = [None, None]  # step directory, problem
        if self.lead and self.cfg.resume:
            found, skipped = find_resumable(self.ckpt_dir)
            try:  # the log a resume trims and appends to: a damaged one stops every rank, nothing written
                records_up_to(self.out / "metrics.jsonl", math.inf)
            except (ValueError, OSError) as e:  # OSError: a folder or unreadable file in its place
                choice[1] = f"--resume: {e}; nothing was changed"
            if found is not None:
                choice[0] = found.name
                if skipped:
                    print(f"--resume: using {found.name}, the newest intact checkpoint; skipped: {'; '.join(skipped)}")
            elif skipped and (self.ckpt_dir / "latest").exists():
                choice[1] = (f"--resume: no intact checkpoint under {self.ckpt_dir} ({'; '.join(skipped)}); nothing "
                             "was changed. Restore the checkpoint, or start over with --overwrite")
        if self.distributed:
            dist.broadcast_object_list(choice, src=0)
        if choice[1]:
            raise SystemExit(choice[1])
        return choice[0]

    def _load_everywhere(self, step_dir: Path) -> dict[str, Any]:
        """Load ``step_dir`` on every rank; if any rank cannot, every rank stops with its message."""
        payload, problem = None, None
        try:
            payload = load_checkpoint(step_dir.parent, self.strategy.model, self.strategy.optimizer, self.plan,
                                      step_dir=step_dir)
            self.strategy.load_state_dict(payload["extra"]["backend"])
            self.progress.update(payload["extra"].get("progress", {}))
        except CheckpointError as e:
            problem = str(e)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:  # a tampered 'extra'
            problem = f"{step_dir}: its saved loop state does not fit this run ({type(e).__name__}: {e})"
        if self.distributed:
            problems: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)
            problem = next((p for p in problems if p), None)
        if problem:
            raise SystemExit(f"--resume: {problem}")
        assert payload is not None
        if self.distributed:
            self._check_agreement(step_dir, payload)
        return payload

    def _check_agreement(self, step_dir: Path, payload: dict[str, Any]) -> None:
        """After loading, every rank must be at the same step with the same loop state, and the holders of
        each parameter must hold equal values (the engine's exact checksum per holder set): rank files
        from different steps, with a manifest edited to match, would otherwise train on, diverged."""
        fix = "they come from different checkpoints: restore the folder, or start over with --overwrite"
        mine = (payload["step"], self.strategy.scheduler.last_epoch, self.progress["samples"])
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) > 1:
            steps = ", ".join(f"rank {r}: step {e[0]}, schedule step {e[1]}" for r, e in enumerate(everyone))
            raise SystemExit(f"--resume: the rank files of {step_dir} disagree ({steps}); {fix}")
        if self.strategy.trained is not None:
            try:
                self.strategy.trained.check_synced_holders(f"--resume from {step_dir}")  # --sync params: not between averages
            except HolderDivergenceError as e:
                raise SystemExit(f"--resume: after loading {step_dir} the holders' values differ ({e.summary}); {fix}") from None

    def _print_header(self) -> None:
        cfg, plan = self.cfg, self.plan
        mode = f"simulated in one process ({self.world} workers)" if cfg.simulate else f"{self.world} process(es)"
        what = (f"SDP level={plan.level} C={plan.coverage:g} masking={cfg.masking}" if plan is not None
                else cfg.strategy.upper())
        if cfg.recomputes_blocks and cfg.strategy != "ddp-ckpt":
            what += " + activation checkpointing"
        if plan is not None and cfg.sharding == "holders":
            what += (" + sharding over holders (simulated unsharded: the same math)" if cfg.simulate
                     else " + sharding over holders (FSDP2)")
        print(f"subnetdp train: {what} | {cfg.model} on {cfg.dataset} | {mode} on {self.device} | "
              f"{self.total} steps in {self.n_epochs} epoch(s), batch {cfg.batch_size}/worker | run dir {self.out}")
        if plan is not None:
            fr = plan.param_fractions()
            print(f"plan: {len(plan.units)} units, r={plan.holders_per_unit}, params per worker "
                  f"{min(fr):.3f}-{max(fr):.3f} of {plan.total_params:,} (spread {plan.spread():.3f})")

    # ---- the loop ----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any] | None:
        """Epochs of steps until the last step, or a stop request (then None after a checkpoint);
        returns the summary on the process that writes it."""
        try:
            while self.global_step < self.total:
                self._epoch()
                if self.stop.stopped:  # after the epoch's end, if this step ended one: a state the full run passes through
                    self.save()
                    self.log.close()
                    if self.lead:
                        print(f"interrupted: stopped after step {self.global_step} of {self.total} and saved a "
                              "checkpoint; continue with the same command and --resume")
                    return None
        except RuntimeError as e:
            if self.distributed and supervise.is_transport_error(e):  # a peer stopped mid-step or mid-save: which?
                supervise.name_missing(f"step {self.global_step + 1}", e)
            raise
        return self.finish()

    def _epoch(self) -> None:
        """The rest of the current epoch (all of it unless resumed inside it), then its end if reached."""
        cfg = self.cfg
        epoch, offset = divmod(self.global_step, self.steps_per_epoch)
        streams = [self.task.epoch_batches(ld, epoch, offset) for ld in self.loaders]
        n_in_epoch = min(self.steps_per_epoch - offset, self.total - self.global_step)
        self.bar = tqdm(total=n_in_epoch, desc=f"epoch {epoch + 1}/{self.n_epochs}",
                        disable=not (cfg.progress and self.lead), dynamic_ncols=True, leave=True, file=sys.stdout)
        if offset == 0:
            self.progress["sums"].update(loss=0.0, correct=0.0, count=0.0, n=0, time_s=0.0)
        for _ in range(n_in_epoch):
            started = time.perf_counter()
            stop_requested = self.step([next(s) for s in streams], started)
            if stop_requested and self.global_step < self.total:
                self.stop.stopped = True  # every process saw the same vote: all leave at this step
                break
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 and self.global_step < self.total:
                self.save()
        self.bar.close()
        if self.global_step % self.steps_per_epoch == 0 or self.global_step == self.total:
            self.end_epoch()

    def step(self, batches: list[Any], started: float) -> bool:
        """One optimizer step of every worker here on its batch; logs it and adds it to the epoch's sums.

        ``started`` is when fetching the batches began (the epoch's ``time_s`` counts from there).
        Returns whether any process was asked to stop (all agree: the vote rides on the step's all-reduce).
        """
        task, sums = self.task, self.progress["sums"]
        t0 = time.perf_counter()
        metrics = self.strategy.train_step(batches, task.loss, self.autocast)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.global_step += 1
        # every worker's figures, and whether any process was asked to stop (one small all-reduce)
        totals = [sum(m["loss"] for m in metrics), float(len(metrics)), float(sum(len(b[0]) for b in batches)),
                  float(self.stop.poll()), *(sum(m[k] for m in metrics) for k in task.summed_metrics)]
        if self.distributed:
            t = torch.tensor(totals, dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            totals = t.tolist()
        loss_sum, workers_n, n, stop_votes, *summed = totals
        loss = loss_sum / workers_n
        self.progress["samples"] += n
        sums["loss"] += loss
        sums["n"] += 1
        sums["time_s"] += time.perf_counter() - started
        for k, v in zip(task.summed_metrics, summed):
            sums[k] += v
        running = task.running_metrics(sums)
        record = {"step": self.global_step, "epoch": (self.global_step - 1) // self.steps_per_epoch + 1, "loss": loss,
                  "lr": self.strategy.lr, "samples_per_s": n / dt, "step_time_s": dt, **running}
        if self.global_step % self.cfg.log_every == 0 or self.global_step == self.total:
            self.log.step(record)
        mem = _peak_memory(self.device)
        self.bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in running.items()}, sps=f"{n / dt:.0f}",
                             mem=format_bytes(mem.get("peak_device_bytes", mem["peak_rss_bytes"])))
        self.bar.update(1)
        return stop_votes > 0

    def end_epoch(self) -> None:
        """Log the epoch's training metrics; evaluate when due; checkpoint unless the run ends here."""
        cfg, step, sums = self.cfg, self.global_step, self.progress["sums"]
        ep = math.ceil(step / self.steps_per_epoch)
        supervise.boundary(f"end of epoch {ep}")
        row: dict[str, Any] = {"epoch": ep, "step": step, "train_loss": sums["loss"] / max(sums["n"], 1),
                               "time_s": sums["time_s"], **_peak_memory(self.device)}
        row.update({f"train_{k}": v for k, v in self.task.running_metrics(sums).items()})
        if (cfg.eval_every and ep % cfg.eval_every == 0) or step == self.total:
            self.evaluate()
            self.evaluated_final = step == self.total
            row.update({k: v for k, v in self.last_eval.items() if k != "evaluation"})
        self.log.epoch(row)
        self.progress["epochs"].append({k: v for k, v in row.items() if k in _EPOCH_KEYS})
        if self.lead:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
                     if k in ("train_loss", "train_acc", "test_acc", "test_loss", "val_loss", "val_ppl")}
            print(f"epoch {ep}: {shown}")
        if step < self.total and not cfg.checkpoint_every and not self.stop.stopped:
            self.save()

    def evaluate(self) -> None:
        """Assemble the full model (a collective) and, on the lead, evaluate it with the conventions applied.

        SDP's model is :func:`subnetdp.evaluation_model`'s, what a library user gets; DDP's and FSDP2's is
        the model as trained. Sets ``last_eval`` (the metrics, with the conventions under ``evaluation``)
        and ``model_state``, the evaluated model that ``model.safetensors`` holds; other processes keep
        their ``last_eval``.
        """
        cfg = self.cfg
        if self.plan is None:
            state = self.strategy.full_state_dict()
            model = None
            if state is not None:
                model = materialize(self.factory, seed=cfg.seed, device=self.device, init=cfg.init)
                model.load_state_dict(state)
                model.evaluation_conventions = {"residual_scaling": False, "bn_recalibrate": 0}
        else:
            model = evaluation_model(self.strategy.trained, self.task.calibration_batches(cfg.bn_recalibrate),
                                     residual_scaling=cfg.residual_scaling, recalibrate=cfg.bn_recalibrate > 0,
                                     device=self.device)
        if model is None:
            self.model_state = None
            return
        result: dict[str, Any] = dict(self.task.evaluate(model, self.autocast))
        result["evaluation"] = model.evaluation_conventions
        self.last_eval = result
        self.model_state = {k: v.detach() for k, v in model.state_dict().items()}

    def save(self) -> None:
        """A checkpoint at the current step, with what the summary needs from the steps so far."""
        self.progress["wall_s"] = time.perf_counter() - self.start_time
        supervise.boundary(f"checkpoint at step {self.global_step}")
        save_checkpoint(self.ckpt_dir, self.global_step, self.strategy.model, self.strategy.optimizer, self.plan,
                        extra={"backend": self.strategy.state_dict(), "progress": self.progress})

    # ---- the end -----------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any] | None:
        """Last checkpoint, final evaluation (unless the last epoch's was), summary and models."""
        self.save()
        wall = self.progress["wall_s"]
        if not self.evaluated_final:  # e.g. resuming a run that had already reached its last step (same on every rank)
            self.evaluate()
        raw_state = self.strategy.full_state_dict()  # the assembled state as trained (a collective, a pure read)
        summary = self._summary(wall)
        summary["predicted_peak_bytes_per_worker"] = self._predicted_peaks()
        if not self.lead:
            self.log.close()
            return None
        _save_models(self.model_state, raw_state, self.out)
        atomic_write(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.log.close()
        print(summary_text(summary, self.out))
        return summary

    def _summary(self, wall: float) -> dict[str, Any]:
        cfg, plan, progress = self.cfg, self.plan, self.progress
        memory = self.strategy.memory()
        comm = self.strategy.comm_bytes_per_step()
        peak = _peak_memory(self.device)
        if self.distributed:  # gather every rank's figures on rank 0
            mine = {"memory": memory[0], "comm": comm[0], "peak": peak}
            everyone: list[Any] = [None] * self.world
            dist.all_gather_object(everyone, mine)
            memory = [e["memory"] for e in everyone]
            comm = [e["comm"] for e in everyone]
            peaks = [e["peak"] for e in everyone]
        else:
            peaks = [peak]
        final = {k: v for k, v in self.last_eval.items() if k != "evaluation"}
        epochs = progress["epochs"]
        return {
            "strategy": cfg.strategy, "level": plan.level if plan is not None else None,
            "activation_checkpointing": cfg.recomputes_blocks,
            "coverage": plan.coverage if plan is not None else 1.0, "model": cfg.model, "width": cfg.width,
            "masking": cfg.masking if plan is not None else None,
            "sharding": cfg.sharding if plan is not None else None,
            "dataset": "CIFAR-10 (JPEG)" if cfg.dataset == "cifar10-jpeg" else cfg.dataset,
            "workers": self.world, "simulated": bool(cfg.simulate), "device": str(self.device),
            # steps, wall time, samples and epoch means cover the whole run, also across --resume
            "steps": self.global_step, "wall_s": wall,
            "samples_per_s": progress["samples"] / wall if wall > 0 else None,
            "final": final,
            "epochs": epochs,
            "train_loss_mean": sum(e["train_loss"] for e in epochs) / len(epochs) if epochs else None,
            # the conventions "final" was evaluated with; model.safetensors holds the model with them applied,
            # model_raw.safetensors the assembled state without them (see docs/evaluation.md)
            "evaluation": self.last_eval.get("evaluation", {"residual_scaling": False, "bn_recalibrate": 0}),
            "params_per_worker": plan.param_counts() if plan is not None else None,
            "full_params": plan.total_params if plan is not None else None,
            "model_state_bytes_per_worker": [sum(m.values()) for m in memory],
            "memory_per_worker": memory,
            "comm_bytes_per_step_per_worker": comm,
            "peak_memory_per_process": peaks,
        }

    def _storage(self) -> str:
        """How this run stores its units' state: ``--simulate`` computes the sharded math unsharded."""
        return "none" if self.cfg.simulate else self.cfg.sharding

    def _predicted_peaks(self) -> list[int] | None:
        """The planner's predicted peak per worker (state + saved activations + transient, fp32), for forward
        masking; a run simulated in one process has no per-worker measured peak, so reports use these."""
        plan, profile, cfg = self.plan, self.profile, self.cfg
        if plan is None or profile is None or cfg.masking != "forward":
            return None
        if self._storage() == "holders":  # each unit's state split over its holders (FSDP2)
            return [predict_sharded_worker(plan, k, _opt_name(cfg), profile, cfg.batch_size,
                                           cfg.recomputes_blocks)["peak_bytes"] for k in range(plan.workers)]
        return [predict_worker(plan, k, _opt_name(cfg), profile, cfg.batch_size,
                               activation_checkpointing=cfg.recomputes_blocks)["peak_bytes"]
                for k in range(plan.workers)]


_EPOCH_KEYS = ("epoch", "step", "train_loss", "train_acc", "time_s")


def _new_progress() -> dict[str, Any]:
    """What the summary needs from the steps before a resume: saved with every checkpoint."""
    return {"wall_s": 0.0, "samples": 0.0, "epochs": [],
            "sums": {"loss": 0.0, "correct": 0.0, "count": 0.0, "n": 0, "time_s": 0.0}}


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``--steps``, else ``--epochs`` worth of steps.

    ``--flop-matched`` (SDP) multiplies either by 1/C, so that K workers each computing about C of the
    model spend DDP's FLOPs; it applies to ``--steps`` too, else the flag would be silently ignored.
    """
    scale = 1 / cfg.coverage if (cfg.flop_matched and cfg.strategy == "sdp") else 1.0
    if cfg.steps:
        return max(1, math.ceil(cfg.steps * scale - 1e-9))
    return max(1, math.ceil(cfg.epochs * scale * steps_per_epoch - 1e-9))


def _opt_name(cfg: TrainConfig) -> str:
    return optimizers.name_for(cfg.optimizer, cfg.momentum)


def evaluate_run(run_dir: str | Path, device: str = "auto", model: str | None = None,
                 trust_run_code: bool = False) -> dict[str, float]:
    """``subnetdp evaluate``: the test metrics of a finished run's ``model.safetensors``, from its files alone.

    The model already holds the evaluation conventions, so it is loaded into the plain
    architecture and evaluated on the run's test data (same data set, subset and precision).
    A run folder is data: a ``module:callable`` model that its ``config.json`` names is imported
    only when the caller names it too (``model``) or says to trust the folder (``trust_run_code``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(run_dir)
    missing = [f for f in ("config.json", "model.safetensors") if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} has no {' or '.join(missing)}: is it a finished run directory of subnetdp train?")
    try:
        values = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / 'config.json'}: not a readable run config ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{d / 'config.json'}: not a run config (expected a JSON object)")
    named = values.get("model")
    if model is not None:
        values["model"] = model
    elif isinstance(named, str) and ":" in named and not trust_run_code:
        raise ValueError(f"{d / 'config.json'} names the model {named!r}: evaluating it would import and run that "
                         f"code; if you trust it, say so with --model {named} (or --trust-run-code)")
    values.update(device=device, progress=False, workers=None, resume=False)
    known = {k: v for k, v in values.items() if k in TrainConfig.__dataclass_fields__}
    cfg = from_values(known, str(d / "config.json"))
    dev = _device(cfg)
    task = make_task(cfg, dev)
    net = materialize(task.model_factory(), seed=cfg.seed, device=dev)
    try:
        state = load_file(d / "model.safetensors", device=str(dev))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{d / 'model.safetensors'}: not a readable safetensors file ({e}); it is damaged: "
                         "restore it, or train the run again") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise ValueError(f"{d / 'model.safetensors'} does not fit the model its config.json names ({first}); "
                         "give the run's own model.safetensors and config.json") from None
    return dict(task.evaluate(net, autocast_for(cfg, dev)))


def _save_models(model: dict[str, torch.Tensor] | None, raw: dict[str, torch.Tensor] | None, out: Path) -> None:
    """``model.safetensors``: the evaluated model (conventions applied); ``model_raw.safetensors``: the
    assembled state as trained. Tied weights are stored as separate copies."""
    from safetensors.torch import save

    for state, name in ((model, "model.safetensors"), (raw, "model_raw.safetensors")):
        if state is not None:
            atomic_write(out / name, save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}))
