"""Data sets: the shared CIFAR-10 (JPEG) copy, IDX files, the tensor loader, text and tokens."""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR10_JPEG, TINY_SHAKESPEARE, require_shared_data
from torch.utils.data import DistributedSampler

import subnetdp.data.vision as vision
from subnetdp.data import (
    CharTokenizer,
    TensorImageLoader,
    TokenBatches,
    get_vision_dataset,
    load_cifar10_jpeg,
    load_fashion_mnist,
    load_text,
    read_idx,
    read_token_file,
    train_val_split,
    write_token_file,
)



pytest_plugins = ["pytester"]


# --------------------------------------------------------------------------- the shared-data marker

def test_missing_shared_data_skips_naming_the_path_and_fails_under_ci(tmp_path: Path, monkeypatch) -> None:
    import conftest

    root = tmp_path / "data"
    root.mkdir()
    missing = root / CIFAR10_JPEG
    for ci, outcome in ((None, pytest.skip.Exception), ("false", pytest.skip.Exception),
                        ("true", pytest.fail.Exception), ("1", pytest.fail.Exception)):
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        with pytest.raises(outcome) as info:
            require_shared_data(CIFAR10_JPEG, root=root)
        assert f"needs {missing}: not found" in str(info.value), (ci, str(info.value))
        assert ("fails instead of skipping" in str(info.value)) == (outcome is pytest.fail.Exception)
    monkeypatch.setattr(conftest, "shared_data_dir", lambda: None)  # no shared data folder anywhere
    with pytest.raises(pytest.fail.Exception, match="needs ../shared/data/tinyshakespeare/input.txt: no shared"):
        require_shared_data(TINY_SHAKESPEARE)
    monkeypatch.undo()
    missing.parent.mkdir()
    missing.write_bytes(b"")
    monkeypatch.setenv("CI", "true")
    assert require_shared_data(CIFAR10_JPEG, root=root) == root


def test_the_shared_data_mark_skips_or_fails_at_setup(pytester: pytest.Pytester, monkeypatch) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_marked="""
        import pytest

        @pytest.mark.shared_data("no-such-set/file.bin")
        def test_reads_it():
            raise AssertionError("ran without its data")
    """)
    monkeypatch.delenv("CI", raising=False)
    skipped = pytester.runpytest("-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*needs *no-such-set/file.bin*"])
    monkeypatch.setenv("CI", "true")
    failed = pytester.runpytest()
    failed.assert_outcomes(errors=1)
    failed.stdout.fnmatch_lines(["*needs *no-such-set/file.bin*CI=true so this fails instead of skipping*"])


# --------------------------------------------------------------------------- CIFAR-10 (JPEG)

@pytest.mark.shared_data(CIFAR10_JPEG)
def test_cifar10_jpeg_decodes_both_splits_and_caches(tmp_path: Path, monkeypatch, shared_data: Path) -> None:
    npz = shared_data / CIFAR10_JPEG
    (x_tr, y_tr), (x_te, y_te) = load_cifar10_jpeg(npz, cache_dir=tmp_path, limit=200,
                                                   progress=False)
    for x, y in ((x_tr, y_tr), (x_te, y_te)):
        assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (200,) and y.dtype == np.int64
        assert set(y.tolist()) == set(range(10))  # the subset spans the class-sorted file
        mean = x.reshape(-1, 3).mean(0) / 255
        assert np.all(np.abs(mean - np.array([0.49, 0.48, 0.45])) < 0.08), mean
        assert x.std() > 30  # real images, not a constant fill
    assert not np.array_equal(x_tr, x_te)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob("*.tmp"))

    # A second call must come from the cache: decoding is made impossible.
    import PIL.Image

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    (x_tr2, y_tr2), (x_te2, y_te2) = load_cifar10_jpeg(npz, cache_dir=tmp_path, limit=200)
    for a, b in ((x_tr, x_tr2), (y_tr, y_tr2), (x_te, x_te2), (y_te, y_te2)):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setenv("SUBNETDP_CACHE", str(tmp_path))  # the environment variable finds it too
    load_cifar10_jpeg(npz, limit=200)


