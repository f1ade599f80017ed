"""The model zoo: CIFAR ResNets, a small-image ViT, Swin-T (timm) and a LLaMA-style decoder.

Every model defines ``init_weights(module, name)`` (see :mod:`subnetdp.init`), builds on the meta
device, and reads layer widths at forward time so that SDP can make layers physically narrower.
:mod:`subnetdp.models.zoo` holds the one table of the zoo's names, builders and traits.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .llama import Llama, LlamaConfig, llama_125m, llama_char_small, llama_tiny
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50, wide_resnet18
from .swin import swin_t_cifar
from .vit import VisionTransformer, vit_small_patch4
from .zoo import (
    IMAGE,
    LANGUAGE,
    ZOO,
    ZooModel,
    get_model,
    is_user_model,
    load_model_factory,
    model_factory,
    model_kind,
    user_model_factory,
    zoo_model,
)

# name -> builder, read from the table (kept for callers that want only the builders)
MODELS: dict[str, Callable[..., nn.Module]] = {name: m.build for name, m in ZOO.items()}

__all__ = [
    "MODELS", "ZOO", "ZooModel", "IMAGE", "LANGUAGE", "get_model", "model_factory", "model_kind", "zoo_model",
    "is_user_model", "load_model_factory", "user_model_factory",
    "ResNet", "BasicBlock", "Bottleneck", "resnet18", "wide_resnet18", "resnet50",
    "VisionTransformer", "vit_small_patch4", "swin_t_cifar",
    "Llama", "LlamaConfig", "llama_tiny", "llama_char_small", "llama_125m",
]
