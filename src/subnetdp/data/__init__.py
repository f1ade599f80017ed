"""Data sets: images held whole as tensors (CIFAR, SVHN, Fashion-MNIST, the shared CIFAR-10 JPEG
copy) and text for char-level language models (Tiny Shakespeare by default), all usable offline."""

from .paths import cache_dir, default_text_path, shared_data_dir
from .text import (
    CharTokenizer,
    TokenBatches,
    load_text,
    read_token_file,
    train_val_split,
    write_token_file,
)
from .vision import (
    VISION_DATASETS,
    ImageDataset,
    TensorImageLoader,
    get_vision_dataset,
    load_cifar10_jpeg,
    load_fashion_mnist,
    read_idx,
)

__all__ = [
    "cache_dir", "shared_data_dir", "default_text_path",
    "CharTokenizer", "TokenBatches", "load_text", "train_val_split", "write_token_file",
    "read_token_file",
    "VISION_DATASETS", "ImageDataset", "TensorImageLoader", "get_vision_dataset",
    "load_cifar10_jpeg", "load_fashion_mnist", "read_idx",
]
