"""A worker's physical subnetwork, built from the architecture and the plan.

Units the worker does not hold never exist on it: a skipped block is replaced by an identity
(the skip connection carries the signal) or by its shortcut path, and a sliced layer holds only its
rows or columns. Construction starts on the meta device and gives each module its value one at a
time (seeded init, or a given model's values), narrowing before the move to the device.

State-dict names stay those of the full model, so ``plan.tensor_map(worker)`` says where every
subnetwork tensor sits in the full model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from subnetdp.checkpointing import checkpoint_blocks
from subnetdp.init import ModelFactory, materialize_, structure_of
from subnetdp.options import SDPOptions, sdp_options
from subnetdp.planning import Plan


class ShortcutOnly(nn.Module):
    """A transition block reduced to its shortcut path (then the block's post-add ReLU, if it has one)."""

    def __init__(self, shortcut_name: str, shortcut: nn.Module, relu: nn.Module | None) -> None:
        super().__init__()
        self.shortcut_name = shortcut_name
        self.add_module(shortcut_name, shortcut)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self, self.shortcut_name)(x)
        return self.relu(y) if self.relu is not None else y


class SkippedBlock(nn.Identity):
    """A block this worker does not hold: returns its input, so the skip connection carries the signal.

    Accepts and ignores the masks, positions and caches that decoder layers (Hugging Face's) are
    called with besides the hidden states.
    """

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    parent._modules[child] = new


