"""Seeded initial values: the factory's own (default, ``init="full"``) or module by module.

By default (``init="full"``) a model given as a factory gets exactly the values the factory itself
gives under ``torch.manual_seed(seed)``: the full model is built once in host memory, each worker
takes its slice, and the full model is freed (torchvision's ``zero_init_residual``, Hugging Face's
``post_init`` and any custom init are kept). ``init="per-module"`` never builds the full model, for
models too large for host memory; it gives each module its value as below.

SDP needs a worker's subnetwork to equal the matching slice of the full model initialised from the
same seed (DESIGN.md invariant 3), without ever building the full model on the worker's device. So
the initial value of every tensor must not depend on which other modules exist: each module is
initialised from its own generator state, derived from ``(seed, module path)``.

A module's own tensors (``recurse=False``) are initialised by the first rule that applies:

1. Hugging Face models (a root with ``_init_weights`` and ``config``, i.e. a ``PreTrainedModel``):
   ``root._init_weights(module)``, then ``root._init_weights(a)`` for each ancestor ``a`` of the
   module, innermost first, with every tensor but the module's own hidden on the meta device. This
   is the value HF's own post-order ``apply(_init_weights)`` gives (GPT-2's scaled ``c_proj`` init
   is applied by its parent), without touching any other module. HF's ``_init_weights`` also
   recomputes rotary ``inv_freq`` buffers (modules with ``original_inv_freq``).
2. timm vision transformers (a root with ``weight_init_mode``, e.g. ``VisionTransformer``): the
   root's own tensors (position embedding, class and register tokens) by ``root.init_weights()``,
   every other module by the per-module function that ``init_weights`` applies
   (``get_init_weights_vit(mode)(module, name)``), plus ``fix_init``'s depth scaling.
3. ``root.init_weights(module, name)`` when the root model defines it with that signature (the
   model zoo does, to give standard initialisations such as Kaiming for convolutions), else
4. ``module.reset_parameters()`` (PyTorch's defaults for built-in layers).

Buffers that a module computes in ``__init__`` (rotary tables, masks) must be recomputed by one of
these, because construction happens on the meta device.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import re
import zlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

ModelFactory = Callable[[], nn.Module]
INIT_MODES = ("full", "per-module")


def check_init(init: str) -> None:
    """Reject an unknown ``init`` mode, naming the choices."""
    if init not in INIT_MODES:
        raise ValueError(f"init={init!r}: choose 'full' (the factory's own initialisation, built once in host "
                         "memory) or 'per-module' (module by module, for models too large for host memory)")


def module_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for the module at path ``name`` (same on every rank and run)."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def has_own_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed CPU RNG state, restoring the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def init_module_(root: nn.Module, module: nn.Module, name: str, seed: int) -> None:
    """Initialise ``module``'s own tensors in place, from ``(seed, name)`` only."""
    with seeded(module_seed(seed, name)), torch.no_grad():
        if _is_hf(root):
            _hf_init(root, module, name)
        elif _is_timm_vit(root):
            _timm_vit_init(root, module, name)
        elif _takes_module_and_name(getattr(root, "init_weights", None)):
            root.init_weights(module, name)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif has_own_tensors(module):
            raise TypeError(
                f"module {name!r} ({type(module).__name__}) owns tensors but has no "
                "reset_parameters(), and the root model defines no init_weights(module, name); "
                "add one of the two so subnetdp can initialise it from a seed"
            )


def _is_hf(root: nn.Module) -> bool:
    return callable(getattr(root, "_init_weights", None)) and hasattr(root, "config")


def _is_timm_vit(root: nn.Module) -> bool:
    return type(root).__module__.startswith("timm.") and hasattr(root, "weight_init_mode")


