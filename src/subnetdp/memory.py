"""Measured memory of a training step, and its first-principles prediction from a plan.

Measured (DESIGN.md section 5), for one module and its optimizer:

* model state: parameters, gradients, optimizer state (every tensor in ``optimizer.state``), buffers;
* activations: the bytes autograd saves for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (:class:`SavedTensorMeter`). Each storage is counted
  once, however many times and through however many views it is saved. Saved tensors that are the
  model's parameters or buffers (a linear layer saves its weight, batch norm its running statistics)
  are model state, not activations: they are reported apart;
* the device peak: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the process's resident-set
  high-water mark, which is process-wide (everything the process ever allocated counts, including
  the allocator's caches), so it is a coarse check only.

Predicted, for a worker of a :class:`~subnetdp.plan.Plan`:

* model state = parameter elements x 4 bytes x (1 parameter + 1 gradient + optimizer states), with
  0 states for plain SGD, 1 for SGD with momentum, 2 for Adam(W) (fp32 throughout);
* activations, from an :class:`ActivationProfile` of the *full* model measured once with module hooks
  (each saved storage is credited to the module running when it was first saved):

  - block level: ``always-kept part + sum of the held blocks' parts``. A skipped block saves nothing
    and its successor saves the same-sized tensor it would have saved anyway, so the parts add up;
  - neuron level: ``fixed part + sum over width groups of f_g x (the group's width-dependent part)``,
    where ``f_g = held / size`` is the fraction of group ``g``'s width the worker holds. The
    width-dependent part of a group is what is saved between the end of its first producer (the layer
    whose output width is sliced) and the end of its consumer (the layer that sums over that width),
    not counting what the producers themselves save (their inputs, which keep full width). It is
    measured twice: as the full model runs (used where ``f_g = 1``) and with the subnetwork's
    inverted-scaling hook installed at factor 1 (used where ``f_g < 1``), so that whatever that hook
    saves is counted (it scales the consumer's output, which saves nothing extra today);
  - activations scale linearly with the batch (a profile taken at batch ``b0`` is multiplied by
    ``b / b0``; the per-channel statistics that batch norm saves do not scale, a negligible error).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from subnetdp.init import ModelFactory, materialize
from subnetdp.plan import OPTIMIZER_STATES, Plan
from subnetdp.subnet import inverted_scaling_hook
from subnetdp.units import find_blocks, find_width_groups

LossFn = Callable[[nn.Module, Any], Any]  # returns the loss, or (loss, metrics)
BYTES_PER_ELEMENT = 4  # predictions are for fp32 parameters, gradients, optimizer state and activations


# ---- counting ----------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def _storage_key(t: torch.Tensor) -> tuple[Hashable, int]:
    """``(key, bytes)`` of the storage behind ``t``: views of one storage share the key."""
    t = _local(t)
    try:
        s = t.untyped_storage()
        return ("storage", t.device.type, s.data_ptr(), s.nbytes()), s.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage
        return ("object", id(t)), t.numel() * t.element_size()


def _storage_ptrs(tensors: Iterator[torch.Tensor]) -> set[Hashable]:
    return {_storage_key(t)[0] for t in tensors}


class SavedTensorMeter:
    """Count the bytes autograd saves for backward while the context is open.

    >>> with SavedTensorMeter(model) as meter:
    ...     loss = loss_fn(model(x), y)
    >>> meter.activation_bytes, meter.param_bytes

    Every storage is counted once (keyed by its data pointer and size), by whichever save reaches it
    first. Storages of ``model``'s parameters go to ``param_bytes`` and of its buffers to
    ``buffer_bytes``; everything else is ``activation_bytes``. ``owner()``, when given, is called at
    each first save and the bytes are also added to ``by_owner[owner()]`` (module attribution).
    Only the forward should run inside the context; the saved tensors are returned unchanged, so
    nothing is copied and backward works as usual after the context closes.
    """

    def __init__(self, model: nn.Module | None = None, owner: Callable[[], Hashable] | None = None) -> None:
        self._params = _storage_ptrs(model.parameters()) if model is not None else set()
        self._buffers = _storage_ptrs(model.buffers()) if model is not None else set()
        self._owner = owner
        self._seen: set[Hashable] = set()
        self._hooks: contextlib.AbstractContextManager | None = None
        self.activation_bytes = 0
        self.param_bytes = 0
        self.buffer_bytes = 0
        self.saves = 0  # pack calls, duplicates included
        self.by_owner: dict[Hashable, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.saves += 1
        key, nbytes = _storage_key(t)
        if key in self._seen:
            return t.detach()
        self._seen.add(key)
        if key in self._params:
            self.param_bytes += nbytes
        elif key in self._buffers:
            self.buffer_bytes += nbytes
        else:
            self.activation_bytes += nbytes
            if self._owner is not None:
                o = self._owner()
                self.by_owner[o] = self.by_owner.get(o, 0) + nbytes
        # Detached: the same storage, without the grad_fn. Returning ``t`` itself would make a saved
        # output reference its own grad_fn, a cycle that no garbage collector frees when the graph is
        # dropped without a backward (as profiling does): its activations would stay allocated.
        return t.detach()

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and buffers that exist now (local shards only).

    Optimizer state counts every tensor in ``optimizer.state`` (AdamW's scalar ``step`` counters too).
    """
    params = list(model.parameters())
    out = {
        "param_bytes": sum(_local(p).numel() * p.element_size() for p in params),
        "grad_bytes": sum(_local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer_bytes": 0,
        "buffer_bytes": sum(_local(b).numel() * b.element_size() for b in model.buffers()),
    }
    if optimizer is not None:
        out["optimizer_bytes"] = sum(_local(t).numel() * t.element_size() for st in optimizer.state.values()
                                     for t in st.values() if isinstance(t, torch.Tensor))
    return out


def make_optimizer(name: str, params: Iterator[nn.Parameter] | Sequence[nn.Parameter], lr: float = 0.01
                   ) -> torch.optim.Optimizer:
    """The optimizers the predictions know: ``sgd``, ``sgd-momentum`` (0.9), ``adamw``/``adam``."""
    if name not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer {name!r} unknown; choose one of {sorted(OPTIMIZER_STATES)}")
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


# ---- process peak (CPU) -----------------------------------------------------------------------------
def _proc_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset Linux's resident-set high-water mark (VmHWM) to the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _loss_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def measure_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, loss_fn: LossFn,
                 device: torch.device | str | None = None, count_saved: bool = True) -> dict[str, float]:
    """Run one training step (forward, backward, optimizer step) and measure its memory.

    Returns the :func:`state_bytes` breakdown after the step, ``activation_bytes`` (saved for
    backward, parameters and buffers excluded; those are ``saved_param_bytes``/``saved_buffer_bytes``),
    ``step_s``, and the device peak: ``peak_allocated_bytes`` on CUDA (reset before the step), or on a
    CPU ``peak_rss_bytes`` (process-wide, since the process started) and, where Linux allows resetting
    the high-water mark, ``step_rss_growth_bytes`` (peak during the step minus the RSS before it).
    ``count_saved=False`` runs without the saved-tensor hooks (their Python calls would enter the step
    time) and leaves ``activation_bytes`` and ``total_bytes`` out.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    out: dict[str, float] = {}
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        reset = _reset_rss_peak()
        before = _proc_status("VmRSS")
    start = time.perf_counter()
    meter = SavedTensorMeter(model) if count_saved else None
    with meter if meter is not None else contextlib.nullcontext():
        loss = _loss_of(loss_fn(model, batch))
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize(device)
    out["step_s"] = time.perf_counter() - start
    if cuda:
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["allocated_before_bytes"] = before
    else:
        out["peak_rss_bytes"] = _max_rss_bytes()
        hwm = _proc_status("VmHWM")
        if reset and hwm is not None and before is not None:
            out["step_rss_growth_bytes"] = hwm - before
    out.update(state_bytes(model, optimizer))
    out["state_bytes"] = out["param_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    if meter is not None:
        out.update(activation_bytes=meter.activation_bytes, saved_param_bytes=meter.param_bytes,
                   saved_buffer_bytes=meter.buffer_bytes)
        out["total_bytes"] = out["state_bytes"] + out["activation_bytes"]
    return out


# ---- workloads ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What a step runs: a model factory, a batch maker ``(batch_size, device, seed) -> batch``, a loss."""

    name: str
    factory: ModelFactory
    make_batch: Callable[[int, torch.device, int], Any]
    loss_fn: LossFn