@pytest.mark.shared_data(CIFAR10_JPEG)
def test_get_vision_dataset_cifar10_jpeg_is_nchw(tmp_path: Path, monkeypatch, shared_data: Path) -> None:
    monkeypatch.setattr(vision, "load_cifar10_jpeg",
                        functools.partial(vision.load_cifar10_jpeg, limit=50, progress=False))
    npz = shared_data / CIFAR10_JPEG
    for data_dir in (shared_data, npz.parent, npz):
        ds = get_vision_dataset("cifar10-jpeg", data_dir=data_dir, train=False, cache_dir=tmp_path)
        assert ds.images.shape == (50, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64 and len(ds) == 50
        assert ds.num_classes == 10 and len(ds.mean) == len(ds.std) == 3


def test_get_vision_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cifar10-jpeg"):
        get_vision_dataset("imagenet")
    with pytest.raises(FileNotFoundError, match="download=True"):
        get_vision_dataset("cifar10", data_dir=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        get_vision_dataset("fashion-mnist", data_dir=tmp_path / "missing")


# --------------------------------------------------------------------------- IDX / Fashion-MNIST

def _write_idx(path: Path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_idx_parser_and_fashion_mnist_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images, 0x08)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels, 0x08)
    x, y = load_fashion_mnist(tmp_path, train=False)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert y.dtype == np.int64
    ds = get_vision_dataset("fashion-mnist", data_dir=folder, train=False)
    assert ds.images.shape == (5, 1, 28, 28) and ds.num_classes == 10 and len(ds.mean) == 1
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_fashion_mnist(folder, train=True)

    ints = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)  # big-endian, not gzipped
    _write_idx(tmp_path / "ints.idx", ints, 0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints.idx"), ints)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes((tmp_path / "ints.idx").read_bytes()[:-4])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short.idx")


# --------------------------------------------------------------------------- TensorImageLoader

def _images(n: int = 103, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.arange(n) % 10)


def test_loader_shards_match_distributed_sampler() -> None:
    images, labels = _images()
    n, world, batch = len(labels), 4, 8
    for epoch in (0, 3):
        seen = []
        for rank in range(world):
            loader = TensorImageLoader(images, labels, batch, (0.5,) * 3, (0.25,) * 3,
                                       rank=rank, world_size=world, seed=7, augment=False)
            loader.set_epoch(epoch)
            sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=7,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            assert loader.indices().tolist() == list(sampler)
            assert len(loader) == (n // world) // batch
            ys = torch.cat([y for _, y in loader])
            assert len(ys) == len(loader) * batch
            seen.append(loader.indices())
        everything = torch.cat(seen)
        assert len(set(everything.tolist())) == len(everything) == (n // world) * world
    a = TensorImageLoader(images, labels, batch, (0.5,) * 3, (0.25,) * 3)
    b = TensorImageLoader(images, labels, batch, (0.5,) * 3, (0.25,) * 3)
    b.set_epoch(1)
    assert not torch.equal(a.indices(), b.indices())
    last = TensorImageLoader(images, labels, batch, (0.5,) * 3, (0.25,) * 3, drop_last=False)
    assert len(last) == 13 and len(list(last)[-1][1]) == 103 - 12 * 8


def test_forever_runs_epoch_after_epoch() -> None:
    images, labels = _images()
    loader = TensorImageLoader(images, labels, 8, (0.5,) * 3, (0.25,) * 3)
    per_epoch = len(loader)
    stream = loader.forever()
    got = [y for _, (_, y) in zip(range(2 * per_epoch + 1), stream)]
    assert loader.epoch == 2  # crossed into a third epoch
    loader.set_epoch(1)
    assert all(torch.equal(a, y) for a, (_, y) in zip(got[per_epoch:2 * per_epoch], loader))
    assert not all(torch.equal(a, b) for a, b in zip(got[:per_epoch], got[per_epoch:2 * per_epoch]))
    too_few = TensorImageLoader(images[:5], labels[:5], 8, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        next(too_few.forever())


def test_loader_is_deterministic_and_normalises() -> None:
    images, labels = _images()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)

    def batches(**kw):
        loader = TensorImageLoader(images, labels, 16, mean, std, world_size=2, seed=1, **kw)
        loader.set_epoch(2)
        return list(loader)

    first, again, other_rank = batches(rank=0), batches(rank=0), batches(rank=1)
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][1], other_rank[0][1])

    plain = batches(rank=0, augment=False, shuffle=False)
    x, y = plain[0]
    expected = (images[0:32:2].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, labels[0:32:2]) and x.dtype == torch.float32


