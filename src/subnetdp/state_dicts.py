"""A rank's model and optimizer state under full-model names, as ``torch.distributed.checkpoint`` reads it.

DCP merges the ranks' state dicts by key: a tensor that several ranks save under one name and one
offset is taken to be replicated and written once. That is right for SDP's whole tensors, which are
equal on all their holders, and wrong for neuron-level slices, where each rank holds other rows of
a tensor under the same name. So a sliced tensor is marked as what it is: chunks of the global
tensor (DCP's ``CheckpointableTensor`` fields ``global_shape``, ``global_offsets``,
``local_offsets``, ``local_sizes``), one chunk per maximal run of consecutive full-model indices
that share one holder set. The holders of a run mark the same chunk, saved once; runs of different
holder sets never overlap; and a load reads whichever saved chunks cover the ones it asks for, so a
checkpoint loads into another plan or world size.

Optimizer state follows its parameter: keyed by the parameter's full-model name (never by the
optimizer's positional ids, which name different tensors on different ranks), state tensors of the
parameter's shape chunked as the parameter is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from subnetdp.planning import Plan

TensorMap = dict[str, tuple[int, list[int]] | None]


def _runs(positions: list[int], holders: list[tuple[int, ...]]) -> Iterator[tuple[int, int, int]]:
    """``(local start, full start, length)`` of each maximal run of consecutive full positions with one holder set."""
    start = 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1 or holders[positions[i]] != holders[positions[start]]:
            yield start, positions[start], i - start
            start = i


def as_chunks(tensor: torch.Tensor, plan: Plan, name: str, dim: int, positions: list[int]) -> torch.Tensor:
    """An alias of ``tensor`` (a slice of ``name`` at full ``positions`` along ``dim``) that DCP saves as chunks."""
    full_shape = tuple(plan.shapes[name])
    _, holders = plan.element_holders(name)
    view = tensor.detach()  # a new tensor object on the same storage: the attributes never touch the parameter
    global_offsets, local_offsets, local_sizes = [], [], []
    for local, full, length in _runs(positions, holders):
        global_offsets.append(tuple(full if d == dim else 0 for d in range(len(full_shape))))
        local_offsets.append(tuple(local if d == dim else 0 for d in range(len(full_shape))))
        local_sizes.append(tuple(length if d == dim else s for d, s in enumerate(tensor.shape)))
    view.global_shape = full_shape
    view.global_offsets = tuple(global_offsets)
    view.local_offsets = tuple(local_offsets)
    view.local_sizes = tuple(local_sizes)
    return view


def checkpointable(tensor: torch.Tensor, plan: Plan, tmap: TensorMap, name: str) -> torch.Tensor:
    """``tensor`` (this rank's ``name``) detached, marked as chunks of the full tensor when it is a slice of it."""
    loc = tmap.get(name)
    if loc is None or tuple(tensor.shape) == tuple(plan.shapes[name]):
        return tensor.detach()
    return as_chunks(tensor, plan, name, loc[0], loc[1])


def model_state(module: nn.Module, plan: Plan, tmap: TensorMap, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module``'s persistent state under full-model names, sliced tensors as chunks; ``buffers`` replace
    the module's own (averaged copies)."""
    own = module.state_dict()
    return {n: checkpointable(buffers.get(n, t), plan, tmap, n) for n, t in own.items()}


def load_model_state(module: nn.Module, plan: Plan, tmap: TensorMap, state: dict[str, object],
                     strict: bool) -> tuple[list[str], list[str]]:
    """Copy ``state`` into ``module``: each value is this rank's slice (as :func:`model_state` gives it)
    or the full-model tensor (this rank takes its slice). Returns ``(missing, unexpected)`` keys;
    raises on a shape that is neither, naming the key."""
    targets = module.state_dict(keep_vars=True)
    known = {n for n, _ in plan.tensors} | {a for a, _ in plan.aliases}
    missing = [n for n in targets if n not in state]
    unexpected = [k for k in state if k not in targets and k not in known]
    if strict and (missing or unexpected):
        raise RuntimeError(f"SubnetDataParallel.load_state_dict: missing keys {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}; give the state of sdp.state_dict() or of a "
                           "full model of this architecture (full_state_dict()), or pass strict=False")
    with torch.no_grad():
        for name, target in targets.items():
            value = state.get(name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"SubnetDataParallel.load_state_dict: {name!r} is a {type(value).__name__}, not a tensor")
            target.data.copy_(_my_part(value, target, plan, tmap, name))
    return missing, unexpected


def _my_part(value: torch.Tensor, target: torch.Tensor, plan: Plan, tmap: TensorMap, name: str) -> torch.Tensor:
    """``value`` as this rank's tensor ``name``: already its shape, or the full tensor to take a slice of."""
    if value.shape == target.shape:
        return value
    loc = tmap.get(name)
    if loc is not None and tuple(value.shape) == tuple(plan.shapes[name]):
        return value.index_select(loc[0], torch.tensor(loc[1], device=value.device))
    raise ValueError(f"SubnetDataParallel.load_state_dict: {name!r} has shape {tuple(value.shape)}; this rank holds "
                     f"{tuple(target.shape)} of its full {tuple(plan.shapes[name])}: the state belongs to another "
                     "model or plan")


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer that has not stepped its state tensors, by one step at learning rate 0 on zero
    gradients (what ``torch.distributed.checkpoint.state_dict.get_state_dict`` does), so that a template
    for ``dcp.load`` holds every tensor the checkpoint fills."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        for p in params:
            p.grad = None


def optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str],
                    chunk: Callable[[torch.Tensor, str], torch.Tensor]) -> dict[str, object]:
    """``optimizer``'s state keyed by parameter name; ``names`` maps ``id(parameter)`` to it and ``chunk``
    marks a state tensor of the parameter's shape as the parameter's chunks."""
    state: dict[str, dict[str, object]] = {}
    groups = []
    for g in optimizer.param_groups:
        groups.append({k: v for k, v in g.items() if k != "params"})
        for p in g["params"]:
            if p not in optimizer.state:
                continue
            name = _name_of(p, names)
            state[name] = {k: chunk(v, name) if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0
                           else v for k, v in optimizer.state[p].items()}
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str], loaded: dict[str, object],
                         full_index: Callable[[str], tuple[int, list[int]] | None]) -> None:
    """Put ``loaded`` (as :func:`optimizer_state` gives it) into ``optimizer``; a state tensor of the full
    parameter's shape is sliced to this rank's part (``full_index(name)``: ``(dim, positions)`` or None)."""
    groups = loaded.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"load_optimizer_state_dict: the state has {len(groups) if isinstance(groups, list) else 'no'} "
                         f"parameter groups, the optimizer {len(optimizer.param_groups)}: it belongs to another optimizer")
    saved = loaded.get("state", {})
    with torch.no_grad():
        for g, hyper in zip(optimizer.param_groups, groups):
            g.update({k: v for k, v in hyper.items() if k != "params"})
            for p in g["params"]:
                name = _name_of(p, names)
                if name not in saved:
                    optimizer.state.pop(p, None)
                    continue
                entry = {}
                for k, v in saved[name].items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                        loc = full_index(name)
                        if loc is None:
                            raise ValueError(f"load_optimizer_state_dict: {name!r} state {k!r} has shape "
                                             f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")
                        v = v.index_select(loc[0], torch.tensor(loc[1], device=v.device))
                    entry[k] = v.detach().clone().to(p.device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                optimizer.state[p] = entry


def _name_of(p: torch.Tensor, names: dict[int, str]) -> str:
    try:
        return names[id(p)]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not this SubnetDataParallel's: build it over "
                         "sdp.parameters()") from None


# ---- an optimizer's own state_dict(): positional ids, valid on the rank that wrote it only ----------------
ORIGIN_KEY = "subnetdp_origin"


def tag_optimizer(optimizer: torch.optim.Optimizer, rank: int, plan_digest: str) -> None:
    """Make ``optimizer.state_dict()`` say which rank and plan wrote it, and ``load_state_dict`` refuse another's.

    An optimizer's own state dict keys its state by position in its parameter list, and the same position
    names different tensors (or other slices) on different SDP ranks. Saved per rank and loaded by the same
    rank, that is right; merged by ``torch.distributed.checkpoint``, which keeps one rank's copy of each key,
    it loads another rank's state, silently where shapes agree. The origin entry makes that load fail.
    """
    origin = {"rank": rank, "plan": plan_digest}

    def add_origin(_opt: torch.optim.Optimizer, state: dict) -> dict:
        state[ORIGIN_KEY] = dict(origin)
        return state

    def check_origin(_opt: torch.optim.Optimizer, state: dict) -> dict:
        saved = state.get(ORIGIN_KEY)
        if saved is not None and saved != origin:
            raise ValueError(
                f"optimizer.load_state_dict: this state was written by rank {saved.get('rank')} of plan "
                f"{saved.get('plan')}, this is rank {rank} of plan {plan_digest}. An optimizer's state_dict() keys "
                "state by position, which names different tensors on each SDP rank (torch.distributed.checkpoint "
                "keeps one rank's copy): save sdp.optimizer_state_dict(optimizer) and load it with "
                "sdp.load_optimizer_state_dict(optimizer, state) instead")
        state = dict(state)
        state.pop(ORIGIN_KEY, None)
        return state

    optimizer.register_state_dict_post_hook(add_origin)
    optimizer.register_load_state_dict_pre_hook(check_origin)
