"""``subnetdp`` command line: ``train``, ``plan`` (with ``--budget``), ``bench`` and ``report``.

Every ``train`` flag is a field of :class:`subnetdp.config.TrainConfig`; values come from the
defaults, then ``--config FILE`` (TOML or YAML), then the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    import json

    from subnetdp.budget import plan_prediction, workload_for

    if args.batch_size < 1:
        print(f"subnetdp plan: error: --batch-size {args.batch_size}: must be > 0", file=sys.stderr)
        return 2
    try:
        p, prediction = plan_prediction(
            workload_for(args), args.workers, args.coverage, args.level, optimizer=args.optimizer,
            batch_size=args.batch_size, seed=args.seed, transitions=args.transitions, balance=args.balance,
            activation_checkpointing=args.activation_checkpointing)
    except ValueError as e:
        print(f"subnetdp plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(prediction))
    else:
        print(p.summary(args.optimizer))
        worst = max(prediction["peak_bytes"])
        print(f"predicted peak of the worst worker: {worst / 2**20:,.2f} MiB = {worst / prediction['ddp_peak_bytes']:.3f}"
              f" x DDP's {prediction['ddp_peak_bytes'] / 2**20:,.2f} MiB ({args.optimizer}, batch {args.batch_size}"
              f"{', block checkpointing' if args.activation_checkpointing else ''})")
    if args.save:
        with open(args.save, "w") as f:
            f.write(p.to_json())
        if not args.json:
            print(f"plan saved to {args.save}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    pl.add_argument("--transitions", choices=("keep", "shortcut"), default="keep",
                    help="block level: keep transition blocks on every worker, or make them units (as in train)")
    pl.add_argument("--balance", choices=("memory", "params"), default="memory",
                    help="what the plan balances: predicted memory (as train does by default) or parameter counts")
    pl.add_argument("--activation-checkpointing", action="store_true",
                    help="predict (and balance) with every block of each worker's subnetwork checkpointed")
    pl.add_argument("--json", action="store_true",
                    help="print one JSON object: the settings, peak/state/activation bytes per worker and DDP's peak")
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
