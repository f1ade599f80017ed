"""Block-level units: the residual blocks a worker may skip.

A block is found by one rule, with no model-specific names in the engine: a child of an
``nn.Sequential`` or ``nn.ModuleList`` that itself has submodules, in a container holding at least
two children of the same class (ResNet stages, ViT ``blocks``, GPT ``h``, LLaMA ``layers``). When such
a child is a stage whose own child holds repeated blocks (timm's Swin and ConvNeXt stages: patch
merging or downsampling, then ``blocks``), the blocks inside are the units and the stage's other
parts are always kept. Users may name blocks instead (module paths or a predicate).

A block whose output shape differs from its input (a strided or channel-changing "transition") can
not be skipped: the identity would carry the wrong shape. It is detected by a ``downsample`` or
``shortcut`` submodule with parameters (torchvision naming) or, given an example input, by running
the model on the meta device and comparing shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

BlockSelector = Sequence[str] | Callable[[str, nn.Module], bool] | None

SHORTCUT_NAMES = ("downsample", "shortcut")


@dataclass(frozen=True)
class BlockInfo:
    """A residual block: its module path, whether its shapes change, and its shortcut path."""

    name: str
    transition: bool
    shortcut: str | None  # path of the shortcut module inside the block, if it has parameters


def _shortcut_of(block: nn.Module) -> str | None:
    for attr in SHORTCUT_NAMES:
        sub = getattr(block, attr, None)
        if isinstance(sub, nn.Module) and any(True for _ in sub.parameters()):
            return attr
    return None


def _repeated(container: nn.Module, prefix: str) -> list[str]:
    """Children of a Sequential/ModuleList that repeat (two or more of one class) and have submodules."""
    if not isinstance(container, (nn.Sequential, nn.ModuleList)):
        return []
    children = list(container.named_children())
    return [f"{prefix}.{n}" if prefix else n for n, c in children
            if sum(type(o) is type(c) for _, o in children) >= 2 and any(True for _ in c.children())]


def _auto_blocks(model: nn.Module) -> list[str]:
    found: list[str] = []
    for name, module in model.named_modules():
        if any(name == b or name.startswith(b + ".") for b in found):
            continue
        found += _repeated(module, name)
    # a stage (Swin, ConvNeXt) is a repeated module whose own child is a container of repeated blocks:
    # its blocks are the units, and the rest of the stage (patch merging, downsampling) is always kept
    out: list[str] = []
    for path in found:
        stage = model.get_submodule(path)
        inner = [b for n, c in stage.named_children() for b in _repeated(c, f"{path}.{n}")]
        out += inner or [path]
    return out


def _shape_changes(model: nn.Module, paths: Sequence[str], example_input: object) -> set[str]:
    """Paths whose output shape differs from their input shape, probed on the meta device."""
    changed: set[str] = set()
    meta = model if next(model.parameters()).is_meta else None
    if meta is None:
        return changed  # a real model is probed only through its shortcut modules

    def hook(path: str) -> Callable:
        def fn(_m: nn.Module, args: tuple, out: object) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                if args[0].shape != out.shape:
                    changed.add(path)

        return fn

    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_hook(hook(p)) for p in paths]
    try:
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return changed


def find_blocks(
    model: nn.Module, blocks: BlockSelector = None, example_input: object = None
) -> list[BlockInfo]:
    """The residual blocks of ``model`` in module order.

    ``blocks`` overrides discovery: a list of module paths, or ``predicate(path, module)``.
    ``example_input`` (meta model only) adds a shape probe to the shortcut rule for transitions.
    """
    modules = dict(model.named_modules())
    if blocks is None:
        paths = _auto_blocks(model)
    elif callable(blocks):
        paths = [n for n, m in model.named_modules() if n and blocks(n, m)]
    else:
        paths = list(blocks)
        missing = [p for p in paths if p not in modules or p == ""]
        if missing:
            raise ValueError(
                f"block paths {missing} are not submodules of {type(model).__name__}; "
                f"candidates: {candidate_paths(model)[:20]}"
            )
    probed = _shape_changes(model, paths, example_input) if example_input is not None else set()
    infos = []
    for p in paths:
        shortcut = _shortcut_of(modules[p])
        infos.append(BlockInfo(p, transition=shortcut is not None or p in probed, shortcut=shortcut))
    return infos


def candidate_paths(model: nn.Module) -> list[str]:
    """Module paths a user might name as blocks: children of containers, then other composites."""
    out = []
    for name, module in model.named_modules():
        if name and any(True for _ in module.children()) and any(True for _ in module.parameters()):
            out.append(name)
    return out
