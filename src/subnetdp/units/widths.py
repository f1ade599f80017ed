"""Neuron-level units: slices of a block's inner width.

A width group is one inner dimension of size ``size`` (conv channels between two convs, MLP hidden
units, attention heads or key/value head groups). Unit ``u`` of the group owns, in every tensor the
dimension runs through, the elements ``c*size*group + u*group + t`` along that tensor's dim, for
each fused chunk ``c < chunks`` and ``t < group``. A worker that does not hold ``u`` has tensors that
are physically narrower along that dim. The residual stream width is never sliced.

Recognised without user code (names as in torchvision, timm, nanoGPT/LLaMA):
- ``conv1 -> bn1 -> conv2`` in a BasicBlock (a module with no ``conv3``);
- ``conv2 -> bn2 -> conv3`` in a Bottleneck (only the second inner width: slicing both would cut
  ``conv2`` along two dims, and its elements ``(o, i)`` would be held only by workers holding both
  ``o`` and ``i``, which cyclic windows do not guarantee; see DESIGN.md invariant 1);
- MLPs: ``fc1 -> fc2``, ``c_fc -> c_proj``, SwiGLU ``gate_proj, up_proj -> down_proj``;
- attention with fused ``qkv`` and ``proj`` and a ``num_heads`` attribute (one unit per head);
- attention with ``q_proj, k_proj, v_proj -> o_proj`` and ``n_heads``/``n_kv_heads`` attributes
  (one unit per key/value head with its query heads, so grouped-query attention stays consistent).
Users add their own as ``(producer, consumer)`` or ``(producer, norm, consumer)`` module paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class SliceSpec:
    """One tensor that a width group runs through: ``tensor``'s ``dim`` viewed as (chunks, size, group)."""

    tensor: str
    dim: int
    chunks: int = 1
    group: int = 1


@dataclass(frozen=True)
class AttrSpec:
    """A module attribute that counts units (``num_heads``): set to ``per_unit * held`` in a subnetwork."""

    module: str
    attr: str
    per_unit: int


