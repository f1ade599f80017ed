"""The main job's configuration: one dataclass, filled from a TOML/YAML file and then flags.

Every field is a ``subnetdp train`` flag (``--field-name``). ``validate`` rejects bad values before
any work starts, naming the flag and what it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subnetdp.data import VISION_DATASETS
from subnetdp.evaluation import RESIDUAL_SCALINGS
from subnetdp.init import INIT_MODES
from subnetdp.models import MODELS
from subnetdp.planning import JOB_BALANCES, LEVELS, TRANSITIONS, check_coverage
from subnetdp.options import MASKINGS, NEURON_SCALINGS, SYNC_MODES, SDPOptions

STRATEGIES = ("sdp", "ddp", "fsdp", "ddp-ckpt")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
TEXT_DATASETS = ("tinyshakespeare",)
WIDTH_MODELS = ("resnet18", "resnet50", "swin_t_cifar")  # the models --width reaches (swin_t_cifar: embedding width)
MAX_EPOCHS, MAX_STEPS = 1e6, 10**12  # beyond these a run cannot end (and 1e308 epochs overflowed to a traceback)


class ConfigError(ValueError):
    """A bad configuration value; the message names the flag and what it accepts."""


@dataclass
class TrainConfig:
    # what to train
    model: str = field(default="resnet18", metadata={"help": f"zoo model ({', '.join(MODELS)}) or 'module:callable'"})
    width: int | None = field(default=None, metadata={
        "help": "ResNet base width (resnet18 default 64); swin_t_cifar embedding width (default 96)"})
    dataset: str = field(default="cifar10-jpeg", metadata={
        "help": f"{', '.join(VISION_DATASETS)}, tinyshakespeare, a UTF-8 text file/folder, or a token file "
                "(subnetdp.data.write_token_file; memory-mapped)"})
    data_dir: str | None = field(default=None, metadata={"help": "where the data set lives (or goes, with --download)"})
    download: bool = field(default=False, metadata={"help": "download torchvision data sets into --data-dir"})
    train_subset: int | None = field(default=None, metadata={"help": "train on N examples drawn with --seed (quick runs)"})
    test_subset: int | None = field(default=None, metadata={"help": "evaluate on N test examples drawn with --seed (quick runs)"})
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
    simulate: int | None = field(default=None, metadata={"help": "run K SDP workers in this one process"})
    workers: int | None = field(default=None, metadata={"help": "start K processes on this machine (torchrun's launcher)"})
    max_restarts: int = field(default=0, metadata={
        "help": "--workers: restart the processes up to N times after a failure; each restart resumes from the "
                "newest intact checkpoint"})
    timeout: float = field(default=300.0, metadata={
        "help": "seconds a rank waits for the others in a collective before the run ends naming the missing rank"})
    sync: str = field(default="grads", metadata={"choices": SYNC_MODES, "help": "SDP sync: grads (every step) or params (every --sync-every steps)"})
    sync_every: int = field(default=1, metadata={"help": "steps between parameter averages with --sync params"})
    neuron_scaling: str = field(default="inverted", metadata={"choices": NEURON_SCALINGS, "help": "neuron level: inverted (scale kept width by 1/C) or none"})
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
    epochs: float = field(default=1.0, metadata={"help": "epochs (text: --steps-per-epoch steps each)"})
    steps: int | None = field(default=None, metadata={"help": "total optimizer steps (overrides --epochs)"})
    flop_matched: bool = field(default=False, metadata={"help": "SDP: train 1/C times as many steps, of --steps or --epochs (equal FLOPs to DDP)"})
    batch_size: int = field(default=128, metadata={"help": "batch size per worker"})
    optimizer: str = field(default="sgd", metadata={"choices": OPTIMIZERS, "help": "sgd (Nesterov momentum) or adamw"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (sgd 0.1, adamw 1e-3 by default)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay (only held parameters exist on a worker)"})
    schedule: str = field(default="cosine", metadata={"choices": SCHEDULES, "help": "cosine (after warm-up), onecycle, or constant"})
    warmup: float = field(default=0.05, metadata={"help": "warm-up as a fraction of all steps"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing for classification"})
    grad_clip: float | None = field(default=None, metadata={"help": "clip the gradient norm (of the averaged gradient)"})
    seq_len: int = field(default=128, metadata={"help": "text: tokens per sequence"})
    tokenizer: str = field(default="char", metadata={
        "help": "text: char, byte, tiktoken:NAME, tokenizers:PATH (a tokenizer.json) or tokenizers:HUB_NAME"})
    steps_per_epoch: int = field(default=200, metadata={"help": "text: steps per epoch"})
    # evaluation
    eval_every: int = field(default=1, metadata={"help": "evaluate the assembled full model every N epochs (0: only at the end)"})
    bn_recalibrate: int = field(default=20, metadata={
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
    threads: int | None = field(default=None, metadata={"help": "CPU threads per process"})
    # outputs
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/<strategy>-<level>-C<coverage>-s<seed>)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its newest intact checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run files of another run in --out (command line only: refused in a --config file)"})
    checkpoint_every: int = field(default=0, metadata={"help": "save a checkpoint every N steps (0: at epoch ends)"})
    log_every: int = field(default=10, metadata={"help": "write step metrics every N steps"})
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
        """The SDP options this configuration trains with (the same object for both SDP backends)."""
        return SDPOptions(seed=self.seed, sync=self.sync, sync_every=self.sync_every, neuron_scaling=self.neuron_scaling,
                          checkpointing=self.checkpointing, masking=self.masking, init=self.init)

    @property
    def checkpointing(self) -> str:
        """``"blocks"`` when activations are checkpointed (the flag, or ``--strategy ddp-ckpt``), else ``"none"``."""
        return "blocks" if self.activation_checkpointing or self.strategy == "ddp-ckpt" else "none"

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
        from subnetdp.checkpoint import atomic_write

        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _choice(flag: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"--{flag} {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _positive(flag: str, value: float | None, allow_none: bool = True, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"--{flag} {value!r}: must be a finite number {'>= 0' if allow_zero else '> 0'}")


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


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad flag; does no work."""
    for f in dataclasses.fields(TrainConfig):
        if "choices" in f.metadata:
            _choice(f.name.replace("_", "-"), getattr(cfg, f.name), f.metadata["choices"])
    if cfg.masking == "backward" and cfg.strategy != "sdp":
        raise ConfigError(f"--masking backward is an SDP regime; --strategy {cfg.strategy} has no masking")
    if cfg.masking == "backward" and cfg.sync != "grads":
        raise ConfigError("--masking backward averages gradients every step; use --sync grads")
    if cfg.model not in MODELS and ":" not in cfg.model:
        raise ConfigError(f"--model {cfg.model!r} is unknown; choose one of: {', '.join(MODELS)}, "
                          "or give your own as 'package.module:callable'")
    for flag in ("epochs", "batch_size", "seq_len", "steps_per_epoch", "sync_every", "log_every"):
        _positive(flag.replace("_", "-"), getattr(cfg, flag), allow_none=False)
    for flag, most in (("epochs", MAX_EPOCHS), ("steps", MAX_STEPS)):
        if (getattr(cfg, flag) or 0) > most:
            raise ConfigError(f"--{flag} {getattr(cfg, flag)!r}: at most {most:g}; give a run that can end")
    for flag in ("steps", "lr", "grad_clip", "simulate", "workers", "train_subset", "test_subset", "width", "threads"):
        _positive(flag.replace("_", "-"), getattr(cfg, flag))
    for flag in ("weight_decay", "eval_every", "bn_recalibrate", "checkpoint_every", "momentum"):
        _positive(flag.replace("_", "-"), getattr(cfg, flag), allow_zero=True)
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"--momentum {cfg.momentum!r}: must be in [0, 1) (0.9 is usual; 0 turns it off)")
    if not 0 <= cfg.warmup < 1:
        raise ConfigError(f"--warmup {cfg.warmup!r}: a fraction of the steps in [0, 1)")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing {cfg.label_smoothing!r}: must be in [0, 1)")
    if not (isinstance(cfg.timeout, (int, float)) and math.isfinite(cfg.timeout) and cfg.timeout > 0):
        raise ConfigError(f"--timeout {cfg.timeout!r}: seconds, a finite number > 0")
    if cfg.max_restarts < 0:
        raise ConfigError(f"--max-restarts {cfg.max_restarts!r}: must be >= 0")
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
        if not cfg.model.startswith("llama") and ":" not in cfg.model:
            raise ConfigError(f"--model {cfg.model} is an image model but --dataset {cfg.dataset} is text; "
                              "use a language model (llama_tiny, llama_char_small, llama_125m)")
    elif cfg.model.startswith("llama"):
        raise ConfigError(f"--model {cfg.model} is a language model but --dataset {cfg.dataset} is images; "
                          "use --dataset tinyshakespeare or a text file")
    if cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().exists() and not cfg.download:
        raise ConfigError(f"--data-dir {cfg.data_dir}: no such file or folder; give the folder that holds "
                          "the data set (or add --download for torchvision data sets)")
    if cfg.width is not None and cfg.model not in WIDTH_MODELS:
        raise ConfigError(f"--width applies to {', '.join(WIDTH_MODELS)}, not {cfg.model}")


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
