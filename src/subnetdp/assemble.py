"""Assembling the full model from workers' subnetworks (DESIGN.md invariant 8)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from subnetdp.planning import Plan


Where = dict[str, "tuple[int, list[int]] | None"]


def assemble_state_dict(
    pieces: Iterable[tuple[Where, Mapping[str, torch.Tensor]]], plan: Plan, structure: nn.Module
) -> dict[str, torch.Tensor]:
    """A full-model state dict from ``(where, tensors)`` pieces.

    ``where`` says where each tensor sits in the full model, as :meth:`Plan.tensor_map` does (a
    worker's whole subnetwork, or just the elements it is first holder of). ``structure`` (the
    architecture, on meta is fine) gives the state-dict names, tied aliases included. Raises if an
    element is in no piece.
    """
    full = {n: torch.zeros(s) for n, s in plan.tensors}
    filled = {n: torch.zeros(s, dtype=torch.bool) for n, s in plan.tensors}
    dtypes: dict[str, torch.dtype] = {}
    for tmap, sd in pieces:
        for name, where in tmap.items():
            if name not in sd or name not in full:  # a tied alias: its canonical tensor carries the values
                continue
            value = sd[name].detach().to("cpu")
            if name not in dtypes:
                dtypes[name] = value.dtype
                full[name] = full[name].to(value.dtype)
            if where is None:
                full[name].copy_(value)
                filled[name].fill_(True)
            else:
                dim, idx = where
                index = torch.tensor(idx, dtype=torch.long)
                full[name].index_copy_(dim, index, value)
                filled[name].index_fill_(dim, index, True)
    canonical = {id(t): n for n, t in list(structure.named_parameters()) + list(structure.named_buffers())}
    out = {}
    for key, t in structure.state_dict(keep_vars=True).items():
        name = canonical[id(t)]
        if not bool(filled[name].all()):
            raise RuntimeError(f"no worker supplied every element of {name!r}: the pieces do not cover the model")
        out[key] = full[name]
    return out
