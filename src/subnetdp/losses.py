"""The losses, in one place: what the main job trains on and what the measurements step with.

Logits are cast to fp32 first (under bf16 autocast the loss is then computed in fp32; on fp32 logits
the cast is the tensor itself, so measured steps see no extra tensor).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``(batch, classes)`` logits against class indices."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of ``(batch, seq, vocab)`` logits against the next tokens."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def image_batch_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``classification_loss`` of ``model`` on an ``(images, labels)`` batch (a measured workload's step)."""
    return classification_loss(model(batch[0]), batch[1])


def token_batch_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``next_token_loss`` of ``model`` on an ``(inputs, targets)`` token batch (a measured workload's step)."""
    return next_token_loss(model(batch[0]), batch[1])
