"""The main job's configuration: one dataclass, filled from a TOML/YAML file and then flags.

Every field is a ``subnetdp train`` flag (``--field-name``), and ``subnetdp plan`` makes the flags it
shares with ``train`` (:data:`PLAN_FIELDS`) from the same fields. Every rule a value must meet lives
here: a field's own rules in its ``checks`` metadata, the rules between fields in :func:`validate`
(``train``), :func:`validate_plan` and :func:`validate_bench`. Each raises :class:`ConfigError` naming
the flag, the bad value and what it accepts; the command line turns it into one line and exit
status 2 in one place (:func:`subnetdp.cli.main`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subnetdp.data import VISION_DATASETS
from subnetdp.evaluation import RESIDUAL_SCALINGS
from subnetdp.init import INIT_MODES
from subnetdp.models import LANGUAGE, ZOO, is_user_model, model_kind
from subnetdp.models.zoo import names as zoo_names
from subnetdp.planning import JOB_BALANCES, LEVELS, TRANSITIONS, check_coverage
from subnetdp.options import MASKINGS, NEURON_SCALINGS, SHARDINGS, SYNC_MODES, SDPOptions

STRATEGIES = ("sdp", "ddp", "fsdp", "ddp-ckpt")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
TEXT_DATASETS = ("tinyshakespeare",)
MAX_EPOCHS, MAX_STEPS = 1e6, 10**12  # beyond these a run cannot end (and 1e308 epochs overflowed to a traceback)


class ConfigError(ValueError):
    """A bad configuration value; the message names the flag and what it accepts."""


Check = Callable[[str, Any], None]  # a field's rule: (flag, value) -> None, or ConfigError


def _choice(flag: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"--{flag} {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def count(minimum: int = 1, unset: bool = False) -> Check:
    """Rule: a whole number >= ``minimum`` (``unset``: or ``None``, leaving it to the default)."""
    what = "a positive whole number (> 0)" if minimum == 1 else f"a whole number >= {minimum}"

    def check(flag: str, value: Any) -> None:
        if value is None and unset:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"--{flag} {value!r}: must be {what}")
    return check


def number(strict: bool = True, unset: bool = False) -> Check:
    """Rule: a finite number > 0 (``strict``) or >= 0 (``unset``: or ``None``, leaving it to the default)."""
    what = "a finite number > 0" if strict else "a finite number >= 0"

    def check(flag: str, value: Any) -> None:
        if value is None and unset:
            return
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
                or (strict and value == 0)):
            raise ConfigError(f"--{flag} {value!r}: must be {what}")
    return check


def at_most(most: float) -> Check:
    """Rule: no more than ``most`` (beyond it a run cannot end)."""
    def check(flag: str, value: Any) -> None:
        if (value or 0) > most:
            raise ConfigError(f"--{flag} {value!r}: at most {most:g}; give a run that can end")
    return check


def below_one(what: str) -> Check:
    """Rule: in [0, 1), with ``what`` saying so in the message."""
    def check(flag: str, value: Any) -> None:
        if not 0 <= value < 1:
            raise ConfigError(f"--{flag} {value!r}: {what}")
    return check


def known_model(flag: str, value: Any) -> None:
    """Rule: a zoo name or a 'package.module:callable'."""
    if value not in ZOO and not is_user_model(value):
        raise ConfigError(f"--{flag} {value!r} is unknown; choose one of the known models: {', '.join(ZOO)}, "
                          "or give your own as 'package.module:callable'")


def seconds(flag: str, value: Any) -> None:
    """Rule: a time in seconds, finite and > 0."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"--{flag} {value!r}: seconds, a finite number > 0")


