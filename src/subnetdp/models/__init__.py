"""The model zoo: CIFAR ResNets, a small-image ViT, Swin-T (timm) and a LLaMA-style decoder.

Every model defines ``init_weights(module, name)`` (see :mod:`subnetdp.init`), builds on the meta
device, and reads layer widths at forward time so that SDP can make layers physically narrower.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from .llama import Llama, LlamaConfig, llama_125m, llama_char_small, llama_tiny
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50, wide_resnet18
from .swin import swin_t_cifar
from .vit import VisionTransformer, vit_small_patch4

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "wide_resnet18": wide_resnet18,
    "resnet50": resnet50,
    "vit_s4": vit_small_patch4,
    "swin_t_cifar": swin_t_cifar,  # timm's Swin (optional extra [hf])
    "llama_tiny": llama_tiny,
    "llama_char_small": llama_char_small,
    "llama_125m": llama_125m,
}


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build a zoo model by name; ``kwargs`` go to its constructor (e.g. ``num_classes``)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return factory(**kwargs)


def load_model_factory(spec: str) -> Callable[..., nn.Module]:
    """Import a user's model constructor given as ``"package.module:callable"``.

    The part after the colon may be dotted (``"pkg.mod:Class.create"``).
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(
            f"bad model factory spec {spec!r}: expected the form 'package.module:callable'")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"bad model factory spec {spec!r}: cannot import module {module_name!r} ({e}); "
            "expected the form 'package.module:callable'") from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"bad model factory spec {spec!r}: {module_name!r} has no attribute "
                f"{attr_path!r}; expected the form 'package.module:callable'") from None
    if not callable(obj):
        raise ValueError(f"bad model factory spec {spec!r}: {attr_path!r} is not callable")
    return obj  # type: ignore[return-value]


__all__ = [
    "MODELS", "get_model", "load_model_factory",
    "ResNet", "BasicBlock", "Bottleneck", "resnet18", "wide_resnet18", "resnet50",
    "VisionTransformer", "vit_small_patch4", "swin_t_cifar",
    "Llama", "LlamaConfig", "llama_tiny", "llama_char_small", "llama_125m",
]
