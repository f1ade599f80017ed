"""Swin-T for 32x32 images: timm's ``SwinTransformer`` built from its configuration (no weights).

The paper's vision transformer. SDP finds its units with no user code: at block level the
``SwinTransformerBlock``s inside each stage (a stage's patch merging is kept on every worker), at
neuron level the attention heads (with their columns of the relative position bias table) and the
MLP hidden units. timm is an optional dependency: ``pip install 'subnetdp[hf]'``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn


def _timm_swin() -> type:
    try:
        from timm.models.swin_transformer import SwinTransformer
    except ImportError as e:
        raise ImportError("swin_t_cifar needs timm, an optional extra of subnetdp: "
                          "pip install 'subnetdp[hf]' (or pip install 'timm>=1.0')") from e
    return SwinTransformer


@functools.cache  # one class, so every model built has the same type
def _swin_class() -> type:
    base = _timm_swin()

    class SwinCifar(base):  # type: ignore[misc, valid-type]
        """timm's Swin with a per-module ``init_weights(module, name)`` for subnetdp's seeded init.

        timm's own init fills buffers (the shifted-window attention mask) on the device of the
        block's norm layer, which is still meta while subnetdp materialises one module at a time;
        here each module's tensors are filled on their own device with timm's default rule.
        """

        def init_weights(self, module: nn.Module | None = None, name: str = "", *, mode: str = "",
                         needs_reset: bool = True) -> None:
            if module is None:  # timm's whole-model call, from its constructor
                super().init_weights(mode=mode, needs_reset=needs_reset)
                return
            if isinstance(module, nn.Linear):  # timm's default ("" mode) rule for linear layers
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif type(module).__name__ == "SwinTransformerBlock":
                if module.attn_mask is not None:
                    mask = module.get_attn_mask(device=module.attn_mask.device, dtype=torch.float32)
                    module.register_buffer("attn_mask", mask, persistent=False)
            elif hasattr(module, "reset_parameters"):  # WindowAttention: bias table and index; norms, convs
                module.reset_parameters()

    SwinCifar.__qualname__ = SwinCifar.__name__ = "SwinTransformer"
    return SwinCifar


def swin_t_cifar(num_classes: int = 10, width: int = 96, img_size: int = 32, patch_size: int = 2,
                 window_size: int = 4, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), in_channels: int = 3) -> nn.Module:
    """Swin-T (depths 2-2-6-2, heads 3-6-12-24, embedding ``width`` 96) for 32x32 inputs: patch 2, window 4.

    Stage grids are 16, 8, 4 and 2 patches; a window larger than its grid shrinks to it (timm's rule).
    """
    return _swin_class()(img_size=img_size, patch_size=patch_size, in_chans=in_channels, num_classes=num_classes,
                         embed_dim=width, depths=tuple(depths), num_heads=tuple(num_heads),
                         window_size=window_size)
