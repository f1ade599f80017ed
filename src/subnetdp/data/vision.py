"""Image classification data: loaders for local and torchvision data sets, and a GPU-resident loader.

Images are returned as uint8 tensors in NCHW layout (PyTorch's layout), so that a whole data set can
sit on the accelerator and be normalised and augmented there with tensor ops
(:class:`TensorImageLoader`), which keeps small-image training from being bound by Python workers.
"""

from __future__ import annotations

import gzip
import io
import itertools
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .paths import cache_dir as _cache_dir
from .paths import shared_data_dir
from .seeding import TORCH_SEED_MODULUS, stable_seed

# Per-channel statistics of the training splits (pixel values scaled to [0, 1]).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
_STATS["cifar10-jpeg"] = _STATS["cifar10"]
_NUM_CLASSES = {"cifar10": 10, "cifar10-jpeg": 10, "cifar100": 100, "svhn": 10,
                "fashion-mnist": 10}
VISION_DATASETS = tuple(_NUM_CLASSES)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

Split = tuple[np.ndarray, np.ndarray]


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """A whole image data set in memory: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N].

    Also a ``torch.utils.data.Dataset`` (for ``DataLoader`` and ``DistributedSampler``): ``ds[i]`` is
    ``(image, label)``, the image float32 [C, H, W] normalised by ``mean``/``std`` as
    :class:`TensorImageLoader` feeds it to a model (without augmentation), the label an int64 scalar.
    Examples are in the source's order: ``cifar10-jpeg`` is sorted by class (its first images are all
    airplanes), the others keep the order torchvision or the IDX files give. Shuffle
    (``DataLoader(shuffle=True)``, ``DistributedSampler``) or draw a seeded subset; never take a first slice.
    """

    name: str
    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape) * 255
        std = torch.tensor(self.std, dtype=torch.float32).view(shape) * 255
        return (self.images[index].to(torch.float32) - mean) / std, self.labels[index]


# --------------------------------------------------------------------------- CIFAR-10 (JPEG)

def load_cifar10_jpeg(path: str | Path, cache_dir: str | Path | None = None,
                      limit: int | None = None, progress: bool = True) -> tuple[Split, Split]:
    """Decode the shared CIFAR-10 (JPEG) file: ``((x_train, y_train), (x_test, y_test))``.

    Images are uint8 [N, 32, 32, 3] (as stored), labels int64. The decoded arrays are cached in
    ``cache_dir`` (default ``$SUBNETDP_CACHE`` or ``~/.cache/subnetdp``), keyed by the source
    file's size and modification time, because decoding 60,000 JPEGs takes seconds. ``limit``
    decodes only ``limit`` images of each split (for tests), evenly spaced through the split in
    file order: the file is sorted by class, so its first images would all be airplanes.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    path = Path(path)
    stat = path.stat()
    cache = _cache_dir(cache_dir) / (
        f"cifar10_jpeg_{stat.st_size}_{stat.st_mtime_ns}_{'all' if limit is None else limit}.npz")
    if cache.is_file():
        with np.load(cache) as z:
            return (z["x_train"], z["y_train"]), (z["x_test"], z["y_test"])

    try:
        with np.load(path) as z:
            blob, ends, y, is_train = z["blob"], z["ends"], z["y"], z["train"]
    except Exception as e:  # noqa: BLE001 - zip, pickle and key errors all mean one thing: a bad file
        raise ValueError(f"{path}: not a readable CIFAR-10 (JPEG) file ({type(e).__name__}: {e}); "
                         "copy it again from the shared data folder") from e
    starts = np.concatenate([[0], ends[:-1]])
    splits = []
    for mask, label in ((is_train, "train"), (~is_train, "test")):
        idx = np.flatnonzero(mask)
        if limit is not None and limit < len(idx):
            idx = idx[np.linspace(0, len(idx) - 1, limit).round().astype(np.int64)]
        x = np.empty((len(idx), 32, 32, 3), dtype=np.uint8)
        for j, i in enumerate(tqdm(idx, desc=f"decoding CIFAR-10 (JPEG) {label}",
                                   disable=not progress, leave=False)):
            with Image.open(io.BytesIO(blob[starts[i]:ends[i]].tobytes())) as im:
                x[j] = np.asarray(im.convert("RGB"))
        splits.append((x, y[idx].astype(np.int64)))
    (x_train, y_train), (x_test, y_test) = splits

    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        os.replace(tmp, cache)  # atomic: concurrent readers see the old state or the whole file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return (x_train, y_train), (x_test, y_test)


def _find_cifar10_jpeg(data_dir: str | Path | None) -> Path:
    roots = [Path(data_dir)] if data_dir is not None else []
    shared = shared_data_dir()
    if shared is not None and data_dir is None:  # a --data-dir given is the only place looked at
        roots.append(shared)
    for root in roots:
        for candidate in (root, root / "cifar10_jpeg.npz", root / "cifar10-jpeg" / "cifar10_jpeg.npz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"cifar10_jpeg.npz not found (looked in {[str(r) for r in roots] or 'nothing'}); pass "
        "data_dir pointing at the file or its folder, or set SUBNETDP_SHARED_DATA")


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped or not, into a numpy array."""
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = math.prod(shape)
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says shape {shape} but the file has "
                         f"{len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).astype(
        dtype.newbyteorder("="))


