"""Text for language-model training: tokenisers, token files, batches.

Character and byte tokenisers need nothing beyond numpy; subword tokenisers come from the optional
``tokenizers`` (Hugging Face) or ``tiktoken`` packages when the user names one (:func:`get_tokenizer`).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .paths import default_text_path
from .seeding import stable_seed

TOKEN_FILE_FORMAT = "subnetdp-tokens-v1"


class CharTokenizer:
    """Character-level tokeniser: token ``i`` is the ``i``-th of the sorted characters.

    ``byte_level=True`` (or :meth:`byte_level_tokenizer`) instead encodes the UTF-8 bytes
    (vocabulary 256), for corpora with too many distinct characters or text with unseen ones.
    ``encode`` returns an int64 numpy array, fast enough for whole corpora.
    """

    def __init__(self, chars: Sequence[str] = (), *, byte_level: bool = False) -> None:
        self.byte_level = byte_level
        self.chars: list[str] = [] if byte_level else sorted(set(chars))
        if not byte_level and not self.chars:
            raise ValueError("a character tokenizer needs at least one character")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("chars must be single characters")
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @classmethod
    def byte_level_tokenizer(cls) -> CharTokenizer:
        return cls(byte_level=True)

    @property
    def vocab_size(self) -> int:
        return 256 if self.byte_level else len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        if self.byte_level:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codes, codepoints)
        known = ids < len(self._codes)
        known[known] = self._codes[ids[known]] == codepoints[known]
        if not known.all():
            bad = chr(int(codepoints[np.argmin(known)]))
            raise ValueError(f"character {bad!r} is not in the tokenizer's vocabulary; build it "
                             "from this text or use the byte-level tokenizer")
        return ids.astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray | Tensor) -> str:
        ids = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}")
        if self.byte_level:
            return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids.tolist())

    def save(self, path: str | Path) -> None:
        data = {"type": "byte"} if self.byte_level else {"type": "char", "chars": "".join(self.chars)}
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("type") == "byte":
            return cls(byte_level=True)
        if data.get("type") == "char":
            return cls(list(data["chars"]))
        raise ValueError(f"{path} is not a saved CharTokenizer")


class SubwordTokenizer:
    """A subword tokeniser from the ``tokenizers`` or ``tiktoken`` package, with ``CharTokenizer``'s API.

    Build it with :func:`get_tokenizer`. ``encode`` returns an int64 numpy array.
    """

    def __init__(self, name: str, backend: object, kind: str) -> None:
        self.name, self._backend, self._kind = name, backend, kind

    @property
    def vocab_size(self) -> int:
        b = self._backend
        return int(b.n_vocab) if self._kind == "tiktoken" else int(b.get_vocab_size())  # type: ignore[attr-defined]

    def encode(self, text: str) -> np.ndarray:
        b = self._backend
        ids = b.encode_ordinary(text) if self._kind == "tiktoken" else b.encode(text).ids  # type: ignore[attr-defined]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray | Tensor) -> str:
        ids = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids, dtype=np.int64).ravel()
        return self._backend.decode(ids.tolist())  # type: ignore[attr-defined]


TOKENIZER_NAMES = ("char", "byte", "tiktoken:<encoding>", "tokenizers:<tokenizer.json or hub name>")


def _optional(package: str, spec: str) -> object:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"tokenizer {spec!r} needs the {package!r} package: pip install {package} "
                          f"(or use the built-in 'char' or 'byte' tokenizer)") from None


def get_tokenizer(spec: str = "char", text: str | None = None) -> CharTokenizer | SubwordTokenizer:
    """The tokeniser named by ``spec``.

    - ``"char"``: the sorted characters of ``text`` (needed); ``"byte"``: UTF-8 bytes (vocabulary 256);
    - ``"tiktoken:NAME"``: ``tiktoken.get_encoding(NAME)``, e.g. ``tiktoken:gpt2`` (tiktoken
      downloads the encoding once into its cache);
    - ``"tokenizers:PATH"``: a Hugging Face ``tokenizer.json`` file (``tokenizers.Tokenizer.from_file``);
      ``"tokenizers:NAME"`` where no such file exists loads ``NAME`` from the Hugging Face Hub
      (``Tokenizer.from_pretrained``). A bare path to a ``.json`` file means the same.
    """
    kind, _, arg = spec.partition(":")
    if spec == "char":
        if text is None:
            raise ValueError("the 'char' tokenizer is built from the training text: pass text=")
        return CharTokenizer.from_text(text)
    if spec == "byte":
        return CharTokenizer.byte_level_tokenizer()
    if kind == "tiktoken" and arg:
        encoding = _optional("tiktoken", spec).get_encoding(arg)  # type: ignore[attr-defined]
        return SubwordTokenizer(spec, encoding, "tiktoken")
    if (kind == "tokenizers" and arg) or spec.endswith(".json"):
        source = arg if kind == "tokenizers" else spec
        lib = _optional("tokenizers", spec)
        if Path(source).is_file():
            backend = lib.Tokenizer.from_file(source)  # type: ignore[attr-defined]
        elif source.endswith(".json"):
            raise FileNotFoundError(f"tokenizer {spec!r}: no such file {source}")
        else:
            backend = lib.Tokenizer.from_pretrained(source)  # type: ignore[attr-defined]
        return SubwordTokenizer(spec, backend, "tokenizers")
    raise ValueError(f"unknown tokenizer {spec!r}; choose one of: {', '.join(TOKENIZER_NAMES)}")


def load_text(path_or_dir: str | Path | None = None) -> str:
    """A UTF-8 text file, or every ``*.txt`` under a folder (sorted, joined by newlines).

    ``None`` gives the default corpus, Tiny Shakespeare from the shared data folder.
    """
    path = Path(path_or_dir) if path_or_dir is not None else default_text_path()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.txt") if f.is_file())
        if not files:
            raise FileNotFoundError(f"no *.txt files under {path}")
        return "\n".join(_read_utf8(f) for f in files)
    return _read_utf8(path)


def _read_utf8(path: Path) -> str:
    """A training text file's contents; a file that is empty or not UTF-8 is named with the cause.

    Only a regular file is read: a FIFO or device would block or never end.
    """
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file (a pipe, socket or device?); give a text file or folder")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
                         "(e.g. iconv -t UTF-8)") from e
    if not text:
        raise ValueError(f"{path}: the text file is empty; give a file with training text")
    return text


def train_val_split(tokens: np.ndarray | Tensor,
                    val_fraction: float = 0.1) -> tuple[np.ndarray | Tensor, np.ndarray | Tensor]:
    """Split a token sequence into (train, validation): the last ``val_fraction`` validates."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n_train = len(tokens) - int(round(len(tokens) * val_fraction))
    return tokens[:n_train], tokens[n_train:]