@dataclass
class TrainConfig:
    # what to train
    model: str = field(default="resnet18", metadata={"checks": (known_model,), "help": f"zoo model ({', '.join(ZOO)}) or 'module:callable'"})
    width: int | None = field(default=None, metadata={"checks": (count(unset=True),),
        "help": "ResNet base width (resnet18 default 64); swin_t_cifar embedding width (default 96)"})
    dataset: str = field(default="cifar10-jpeg", metadata={
        "help": f"{', '.join(VISION_DATASETS)}, tinyshakespeare, a UTF-8 text file/folder, or a token file "
                "(subnetdp.data.write_token_file; memory-mapped)"})
    data_dir: str | None = field(default=None, metadata={"help": "where the data set lives (or goes, with --download)"})
    download: bool = field(default=False, metadata={"help": "download torchvision data sets into --data-dir"})
    train_subset: int | None = field(default=None, metadata={"checks": (count(unset=True),), "help": "train on N examples drawn with --seed (quick runs)"})
    test_subset: int | None = field(default=None, metadata={"checks": (count(unset=True),), "help": "evaluate on N test examples drawn with --seed (quick runs)"})
    # how to parallelise
    strategy: str = field(default="sdp", metadata={"choices": STRATEGIES, "help": "sdp, ddp, fsdp (FSDP2) or ddp-ckpt (DDP + activation checkpointing)"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute every residual block in backward instead of keeping its activations (any strategy; "
                "SDP: the blocks a worker has; --strategy ddp-ckpt is ddp with this on)"})
    level: str = field(default="block", metadata={"choices": LEVELS, "help": "SDP units: block (residual blocks) or neuron (inner widths)"})
    coverage: float = field(default=0.5, metadata={"help": "SDP coverage C in (0, 1]: fraction of units per worker"})
    transitions: str = field(default="keep", metadata={
        "choices": TRANSITIONS,
        "help": "SDP block level: keep (strided/channel-changing blocks on every worker) or shortcut (they are "
                "units too; a worker that skips one runs its shortcut path; see docs/evaluation.md)"})
    balance: str = field(default="memory", metadata={
        "choices": JOB_BALANCES,
        "help": "SDP: what the plan balances across workers: memory (predicted model state + saved activations; "
                "under --masking backward, held state + weight-gradient inputs) or params (parameter counts)"})
    simulate: int | None = field(default=None, metadata={"checks": (count(unset=True),), "help": "run K SDP workers in this one process"})
    workers: int | None = field(default=None, metadata={"checks": (count(unset=True),), "help": "start K processes on this machine (torchrun's launcher)"})
    max_restarts: int = field(default=0, metadata={"checks": (count(0),),
        "help": "--workers: restart the processes up to N times after a failure; each restart resumes from the "
                "newest intact checkpoint"})
    timeout: float = field(default=300.0, metadata={"checks": (seconds,),
        "help": "seconds a rank waits for the others in a collective before the run ends naming the missing rank"})
    sync: str = field(default="grads", metadata={"choices": SYNC_MODES, "help": "SDP sync: grads (every step) or params (every --sync-every steps)"})
    sync_every: int = field(default=1, metadata={"checks": (count(),), "help": "steps between parameter averages with --sync params"})
    neuron_scaling: str = field(default="inverted", metadata={"choices": NEURON_SCALINGS, "help": "neuron level: inverted (scale kept width by 1/C) or none"})
    sharding: str = field(default="none", metadata={
        "choices": SHARDINGS,
        "help": "SDP: how a worker stores its units' state: none (every holder keeps all of it) or holders (each "
                "unit's parameters, gradients and optimizer state split over its holders with FSDP2; block level, "
                "forward masking, gradient sync; --simulate computes the same math unsharded; docs/sharding.md)"})
    masking: str = field(default="forward", metadata={
        "choices": MASKINGS,
        "help": "SDP regime: forward (units not held are absent) or backward (full forward on every worker, "
                "gradients and updates only for held units; docs/masking.md)"})
    seed: int = field(default=0, metadata={"help": "seed for init, plan and data"})
    init: str = field(default="full", metadata={
        "choices": INIT_MODES,
        "help": "initial values: full (the model's own init, built once in host memory and sliced) or "
                "per-module (module by module, never the full model: for models too large for host memory)"})
    # recipe
    epochs: float = field(default=1.0, metadata={"checks": (number(), at_most(MAX_EPOCHS)), "help": "epochs (text: --steps-per-epoch steps each)"})
    steps: int | None = field(default=None, metadata={"checks": (count(unset=True), at_most(MAX_STEPS)), "help": "total optimizer steps (overrides --epochs)"})
    flop_matched: bool = field(default=False, metadata={"help": "SDP: train 1/C times as many steps, of --steps or --epochs (equal FLOPs to DDP)"})
    batch_size: int = field(default=128, metadata={"checks": (count(),), "help": "batch size per worker"})
    optimizer: str = field(default="sgd", metadata={"choices": OPTIMIZERS, "help": "sgd (Nesterov momentum) or adamw"})
    lr: float | None = field(default=None, metadata={"checks": (number(unset=True),), "help": "peak learning rate (sgd 0.1, adamw 1e-3 by default)"})
    momentum: float = field(default=0.9, metadata={"checks": (number(strict=False), below_one("must be in [0, 1) (0.9 is usual; 0 turns it off)")), "help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"checks": (number(strict=False),), "help": "weight decay (only held parameters exist on a worker)"})
    schedule: str = field(default="cosine", metadata={"choices": SCHEDULES, "help": "cosine (after warm-up), onecycle, or constant"})
    warmup: float = field(default=0.05, metadata={"checks": (below_one("a fraction of the steps in [0, 1)"),), "help": "warm-up as a fraction of all steps"})
    label_smoothing: float = field(default=0.0, metadata={"checks": (below_one("must be in [0, 1)"),), "help": "label smoothing for classification"})
    grad_clip: float | None = field(default=None, metadata={"checks": (number(unset=True),), "help": "clip the gradient norm (of the averaged gradient)"})
    seq_len: int = field(default=128, metadata={"checks": (count(),), "help": "text: tokens per sequence"})
    tokenizer: str = field(default="char", metadata={
        "help": "text: char, byte, tiktoken:NAME, tokenizers:PATH (a tokenizer.json) or tokenizers:HUB_NAME"})
    steps_per_epoch: int = field(default=200, metadata={"checks": (count(),), "help": "text: steps per epoch"})
    # evaluation
    eval_every: int = field(default=1, metadata={"checks": (count(0),), "help": "evaluate the assembled full model every N epochs (0: only at the end)"})
    bn_recalibrate: int = field(default=20, metadata={"checks": (count(0),),
        "help": "SDP with C<1: re-estimate the assembled model's BatchNorm statistics on N training batches "
                "before evaluation (0: off; see docs/evaluation.md)"})
    residual_scaling: str = field(default="auto", metadata={
        "choices": RESIDUAL_SCALINGS, "bare": ("on", "off"), "legacy": bool,  # files from before "auto": true/false
        "help": "SDP block level: scale each block's residual branch by its holder fraction r/K at evaluation: "
                "auto (off for LLaMA-style decoders, on for the others: ResNet, GPT-2, ...), on or off; "
                "--residual-scaling alone is on, --no-residual-scaling off (see docs/evaluation.md)"})
    # machine
    device: str = field(default="auto", metadata={"choices": DEVICES, "help": "auto, cpu or cuda"})
    precision: str = field(default="auto", metadata={"choices": PRECISIONS, "help": "auto (bf16 autocast on GPU), fp32 or bf16"})
    threads: int | None = field(default=None, metadata={"checks": (count(unset=True),), "help": "CPU threads per process"})
    # outputs
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/<strategy>-<level>-C<coverage>-s<seed>)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its newest intact checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run files of another run in --out (command line only: refused in a --config file)"})
    checkpoint_every: int = field(default=0, metadata={"checks": (count(0),), "help": "save a checkpoint every N steps (0: at epoch ends)"})
    log_every: int = field(default=10, metadata={"checks": (count(),), "help": "write step metrics every N steps"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        # runs before "auto" existed saved the flag as a boolean in config.json
        if isinstance(self.residual_scaling, bool):
            self.residual_scaling = "on" if self.residual_scaling else "off"

    # ---- derived -----------------------------------------------------------------------------------
    @property
    def is_text(self) -> bool:
        return self.dataset in TEXT_DATASETS or self.dataset not in VISION_DATASETS

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)

    def sdp_options(self) -> SDPOptions:
        """The SDP options this configuration trains with (the same object for both SDP strategies)."""
        return SDPOptions(seed=self.seed, sync=self.sync, sync_every=self.sync_every, neuron_scaling=self.neuron_scaling,
                          checkpointing="blocks" if self.recomputes_blocks else "none", masking=self.masking,
                          init=self.init, sharding=self.sharding)

    @property
    def recomputes_blocks(self) -> bool:
        """Whether residual blocks are recomputed in backward: ``--activation-checkpointing``, or ``--strategy ddp-ckpt``."""
        return self.activation_checkpointing or self.strategy == "ddp-ckpt"

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        tag = f"{self.strategy}-{self.level}-C{self.coverage:g}" if self.strategy == "sdp" else self.strategy
        if self.strategy == "sdp" and self.masking == "backward":
            tag += "-backward"
        return Path("runs") / f"{tag}-{self.model.replace(':', '_')}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from subnetdp.files import atomic_write

        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def field_type(name: str) -> type:
    """The type a field's value must have (``int | None`` -> ``int``)."""
    import types
    import typing

    t = typing.get_type_hints(TrainConfig)[name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def from_values(values: dict[str, Any], source: str) -> TrainConfig:
    """A :class:`TrainConfig` from values read from a file (``source`` names it in errors), each checked for
    its field's type as a flag would be: a file is data, and a wrong type must not become a traceback later."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"{source}: unknown settings {unknown}; known: "
                          f"{', '.join(sorted(f.name for f in dataclasses.fields(TrainConfig)))}")
    legacy = {f.name: f.metadata["legacy"] for f in dataclasses.fields(TrainConfig) if "legacy" in f.metadata}
    for name, v in values.items():
        t = field_type(name)
        ok = (isinstance(v, t) and not (t is not bool and isinstance(v, bool))) or isinstance(v, legacy.get(name, ()))
        if v is not None and not ok and not (t is float and isinstance(v, int) and not isinstance(v, bool)):
            raise ConfigError(f"--{name.replace('_', '-')} {v!r}: expected {t.__name__} ({source})")
    return TrainConfig(**values)


def world_size_of(cfg: TrainConfig) -> int:
    """How many workers the run has: --simulate, --workers, or torchrun's WORLD_SIZE."""
    return cfg.simulate or cfg.workers or int(os.environ.get("WORLD_SIZE", "1"))


def check_fields(cfg: TrainConfig, names: tuple[str, ...] | None = None) -> None:
    """Raise :class:`ConfigError` for the first field (of ``names``; all by default) whose value breaks its
    own rules: its choices and its ``checks``. ``train`` and ``plan`` check their shared flags here alike."""
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        flag, value = f.name.replace("_", "-"), getattr(cfg, f.name)
        if "choices" in f.metadata:
            _choice(flag, value, f.metadata["choices"])
        for check in f.metadata.get("checks", ()):
            check(flag, value)


def _check_model_fits(cfg: TrainConfig) -> None:
    """The flags that shape the model reach it: ``--width`` only a zoo model whose builder takes a width."""
    if cfg.width is not None and (is_user_model(cfg.model) or not ZOO[cfg.model].takes("width")):
        raise ConfigError(f"--width applies to {', '.join(zoo_names(takes='width'))}, not {cfg.model}")


def _check_sharding(cfg: TrainConfig) -> None:
    """``--sharding holders``'s rules, the same for ``train`` and ``plan``."""
    if cfg.sharding == "holders":
        needs = [(cfg.strategy == "sdp", f"--strategy sdp (--strategy {cfg.strategy} has no holders; fsdp shards the whole model)"),
                 (cfg.level == "block", "--level block: FSDP2 shards whole parameters, and a neuron-level unit is a slice of one"),
                 (cfg.masking == "forward", "--masking forward: under backward masking every worker holds the full model"),
                 (cfg.sync == "grads", "--sync grads: FSDP2 reduce-scatters the gradients in every backward")]
        for ok, what in needs:
            if not ok:
                raise ConfigError(f"--sharding holders needs {what}")


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad flag of ``subnetdp train``; does no work."""
    check_fields(cfg)
    if cfg.masking == "backward" and cfg.strategy != "sdp":
        raise ConfigError(f"--masking backward is an SDP regime; --strategy {cfg.strategy} has no masking")
    if cfg.masking == "backward" and cfg.sync != "grads":
        raise ConfigError("--masking backward averages gradients every step; use --sync grads")
    _check_sharding(cfg)
    if cfg.max_restarts and not cfg.workers:
        raise ConfigError(f"--max-restarts {cfg.max_restarts} applies to --workers K; under torchrun use "
                          "torchrun's own --max-restarts (the run resumes by itself on a restart)")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    if cfg.simulate and cfg.workers:
        raise ConfigError("--simulate and --workers exclude each other: simulate runs K workers in one process")
    if cfg.simulate and cfg.strategy != "sdp":
        raise ConfigError(f"--simulate runs SDP workers only, not --strategy {cfg.strategy}; "
                          "SDP with --coverage 1 is data parallelism's math")
    if cfg.simulate and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError("--simulate runs in one process; do not launch it with torchrun")
    k = world_size_of(cfg)
    try:  # SDP needs C*K whole; the other strategies ignore --coverage but it must still be a coverage
        check_coverage(cfg.coverage, k if cfg.strategy == "sdp" else None, name="--coverage ")
    except ValueError as e:
        hint = (" (this is one worker: run K workers with --simulate K, --workers K or torchrun)"
                if k == 1 and cfg.strategy == "sdp" and "holders per unit" in str(e) else "")
        raise ConfigError(f"{e}{hint}") from None
    if cfg.is_text:
        kind, _, arg = cfg.tokenizer.partition(":")
        if not (cfg.tokenizer in ("char", "byte") or cfg.tokenizer.endswith(".json")
                or (kind in ("tiktoken", "tokenizers") and arg)):
            raise ConfigError(f"--tokenizer {cfg.tokenizer!r}: use char, byte, tiktoken:NAME or tokenizers:PATH")
        if cfg.dataset not in TEXT_DATASETS and not Path(cfg.dataset).exists():
            raise ConfigError(f"--dataset {cfg.dataset!r} is neither a known data set "
                              f"({', '.join(VISION_DATASETS + TEXT_DATASETS)}) nor an existing text file or folder")
        if model_kind(cfg.model) not in (LANGUAGE, None):
            raise ConfigError(f"--model {cfg.model} is an image model but --dataset {cfg.dataset} is text; "
                              f"use a language model ({', '.join(zoo_names(LANGUAGE))})")
    elif model_kind(cfg.model) == LANGUAGE:
        raise ConfigError(f"--model {cfg.model} is a language model but --dataset {cfg.dataset} is images; "
                          "use --dataset tinyshakespeare or a text file")
    if cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().exists() and not cfg.download:
        raise ConfigError(f"--data-dir {cfg.data_dir}: no such file or folder; give the folder that holds "
                          "the data set (or add --download for torchvision data sets)")
    _check_model_fits(cfg)


# the flags ``subnetdp plan`` shares with ``train``, made from these fields (cli.py): same names, types, help,
# defaults, choices and rules, because plan predicts what train does with them. One differs on purpose:
# plan's --workers is the K the plan is for (8 unless given), train's the processes it starts.
PLAN_FIELDS = ("model", "width", "workers", "coverage", "level", "seed", "activation_checkpointing", "masking",
               "transitions", "balance", "batch_size", "seq_len", "optimizer", "momentum", "sharding")


def validate_plan(cfg: TrainConfig, num_classes: int, vocab_size: int | None, json: bool = False,
                  budget: bool = False) -> None:
    """Raise :class:`ConfigError` naming the first bad flag of ``subnetdp plan``; does no work.

    ``cfg`` holds plan's :data:`PLAN_FIELDS`, checked by train's rules; ``num_classes`` and ``vocab_size``
    are the model dimensions only plan takes (train reads them from its data); ``--json`` and ``--budget``
    predict activations, which needs a zoo model. The K and the coverage
    are checked by :func:`subnetdp.planning.plan` itself, the API's check, which names them as it does.
    """
    check_fields(cfg, tuple(n for n in PLAN_FIELDS if n not in ("workers", "coverage")))
    count(unset=True)("num-classes", num_classes)
    count(unset=True)("vocab-size", vocab_size)
    _check_model_fits(cfg)
    _check_sharding(cfg)
    for flag, given in (("--json", json), ("--budget", budget)):
        if given and is_user_model(cfg.model):
            raise ConfigError(f"{flag} needs a zoo model (a 'module:callable' model has no known inputs to predict "
                              "activations from)")


BENCH_MODELS = ("resnet18", "llama")  # the workloads of subnetdp bench: ResNet-18 and the --llama-model preset


def validate_bench(args: Any) -> None:
    """Raise :class:`ConfigError` naming the first bad flag of ``subnetdp bench`` (its parsed flags); does no work."""
    for flag in ("width", "batch", "llama_batch", "seq_len", "workers", "repeats", "time_steps", "rounds"):
        count()(flag.replace("_", "-"), getattr(args, flag))
    for flag in ("time_ranks", "time_warmup", "threads"):
        count(0)(flag.replace("_", "-"), getattr(args, flag))
    seconds("time-limit", args.time_limit)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in BENCH_MODELS for m in models):
        raise ConfigError(f"--models {args.models!r}: give a comma-separated list of {', '.join(BENCH_MODELS)}")
    if "llama" in models and args.llama_model not in zoo_names(LANGUAGE):
        raise ConfigError(f"--llama-model {args.llama_model!r}: give a language model of the zoo "
                          f"({', '.join(zoo_names(LANGUAGE))})")
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ConfigError(f"--levels {args.levels!r}: give a comma-separated list of {', '.join(LEVELS)}")
    try:
        coverages = [float(c) for c in args.coverages.split(",") if c.strip()]
    except ValueError:
        coverages = []
    if not coverages or any(not 0 < c <= 1 for c in coverages):
        raise ConfigError(f"--coverages {args.coverages!r}: give comma-separated numbers in (0, 1], e.g. 0.75,0.5")
    import torch

    try:
        torch.device(args.device)
    except RuntimeError as e:
        raise ConfigError(f"--device {args.device!r}: not a device ({e}); use cpu or cuda") from e


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a dict of field values (unknown keys are rejected)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    if p.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML ({e})") from e
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError as e:
            raise ConfigError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); or use TOML") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(e).split())}); fix the line named") from e
    else:
        raise ConfigError(f"--config {path}: use a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of settings at the top level")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown settings {unknown}; known: {', '.join(sorted(known))}")
    return data