def _takes_module_and_name(hook: object) -> bool:
    if not callable(hook):
        return False
    try:
        inspect.signature(hook).bind(None, "")
    except (TypeError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _only_own_tensors_real(scope: nn.Module, module: nn.Module) -> Iterator[None]:
    """Within ``scope``, swap every tensor except ``module``'s own for a meta stand-in, then restore."""
    swapped = []
    for m in scope.modules():
        if m is module:
            continue
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is not None and not t.is_meta:
                    stand_in = torch.empty_like(t, device="meta")
                    store[key] = nn.Parameter(stand_in, t.requires_grad) if isinstance(t, nn.Parameter) else stand_in
                    swapped.append((store, key, t))
    try:
        yield
    finally:
        for store, key, t in swapped:
            store[key] = t


def _apply_post_order(root: nn.Module, module: nn.Module, name: str, fn: Callable[[nn.Module, str], None],
                      include_root: bool) -> None:
    """``fn`` on ``module``, then on each ancestor (innermost first) with only ``module``'s tensors real.

    This leaves ``module``'s tensors as a post-order ``apply(fn)`` over the whole model would (an
    ancestor may set its children's tensors, as GPT-2 scales ``c_proj``), touching nothing else.
    """
    fn(module, name)
    parts = name.split(".") if name else []
    for depth in range(len(parts) - 1, -1 if include_root else 0, -1):
        ancestor_name = ".".join(parts[:depth])
        ancestor = root.get_submodule(ancestor_name)
        with _only_own_tensors_real(ancestor, module):
            fn(ancestor, ancestor_name)


def _hf_init(root: nn.Module, module: nn.Module, name: str) -> None:
    _apply_post_order(root, module, name, lambda m, _n: root._init_weights(m), include_root=True)


def _timm_vit_init(root: nn.Module, module: nn.Module, name: str) -> None:
    if module is root:
        with _only_own_tensors_real(root, root):
            root.init_weights()  # on the root's own tensors only; the rest stands in on meta
        return
    from timm.models.vision_transformer import get_init_weights_vit

    mode = root.weight_init_mode
    head_bias = -math.log(root.num_classes) if "nlhb" in mode else 0.0
    _apply_post_order(root, module, name, get_init_weights_vit(mode, head_bias), include_root=False)
    fix = re.fullmatch(r"blocks\.(\d+)\.(attn\.proj|mlp\.fc2)", name)
    if getattr(root, "fix_init", False) and fix:
        module.weight.div_(math.sqrt(2.0 * (int(fix.group(1)) + 1)))


def build_meta(factory: ModelFactory) -> nn.Module:
    """Construct the architecture on the meta device: shapes only, no memory, no RNG use."""
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory returned {type(model).__name__}, not an nn.Module")
    return model


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure on the meta device, without copying any tensor data."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def build_full(factory: ModelFactory, seed: int) -> nn.Module:
    """The factory's own model in host memory, built under ``torch.manual_seed(seed)`` (caller's RNG kept)."""
    with seeded(seed), torch.device("cpu"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory returned {type(model).__name__}, not an nn.Module")
    return model


def structure_of(model: nn.Module | ModelFactory, seed: int = 0,
                 init: str = "per-module") -> tuple[nn.Module, nn.Module | None]:
    """``(meta structure, source of values or None)`` for a factory, a meta model or a real model.

    With ``init="full"`` a factory's source is its own model built under ``seed`` (see
    :func:`build_full`); a meta model has no own values, so it is initialised per module.
    """
    check_init(init)
    if not isinstance(model, nn.Module):
        if init == "full":
            full = build_full(model, seed)
            return meta_copy(full), full
        return build_meta(model), None
    if all(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        return meta_copy(model), None
    return meta_copy(model), model


Transform = Callable[[str, torch.Tensor], torch.Tensor]


def materialize_(
    model: nn.Module,
    seed: int = 0,
    *,
    source: nn.Module | None = None,
    transform: Transform | None = None,
    skip: Sequence[str] = (),
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Give every tensor of the meta ``model`` its value, in place, one module at a time.

    Values come from ``source`` (a real model of the same architecture) or from the seeded init;
    ``transform(full_name, tensor)`` may narrow each before it moves to ``device``, so the full
    model never exists on the device. Modules under a ``skip`` path stay on meta. Tied parameters
    stay tied.
    """
    done: dict[int, torch.Tensor] = {}
    src = {}
    if source is not None:
        src = dict(source.named_parameters(remove_duplicate=False))
        src.update(dict(source.named_buffers(remove_duplicate=False)))
    for mname, module in model.named_modules():
        if any(mname == s or mname.startswith(s + ".") for s in skip):
            continue
        own = [(n, t, True) for n, t in module._parameters.items() if t is not None]
        own += [(n, t, False) for n, t in module._buffers.items() if t is not None]
        if not own:
            continue
        pending = [n for n, t, _ in own if id(t) not in done]
        if pending and source is None:
            module.to_empty(device="cpu", recurse=False)
            init_module_(model, module, mname, seed)
        for n, orig, is_param in own:
            if id(orig) not in done:
                full = f"{mname}.{n}" if mname else n
                if source is not None:
                    value = src[full].detach().to("cpu")
                else:
                    value = (module._parameters if is_param else module._buffers)[n].detach()
                if transform is not None:
                    value = transform(full, value)
                value = value.to(device).clone()
                done[id(orig)] = nn.Parameter(value, requires_grad=orig.requires_grad) if is_param else value
            (module._parameters if is_param else module._buffers)[n] = done[id(orig)]
    return model


def materialize(
    model: nn.Module | ModelFactory, seed: int = 0, device: torch.device | str = "cpu", *, init: str = "full"
) -> nn.Module:
    """The full model with subnetdp's seeded initialisation: the reference for invariant 3.

    ``model`` is a factory or a model on the meta device (a real model is copied as it is).
    ``init="full"`` gives a factory's own values under ``torch.manual_seed(seed)``; ``"per-module"``
    the module-by-module values (see the module docstring).
    """
    structure, source = structure_of(model, seed, init)
    return materialize_(structure, seed, source=source, device=device)
