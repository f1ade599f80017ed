"""``SDPOptions``: how a plan is trained, in one frozen, validated object.

Both engines (:class:`subnetdp.SubnetDataParallel`, :class:`subnetdp.Simulation`) and the worker
builders (:func:`subnetdp.build_subnetwork`, :func:`subnetdp.masking.build_backward_worker`) take
these options, as an object or as keywords of the same names; every rule about them is checked
here, once, when the object is made. Ranks compare the :meth:`SDPOptions.digest` at setup, so two
ranks that would issue different collectives fail before the first one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
from dataclasses import dataclass
from typing import Any

from subnetdp.recompute import check_checkpointing
from subnetdp.init import check_init

SYNC_MODES = ("grads", "params")  # average gradients every step, or parameters every sync_every steps
MASKINGS = ("forward", "backward")  # what a worker runs: its subnetwork, or the full forward (docs/masking.md)
NEURON_SCALINGS = ("inverted", "none")
SHARDINGS = ("none", "holders")  # how a held unit's state is stored: whole on every holder, or split over them (FSDP2)
# the dtype sharded parameters are gathered and computed in (FSDP2's MixedPrecisionPolicy; shards, gradient
# reduction and optimizer state stay float32)
PARAM_DTYPES = ("float32", "bfloat16")
DEFAULT_BUCKET_ELEMENTS = 25 * 2**20 // 4  # DDP's default 25 MiB of fp32
DEFAULT_CHECK_EVERY = 100  # holder agreement checked every N training forwards (docs/ddp_habits.md: its cost)


def _whole(name: str, value: object, least: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}={value!r}: need {what}")


def check_sync(sync: str, sync_every: int) -> None:
    """Fail fast on an unknown sync mode or a cadence that is not a positive whole number of steps."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync={sync!r}: choose one of {SYNC_MODES}")
    _whole("sync_every", sync_every, 1, "a positive whole number of steps")


def check_masking(masking: str, sync: str) -> None:
    """Fail fast on an unknown regime, or one combined with parameter averaging (undefined for it)."""
    if masking not in MASKINGS:
        raise ValueError(f"masking={masking!r}: choose one of {MASKINGS}")
    if masking == "backward" and sync != "grads":
        raise ValueError(f"masking='backward' with sync={sync!r}: backward masking averages gradients every "
                         "step and sends the holders' new values to the others; use sync='grads'")


def check_sharding(sharding: str, masking: str, sync: str) -> None:
    """Fail fast on an unknown sharding, or ``"holders"`` with a regime FSDP2 cannot express.

    Sharded over holders, a worker keeps only its shard of each value between steps: backward
    masking's full forward would gather every unit on every worker, and parameter averaging has no
    replicas to average (each holder already keeps the one copy's shard).
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r}: choose one of {SHARDINGS}")
    if sharding == "holders" and masking != "forward":
        raise ValueError(f"sharding='holders' with masking={masking!r}: sharding splits each unit over the workers "
                         "that run it, and backward masking runs every unit on every worker; use masking='forward' "
                         "or sharding='none'")
    if sharding == "holders" and sync != "grads":
        raise ValueError(f"sharding='holders' with sync={sync!r}: a sharded unit has one copy split over its holders, "
                         "so there are no replicas to average; use sync='grads' (gradients averaged over holders "
                         "every step) or sharding='none'")


@dataclass(frozen=True)
class SDPOptions:
    """How a plan is trained. Every field is checked when the object is made (a ``ValueError``
    naming the bad value and the choices).

    - ``seed``: initial values (a factory's own under ``torch.manual_seed(seed)``, or per module);
    - ``sync``: ``"grads"`` (average gradients over holders in every backward) or ``"params"``
      (average parameters every ``sync_every`` optimizer steps, local-SGD style);
    - ``neuron_scaling``: neuron level, ``"inverted"`` (scale kept width by ``size / held``) or ``"none"``;
    - ``checkpointing``: ``"blocks"`` recomputes each residual block in backward (activation
      checkpointing), ``"none"`` (or ``None``) keeps activations;
    - ``masking``: ``"forward"`` (units not held are absent) or ``"backward"`` (full forward, training
      only the held units; :mod:`subnetdp.masking`);
    - ``init``: ``"full"`` (the factory's model built once in host memory and sliced) or
      ``"per-module"`` (module by module, for models too large for host memory);
    - ``bucket_elements``: the distributed engine's all-reduce chunk size (sets which collectives run);
    - ``check_every``: the distributed engine checks holder agreement every N training forwards (0: never);
    - ``sharding``: ``"none"`` (every holder keeps a unit's whole state) or ``"holders"`` (each unit's
      parameters, gradients and optimizer state split over its holders by FSDP2; block level, forward
      masking, gradient sync; :mod:`subnetdp.sharded`). The simulation computes the same math either way;
    - ``param_dtype``: ``"float32"``, or ``"bfloat16"`` with ``sharding="holders"``: FSDP2's mixed precision
      (``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``): parameters are
      gathered and computed in bf16 (half the all-gather bytes), gradients reduced in fp32, the shards and
      the optimizer state stay fp32. The replicated engine takes ``torch.autocast`` instead.
    """

    seed: int = 0
    sync: str = "grads"
    sync_every: int = 1
    neuron_scaling: str = "inverted"
    checkpointing: str | None = "none"
    masking: str = "forward"
    init: str = "full"
    bucket_elements: int = DEFAULT_BUCKET_ELEMENTS
    check_every: int = DEFAULT_CHECK_EVERY
    sharding: str = "none"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "seed", operator.index(self.seed))
        except TypeError:
            raise ValueError(f"seed={self.seed!r}: need a whole number") from None
        check_sync(self.sync, self.sync_every)
        if self.neuron_scaling not in NEURON_SCALINGS:
            raise ValueError(f"neuron_scaling={self.neuron_scaling!r}: choose one of {NEURON_SCALINGS}")
        object.__setattr__(self, "checkpointing", check_checkpointing(self.checkpointing))
        check_masking(self.masking, self.sync)
        check_init(self.init)
        _whole("bucket_elements", self.bucket_elements, 1, "a positive whole number of elements")
        _whole("check_every", self.check_every, 0, "a whole number of steps, 0 (never) or more")
        check_sharding(self.sharding, self.masking, self.sync)
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype={self.param_dtype!r}: choose one of {PARAM_DTYPES}")
        if self.param_dtype != "float32" and self.sharding != "holders":
            raise ValueError(f"param_dtype={self.param_dtype!r} is FSDP2's mixed precision and needs sharding='holders'; "
                             "with sharding='none' keep param_dtype='float32' and train under torch.autocast")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A hash of every field: ranks that differ in it would differ in values or in the collectives they issue."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SDPOptions))


def sdp_options(options: SDPOptions | None = None, **overrides: Any) -> SDPOptions:
    """``options`` (default: all defaults) with ``overrides`` (keywords named as its fields) applied and checked."""
    if options is not None and not isinstance(options, SDPOptions):
        raise TypeError(f"options={options!r}: pass a subnetdp.SDPOptions (or the options as keywords)")
    unknown = sorted(set(overrides) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}: "
                        f"the SDP options are {', '.join(OPTION_NAMES)}")
    base = options if options is not None else SDPOptions()
    return dataclasses.replace(base, **overrides) if overrides else base


def differing(everyone: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rank, only the option fields on which ranks differ (what an error message should show)."""
    keys = [k for k in everyone[0] if len({repr(d.get(k)) for d in everyone}) > 1]
    return [{k: d.get(k) for k in keys} for d in everyone]