def _image_batch(batch_size: int, device: torch.device, seed: int, *, channels: int, size: int, classes: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, channels, size, size, generator=g)
    y = torch.randint(0, classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def _token_batch(batch_size: int, device: torch.device, seed: int, *, seq_len: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
    return t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)


def _image_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _token_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    logits = model(batch[0])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def image_workload(model: str = "resnet18", width: int = 16, num_classes: int = 10, image_size: int = 32,
                   channels: int = 3) -> Workload:
    """A zoo image model on synthetic ``image_size`` x ``image_size`` inputs, cross-entropy loss."""
    import functools

    from subnetdp.models import get_model

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_channels": channels}
    if model in ("resnet18", "resnet50"):
        kwargs["width"] = width
    factory = functools.partial(get_model, model, **kwargs)
    maker = functools.partial(_image_batch, channels=channels, size=image_size, classes=num_classes)
    label = f"{model}(width={width})" if "width" in kwargs else model
    return Workload(label, factory, maker, _image_loss)


def text_workload(model: str = "llama_char_small", seq_len: int = 128, vocab_size: int = 65,
                  **overrides: Any) -> Workload:
    """A zoo LLaMA preset on random tokens (next-token cross-entropy), ``seq_len`` tokens per sample."""
    import functools

    from subnetdp.models import get_model

    factory = functools.partial(get_model, model, vocab_size=vocab_size, max_seq_len=seq_len, **overrides)
    maker = functools.partial(_token_batch, seq_len=seq_len, vocab=vocab_size)
    extra = "".join(f", {k}={v}" for k, v in overrides.items())
    return Workload(f"{model}(vocab={vocab_size}, seq={seq_len}{extra})", factory, maker, _token_loss)


# ---- the activation profile of the full model -------------------------------------------------------
class _Attribution:
    """Who is running when a tensor is first saved: the innermost block (or shortcut), and the open width
    group (between its first producer's end and its consumers' end, outside the producers)."""

    def __init__(self, model: nn.Module, blocks: Sequence, groups: Sequence) -> None:
        self.stack: list[str] = []
        self.producer_depth = 0
        self.open: list[str] = []
        self.handles: list[Any] = []
        modules = dict(model.named_modules())
        watch = {}
        for b in blocks:
            watch[b.name] = f"block:{b.name}"
            if b.shortcut:
                watch[f"{b.name}.{b.shortcut}"] = f"shortcut:{b.name}"
        for path, key in watch.items():
            self._hook(modules[path], lambda key=key: self.stack.append(key), lambda key=key: self.stack.pop())
        self._pending: dict[str, set[str]] = {}
        for g in groups:
            producers = {s.tensor.rsplit(".", 1)[0] for s in g.slices if s.dim == 0}
            producers = {p for p in producers if getattr(modules[p], "weight", None) is not None
                         and modules[p].weight.dim() >= 2}
            for p in producers:
                self._hook(modules[p], self._enter_producer, lambda g=g.name: self._leave_producer(g))
            for c in g.consumers:
                self._hook(modules[c], lambda: None, lambda g=g.name, c=c: self._leave_consumer(g, c))
            self._pending[g.name] = set(g.consumers)
        self._consumers = dict(self._pending)
        self._started: set[str] = set()

    def _hook(self, module: nn.Module, pre: Callable[[], None], post: Callable[[], None]) -> None:
        def pre_hook(*_: object) -> None:
            pre()

        def post_hook(*_: object) -> None:  # returns None: a forward hook's result would replace the output
            post()

        self.handles.append(module.register_forward_pre_hook(pre_hook, prepend=True))
        self.handles.append(module.register_forward_hook(post_hook, always_call=True))

    def _enter_producer(self) -> None:
        self.producer_depth += 1

    def _leave_producer(self, group: str) -> None:
        self.producer_depth -= 1
        if group not in self._started:
            self._started.add(group)
            self._pending[group] = set(self._consumers[group])
            self.open.append(group)

    def _leave_consumer(self, group: str, consumer: str) -> None:
        if group in self.open:
            self._pending[group].discard(consumer)
            if not self._pending[group]:
                self.open.remove(group)

    def owner(self) -> tuple[str, str | None]:
        block = self.stack[-1] if self.stack else "kept"
        group = self.open[-1] if self.open and self.producer_depth == 0 else None
        return block, group

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class ActivationProfile:
    """Saved-for-backward bytes of the full model at ``batch_size``, split by unit.

    ``block_bytes[name]``: bytes first saved inside block ``name`` (its shortcut excluded);
    ``group_bytes[g]`` / ``group_bytes_scaled[g]``: width group ``g``'s width-dependent bytes as the
    full model runs / with the inverted-scaling input hooks at factor 1 (see the module docstring).
    """

    batch_size: int
    total: int
    block_bytes: dict[str, int]
    group_bytes: dict[str, int]
    group_bytes_scaled: dict[str, int]
    shortcut_bytes: dict[str, int] = field(default_factory=dict)
    total_scaled: int = 0

    def kept_bytes(self, plan: Plan) -> int:
        """Bytes that every worker saves at this batch size, at ``plan``'s level."""
        if plan.level == "block":
            return self.total - sum(self.block_bytes.get(u.name, 0) for u in plan.units)
        return self.total - sum(self.group_bytes.get(g.name, 0) for g in plan.groups)

    def predict(self, plan: Plan, worker: int, batch_size: int | None = None,
                neuron_scaling: str = "inverted") -> int:
        """Predicted activation bytes of ``worker``'s subnetwork (see the module docstring)."""
        scale = (batch_size or self.batch_size) / self.batch_size
        total = self.kept_bytes(plan)
        if plan.level == "block":
            total += sum(self.block_bytes.get(u.name, 0) for u in plan.units_of(worker))
        else:
            held: dict[str, int] = {}
            for u in plan.units_of(worker):
                held[u.group] = held.get(u.group, 0) + 1
            for g in plan.groups:
                f = held.get(g.name, 0) / g.size
                part = self.group_bytes if f == 1 or neuron_scaling == "none" else self.group_bytes_scaled
                total += f * part.get(g.name, 0)
        return round(total * scale)


def _measure_saved(model: nn.Module, batch: Any, loss_fn: LossFn, blocks: Sequence, groups: Sequence
                   ) -> SavedTensorMeter:
    attribution = _Attribution(model, blocks, groups)
    try:
        model.train()
        with SavedTensorMeter(model, owner=attribution.owner) as meter:
            loss = _loss_of(loss_fn(model, batch))
        del loss  # frees the graph: only the forward's saves matter
    finally:
        attribution.remove()
    return meter


def profile_activations(model: nn.Module | ModelFactory, batch: Any, loss_fn: LossFn, batch_size: int,
                        *, seed: int = 0, device: torch.device | str = "cpu", blocks: Sequence | None = None,
                        groups: Sequence | None = None) -> ActivationProfile:
    """Measure the full model's saved bytes per block and per width group, once.

    ``model`` is a factory (materialised on ``device`` with ``seed``) or a real full model; ``batch``
    holds ``batch_size`` samples. ``blocks``/``groups`` default to discovery; pass a plan's
    ``plan.blocks``/``plan.groups`` when it names its units. Runs the forward twice (without and with
    the scaling hooks at factor 1).
    """
    full = model if isinstance(model, nn.Module) and not _is_meta(model) else materialize(model, seed, device)
    if blocks is None:
        blocks = find_blocks(full)
    if groups is None:
        try:
            groups = find_width_groups(full)
        except ValueError:  # no inner widths: block level only
            groups = []
    plain = _measure_saved(full, batch, loss_fn, blocks, groups)
    handles = []
    modules = dict(full.named_modules())
    for g in groups:
        for c in g.consumers:  # the subnetwork's inverted scaling, at factor 1: same values, its copies
            handles.append(modules[c].register_forward_hook(inverted_scaling_hook(1.0)))
    try:
        scaled = _measure_saved(full, batch, loss_fn, blocks, groups)
    finally:
        for h in handles:
            h.remove()
    return ActivationProfile(
        batch_size=batch_size,
        total=plain.activation_bytes,
        block_bytes=_sum_by(plain.by_owner, 0, "block:"),
        group_bytes=_sum_by(plain.by_owner, 1, ""),
        group_bytes_scaled=_sum_by(scaled.by_owner, 1, ""),
        shortcut_bytes=_sum_by(plain.by_owner, 0, "shortcut:"),
        total_scaled=scaled.activation_bytes,
    )


def _is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters())


