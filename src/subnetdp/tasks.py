"""What the main job trains on: image classification or next-token prediction.

A task owns its data, builds each worker's batch stream, computes the loss with the metrics that go
with it, and evaluates the assembled full model.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from subnetdp.config import TEXT_DATASETS, TrainConfig
from subnetdp.data import (
    TensorImageLoader,
    TokenBatches,
    default_text_path,
    get_vision_dataset,
    load_text,
    train_val_split,
)
from subnetdp.data.text import get_tokenizer, is_token_file, read_token_file, token_file_vocab_size
from subnetdp.losses import classification_loss, next_token_loss
from subnetdp.models import model_factory

Batch = tuple[torch.Tensor, torch.Tensor]
Metrics = dict[str, float]


def _digest(*parts: torch.Tensor | np.ndarray | int | tuple) -> str:
    """A short sha256 of arrays' bytes and plain values: what a resume compares to know it has the run's data."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()[:16]


class ImageTask:
    """Classification on an image data set held whole on the device (the fast path)."""

    summed_metrics = ("correct", "count")  # the loss's metrics a step adds to the epoch's sums

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        train = get_vision_dataset(cfg.dataset, cfg.data_dir, train=True, download=cfg.download)
        self.test = get_vision_dataset(cfg.dataset, cfg.data_dir, train=False, download=cfg.download)
        for ds, n in ((train, cfg.train_subset), (self.test, cfg.test_subset)):
            if n:
                keep = torch.randperm(len(ds.labels), generator=torch.Generator().manual_seed(cfg.seed))[:n]
                ds.images, ds.labels = ds.images[keep], ds.labels[keep]
        self.train = train
        self.num_classes = train.num_classes
        self.in_channels = train.images.shape[1]
        self.channels_last = device.type == "cuda"

    def data_identity(self) -> str:
        """A digest of the training data (labels in full, images' shape and a strided sample of their values)."""
        images = self.train.images
        return _digest(tuple(images.shape), self.train.labels, images.reshape(-1)[:: max(1, images.numel() // 2**20)])

    def model_factory(self) -> Callable[[], nn.Module]:
        """The model, with the dimensions the data set fixes (classes, channels, image size) and ``--width``."""
        return model_factory(self.cfg.model, num_classes=self.num_classes, in_channels=self.in_channels,
                             img_size=self.train.images.shape[-1], width=self.cfg.width)

    def loader(self, rank: int, world: int) -> TensorImageLoader:
        self.steps_per_epoch(world)
        return TensorImageLoader.from_dataset(self.train, self.cfg.batch_size, rank=rank, world_size=world,
                                              seed=self.cfg.seed, device=self.device)

    def steps_per_epoch(self, world: int) -> int:
        shard = len(self.train.labels) // world
        if shard < self.cfg.batch_size:
            raise ValueError(f"--batch-size {self.cfg.batch_size} is larger than a worker's shard ({shard} of "
                             f"{len(self.train.labels)} training examples over {world} workers); lower "
                             "--batch-size, use fewer workers, or a larger --train-subset")
        return shard // self.cfg.batch_size

    def epoch_batches(self, loader: TensorImageLoader, epoch: int, start_step: int) -> Iterator[Batch]:
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= start_step:
                yield batch

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        x, y = batch
        logits = model(self.prepare(x))
        loss = classification_loss(logits, y, self.cfg.label_smoothing)
        return loss, {"correct": float((logits.argmax(1) == y).sum()), "count": float(len(y))}

    def running_metrics(self, sums: dict[str, float]) -> Metrics:
        """The epoch's training accuracy so far, from the summed step metrics (``acc``; ``train_acc`` per epoch)."""
        return {"acc": sums["correct"] / max(sums["count"], 1)}

    def calibration_batches(self, n: int) -> Iterator[torch.Tensor]:
        """``n`` training batches for BatchNorm re-estimation, drawn only when iterated (a fixed, separate draw)."""
        loader = self.loader(0, 1)
        loader.set_epoch(10_000)
        return (self.prepare(x) for x, _ in itertools.islice(loader, n))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast: Callable) -> Metrics:
        model.eval()
        loader = TensorImageLoader.from_dataset(self.test, 500, augment=False, shuffle=False, drop_last=False,
                                                device=self.device)
        correct = total = 0
        loss = 0.0
        for x, y in loader:
            with autocast():
                logits = model(self.prepare(x))
            loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        model.train()
        return {"test_acc": correct / total, "test_loss": loss / total}


def _logits(out: object) -> torch.Tensor:
    """A model's logits: the output itself, or its ``.logits`` (Hugging Face's ModelOutput)."""
    return getattr(out, "logits", out)  # type: ignore[return-value]


class TextTask:
    """Next-token prediction on a UTF-8 corpus: character tokens by default, or the named tokenizer."""

    summed_metrics: tuple[str, ...] = ()  # the loss's metrics a step adds to the epoch's sums
    eval_batches = 20

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        path = default_text_path() if cfg.dataset in TEXT_DATASETS else Path(cfg.dataset)
        if is_token_file(path):  # already tokenised, memory-mapped: corpora larger than memory
            self.tokenizer = None
            tokens = read_token_file(path)
            self.vocab_size = token_file_vocab_size(path)
        else:
            text = load_text(path)
            self.tokenizer = get_tokenizer(cfg.tokenizer, text)
            tokens = self.tokenizer.encode(text)
            self.vocab_size = self.tokenizer.vocab_size
        self.train, self.val = train_val_split(tokens)

    def data_identity(self) -> str:
        """A digest of the training tokens (their count, vocabulary and first and last 2**20 ids; a token
        file may be larger than memory)."""
        n = len(self.train)
        return _digest(n, self.vocab_size, self.train[: 2**20], self.train[max(0, n - 2**20):])

    def model_factory(self) -> Callable[[], nn.Module]:
        """The model, with the vocabulary of the data and ``--seq-len`` as its longest sequence."""
        return model_factory(self.cfg.model, vocab_size=self.vocab_size, max_seq_len=self.cfg.seq_len)

    def loader(self, rank: int, world: int) -> TokenBatches:
        return TokenBatches(self.train, self.cfg.batch_size, self.cfg.seq_len, seed=self.cfg.seed, rank=rank,
                            device=self.device)

    def steps_per_epoch(self, world: int) -> int:
        return self.cfg.steps_per_epoch

    def epoch_batches(self, loader: TokenBatches, epoch: int, start_step: int) -> Iterator[Batch]:
        base = epoch * self.cfg.steps_per_epoch
        for i in range(start_step, self.cfg.steps_per_epoch):
            yield loader.batch(base + i)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        x, y = batch
        logits = _logits(model(x))
        loss = next_token_loss(logits, y)
        return loss, {"count": float(y.numel())}

    def running_metrics(self, sums: dict[str, float]) -> Metrics:
        """No training metric beyond the loss (the step's and the epoch's mean, which the loop reports)."""
        return {}

    def calibration_batches(self, n: int) -> Iterator[torch.Tensor]:
        return iter(())  # no BatchNorm in the language models

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast: Callable) -> Metrics:
        model.eval()
        batches = TokenBatches(self.val, self.cfg.batch_size, self.cfg.seq_len, seed=12345, device=self.device)
        total = 0.0
        for step in range(self.eval_batches):
            x, y = batches.batch(step)
            with autocast():
                logits = _logits(model(x))
            total += float(next_token_loss(logits, y))
        model.train()
        val = total / self.eval_batches
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}


def make_task(cfg: TrainConfig, device: torch.device) -> ImageTask | TextTask:
    return TextTask(cfg, device) if cfg.is_text else ImageTask(cfg, device)
