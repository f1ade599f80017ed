"""The model zoo: CIFAR ResNets, a small-image ViT, Swin-T (timm) and a LLaMA-style decoder.

Every model defines ``init_weights(module, name)`` (see :mod:`subnetdp.init`), builds on the meta
device, and reads layer widths at forward time so that SDP can make layers physically narrower.
"""

from __future__ import annotations

import functools
import importlib
import inspect
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


def user_model_factory(spec: str, **kwargs: object) -> Callable[[], nn.Module]:
    """The factory of a user's ``module:callable`` model, called with ``kwargs``, that checks what it builds.

    A callable that does not take ``kwargs``, or returns anything but a module, fails here with one line
    naming the spec, not later, deep in planning, with a traceback.
    """
    factory = load_model_factory(spec)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"model factory {spec!r} cannot be called with {', '.join(f'{k}=' for k in kwargs)} "
                         f"({e}); give a callable that accepts them (or **kwargs) and returns a torch.nn.Module") from None
    except ValueError:  # no signature to check (a builtin): the call itself tells
        pass
    return functools.partial(_build_checked, spec, factory, **kwargs)


def _build_checked(spec: str, factory: Callable[..., object], **kwargs: object) -> nn.Module:
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module; give a "
                         "callable that builds the model")
    return model


__all__ = [
    "MODELS", "get_model", "load_model_factory", "user_model_factory",
    "ResNet", "BasicBlock", "Bottleneck", "resnet18", "wide_resnet18", "resnet50",
    "VisionTransformer", "vit_small_patch4", "swin_t_cifar",
    "Llama", "LlamaConfig", "llama_tiny", "llama_char_small", "llama_125m",
]