def test_augmentation_is_a_padded_crop_and_flip() -> None:
    images, labels = _images(n=64)
    loader = TensorImageLoader(images, labels, 64, (0.5,) * 3, (0.5,) * 3)
    out = loader._crop_flip(images, torch.Generator().manual_seed(5))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    g = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 9, (64, 2), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    assert 0 < flips.sum() < 64
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(64):
        oy, ox = offsets[i].tolist()
        ref = padded[i, :, oy:oy + 32, ox:ox + 32]
        if flips[i]:
            ref = ref[:, :, ::-1]
        np.testing.assert_array_equal(out[i].numpy(), ref)
    x_aug, _ = next(iter(loader))
    loader.augment = False
    x_plain, _ = next(iter(loader))
    assert x_aug.shape == x_plain.shape and not torch.equal(x_aug, x_plain)


# --------------------------------------------------------------------------- text

@pytest.mark.shared_data(TINY_SHAKESPEARE)
def test_char_tokenizer_round_trips_shakespeare(tmp_path: Path, shared_data: Path) -> None:
    text = load_text(shared_data / TINY_SHAKESPEARE)[:10_000]
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text)) and tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and len(ids) == 10_000 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids[:20])) == text[:20]
    tok.save(tmp_path / "tok.json")
    loaded = CharTokenizer.load(tmp_path / "tok.json")
    assert loaded.chars == tok.chars and np.array_equal(loaded.encode(text), ids)
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.encode("Ω")
    assert len(load_text(shared_data / TINY_SHAKESPEARE)) == 1_115_394


def test_byte_tokenizer_and_text_folders(tmp_path: Path) -> None:
    tok = CharTokenizer.byte_level_tokenizer()
    text = "naïve ✓ text"
    assert tok.vocab_size == 256 and tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "bytes.json")
    assert CharTokenizer.load(tmp_path / "bytes.json").byte_level
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_text(tmp_path) == "first\nsecond"
    train, val = train_val_split(np.arange(100))
    assert list(val) == list(range(90, 100)) and len(train) == 90


