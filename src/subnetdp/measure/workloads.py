"""Synthetic workloads that the measurements step: a model factory, a batch maker and a loss.

Memory and time of a step do not depend on the values, so batches are seeded random images or
tokens; the losses are the main job's (:mod:`subnetdp.losses`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from subnetdp.init import ModelFactory
from subnetdp.losses import image_batch_loss, token_batch_loss
from subnetdp.measure.meters import LossFn
from subnetdp.models import LANGUAGE, model_kind, zoo_model

DEFAULT_VOCAB = 65  # Tiny Shakespeare's characters: a language model's vocabulary unless given


@dataclass(frozen=True)
class Workload:
    """What a step runs: a model factory, a batch maker ``(batch_size, device, seed) -> batch``, a loss."""

    name: str
    factory: ModelFactory
    make_batch: Callable[[int, torch.device, int], Any]
    loss_fn: LossFn


def image_batch(batch_size: int, device: torch.device, seed: int, *, channels: int, size: int, classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random images and labels (memory and time do not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, channels, size, size, generator=g)
    y = torch.randint(0, classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def token_batch(batch_size: int, device: torch.device, seed: int, *, seq_len: int, vocab: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random token windows: inputs and the next tokens."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
    return t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)


def image_workload(model: str = "resnet18", width: int | None = 16, num_classes: int = 10, image_size: int = 32,
                   channels: int = 3) -> Workload:
    """A zoo image model on synthetic ``image_size`` x ``image_size`` inputs, cross-entropy loss.

    ``width`` reaches the models that take one (``None``: the model's own default); others ignore it.
    """
    import functools

    m = zoo_model(model)
    factory = m.factory(num_classes=num_classes, in_channels=channels, img_size=image_size, width=width)
    maker = functools.partial(image_batch, channels=channels, size=image_size, classes=num_classes)
    label = f"{model}(width={m.defaults['width'] if width is None else width})" if m.takes("width") else model
    return Workload(label, factory, maker, image_batch_loss)


def text_workload(model: str = "llama_char_small", seq_len: int = 128, vocab_size: int = DEFAULT_VOCAB,
                  **overrides: Any) -> Workload:
    """A zoo language model on random tokens (next-token cross-entropy), ``seq_len`` tokens per sample;
    ``overrides`` go to its builder (architecture fields such as ``n_layers``)."""
    import functools

    factory = functools.partial(zoo_model(model).factory(vocab_size=vocab_size, max_seq_len=seq_len), **overrides)
    maker = functools.partial(token_batch, seq_len=seq_len, vocab=vocab_size)
    extra = "".join(f", {k}={v}" for k, v in overrides.items())
    return Workload(f"{model}(vocab={vocab_size}, seq={seq_len}{extra})", factory, maker, token_batch_loss)


def workload_from_spec(spec: dict[str, Any]) -> Workload:
    """The workload of a benchmark spec: ``{"kind": "image", "model", "width"}`` or
    ``{"kind": "text", "model", "seq_len", "overrides"?}``."""
    if spec["kind"] == "image":
        return image_workload(spec["model"], width=spec["width"])
    return text_workload(spec["model"], seq_len=spec["seq_len"], **spec.get("overrides", {}))


def workload_for(args: argparse.Namespace) -> Workload:
    """The workload of ``subnetdp plan``'s model flags (``--model``, ``--width``, ``--num-classes``,
    ``--vocab-size``, ``--seq-len``)."""
    if model_kind(args.model) == LANGUAGE:
        return text_workload(args.model, seq_len=args.seq_len, vocab_size=args.vocab_size or DEFAULT_VOCAB)
    return image_workload(args.model, width=args.width, num_classes=args.num_classes)