def load_fashion_mnist(data_dir: str | Path | None = None, train: bool = True) -> Split:
    """Fashion-MNIST from the Debian package's IDX files: images uint8 [N, 28, 28], labels int64."""
    root = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    prefix = "train" if train else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        matches = sorted(p for p in root.rglob(f"{prefix}-{kind}*")
                         if p.name in (f"{prefix}-{kind}", f"{prefix}-{kind}.gz")) if root.is_dir() else []
        if not matches:
            raise FileNotFoundError(
                f"Fashion-MNIST file {prefix}-{kind}.gz not found under {root}; install it with "
                "`apt-get install -y dataset-fashion-mnist` or pass data_dir pointing at the IDX files")
        found.append(matches[0])
    images, labels = read_idx(found[0]), read_idx(found[1])
    return images.astype(np.uint8), labels.astype(np.int64)


# --------------------------------------------------------------------------- all data sets

def get_vision_dataset(name: str, data_dir: str | Path | None = None, train: bool = True,
                       download: bool = False, cache_dir: str | Path | None = None) -> ImageDataset:
    """Load a whole split of ``name`` as uint8 NCHW tensors, with its class count and statistics.

    ``cifar10``, ``cifar100`` and ``svhn`` come through torchvision (``download=True`` fetches
    them into ``data_dir``, default ``<cache>/datasets``; otherwise ``data_dir`` must hold them in
    torchvision's format); ``cifar10-jpeg`` reads the shared npz (report it as "CIFAR-10 (JPEG)");
    ``fashion-mnist`` reads the Debian package ``dataset-fashion-mnist``. The result is a
    ``torch.utils.data.Dataset`` in the source's order (``cifar10-jpeg``: sorted by class); see
    :class:`ImageDataset`.
    """
    if name not in _NUM_CLASSES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(VISION_DATASETS)}")
    if name == "cifar10-jpeg":
        (x_tr, y_tr), (x_te, y_te) = load_cifar10_jpeg(_find_cifar10_jpeg(data_dir), cache_dir)
        x, y = (x_tr, y_tr) if train else (x_te, y_te)
        images = torch.from_numpy(x).permute(0, 3, 1, 2)
    elif name == "fashion-mnist":
        x, y = load_fashion_mnist(data_dir, train)
        images = torch.from_numpy(x).unsqueeze(1)
    else:
        import torchvision.datasets as tvd

        root = Path(data_dir) if data_dir is not None else _cache_dir(cache_dir) / "datasets"
        try:
            if name == "svhn":
                ds = tvd.SVHN(str(root), split="train" if train else "test", download=download)
                images, y = torch.from_numpy(ds.data), ds.labels
            else:
                cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
                ds = cls(str(root), train=train, download=download)
                images, y = torch.from_numpy(ds.data).permute(0, 3, 1, 2), ds.targets
        except RuntimeError as e:
            raise FileNotFoundError(
                f"{name} not found under {root}: add --download to fetch it (download=True in Python), or "
                "point --data-dir (data_dir) at a copy in torchvision's format") from e
    labels = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    _check_labels(name, data_dir, images, labels)
    mean, std = _STATS[name]
    return ImageDataset(name, images.contiguous(), labels, _NUM_CLASSES[name], mean, std)