def _sum_by(by_owner: dict, index: int, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, nbytes in by_owner.items():
        name = key[index]
        if name is not None and name.startswith(prefix):
            out[name[len(prefix):]] = out.get(name[len(prefix):], 0) + nbytes
    return out


def predict_worker(plan: Plan, worker: int, optimizer: str, profile: ActivationProfile | None = None,
                   batch_size: int | None = None, neuron_scaling: str = "inverted") -> dict[str, int]:
    """First-principles bytes of ``worker``: parameters, gradients, optimizer state, activations, total."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer {optimizer!r} unknown; choose one of {sorted(OPTIMIZER_STATES)}")
    n = plan.param_count(worker) * BYTES_PER_ELEMENT
    out = {"param_bytes": n, "grad_bytes": n, "optimizer_bytes": n * OPTIMIZER_STATES[optimizer]}
    out["state_bytes"] = plan.model_state_bytes(worker, optimizer, BYTES_PER_ELEMENT)
    assert out["state_bytes"] == sum(out[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes"))
    if profile is not None:
        out["activation_bytes"] = profile.predict(plan, worker, batch_size, neuron_scaling)
        out["total_bytes"] = out["state_bytes"] + out["activation_bytes"]
    return out


# ---- backward masking (docs/masking.md) ----------------------------------------------------------------
def _frozen_sets(plan: Plan) -> dict[str, list[str]]:
    """Per unit key (block name, or width group at neuron level): the parameters it would freeze."""
    if plan.level == "block":
        out: dict[str, list[str]] = {u.name: [] for u in plan.units}
        for name in plan.params:
            unit = plan.block_of(name)
            if unit is not None:
                out[unit.name].append(name)
        return out
    return {g.name: [s.tensor for s in g.slices if s.tensor in set(plan.params)] for g in plan.groups}


def profile_weight_grads(model: nn.Module | ModelFactory, batch: Any, loss_fn: LossFn, plan: Plan,
                         *, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, int]:
    """Saved bytes that only the weight gradients of each unit need, measured on the full model.

    For each block (or width group), the full forward's saved bytes with and without that unit's
    parameters requiring gradients; the difference is what backward masking saves on a worker that
    does not hold it (inputs of linear layers and convolutions that nothing else saves). One forward
    per unit at the batch of ``batch``.
    """
    full = model if isinstance(model, nn.Module) and not _is_meta(model) else materialize(model, seed, device)
    full.train()
    params = dict(full.named_parameters())

    def saved() -> int:
        with SavedTensorMeter(full) as meter:
            loss = _loss_of(loss_fn(full, batch))
        del loss
        return meter.activation_bytes

    base = saved()
    out = {}
    for key, names in _frozen_sets(plan).items():
        for n in names:
            params[n].requires_grad_(False)
        try:
            out[key] = base - saved()
        finally:
            for n in names:
                params[n].requires_grad_(True)
    return out


def backward_trainable_elements(plan: Plan, worker: int) -> int:
    """Parameter elements that require gradients on ``worker`` under backward masking.

    Block level: exactly the worker's parameters in the plan. Neuron level: every tensor with a held
    element, whole (a partly held tensor has a full-size gradient whose other slices are zeroed).
    """
    if plan.level == "block":
        return plan.param_count(worker)
    tmap = plan.tensor_map(worker)
    return sum(_prod(plan.shapes[n]) for n in plan.params
               if n in tmap and (tmap[n] is None or len(tmap[n][1]) > 0))


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def predict_backward_worker(plan: Plan, worker: int, optimizer: str, profile: ActivationProfile | None = None,
                            weight_grads: dict[str, int] | None = None,
                            batch_size: int | None = None) -> dict[str, int]:
    """Bytes of ``worker`` under backward masking: the full model's parameters, gradients and optimizer
    state of its trainable elements (:func:`backward_trainable_elements`), and the full forward's
    activations minus what only the weight gradients of the units it does not train would save
    (``weight_grads`` from :func:`profile_weight_grads`; a neuron-level group counts only when the
    worker holds none of it).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer {optimizer!r} unknown; choose one of {sorted(OPTIMIZER_STATES)}")
    trained = backward_trainable_elements(plan, worker) * BYTES_PER_ELEMENT
    out = {"param_bytes": plan.total_params * BYTES_PER_ELEMENT, "grad_bytes": trained,
           "optimizer_bytes": trained * OPTIMIZER_STATES[optimizer]}
    out["state_bytes"] = out["param_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    if profile is not None:
        scale = (batch_size or profile.batch_size) / profile.batch_size
        if plan.level == "block":
            idle = [u.name for u in plan.units if not plan.holds(worker, u)]
        else:
            held = {u.group for u in plan.units_of(worker)}
            idle = [g.name for g in plan.groups if g.name not in held]
        spared = sum((weight_grads or {}).get(key, 0) for key in idle)
        out["activation_bytes"] = round((profile.total - spared) * scale)
        out["total_bytes"] = out["state_bytes"] + out["activation_bytes"]
    return out