# --------------------------------------------------------------------------- token files

def _header_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_token_file(tokens: Sequence[int] | np.ndarray | Tensor, path: str | Path,
                     vocab_size: int | None = None) -> Path:
    """Write tokens as a flat little-endian uint16 (or uint32 if needed) file plus a JSON header.

    The header ``<path>.json`` records the dtype, the length and (if given) the vocabulary size, so
    :func:`read_token_file` can memory-map the file without reading it.
    """
    path = Path(path)
    arr = np.asarray(tokens.cpu() if isinstance(tokens, Tensor) else tokens).ravel()
    if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
        raise ValueError("token ids must lie in 0..2**32-1")
    if vocab_size is not None and arr.size and int(arr.max()) >= vocab_size:
        raise ValueError(f"token id {int(arr.max())} is beyond vocab_size={vocab_size}; give the tokenizer's "
                         "vocabulary size")
    dtype = np.dtype("<u2") if not arr.size or arr.max() < 2**16 else np.dtype("<u4")
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, payload in ((path, arr.astype(dtype).tobytes()),
                            (_header_path(path), json.dumps({
                                "format": TOKEN_FILE_FORMAT, "dtype": dtype.str,
                                "length": int(arr.size), "vocab_size": vocab_size}).encode())):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, target)
    return path


# the integer types token ids come in (numpy's ``dtype.str``); anything else is refused before mapping:
# an object dtype would map pointers (a crash), a float one would train on garbage
TOKEN_DTYPES = ("|u1", "<u2", "<u4", "<i2", "<i4", "<i8")
MAX_VOCAB = 2**32  # the writer's bound on ids; a larger vocabulary is a damaged header
_REWRITE = "write it again with subnetdp.data.write_token_file"


