"""A LLaMA-style decoder in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Widths are read at forward time from ``Attention.n_heads``/``n_kv_heads``/``head_dim`` and from
tensor shapes, because neuron-level SDP makes projections physically narrower and rewrites the
head counts. Query head ``h`` uses KV head ``h // (n_heads // n_kv_heads)``, so a KV group (one KV
head and its consecutive query heads) is the natural unit to keep or drop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import init_all_


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a :class:`Llama`.

    ``mlp_hidden=None`` gives LLaMA's SwiGLU width: ``8/3 * dim`` (same parameter count as a
    4x GELU MLP) rounded up to a multiple of 32, so that hidden slices stay GPU-friendly.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads = n_heads)
    max_seq_len: int = 256
    mlp_hidden: int | None = None
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", 32 * math.ceil(8 * self.dim / 3 / 32))
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:  # type: ignore[operator]
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim {self.dim // self.n_heads} must be even for rotary")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (half-rotation layout) with cached cos/sin tables.

    The tables are non-persistent buffers (not in the state dict), recomputed by
    ``reset_parameters`` because the model is first built on the meta device.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        device = self.cos.device
        inv_freq = 1.0 / self.theta ** (
            torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float32),
                             inv_freq)
        self.cos = angles.cos()
        self.sin = angles.sin()

    def forward(self, x: Tensor) -> Tensor:
        """Rotate ``x`` [B, heads, T, head_dim] by position; computed in float32."""
        T = x.shape[-2]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.max_seq_len}")
        cos, sin = self.cos[:T].float(), self.sin[:T].float()
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.type_as(x)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary embeddings."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads: int = config.n_kv_heads  # type: ignore[assignment]
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, config.max_seq_len, config.rope_theta)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q), self.rotary(k)
        n_rep = self.n_heads // max(self.n_kv_heads, 1)  # a subnetwork may hold no head of a layer
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual layer; takes only ``x`` so that SDP can skip it like a ResNet block."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.mlp_hidden)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder-only language model: ``forward(idx[B, T]) -> logits[B, T, vocab_size]``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        init_all_(self)

    def init_weights(self, module: nn.Module, name: str) -> None:
        """Initialise ``module``'s own tensors: normal(0.02), residual outputs scaled down.

        ``o_proj`` and ``down_proj`` (the projections that write into the residual stream) get
        ``0.02 / sqrt(2 * n_layers)`` with ``n_layers`` from the config, i.e. the full model's
        depth, so a subnetwork that skips layers initialises exactly like the full model.
        With tied embeddings the tie is restored here, because ``to_empty`` on the meta-built
        model gives the two modules separate tensors; whichever of the two is initialised second
        re-ties ``output.weight`` to the embedding (so the order of the calls does not matter).
        """
        tied = self.config.tie_embeddings
        if module is self.output and tied:
            if not self.tok_embeddings.weight.is_meta:
                module.weight = self.tok_embeddings.weight
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if name.rsplit(".", 1)[-1] in ("o_proj", "down_proj"):
                std = 0.02 / math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            if module is self.tok_embeddings and tied and not self.output.weight.is_meta:
                self.output.weight = module.weight
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()  # RMSNorm: ones; RotaryEmbedding: recompute tables

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def _preset(defaults: dict[str, object], overrides: dict[str, object]) -> Llama:
    # Merge before building the config, so derived fields (mlp_hidden) follow overridden widths.
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)}
    if unknown:
        raise TypeError(f"unknown LlamaConfig fields {sorted(unknown)}")
    return Llama(LlamaConfig(**{**defaults, **overrides}))  # type: ignore[arg-type]


# each preset's configuration before a caller's overrides (the zoo's table reads its default dimensions here)
PRESETS: dict[str, dict[str, object]] = {
    "llama_tiny": dict(vocab_size=65, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64),
    "llama_char_small": dict(vocab_size=65, dim=192, n_layers=6, n_heads=6, n_kv_heads=3, max_seq_len=256),
    "llama_125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=1024),
}


def llama_tiny(**overrides: object) -> Llama:
    """About 0.2M parameters: for tests."""
    return _preset(PRESETS["llama_tiny"], overrides)


def llama_char_small(**overrides: object) -> Llama:
    """About 2.4M parameters: char-level Tiny Shakespeare on a CPU."""
    return _preset(PRESETS["llama_char_small"], overrides)


def llama_125m(**overrides: object) -> Llama:
    """About 125M parameters (32k vocabulary, untied, 4 KV heads): for a GPU."""
    return _preset(PRESETS["llama_125m"], overrides)
