"""``subnetdp`` command line: ``train``, ``plan`` (with ``--budget``), ``bench`` and ``report``.

Every ``train`` flag is a field of :class:`subnetdp.config.TrainConfig`; values come from the
defaults, then ``--config FILE`` (TOML or YAML), then the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import types
import typing
from collections.abc import Sequence

from subnetdp.bench import add_bench_parser
from subnetdp.budget import add_budget_arguments
from subnetdp.config import ConfigError, TrainConfig, load_file, validate


class _Parser(argparse.ArgumentParser):
    """Errors in one line, naming the flag: no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _field_type(f: dataclasses.Field) -> type:
    t = typing.get_type_hints(TrainConfig)[f.name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or YAML file of settings (flags given here override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        t = _field_type(f)
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, type=t, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_file(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command")}
    values.update(given)
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"--config: {e}") from e
    for f in dataclasses.fields(TrainConfig):  # values from a file are checked for type as flags are
        v = getattr(cfg, f.name)
        t = _field_type(f)
        if v is not None and not isinstance(v, t) and not (t is float and isinstance(v, int) and not isinstance(v, bool)):
            raise ConfigError(f"--{f.name.replace('_', '-')} {v!r}: expected {t.__name__}")
    return cfg


def _plan_command(args: argparse.Namespace) -> int:
    import functools

    from subnetdp.models import get_model
    from subnetdp.plan import plan

    for flag in ("width", "num_classes", "vocab_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"subnetdp plan: error: --{flag.replace('_', '-')} {value}: must be a positive whole number",
                  file=sys.stderr)
            return 2
    kwargs = {"num_classes": args.num_classes}
    if args.width is not None:
        kwargs["width"] = args.width
    if args.model.startswith("llama"):
        kwargs = {"vocab_size": args.vocab_size}
    try:
        p = plan(functools.partial(get_model, args.model, **kwargs), args.workers, args.coverage, args.level, args.seed)
    except ValueError as e:
        print(f"subnetdp plan: error: {e}", file=sys.stderr)
        return 2
    print(p.summary(args.optimizer))
    if args.save:
        try:
            with open(args.save, "w") as f:
                f.write(p.to_json())
        except OSError as e:
            print(f"subnetdp plan: error: --save {args.save}: {e.strerror}; give a file in an existing, writable "
                  "folder", file=sys.stderr)
            return 2
        print(f"plan saved to {args.save}")
    return 0


class _PipeSafeStdout(io.TextIOBase):
    """stdout that goes quiet when its reader closes (``subnetdp train | head``), so the job keeps
    running and still writes its outputs: after the first broken pipe, writes go to /dev/null."""

    def __init__(self, stream: typing.TextIO) -> None:
        self.stream = stream

    def _quiet(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # also silences the interpreter's flush at exit
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._quiet()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
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
    parser = _Parser(prog="subnetdp", description="Subnetwork Data Parallelism for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (SDP, DDP, FSDP2 or DDP with activation checkpointing)",
                           description="Train with one strategy; under torchrun one worker per process, "
                                       "--simulate K for K workers in one process, --workers K to start K "
                                       "local processes.")
    _add_train_flags(train)

    pl = sub.add_parser("plan", help="print an SDP plan's summary and predicted memory per worker, without training")
    pl.add_argument("--model", default="resnet18")
    pl.add_argument("--width", type=int, default=None)
    pl.add_argument("--num-classes", type=int, default=10)
    pl.add_argument("--vocab-size", type=int, default=65)
    pl.add_argument("--workers", type=int, default=8)
    pl.add_argument("--coverage", type=float, default=0.5)
    pl.add_argument("--level", choices=("block", "neuron"), default="block")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--optimizer", choices=("sgd", "sgd-momentum", "adamw"), default="sgd-momentum",
                    help="optimizer whose state the prediction counts")
    pl.add_argument("--save", help="write the plan as JSON to this file")
    add_budget_arguments(pl)  # --budget, --batch-size, --seq-len, --measure

    add_bench_parser(sub)

    rep = sub.add_parser("report", help="markdown table and PNG plots from run directories")
    rep.add_argument("runs", nargs="+", help="run directories (each with summary.json and metrics.jsonl)")
    rep.add_argument("--out", default="report", help="folder for report.md and the plots")

    args = parser.parse_args(argv)
    if args.command == "plan":
        if args.budget:
            from subnetdp.budget import run_budget

            return run_budget(args)
        return _plan_command(args)
    if args.command == "bench":
        from subnetdp.bench import run_bench

        run_bench(args)
        return 0
    if args.command == "report":
        from subnetdp.report import write_report

        try:
            path = write_report(args.runs, args.out)
        except (FileNotFoundError, ValueError) as e:
            print(f"subnetdp report: error: {e}", file=sys.stderr)
            return 2
        print(path.read_text())
        print(f"written: {path} and plots in {path.parent}")
        return 0
    try:
        cfg = config_from_args(args)
        validate(cfg)
    except ConfigError as e:
        print(f"subnetdp train: error: {e}", file=sys.stderr)
        return 2
    from subnetdp.train import run

    run(cfg, argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