def read_token_header(path: str | Path) -> dict[str, Any]:
    """A token file's header, every field checked against the rules and the file's size.

    Returns ``dtype`` (a numpy dtype from :data:`TOKEN_DTYPES`), ``length`` and ``vocab_size`` (or
    None). A header is data from disk: a wrong type, an unknown dtype or a length the file does not
    hold raises ValueError naming the header, the field and the fix, before anything is mapped.
    """
    path = Path(path)
    head = _header_path(path)
    if not head.is_file() or not path.is_file():
        raise ValueError(f"{path}: a token file and its header {head.name} must both be regular files; {_REWRITE}")
    try:
        header = json.loads(head.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{head}: not a JSON token-file header ({' '.join(str(e).split())}); {_REWRITE}") from None
    if not isinstance(header, dict) or header.get("format") != TOKEN_FILE_FORMAT:
        raise ValueError(f"{head} is not a {TOKEN_FILE_FORMAT} header; {_REWRITE}")
    dtype, length, vocab = header.get("dtype"), header.get("length"), header.get("vocab_size")
    if not isinstance(dtype, str) or dtype not in TOKEN_DTYPES:
        raise ValueError(f"{head}: \"dtype\" {dtype!r} is not a token id type; use one of "
                         f"{', '.join(TOKEN_DTYPES)}, or {_REWRITE}")
    if type(length) is not int or length < 0:
        raise ValueError(f"{head}: \"length\" {length!r} must be a whole number >= 0; {_REWRITE}")
    if vocab is not None and (type(vocab) is not int or not 0 < vocab <= MAX_VOCAB):
        raise ValueError(f"{head}: \"vocab_size\" {vocab!r} must be null or a whole number in 1..{MAX_VOCAB}; "
                         f"{_REWRITE}")
    np_dtype = np.dtype(dtype)
    size = path.stat().st_size
    if size != length * np_dtype.itemsize:
        raise ValueError(f"{path} has {size} bytes; its header says {length} tokens of {np_dtype} "
                         f"(truncated or overwritten?); {_REWRITE}")
    return {"dtype": np_dtype, "length": length, "vocab_size": vocab}


def read_token_file(path: str | Path) -> np.ndarray:
    """Memory-map a file written by :func:`write_token_file` (read-only), after checking its header.

    One pass over the mapped ids checks them against the vocabulary (ids below 0 or at or above the
    header's ``vocab_size`` would index outside the model's embedding: a crash, or silent garbage).
    """
    path = Path(path)
    header = read_token_header(path)
    dtype, length, vocab = header["dtype"], header["length"], header["vocab_size"]
    if length == 0:
        return np.empty(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(length,))
    low = int(tokens.min()) if dtype.kind == "i" else 0
    high = int(tokens.max()) if vocab is not None else None
    if low < 0 or (high is not None and high >= vocab):
        bad, allowed = (low, "ids >= 0") if low < 0 else (high, f"the vocabulary 0..{vocab - 1}")
        raise ValueError(f"{path}: token id {bad} is outside {allowed} of its header {_header_path(path).name}; "
                         f"fix its \"vocab_size\" or {_REWRITE}")
    return tokens


def is_token_file(path: str | Path) -> bool:
    """Whether ``path`` is a token file written by :func:`write_token_file` (it has its header)."""
    return Path(path).is_file() and _header_path(Path(path)).is_file()


def token_file_vocab_size(path: str | Path) -> int:
    """The vocabulary size recorded in a token file's header, else the largest id + 1 (one pass)."""
    vocab = read_token_header(path)["vocab_size"]
    if vocab:
        return vocab
    tokens = read_token_file(path)
    return int(tokens.max()) + 1 if len(tokens) else 0


# --------------------------------------------------------------------------- batches

class TokenBatches:
    """Random windows of a 1-D token sequence, for next-token prediction.

    Batch ``step`` of rank ``rank`` draws ``batch_size`` window starts from a generator seeded by
    ``(seed, rank, step)``: deterministic, resumable at any step, and different on every rank.
    Works on memory-mapped files (only the windows are read). Yields ``(inputs, targets)``, int64
    ``[batch_size, seq_len]`` on ``device``, targets shifted by one token.
    """

    def __init__(self, tokens: np.ndarray | Tensor, batch_size: int, seq_len: int, *,
                 seed: int = 0, rank: int = 0, device: torch.device | str = "cpu",
                 start_step: int = 0, num_steps: int | None = None) -> None:
        self.tokens = tokens.cpu().numpy() if isinstance(tokens, Tensor) else tokens
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(self.tokens.shape)}")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{len(self.tokens)} tokens cannot fill a window of {seq_len + 1}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.start_step, self.num_steps = start_step, num_steps

    def windows(self, step: int) -> Tensor:
        """The ``[batch_size, seq_len + 1]`` windows of batch ``step`` (on the CPU)."""
        rng = np.random.default_rng(stable_seed(self.seed, self.rank, step))
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        return torch.from_numpy(np.asarray(self.tokens[idx]).astype(np.int64))

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        w = self.windows(step).to(self.device)
        return w[:, :-1], w[:, 1:]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batch(step)
            step += 1