def test_token_file_round_trip_is_memory_mapped(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 65, 5000)
    path = write_token_file(tokens, tmp_path / "train.bin")
    assert path.stat().st_size == 5000 * 2  # uint16
    mm = read_token_file(path)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    np.testing.assert_array_equal(mm, tokens)
    big = torch.tensor([0, 70_000, 5])
    mm_big = read_token_file(write_token_file(big, tmp_path / "big.bin"))
    assert mm_big.dtype == np.uint32 and mm_big.tolist() == [0, 70_000, 5]
    (tmp_path / "train.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="header says"):
        read_token_file(tmp_path / "train.bin")


def test_token_batches_are_seeded_per_rank(tmp_path: Path) -> None:
    tokens = read_token_file(write_token_file(np.arange(3000) % 60_000, tmp_path / "t.bin"))
    a = TokenBatches(tokens, 4, 16, seed=3, rank=0)
    b = TokenBatches(tokens, 4, 16, seed=3, rank=0)
    c = TokenBatches(tokens, 4, 16, seed=3, rank=1)
    d = TokenBatches(tokens, 4, 16, seed=4, rank=0)
    x, y = a.batch(5)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows of the stream
    assert torch.equal(x, b.batch(5)[0])
    assert not torch.equal(x, c.batch(5)[0]) and not torch.equal(x, d.batch(5)[0])
    assert not torch.equal(x, a.batch(6)[0])
    steps = list(TokenBatches(tokens, 4, 16, seed=3, start_step=5, num_steps=2))
    assert len(steps) == 2 and torch.equal(steps[0][0], x) and torch.equal(steps[1][0], a.batch(6)[0])
    with pytest.raises(ValueError, match="window"):
        TokenBatches(tokens[:10], 1, 16)


def test_both_loaders_keep_their_streams_with_the_one_seed_helper() -> None:
    """The values recorded before the two ``_stable_seed`` copies became ``data.seeding.stable_seed``:
    the text stream uses the full 64-bit seed, the image stream the seed reduced mod 2**63 - 1."""
    import hashlib

    from subnetdp.data.seeding import TORCH_SEED_MODULUS, stable_seed

    assert stable_seed(0, 0, 0) == 15793235383387715774  # above 2**63: the moduli really differ
    assert stable_seed(0, 0, 0, modulus=TORCH_SEED_MODULUS) == 6569863346532939967
    assert stable_seed(42, 0, 123456) == 6149637624340056156
    tokens = np.arange(1000, dtype=np.int64)
    for (seed, rank, step), starts in {(0, 0, 0): [980, 793, 143, 88], (0, 1, 5): [466, 641, 779, 378],
                                       (7, 3, 99): [807, 904, 603, 470]}.items():
        assert TokenBatches(tokens, 4, 8, seed=seed, rank=rank).windows(step)[:, 0].tolist() == starts
    images = (torch.arange(16 * 3 * 8 * 8) % 251).to(torch.uint8).reshape(16, 3, 8, 8)
    labels = torch.arange(16) % 10
    for (seed, epoch, rank), digest in {(0, 0, 0): "44df1fd7d4849037", (0, 1, 1): "28f60b2bdaa5a5c0",
                                        (7, 2, 1): "d3c850119c1d17fe"}.items():
        loader = TensorImageLoader(images, labels, 4, (0.5,) * 3, (0.25,) * 3, rank=rank, world_size=2, seed=seed,
                                   crop_padding=2)
        loader.set_epoch(epoch)
        x, _ = next(iter(loader))
        assert hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16] == digest


def test_an_image_dataset_is_a_torch_dataset_for_dataloader_and_distributed_sampler() -> None:
    """ds[i] is (normalised image, label), as TensorImageLoader feeds a model; DistributedSampler shards it."""
    from torch.utils.data import DataLoader, Dataset

    images, labels = _images()
    ds = vision.ImageDataset("toy", images, labels, 10, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert isinstance(ds, Dataset)
    x, y = next(iter(DataLoader(ds, batch_size=16, shuffle=False)))
    plain = TensorImageLoader.from_dataset(ds, 16, augment=False, shuffle=False)
    x2, y2 = next(iter(plain))
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (16, *images.shape[1:])
    shards = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True))
              for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) + len(shards[1]) == len(ds) // 2 * 2
    xs, ys = next(iter(DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, 2, 1, seed=0))))
    assert xs.shape == (8, *images.shape[1:]) and ys.dtype == torch.int64


@pytest.mark.shared_data(CIFAR10_JPEG)
def test_cifar10_jpeg_is_stored_sorted_by_class_as_documented(tmp_path: Path, monkeypatch, shared_data: Path) -> None:
    """The order ImageDataset documents: a first slice of cifar10-jpeg is one class, so shuffle or sample."""
    monkeypatch.setattr(vision, "load_cifar10_jpeg",
                        functools.partial(vision.load_cifar10_jpeg, limit=50, progress=False))
    ds = get_vision_dataset("cifar10-jpeg", data_dir=shared_data, train=True, cache_dir=tmp_path)
    labels = [int(ds[i][1]) for i in range(len(ds))]
    assert labels == sorted(labels) and len(set(labels)) == 10
