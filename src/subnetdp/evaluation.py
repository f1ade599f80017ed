"""Evaluation conventions for the assembled full model.

At test time every unit is present, while in training each worker saw only its part. Three
conventions reconcile the two (compared on real data in docs/evaluation.md):

- block level, ``scale_residual_branches``: a block held by ``r`` of ``K`` workers was present in a
  fraction ``r/K`` of the training subnetworks, so its residual branch is scaled by ``r/K`` at test
  time, as stochastic depth does (``relu(x + (r/K) * f(x))`` for a ResNet block, ``x + (r/K) *
  attn(...)`` and ``h + (r/K) * mlp(...)`` for a transformer block), the shortcut unscaled. The
  scale is folded into the weights of each branch's last affine layer, so the scaled model is the
  plain architecture with other weights: it is what ``model.safetensors`` holds. By default
  (:func:`residual_scaling_rule`, ``"auto"``) LLaMA-style decoders are not scaled: on them the
  scaling was measured to make the validation loss worse;
- neuron level, inverted scaling during training (``build_subnetwork(neuron_scaling="inverted")``):
  the assembled model then needs no rescaling;
- ``recalibrate_batchnorm``: re-estimate BatchNorm statistics of the full model on training batches.

:func:`evaluation_model` applies exactly the conventions that apply to a trained
:class:`~subnetdp.SubnetDataParallel` or :class:`~subnetdp.Simulation`; the main job evaluates and
ships what it returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from subnetdp.init import materialize_, meta_copy
from subnetdp.planning import Plan
from subnetdp.units.widths import find_width_groups

if TYPE_CHECKING:
    from subnetdp.engine import SubnetDataParallel
    from subnetdp.simulate import Simulation

Batch = torch.Tensor | tuple[torch.Tensor, ...]


def branch_output_layers(block: nn.Module) -> list[str]:
    """Paths (inside ``block``) of the last affine layer of each residual branch.

    ResNet blocks: the last BatchNorm (``bn3`` of a Bottleneck, ``bn2`` of a BasicBlock). Other
    blocks: the output projection of each recognised inner width (``proj``/``o_proj``/``c_proj`` of
    attention, ``fc2``/``down_proj``/``c_proj`` of the MLP), which writes into the residual stream.
    """
    for conv, norm in (("conv3", "bn3"), ("conv2", "bn2")):
        if isinstance(getattr(block, conv, None), nn.Conv2d) and isinstance(getattr(block, norm, None), nn.Module):
            return [norm]
    return [c for g in find_width_groups(block) for c in g.consumers]


@torch.no_grad()
def scale_residual_branches(model: nn.Module, plan: Plan) -> list[str]:
    """Scale each unit block's residual branch by its holder fraction ``r/K``, in place, in the weights.

    Multiplies the weight and bias of each branch's last affine layer (:func:`branch_output_layers`)
    by ``r/K``, so the result loads into the plain architecture. Returns the scaled module paths.
    """
    if plan.level != "block":
        raise ValueError(f"residual-branch scaling applies to block-level plans, not {plan.level!r}")
    scale = plan.holders_per_unit / plan.workers
    scaled = []
    for u in plan.units:
        block = model.get_submodule(u.name)
        layers = branch_output_layers(block)
        if not layers:
            raise ValueError(f"block {u.name!r} ({type(block).__name__}): no last affine layer of its residual "
                             "branch was recognised (bn2/bn3, proj, o_proj, c_proj, fc2, down_proj); train "
                             "with --no-residual-scaling or name its widths with width_pairs")
        for name in layers:
            layer = block.get_submodule(name)
            for attr in ("weight", "bias"):
                t = getattr(layer, attr, None)
                if isinstance(t, torch.Tensor):
                    t.mul_(scale)
            scaled.append(f"{u.name}.{name}")
    return scaled


RESIDUAL_SCALINGS = ("auto", "on", "off")


def _llama_style(block: nn.Module) -> bool:
    """Whether ``block`` is a LLaMA-style decoder layer: its MLP branch ends in a SwiGLU ``down_proj`` (the zoo's
    LLaMA, Hugging Face's Llama and its kin: RMSNorm pre-norm, ``q/k/v/o_proj`` attention, SwiGLU MLP)."""
    return any(name.rsplit(".", 1)[-1] == "down_proj" for name in branch_output_layers(block))


def _scaling_mode(residual_scaling: bool | str) -> str:
    """``"auto"``, ``"on"`` or ``"off"`` from the mode or a boolean (the flag's meaning before ``"auto"``)."""
    mode = ("on" if residual_scaling else "off") if isinstance(residual_scaling, bool) else residual_scaling
    if mode not in RESIDUAL_SCALINGS:
        raise ValueError(f"residual_scaling {residual_scaling!r}: choose one of {', '.join(RESIDUAL_SCALINGS)} "
                         "(or True/False)")
    return mode


def residual_scaling_rule(model: nn.Module, plan: Plan, residual_scaling: bool | str = "auto") -> tuple[bool, str]:
    """Whether the block-level evaluation scales ``model``'s unit blocks' residual branches by ``r/K``, and the rule.

    ``"on"``/``True`` and ``"off"``/``False`` decide it; ``"auto"`` decides by the model family, because the
    measurements differ by family (docs/evaluation.md): on LLaMA-style decoders the scaling made the validation
    loss worse in every run, so ``"auto"`` leaves them unscaled; elsewhere it scales (ResNets with BatchNorm:
    better in every run; a GPT-2 decoder: neither consistently better, so the earlier default stays). Returns
    ``(scale, rule)``, the rule in words for the run's summary.
    """
    mode = _scaling_mode(residual_scaling)
    if mode != "auto":
        return mode == "on", f"{mode} (chosen)"
    if all(_llama_style(model.get_submodule(u.name)) for u in plan.units):
        return False, "auto: off (LLaMA-style blocks: SwiGLU MLP, RMSNorm pre-norm)"
    return True, "auto: on (blocks other than LLaMA-style ones, e.g. ResNet, GPT-2)"


def _inputs(batch: object) -> object:
    """The model input of a calibration batch: a tensor, or the first element of an (x, y) pair."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"recalibrate_batchnorm: a batch must be an input tensor or an (inputs, targets) pair, "
                    f"got {type(batch).__name__}")


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch]) -> int:
    """Re-estimate every BatchNorm's running statistics as a plain average over ``batches``.

    A batch is an input tensor or an ``(inputs, targets)`` pair (targets are ignored), so the
    batches used for training serve. Returns the number of batches used; the model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    n = 0
    try:
        for b in batches:
            model(_inputs(b))
            n += 1
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.eval()
    return n


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers, whose running statistics need re-estimating after assembly."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def evaluation_model(
    trained: SubnetDataParallel | Simulation,
    calibration_batches: Iterable[Batch] | None = None,
    *,
    residual_scaling: bool | str = "auto",
    recalibrate: bool = True,
    device: torch.device | str | None = None,
) -> nn.Module | None:
    """The model to evaluate and ship: the assembled full model, in the plain architecture, with the
    evaluation conventions that apply to how it was trained, in eval mode.

    With ``C<1`` (forward masking): at block level each residual branch is scaled by ``r/K`` in its
    weights where :func:`residual_scaling_rule` says so (``residual_scaling``: ``"auto"`` decides by the
    model family, no for LLaMA-style decoders, yes for the others; ``"on"`` or ``"off"`` decide
    themselves); a model with BatchNorm gets its statistics re-estimated on
    ``calibration_batches`` (training batches, ``(x, y)`` pairs or inputs; about 20 suffice), which
    are then required unless ``recalibrate=False``. At ``C=1``, at neuron level (trained with
    inverted scaling) and under backward masking the corresponding convention does not apply and
    nothing is done. ``model.evaluation_conventions`` says what was applied and, at block level, by
    which rule (``residual_scaling_rule``); it is the main job's ``summary.json`` ``evaluation``.
    ``device`` defaults to the trained workers' device.

    Collective for :class:`~subnetdp.SubnetDataParallel`, like ``full_state_dict()``: every rank must
    call it; rank 0 gets the model, the others ``None`` (only rank 0 uses its calibration batches).
    """
    _scaling_mode(residual_scaling)  # a bad value fails whether or not it would apply
    plan = trained.plan
    partial = plan.holders_per_unit < plan.workers and trained.regime.partial_forward
    state = trained.full_state_dict()
    if state is None:
        return None
    # buffers outside the state dict (rotary tables, masks) come from the modules' init rules (subnetdp.init)
    model = materialize_(meta_copy(trained.structure), device=device if device is not None else trained.device)
    model.load_state_dict(state)
    applied: dict[str, Any] = {"residual_scaling": False, "bn_recalibrate": 0}
    if partial and plan.level == "block":
        scale, applied["residual_scaling_rule"] = residual_scaling_rule(model, plan, residual_scaling)
        if scale:
            layers = scale_residual_branches(model, plan)
            applied.update(residual_scaling=True, residual_scale=plan.holders_per_unit / plan.workers,
                           scaled_layers=len(layers))
    if partial and recalibrate and has_batchnorm(model):
        if calibration_batches is None:
            raise ValueError(f"evaluation_model: the model has BatchNorm and was trained at C={plan.coverage:g}, so "
                             "its statistics must be re-estimated: pass calibration_batches (about 20 training "
                             "batches), or recalibrate=False to keep the assembled statistics")
        applied["bn_recalibrate"] = recalibrate_batchnorm(model, calibration_batches)
        if not applied["bn_recalibrate"]:
            raise ValueError("evaluation_model: calibration_batches gave no batch; pass about 20 training batches")
    model.eval()
    model.evaluation_conventions = applied
    return model
