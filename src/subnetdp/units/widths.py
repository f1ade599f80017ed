"""Neuron-level units: slices of a block's inner width.

A width group is one inner dimension of size ``size`` (conv channels between two convs, MLP hidden
units, attention heads or key/value head groups). Unit ``u`` of the group owns, in every tensor the
dimension runs through, the elements ``c*size*group + u*group + t`` along that tensor's dim, for
each fused chunk ``c < chunks`` and ``t < group``. A worker that does not hold ``u`` has tensors that
are physically narrower along that dim. The residual stream width is never sliced.

Recognised without user code (names as in torchvision, timm, nanoGPT/LLaMA, Hugging Face):
- ``conv1 -> bn1 -> conv2`` in a BasicBlock (a module with no ``conv3``);
- ``conv2 -> bn2 -> conv3`` in a Bottleneck (only the second inner width: slicing both would cut
  ``conv2`` along two dims, and its elements ``(o, i)`` would be held only by workers holding both
  ``o`` and ``i``, which cyclic windows do not guarantee; see DESIGN.md invariant 1);
- MLPs: ``fc1 -> fc2``, ``c_fc -> c_proj``, SwiGLU ``gate_proj, up_proj -> down_proj``;
- attention with fused ``qkv`` and ``proj`` and a ``num_heads`` attribute (one unit per head;
  timm's ``attn_dim``, gated attention's ``gate`` and Swin's ``relative_position_bias_table``
  columns follow the heads; Swin's shifted-window mask is per window, shared by all heads);
- GPT-2 attention: fused ``c_attn -> c_proj`` with a ``num_heads`` attribute (one unit per head;
  ``num_heads`` and ``split_size`` are rewritten, ``head_dim`` is kept);
- attention with ``q_proj, k_proj, v_proj -> o_proj`` (one unit per key/value head with its query
  heads, so grouped-query attention stays consistent). The head width is the module's ``head_dim``
  or ``q_proj`` rows / ``n_heads`` (or ``num_heads``); the head counts found among ``n_heads``,
  ``num_heads``, ``num_attention_heads``, ``n_kv_heads``, ``num_key_value_heads`` are rewritten.
  The query heads per key/value head (``num_key_value_groups``) do not change.
Linear layers are ``nn.Linear`` or Hugging Face's ``Conv1D`` (weight stored as (in, out), so a
producer is sliced along weight dim 1 and a consumer along dim 0; its ``nf``/``nx`` are rewritten).
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


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored as (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _is_linear(m: object) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Module) and _is_conv1d(m))


def _out_features(m: nn.Module) -> int:
    return int(m.nf) if _is_conv1d(m) else m.out_features


def _producer(module: nn.Module, prefix: str, chunks: int = 1, group: int = 1) -> list[SliceSpec]:
    if _is_conv1d(module):
        specs = [SliceSpec(_join(prefix, "weight"), 1, chunks, group)]
        if module.bias is not None:
            specs.append(SliceSpec(_join(prefix, "bias"), 0, chunks, group))
        return specs
    return _own(module, prefix, 0, chunks, group)


def _consumer(module: nn.Module, prefix: str, group: int = 1) -> list[SliceSpec]:
    return [SliceSpec(_join(prefix, "weight"), 0 if _is_conv1d(module) else 1, 1, group)]


def _width_attrs(module: nn.Module, path: str, out_per_unit: int, in_per_unit: int = 0) -> list[AttrSpec]:
    """``Conv1D`` reads its width from ``nf`` at forward time (``nn.Linear`` is fixed from shapes)."""
    if not _is_conv1d(module):
        return []
    attrs = [AttrSpec(path, "nf", out_per_unit)] if out_per_unit else []
    return attrs + ([AttrSpec(path, "nx", in_per_unit)] if in_per_unit else [])


def _pair(path: str, producers: Sequence[nn.Module], names: Sequence[str], norm: nn.Module | None,
          norm_name: str | None, consumer: nn.Module, consumer_name: str, size: int) -> WidthGroup:
    slices: list[SliceSpec] = []
    attrs: list[AttrSpec] = []
    for m, n in zip(producers, names):
        slices += _producer(m, _join(path, n))
        attrs += _width_attrs(m, _join(path, n), 1)
    if norm is not None and norm_name is not None:
        slices += _own(norm, _join(path, norm_name), 0)
    slices += _consumer(consumer, _join(path, consumer_name))
    attrs += _width_attrs(consumer, _join(path, consumer_name), 0, 1)
    return WidthGroup(f"{path}:width" if path else "width", size, tuple(slices), tuple(attrs),
                      consumers=(_join(path, consumer_name),))


def _width_of(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if _is_linear(m):
        return _out_features(m)
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
    lin = _is_linear
    for a, b in (("fc1", "fc2"), ("c_fc", "c_proj")):
        if lin(g(m, a, None)) and lin(g(m, b, None)):
            return [_pair(path, [g(m, a)], [a], None, None, g(m, b), b, _out_features(g(m, a)))]
    if all(lin(g(m, n, None)) for n in ("gate_proj", "up_proj", "down_proj")):
        return [_pair(path, [m.gate_proj, m.up_proj], ["gate_proj", "up_proj"], None, None,
                      m.down_proj, "down_proj", _out_features(m.gate_proj))]
    if lin(g(m, "qkv", None)) and lin(g(m, "proj", None)) and hasattr(m, "num_heads"):
        return _fused_heads(path, m, "qkv", "proj")
    if lin(g(m, "c_attn", None)) and lin(g(m, "c_proj", None)) and hasattr(m, "num_heads") \
            and not hasattr(m, "q_attn"):  # GPT-2 self-attention (cross-attention fuses only k, v)
        return _fused_heads(path, m, "c_attn", "c_proj")
    if all(lin(g(m, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return _grouped_heads(path, m)
    return []


def _fused_heads(path: str, m: nn.Module, qkv: str, proj: str) -> list[WidthGroup]:
    """One unit per head of a fused (q, k, v) projection; rows laid out as (3, heads, head_dim)."""
    heads = int(m.num_heads)
    hd = _out_features(getattr(m, qkv)) // (3 * heads)
    slices = _producer(getattr(m, qkv), _join(path, qkv), chunks=3, group=hd)
    slices += _consumer(getattr(m, proj), _join(path, proj), group=hd)
    attrs = [AttrSpec(path, "num_heads", 1)]
    attrs += [AttrSpec(path, a, hd) for a in ("attn_dim", "split_size") if isinstance(getattr(m, a, None), int)]
    attrs += _width_attrs(getattr(m, qkv), _join(path, qkv), 3 * hd)
    attrs += _width_attrs(getattr(m, proj), _join(path, proj), 0, hd)
    table = getattr(m, "relative_position_bias_table", None)  # Swin: one bias column per head
    if isinstance(table, nn.Parameter) and table.dim() == 2 and table.shape[1] == heads:
        slices.append(SliceSpec(_join(path, "relative_position_bias_table"), 1))
    gate = getattr(m, "gate", None)  # timm's gated attention: a sigmoid gate per attention output
    if _is_linear(gate):
        slices += _producer(gate, _join(path, "gate"), group=hd)
        attrs += _width_attrs(gate, _join(path, "gate"), hd)
    return [WidthGroup(f"{path}:heads", heads, tuple(slices), tuple(attrs), consumers=(_join(path, proj),))]


HEAD_COUNTS = ("n_heads", "num_heads", "num_attention_heads")
KV_HEAD_COUNTS = ("n_kv_heads", "num_key_value_heads")


def _grouped_heads(path: str, m: nn.Module) -> list[WidthGroup]:
    """One unit per key/value head with its query heads (grouped-query attention stays consistent)."""
    q_out, k_out = _out_features(m.q_proj), _out_features(m.k_proj)
    hd = getattr(m, "head_dim", None)
    if not isinstance(hd, int):
        heads = next((getattr(m, a) for a in HEAD_COUNTS if isinstance(getattr(m, a, None), int)), None)
        if heads is None:
            return []  # no way to tell the head width: the user names the widths instead
        hd = q_out // heads
    if not hd or q_out % hd or k_out % hd or (q_out // hd) % (k_out // hd) or _out_features(m.v_proj) != k_out:
        return []
    kv = k_out // hd
    rep = q_out // hd // kv
    slices = (
        _producer(m.q_proj, _join(path, "q_proj"), group=rep * hd)
        + _producer(m.k_proj, _join(path, "k_proj"), group=hd)
        + _producer(m.v_proj, _join(path, "v_proj"), group=hd)
        + _consumer(m.o_proj, _join(path, "o_proj"), group=rep * hd)
    )
    attrs = [AttrSpec(path, a, rep) for a in HEAD_COUNTS if isinstance(getattr(m, a, None), int)]
    attrs += [AttrSpec(path, a, 1) for a in KV_HEAD_COUNTS if isinstance(getattr(m, a, None), int)]
    for name, per_unit in (("q_proj", rep * hd), ("k_proj", hd), ("v_proj", hd)):
        attrs += _width_attrs(getattr(m, name), _join(path, name), per_unit)
    attrs += _width_attrs(m.o_proj, _join(path, "o_proj"), 0, rep * hd)
    return [WidthGroup(f"{path}:heads", kv, tuple(slices), tuple(attrs), consumers=(_join(path, "o_proj"),))]


def find_width_groups(
    model: nn.Module, *, pairs: Sequence[WidthPair] | None = None
) -> list[WidthGroup]:
    """The width groups of ``model``: recognised patterns, plus ``pairs``."""
    groups: list[WidthGroup] = []
    modules = dict(model.named_modules())
    for path, m in modules.items():
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
        attrs = _width_attrs(prod, names[0], 1) + _width_attrs(cons, names[-1], 0, 1)
        groups.append(WidthGroup(f"{names[0]}->{names[-1]}", _width_of(prod), tuple(slices), tuple(attrs),
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