def _fix_standard_attrs(model: nn.Module) -> None:
    """Keep ``in_features``/``out_channels``/``num_features`` truthful after narrowing."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = w.shape
        elif isinstance(m, nn.modules.conv._ConvNd):
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            m.num_features = w.shape[0]


def inverted_scaling_hook(factor: float) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
    """A forward hook equal to scaling the layer's input by ``factor`` (the layer is linear in it).

    Scaling the output instead of the input saves memory: the layer saves its input for backward
    and a multiplication by a constant saves nothing, so no scaled copy of the input is kept.
    """

    def hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        bias = getattr(module, "bias", None)
        scaled = out * factor
        if bias is not None:  # only the input's part scales: take (factor - 1) * bias back out
            # channels at dim 1 for convolutions; last for linear layers (nn.Linear, Hugging Face's Conv1D)
            shape = (-1, *[1] * (out.dim() - 2)) if isinstance(module, nn.modules.conv._ConvNd) else (-1,)
            scaled = scaled + (bias * (1 - factor)).view(shape)
        return scaled

    return hook


def build_subnetwork(
    model: nn.Module | ModelFactory,
    plan: Plan,
    worker: int,
    options: SDPOptions | None = None,
    *,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> nn.Module:
    """Build ``worker``'s subnetwork of ``model`` under ``plan``.

    Options (:class:`subnetdp.SDPOptions`, or its fields as keywords): ``seed``, ``init``,
    ``neuron_scaling`` and ``checkpointing`` apply.

    ``model`` is a factory, a model on the meta device, or a real model (its current values are
    sliced). A factory's values: with ``init="full"`` (default) its own, built once in host memory
    under ``torch.manual_seed(seed)`` and sliced; with ``init="per-module"`` each module's from
    ``(seed, module path)`` on its own, never building the full model (a meta model always so). Either
    way the result equals the slice of :func:`subnetdp.materialize` with the same ``seed`` and ``init``.

    ``neuron_scaling="inverted"`` scales each layer that sums over a sliced width as if its input
    were multiplied by ``size / held``, so activations keep the full model's scale and the assembled model needs
    no rescaling at evaluation (as width-sliced federated methods do).

    ``checkpointing="blocks"`` runs every block the worker trains (held or narrowed) under activation
    checkpointing (:mod:`subnetdp.checkpointing`), as DDP+ckpt does for the full model; a transition
    reduced to its shortcut (a 1x1 convolution) runs plainly, as the memory prediction assumes. Names
    and state-dict keys are unchanged.
    """
    options = sdp_options(options, **overrides)
    seed, init, neuron_scaling, checkpointing = options.seed, options.init, options.neuron_scaling, options.checkpointing
    plan.check_worker(worker)
    if checkpointing == "blocks" and not plan.blocks:
        raise ValueError("checkpointing='blocks': the plan knows no residual blocks of this model; "
                         "make the plan with blocks=[...] (module paths) or use checkpointing=None")
    check_heads(plan)
    structure, source = structure_of(model, seed, init)
    check_architecture(structure, plan)
    tmap = plan.tensor_map(worker)
    dropped = plan.dropped_blocks(worker)
    skip = [b.name for b in dropped if not b.transition]
    # a transition reduced to its shortcut keeps the shortcut's tensors, so only its other parts are skipped
    for b in dropped:
        if b.transition:
            block = structure.get_submodule(b.name)
            skip += [f"{b.name}.{n}" for n, _ in block.named_children() if n != b.shortcut]

    def narrow(name: str, value: torch.Tensor) -> torch.Tensor:
        where = tmap[name]
        if where is None:
            return value
        dim, idx = where
        return value.index_select(dim, torch.tensor(idx, dtype=torch.long))

    materialize_(structure, seed, source=source, transform=narrow, skip=skip, device=device)
    for b in dropped:
        if b.transition:
            block = structure.get_submodule(b.name)
            relu = getattr(block, "relu", None)
            _set_module(structure, b.name, ShortcutOnly(b.shortcut, getattr(block, b.shortcut),
                                                         relu if isinstance(relu, nn.Module) else None))
        else:
            _set_module(structure, b.name, SkippedBlock())
    for spec, value in plan.attrs(worker):
        setattr(structure.get_submodule(spec.module), spec.attr, value)
    _fix_standard_attrs(structure)
    if neuron_scaling == "inverted":
        for path, factor in plan.consumer_scales(worker).items():
            if factor != 1.0:
                structure.get_submodule(path).register_forward_hook(inverted_scaling_hook(factor))
    if checkpointing == "blocks":
        present = [b.name for b in plan.blocks
                   if not isinstance(structure.get_submodule(b.name), (SkippedBlock, ShortcutOnly))]
        if present:  # a worker holding no block has nothing to checkpoint
            checkpoint_blocks(structure, present)
    leftover = [n for n, t in structure.named_parameters() if t.is_meta]
    assert not leftover, f"internal error: tensors left on meta: {leftover[:5]}"
    return structure


def check_heads(plan: Plan) -> None:
    """Reject a neuron-level plan in which some worker holds none of a GPT-2 attention layer's heads.

    GPT-2's attention splits its fused projection by ``split_size``, which is 0 with zero heads, so
    its forward fails (the zoo's, timm's and Hugging Face Llama's attention run with zero heads and
    return the output projection's bias). The check covers every worker, so that under
    torch.distributed every rank raises the same error at setup instead of one rank failing alone.
    """
    held: dict[str, list[int]] = {}
    for g in plan.groups:
        if g.name.endswith(":heads") and any(a.attr == "split_size" for a in g.attrs):
            held[g.name] = [0] * plan.workers
    if not held:
        return
    for u in plan.units:
        if u.group in held:
            for k in plan.holders(u):
                held[u.group][k] += 1
    for g in plan.groups:
        counts = held.get(g.name)
        if counts is not None and 0 in counts:
            r = plan.holders_per_unit
            need = -(-plan.workers // g.size) / plan.workers  # ceil(K / heads) holders per unit
            raise ValueError(
                f"worker {counts.index(0)} would hold none of the {g.size} heads of {g.name.split(':')[0]} "
                f"(K={plan.workers} workers, C={plan.coverage:g}, r={r}); GPT-2 attention with zero heads cannot run. "
                f"Use a coverage of at least {need:g}, fewer workers, or level='block'")


def check_architecture(model: nn.Module, plan: Plan) -> None:
    """Fail with a clear message when ``model``'s tensors differ from those the plan was made for."""
    mine = {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    theirs = plan.shapes
    if mine != theirs:
        extra = sorted(set(mine) - set(theirs))[:5]
        missing = sorted(set(theirs) - set(mine))[:5]
        shape = [n for n in set(mine) & set(theirs) if mine[n] != theirs[n]][:5]
        raise ValueError(
            "the model does not match the plan's architecture: "
            f"tensors not in the plan {extra}, missing tensors {missing}, different shapes {shape}. "
            "Build the plan from the same model (same constructor arguments)."
        )
