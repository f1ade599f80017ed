"""``subnetdp`` command line: ``train``, ``plan`` (with ``--budget``), ``bench`` and ``report``.

Every ``train`` flag is a field of :class:`subnetdp.config.TrainConfig`; values come from the
defaults, then ``--config FILE`` (TOML or YAML), then the flags given. The flags ``plan`` shares with
``train`` are made from the same fields (name, type, help, default, choices and rules), so the two
cannot drift apart. Every verb's values are checked by :mod:`subnetdp.config` before any work; a
:class:`~subnetdp.config.ConfigError` (or any other user error) ends in one line and exit status 2, in
:func:`main` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from subnetdp.config import (
    DEVICES,
    PLAN_FIELDS,
    ConfigError,
    TrainConfig,
    field_type,
    from_values,
    load_file,
    validate,
    validate_bench,
    validate_plan,
)
from subnetdp.measure.workloads import DEFAULT_VOCAB
from subnetdp.models import LANGUAGE, model_factory, model_kind
from subnetdp.optimizers import OPTIMIZER_NAMES, name_for
from subnetdp.planning import JOB_BALANCES, LEVELS, TRANSITIONS


class _Parser(argparse.ArgumentParser):
    """Errors in one line, naming the flag: no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _DefaultsParser(_Parser):
    """Every verb's --help shows each flag's default (train's flags state theirs in their help text)."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def _add_field_flag(p: argparse.ArgumentParser, f: dataclasses.Field, for_train: bool, **override: typing.Any) -> None:
    """One flag from one :class:`TrainConfig` field: its name, type, help and choices.

    ``train`` leaves unset flags out of the namespace (a ``--config`` file fills them) and checks choices
    in :func:`subnetdp.config.validate`, which also checks the file's values; other verbs take the
    field's default and let argparse check the choices. ``override`` replaces what a verb means
    differently (``plan --workers`` is the K a plan is made for, 8 by default).
    """
    flag = "--" + f.name.replace("_", "-")
    t = field_type(f.name)
    kwargs: dict[str, typing.Any] = {"help": f.metadata.get("help", "")}
    if for_train:
        kwargs.update(default=argparse.SUPPRESS, help=f"{kwargs['help']} (default: {f.default})")
    else:
        kwargs["default"] = f.default
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
    if t is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif "bare" in f.metadata:  # a mode that was a boolean flag: --flag alone and --no-flag keep their meaning
        kwargs.update(type=t, nargs="?", const=f.metadata["bare"][0], metavar="{" + ",".join(f.metadata["choices"]) + "}")
    else:
        kwargs["type"] = t
        if "choices" not in kwargs:  # argparse shows the choices instead
            kwargs["metavar"] = f.name.upper()
    kwargs.update(override)
    p.add_argument(flag, **kwargs)
    if "bare" in f.metadata:
        off = f.metadata["bare"][1]
        p.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=off, default=kwargs["default"],
                       help=f"same as {flag} {off} (default: {f.default})")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or YAML file of settings (flags given here override it)")
    for f in dataclasses.fields(TrainConfig):
        _add_field_flag(p, f, for_train=True)


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    """``plan``'s flags of :data:`subnetdp.config.PLAN_FIELDS`, from train's fields (``--workers`` is plan's K)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in PLAN_FIELDS:
        override = {"default": 8, "help": "number of SDP workers K"} if name == "workers" else {}
        _add_field_flag(p, fields[name], for_train=False, **override)


# decisions that only the command line may make: a config file is often shared, or written by someone else
COMMAND_LINE_ONLY = ("overwrite",)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_file(args.config) if getattr(args, "config", None) else {}
    for name in COMMAND_LINE_ONLY:
        if name in values:
            raise ConfigError(f"--config {args.config}: '{name}' is a command-line decision (it deletes files); "
                              f"remove it from the file and give --{name} on the command line")
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command")}
    values.update(given)
    return from_values(values, f"--config {args.config}" if getattr(args, "config", None) else "flags")


def plan_config(args: argparse.Namespace) -> TrainConfig:
    """``plan``'s shared flags as the :class:`TrainConfig` of the run it predicts, checked by train's rules
    and plan's own (:func:`subnetdp.config.validate_plan`)."""
    cfg = TrainConfig(**{name: getattr(args, name) for name in PLAN_FIELDS})
    validate_plan(cfg, args.num_classes, args.vocab_size, json=args.json, budget=args.budget is not None)
    return cfg


def _save_plan(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise ConfigError(f"--save {path}: {e.strerror}; give a file in an existing, writable folder") from None


def _plan_command(args: argparse.Namespace) -> int:
    import json

    from subnetdp.measure.workloads import workload_for
    from subnetdp.metrics import format_bytes
    from subnetdp.planning import plan, plan_prediction, storage_summary

    cfg = plan_config(args)
    optimizer = name_for(cfg.optimizer, cfg.momentum)  # what train runs: sgd without momentum keeps no state
    if model_kind(cfg.model) is None:  # a 'module:callable': no workload to profile; balance parameter counts
        # built as train builds it: an image model with --num-classes, a language model (--vocab-size given)
        # with its vocabulary and --seq-len
        dims = ({"vocab_size": args.vocab_size, "max_seq_len": cfg.seq_len} if args.vocab_size is not None
                else {"num_classes": args.num_classes})
        p, prediction = plan(model_factory(cfg.model, **dims), cfg.workers, cfg.coverage, cfg.level, cfg.seed,
                             transitions=cfg.transitions), None
    else:
        p, prediction = plan_prediction(
            workload_for(args), cfg.workers, cfg.coverage, cfg.level, optimizer=optimizer,
            batch_size=cfg.batch_size, seed=cfg.seed, transitions=cfg.transitions, balance=cfg.balance,
            activation_checkpointing=cfg.activation_checkpointing, masking=cfg.masking, sharding=cfg.sharding)
    if args.json:
        print(json.dumps(prediction))
    else:
        print(storage_summary(p, optimizer, cfg.sharding))
        print()
        if prediction is None:
            print(f"activations: not predicted for a 'module:callable' model (subnetdp does not know its inputs); "
                  f"the state above is params + grads + {optimizer} state; the plan balances parameter counts")
        else:
            tokens = f" x {cfg.seq_len} tokens" if model_kind(cfg.model) == LANGUAGE else ""
            ckpt = ", block checkpointing" if cfg.activation_checkpointing else ""
            shard = (", each unit's state sharded over its holders (FSDP2; the peak includes the gathered groups)"
                     if cfg.sharding == "holders" else "")
            print(f"predicted memory per worker (batch {cfg.batch_size} per worker{tokens}, fp32, {optimizer}"
                  f"{ckpt}{shard}; --batch-size sets the batch):")
            print("| worker | model state | activations | predicted peak |")
            print("|---|---|---|---|")
            for k in range(p.workers):
                print(f"| {k} | {format_bytes(prediction['state_bytes'][k])} | "
                      f"{format_bytes(prediction['activation_bytes'][k])} | {format_bytes(prediction['peak_bytes'][k])} |")
            worst = max(range(p.workers), key=lambda k: prediction["peak_bytes"][k])
            ddp, fsdp2 = prediction["ddp_peak_bytes"], prediction["fsdp2_peak_bytes"]
            print(f"worst worker: {worst}, predicted peak {format_bytes(prediction['peak_bytes'][worst])} = "
                  f"{prediction['peak_bytes'][worst] / ddp:.3f} x DDP's {format_bytes(ddp)}, "
                  f"{prediction['peak_bytes'][worst] / fsdp2:.3f} x FSDP2's {format_bytes(fsdp2)} (K={p.workers}{ckpt})")
    if args.save:
        _save_plan(args.save, p.to_json())
        if not args.json:
            print(f"plan saved to {args.save}")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    import json

    from subnetdp.report import conventions_text
    from subnetdp.train import evaluate_run

    result = evaluate_run(args.run, args.device, model=args.model, trust_run_code=args.trust_run_code)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<12} {v:.4f}")
        summary = Path(args.run) / "summary.json"
        if summary.is_file():  # the model file holds the conventions; say which, and by which rule
            print(f"model.safetensors evaluated with: {conventions_text(json.loads(summary.read_text())['evaluation'])}")
    return 0


# ---- bench and plan --budget ------------------------------------------------------------------------
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``subnetdp bench`` (:func:`subnetdp.measure.bench.run_bench`)."""
    p.add_argument("--models", default="resnet18,llama", help="comma-separated: resnet18, llama")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64: the standard model)")
    p.add_argument("--batch", type=int, default=32, help="ResNet samples per worker per step")
    p.add_argument("--llama-model", default="llama_char_small", help="LLaMA preset of subnetdp.models")
    p.add_argument("--llama-batch", type=int, default=8, help="LLaMA sequences per worker per step")
    p.add_argument("--seq-len", type=int, default=128, help="LLaMA tokens per sequence")
    p.add_argument("--resnet-optimizer", default="sgd-momentum", choices=OPTIMIZER_NAMES,
                   help="optimizer whose state the ResNet measurements count")
    p.add_argument("--llama-optimizer", default="adamw", choices=OPTIMIZER_NAMES,
                   help="optimizer whose state the LLaMA measurements count")
    p.add_argument("--workers", type=int, default=8, help="K for the memory part (subnetworks measured in-process)")
    p.add_argument("--coverages", default="0.875,0.75,0.5,0.25", help="comma-separated SDP coverages")
    p.add_argument("--levels", default="block,neuron", help="comma-separated SDP levels")
    p.add_argument("--sdp-checkpointing", default="both", choices=("none", "blocks", "both"),
                   help="SDP rows without activation checkpointing, with it (SDP+ckpt), or both")
    p.add_argument("--sharding", default="none", choices=("none", "holders", "both"),
                   help="SDP rows of the timing part: replicated (none), sharded over holders on FSDP2 (holders, "
                        "block level), or both")
    p.add_argument("--masking", default="forward", choices=("forward", "backward", "both"),
                   help="SDP regime(s) of the memory part; backward adds its rows (docs/masking.md)")
    p.add_argument("--repeats", type=int, default=3, help="measured steps per worker in the memory part")
    p.add_argument("--transitions", choices=TRANSITIONS, default=TrainConfig.transitions,
                   help="SDP block plans of the memory part (the old default, keep with params balance, is "
                        "measured as an extra row)")
    p.add_argument("--balance", choices=JOB_BALANCES, default=TrainConfig.balance,
                   help="what SDP plans of the memory part balance (as subnetdp train --balance)")
    p.add_argument("--time-ranks", type=int, default=4, help="torchrun processes for the timing part (0: skip it)")
    p.add_argument("--time-steps", type=int, default=5, help="timed steps per configuration per round")
    p.add_argument("--time-warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    p.add_argument("--time-limit", type=float, default=3600, help="seconds the torchrun part may take before it is stopped")
    p.add_argument("--full", action="store_true", help="full size: ResNet-18 width 64, batch 128")
    p.add_argument("--device", default="cpu", help="device of the memory part")
    p.add_argument("--seed", type=int, default=0, help="seed for init, plans and batches")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the memory part (1: steadier timings)")
    p.add_argument("--out", default="bench", help="folder for bench.json, bench.md and the plots")


def add_bench_parser(subparsers: typing.Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subnetdp``'s subparsers."""
    p = subparsers.add_parser("bench", help="measure memory per worker, communication and step time of SDP "
                                            "against DDP, FSDP2 and DDP, SDP and FSDP2 with activation checkpointing",
                              description="Memory, communication and step time of SDP against DDP, FSDP2 and DDP "
                                          "with activation checkpointing, each of SDP and FSDP2 also with "
                                          "checkpointing, all in one invocation (docs/benchmarks.md).")
    add_bench_arguments(p)
    return p


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for ``subnetdp plan --budget 6GiB``: pick the coverage and level from a memory budget."""
    parser.add_argument("--budget", default=None,
                        help="memory per worker (e.g. 6GiB, 512MiB): choose the largest coverage and the level "
                             "whose predicted peak fits, instead of --coverage/--level")
    parser.add_argument("--measure", action="store_true",
                        help="with --budget: run one step of the chosen plan's worst worker here and report "
                             "measured / predicted")


def _budget_command(args: argparse.Namespace) -> int:
    """``subnetdp plan --budget``: print the chosen plan (uses the ``plan`` command's model flags)."""
    from subnetdp.measure.meters import measure_choice
    from subnetdp.measure.workloads import workload_for
    from subnetdp.metrics import format_bytes
    from subnetdp.planning import storage_summary
    from subnetdp.planning.budget import plan_for_budget

    cfg = plan_config(args)
    optimizer = name_for(cfg.optimizer, cfg.momentum)
    w = workload_for(args)
    # sharded plans are considered always and taken where they fit a larger coverage; --sharding holders: only they
    shardings = ("holders",) if cfg.sharding == "holders" else ("none", "holders")
    choice = plan_for_budget(w, cfg.workers, args.budget, optimizer=optimizer, batch_size=cfg.batch_size,
                             seed=cfg.seed, transitions=cfg.transitions, shardings=shardings,
                             levels=("block",) if cfg.sharding == "holders" else LEVELS)
    print(choice.summary())
    print()
    print(storage_summary(choice.plan, optimizer, choice.sharding))
    if args.measure and choice.sharding == "holders":
        raise ConfigError("--measure runs the chosen plan's worst worker in this one process, and a plan sharded over "
                          "holders needs its K processes; measure it with subnetdp bench --sharding holders")
    if args.measure:
        r = measure_choice(choice, w, seed=cfg.seed)
        print(f"\nmeasured worker {r['worker']}: {format_bytes(r['measured_bytes'])} (state + saved activations) "
              f"vs predicted {format_bytes(r['predicted_bytes'])}: ratio {r['ratio']:.3f}")
    if args.save:
        _save_plan(args.save, choice.plan.to_json())
        print(f"plan saved to {args.save}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``subnetdp`` parser with its verbs (train, plan, bench, evaluate, report)."""
    parser = _Parser(prog="subnetdp", description="Subnetwork Data Parallelism for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_DefaultsParser)

    train = sub.add_parser("train", help="train a model (SDP, DDP, FSDP2 or DDP with activation checkpointing)",
                           description="Train with one strategy; under torchrun one worker per process, "
                                       "--simulate K for K workers in one process, --workers K to start K "
                                       "local processes.")
    _add_train_flags(train)

    pl = sub.add_parser("plan", help="print an SDP plan's summary and predicted memory per worker, without training")
    _add_plan_flags(pl)
    pl.add_argument("--num-classes", type=int, default=10, help="classes of an image model")
    pl.add_argument("--vocab-size", type=int, default=None,
                    help=f"vocabulary of a language model (zoo: {DEFAULT_VOCAB} if not given); a 'module:callable' "
                         "model gets vocab_size and max_seq_len=--seq-len when it is given, else num_classes")
    pl.add_argument("--json", action="store_true",
                    help="print one JSON object: the settings, peak/state/activation bytes per worker and DDP's peak")
    pl.add_argument("--save", help="write the plan as JSON to this file (default: not saved)")
    add_budget_arguments(pl)  # --budget, --measure

    add_bench_parser(sub)

    ev = sub.add_parser("evaluate", help="evaluate a finished run's model.safetensors on its test data",
                        description="Test accuracy (images) or validation loss (text) of RUN_DIR/model.safetensors, "
                                    "from the run's files alone (config.json names the data, model and precision).")
    ev.add_argument("run", metavar="RUN_DIR", help="run directory of subnetdp train")
    ev.add_argument("--device", default="auto", choices=DEVICES, help="device to evaluate on")
    ev.add_argument("--json", action="store_true", help="print one JSON object with the keys of summary.json's 'final'")
    ev.add_argument("--model", default=None,
                    help="the model to load the weights into (a zoo name or 'module:callable'); a run trained on a "
                         "'module:callable' model needs it (or --trust-run-code): a run folder's config.json is "
                         "never a reason to import code")
    ev.add_argument("--trust-run-code", action="store_true",
                    help="import and call the 'module:callable' model that RUN_DIR/config.json names")

    rep = sub.add_parser("report", help="markdown table and PNG plots from run directories")
    rep.add_argument("runs", nargs="+", help="run directories (each with summary.json and metrics.jsonl)")
    rep.add_argument("--out", default="report", help="folder for report.md and the plots")
    return parser


_READER_GONE = (errno.EPIPE, errno.EIO)  # a closed pipe; a terminal that hung up


class _PipeSafeStdout(io.TextIOBase):
    """stdout that goes quiet when its reader closes (``subnetdp train | head``, or a closed terminal:
    EIO), so the job keeps running and still writes its outputs: after the first such error, writes go
    to /dev/null."""

    def __init__(self, stream: typing.TextIO) -> None:
        self.stream = stream

    def _quiet(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # also silences the interpreter's flush at exit
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            if e.errno not in _READER_GONE:
                raise
            self._quiet()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            if e.errno not in _READER_GONE:
                raise
            self._quiet()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding  # tqdm picks its bar characters by it

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


# what a user can cause (a bad value, file or setting); anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; a user error ends in one line on stderr and exit status 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    wrapped = sys.stdout is not None and sys.stdout is sys.__stdout__
    if wrapped:
        sys.stdout = _PipeSafeStdout(sys.stdout)  # type: ignore[assignment]
    try:
        return _main(argv)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:  # a Ctrl-C before a run could take it as a stop request, or a second one
        print(f"subnetdp {command}: interrupted".replace("subnetdp : ", "subnetdp: "), file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in detail:
            detail += f" ({e.filename})"
        print(f"subnetdp {command}: error: {detail}".replace("subnetdp : ", "subnetdp: "), file=sys.stderr)
        return 2
    finally:
        if wrapped:
            sys.stdout = sys.stdout.stream if isinstance(sys.stdout, _PipeSafeStdout) else sys.stdout


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plan":
        if args.budget:
            return _budget_command(args)
        return _plan_command(args)
    if args.command == "bench":
        from subnetdp.measure.bench import run_bench

        validate_bench(args)
        run_bench(args)
        return 0
    if args.command == "evaluate":
        return _evaluate_command(args)
    if args.command == "report":
        from subnetdp.report import write_report

        path = write_report(args.runs, args.out)
        print(path.read_text())
        print(f"written: {path} and plots in {path.parent}")
        return 0
    cfg = config_from_args(args)
    validate(cfg)
    from subnetdp.train import run

    run(cfg, argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
