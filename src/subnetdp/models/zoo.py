"""The zoo's one table: each model's builder and traits, and the one way to build a model from its name.

The main job (:mod:`subnetdp.tasks`), the configuration's checks (:mod:`subnetdp.config`), the command
line and the measurements' workloads ask this table what a name is (an image or a language model,
convolutional or not, which dimensions its builder takes and their defaults) instead of testing
names, so a model added here is known everywhere at once.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from .llama import PRESETS, llama_125m, llama_char_small, llama_tiny
from .resnet import resnet18, resnet50, wide_resnet18
from .swin import swin_t_cifar
from .vit import vit_small_patch4

IMAGE, LANGUAGE = "image", "language"
# the dimensions a 'module:callable' model is called with, of those its caller knows: an image model
# gets its classes, a language model its vocabulary and sequence length (its other inputs are its own)
USER_MODEL_DIMS = ("num_classes", "vocab_size", "max_seq_len")


@dataclass(frozen=True)
class ZooModel:
    """One zoo model: its builder and what the rest of subnetdp needs to know about it.

    ``dims`` are the keywords its builder takes from the data or the flags (``num_classes``,
    ``in_channels``, ``img_size``, ``width``; ``vocab_size``, ``max_seq_len``) and ``defaults`` what
    the builder uses for each when not given. ``convolutional`` models train in channels-last layout
    on a GPU.
    """

    name: str
    build: Callable[..., nn.Module]
    kind: str  # IMAGE or LANGUAGE: the data it trains on
    dims: tuple[str, ...]
    convolutional: bool = False
    defaults: Mapping[str, object] = field(default_factory=dict)

    def takes(self, dim: str) -> bool:
        """Whether a flag or data set's dimension ``dim`` reaches this model (``--width`` applies only then)."""
        return dim in self.dims

    def factory(self, **dims: object) -> Callable[[], nn.Module]:
        """A zero-argument factory of this model, given what the caller knows.

        Callers offer every dimension they know (a data set's classes, channels and image size; a
        flag's width); the model takes those in :attr:`dims`, and a ``None`` or a dimension it does
        not take leaves the builder's default. Whether a flag the user gave applies is the
        configuration's check (:func:`subnetdp.config.validate`), made before any work.
        """
        return functools.partial(self.build, **{k: v for k, v in dims.items() if k in self.dims and v is not None})


def _signature_defaults(build: Callable[..., nn.Module], dims: tuple[str, ...]) -> dict[str, object]:
    params = inspect.signature(build).parameters
    return {d: params[d].default for d in dims}


def _image(name: str, build: Callable[..., nn.Module], dims: tuple[str, ...], convolutional: bool) -> ZooModel:
    return ZooModel(name, build, IMAGE, dims, convolutional, _signature_defaults(build, dims))


def _language(name: str, build: Callable[..., nn.Module]) -> ZooModel:
    dims = ("vocab_size", "max_seq_len")
    return ZooModel(name, build, LANGUAGE, dims, defaults={d: PRESETS[name][d] for d in dims})


_RESNET_DIMS = ("num_classes", "in_channels", "width")
ZOO: dict[str, ZooModel] = {m.name: m for m in (
    _image("resnet18", resnet18, _RESNET_DIMS, convolutional=True),
    _image("wide_resnet18", wide_resnet18, ("num_classes", "in_channels"), convolutional=True),
    _image("resnet50", resnet50, _RESNET_DIMS, convolutional=True),
    _image("vit_s4", vit_small_patch4, ("num_classes", "in_channels", "img_size"), convolutional=False),
    # timm's Swin (optional extra [hf]); width is its embedding width
    _image("swin_t_cifar", swin_t_cifar, ("num_classes", "in_channels", "img_size", "width"), convolutional=False),
    _language("llama_tiny", llama_tiny),
    _language("llama_char_small", llama_char_small),
    _language("llama_125m", llama_125m),
)}


def names(kind: str | None = None, takes: str | None = None) -> tuple[str, ...]:
    """The zoo's names, in table order: all, those of one ``kind``, or those whose builder ``takes`` a dimension."""
    return tuple(n for n, m in ZOO.items() if (kind is None or m.kind == kind) and (takes is None or m.takes(takes)))


def is_user_model(name: str) -> bool:
    """Whether ``name`` is a user's ``'package.module:callable'`` rather than a zoo name."""
    return ":" in name


def zoo_model(name: str) -> ZooModel:
    """The table's entry for ``name``; an error naming the known models otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(ZOO))}") from None


def model_kind(name: str) -> str | None:
    """``IMAGE`` or ``LANGUAGE`` for a zoo model; ``None`` for a ``module:callable`` (its data decides)."""
    return None if is_user_model(name) else zoo_model(name).kind


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build a zoo model by name; ``kwargs`` go to its builder (e.g. ``num_classes``)."""
    return zoo_model(name).build(**kwargs)


def model_factory(name: str, **dims: object) -> Callable[[], nn.Module]:
    """The factory of model ``name`` (a zoo name or ``'module:callable'``) given the dimensions the caller knows.

    The one place a name becomes a model: a zoo model takes the dimensions its entry lists
    (:meth:`ZooModel.factory`); a user's callable is called with those of :data:`USER_MODEL_DIMS`
    and checked (:func:`user_model_factory`).
    """
    if is_user_model(name):
        return user_model_factory(name, **{k: v for k, v in dims.items() if k in USER_MODEL_DIMS and v is not None})
    return zoo_model(name).factory(**dims)


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