def _check_labels(name: str, data_dir: str | Path | None, images: Tensor, labels: Tensor) -> None:
    """One label per image, each a class of the data set: a label beyond the classes would index outside
    the classifier (a crash on the GPU, an IndexError traceback on the CPU) after minutes of loading."""
    n = _NUM_CLASSES[name]
    where = f"{name} in {data_dir}" if data_dir is not None else name
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{where}: {len(images)} images but labels of shape {tuple(labels.shape)}; "
                         "copy the data set again")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"{where}: label {bad} is not one of its {n} classes (0..{n - 1}); copy the data set again")


# --------------------------------------------------------------------------- the fast loader

class TensorImageLoader:
    """Batches from a data set held whole on a device, augmented there with tensor ops.

    Each epoch, rank ``rank`` of ``world_size`` gets the same shard that
    ``torch.utils.data.DistributedSampler(shuffle=shuffle, seed=seed, drop_last=True)`` gives it
    (a permutation seeded by ``seed + epoch``, truncated to a multiple of ``world_size``, then
    every ``world_size``-th index), so shards are disjoint and all ranks run the same number of
    batches. ``batch_size`` is per worker. Augmentation (random crop with ``crop_padding`` zero
    padding, horizontal flip) draws from a generator seeded by ``(seed, epoch, rank)``: iteration
    is deterministic and the same on every device. Yields ``(x float [B,C,H,W] normalised,
    y int64 [B])``.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], *, augment: bool = True, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device | str | None = None, crop_padding: int = 4,
                 dtype: torch.dtype = torch.float32) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        device = torch.device(device) if device is not None else images.device
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.batch_size, self.augment, self.shuffle, self.drop_last = (
            batch_size, augment, shuffle, drop_last)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.crop_padding, self.dtype = crop_padding, dtype
        shape = (1, -1, 1, 1)
        self._mean = torch.tensor(mean, device=device, dtype=dtype).view(shape) * 255
        self._std = torch.tensor(std, device=device, dtype=dtype).view(shape) * 255
        self.num_samples = len(self.labels) // world_size  # DistributedSampler, drop_last=True

    @classmethod
    def from_dataset(cls, dataset: ImageDataset, batch_size: int,
                     **kwargs: object) -> TensorImageLoader:
        return cls(dataset.images, dataset.labels, batch_size, dataset.mean, dataset.std,
                   **kwargs)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's permutation and augmentations (like DistributedSampler)."""
        self.epoch = epoch

    def forever(self, start_epoch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches epoch after epoch from ``start_epoch`` on (each epoch its own permutation), for step-counted loops."""
        if len(self) == 0:
            raise ValueError(f"rank {self.rank} of {self.world_size} gets {self.num_samples} samples, fewer than one "
                             f"batch of {self.batch_size}: lower the batch size or use more data")
        for epoch in itertools.count(start_epoch):
            self.set_epoch(epoch)
            yield from self

    def indices(self) -> Tensor:
        """This rank's sample indices for the current epoch (CPU, int64)."""
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        return order[: self.num_samples * self.world_size][self.rank :: self.world_size]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self.indices()
        gen = torch.Generator().manual_seed(stable_seed(self.seed, self.epoch, self.rank, modulus=TORCH_SEED_MODULUS))
        device = self.images.device
        for b in range(len(self)):
            batch = idx[b * self.batch_size:(b + 1) * self.batch_size].to(device)
            x = self.images[batch]
            if self.augment:
                x = self._crop_flip(x, gen)
            x = (x.to(self.dtype) - self._mean) / self._std
            yield x, self.labels[batch]

    def _crop_flip(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Random crop of the zero-padded image and random horizontal flip, as one gather."""
        B, C, H, W = x.shape
        p = self.crop_padding
        offsets = torch.randint(0, 2 * p + 1, (B, 2), generator=gen)
        flip = torch.rand(B, generator=gen) < 0.5
        offsets, flip = offsets.to(x.device), flip.to(x.device)
        padded = F.pad(x, (p, p, p, p))
        ar_h = torch.arange(H, device=x.device)
        ar_w = torch.arange(W, device=x.device)
        rows = offsets[:, :1] + ar_h  # [B, H]
        cols = offsets[:, 1:] + torch.where(flip[:, None], W - 1 - ar_w, ar_w)  # [B, W]
        b = torch.arange(B, device=x.device)[:, None, None, None]
        c = torch.arange(C, device=x.device)[None, :, None, None]
        return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]