@dataclass(frozen=True)
class WidthGroup:
    name: str
    size: int
    slices: tuple[SliceSpec, ...]
    attrs: tuple[AttrSpec, ...] = ()
    consumers: tuple[str, ...] = ()  # modules whose input sums over the group (scaled in training)

    def indices(self, units: Sequence[int], spec: SliceSpec) -> list[int]:
        """Element indices along ``spec.dim`` owned by ``units`` (kept in full-model order)."""
        out = []
        for c in range(spec.chunks):
            for u in sorted(units):
                start = (c * self.size + u) * spec.group
                out.extend(range(start, start + spec.group))
        return out

    def unit_of(self, spec: SliceSpec, index: int) -> int:
        return (index // spec.group) % self.size


WidthPair = tuple[str, str] | tuple[str, str, str]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _own(module: nn.Module, prefix: str, dim: int, chunks: int = 1, group: int = 1) -> list[SliceSpec]:
    """Slices of every own tensor of ``module`` along ``dim`` (weights, biases, norm statistics)."""
    specs = []
    for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t.dim() > dim:
            specs.append(SliceSpec(_join(prefix, pname), dim, chunks, group))
    return specs


def _producer(module: nn.Module, prefix: str, chunks: int = 1, group: int = 1) -> list[SliceSpec]:
    return _own(module, prefix, 0, chunks, group)


def _consumer(module: nn.Module, prefix: str, group: int = 1) -> list[SliceSpec]:
    return [SliceSpec(_join(prefix, "weight"), 1, 1, group)]


def _pair(path: str, producers: Sequence[nn.Module], names: Sequence[str], norm: nn.Module | None,
          norm_name: str | None, consumer: nn.Module, consumer_name: str, size: int) -> WidthGroup:
    slices: list[SliceSpec] = []
    for m, n in zip(producers, names):
        slices += _producer(m, _join(path, n))
    if norm is not None and norm_name is not None:
        slices += _own(norm, _join(path, norm_name), 0)
    slices += _consumer(consumer, _join(path, consumer_name))
    return WidthGroup(f"{path}:width" if path else "width", size, tuple(slices),
                      consumers=(_join(path, consumer_name),))


def _width_of(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    raise TypeError(f"cannot slice the output of {type(m).__name__}")


def _match(path: str, m: nn.Module) -> list[WidthGroup]:
    g = getattr
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if isinstance(g(m, "conv1", None), conv) and isinstance(g(m, "conv2", None), conv):
        if isinstance(g(m, "conv3", None), conv) and isinstance(g(m, "bn2", None), bn):
            return [_pair(path, [m.conv2], ["conv2"], m.bn2, "bn2", m.conv3, "conv3", m.conv2.out_channels)]
        if isinstance(g(m, "bn1", None), bn) and m.conv2.groups == 1:
            return [_pair(path, [m.conv1], ["conv1"], m.bn1, "bn1", m.conv2, "conv2", m.conv1.out_channels)]
    lin = nn.Linear
    for a, b in (("fc1", "fc2"), ("c_fc", "c_proj")):
        if isinstance(g(m, a, None), lin) and isinstance(g(m, b, None), lin):
            return [_pair(path, [g(m, a)], [a], None, None, g(m, b), b, g(m, a).out_features)]
    if all(isinstance(g(m, n, None), lin) for n in ("gate_proj", "up_proj", "down_proj")):
        return [_pair(path, [m.gate_proj, m.up_proj], ["gate_proj", "up_proj"], None, None,
                      m.down_proj, "down_proj", m.gate_proj.out_features)]
    if isinstance(g(m, "qkv", None), lin) and isinstance(g(m, "proj", None), lin) and hasattr(m, "num_heads"):
        heads = int(m.num_heads)
        hd = m.qkv.out_features // (3 * heads)
        slices = tuple(_producer(m.qkv, _join(path, "qkv"), chunks=3, group=hd)) + (
            SliceSpec(_join(path, "proj.weight"), 1, 1, hd),)
        return [WidthGroup(f"{path}:heads", heads, slices, (AttrSpec(path, "num_heads", 1),),
                           consumers=(_join(path, "proj"),))]
    if all(isinstance(g(m, n, None), lin) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(m, "n_heads"):
        heads = int(m.n_heads)
        kv = int(getattr(m, "n_kv_heads", None) or heads)
        hd = m.q_proj.out_features // heads
        rep = heads // kv
        slices = (
            _producer(m.q_proj, _join(path, "q_proj"), group=rep * hd)
            + _producer(m.k_proj, _join(path, "k_proj"), group=hd)
            + _producer(m.v_proj, _join(path, "v_proj"), group=hd)
            + [SliceSpec(_join(path, "o_proj.weight"), 1, 1, rep * hd)]
        )
        attrs = [AttrSpec(path, "n_heads", rep)]
        if hasattr(m, "n_kv_heads"):
            attrs.append(AttrSpec(path, "n_kv_heads", 1))
        return [WidthGroup(f"{path}:heads", kv, tuple(slices), tuple(attrs),
                           consumers=(_join(path, "o_proj"),))]
    return []


def find_width_groups(
    model: nn.Module, within: Sequence[str] | None = None, pairs: Sequence[WidthPair] | None = None
) -> list[WidthGroup]:
    """The width groups of ``model``: recognised patterns (inside ``within`` paths if given), plus ``pairs``."""
    groups: list[WidthGroup] = []
    modules = dict(model.named_modules())
    for path, m in modules.items():
        if within is not None and not any(path == w or path.startswith(w + ".") for w in within):
            continue
        groups += _match(path, m)
    for pair in pairs or ():
        names = list(pair)
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"width pair {pair}: {missing} not found in the model")
        prod, cons = modules[names[0]], modules[names[-1]]
        norm = modules[names[1]] if len(names) == 3 else None
        slices = _producer(prod, names[0]) + (_own(norm, names[1], 0) if norm is not None else [])
        slices += _consumer(cons, names[-1])
        groups.append(WidthGroup(f"{names[0]}->{names[-1]}", _width_of(prod), tuple(slices),
                                 consumers=(names[-1],)))
    seen: dict[str, str] = {}
    for grp in groups:
        for s in grp.slices:
            if s.tensor in seen:
                raise ValueError(
                    f"tensor {s.tensor!r} is sliced by two width groups ({seen[s.tensor]!r} and "
                    f"{grp.name!r}); its elements could end up held by no worker. Slice one of them only."
                )
            seen[s.tensor] = grp.name
    return groups
