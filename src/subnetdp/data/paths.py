"""Where data and caches live: explicit arguments first, then environment variables, then defaults."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(path: str | Path | None = None) -> Path:
    """The cache folder: ``path``, else ``$SUBNETDP_CACHE``, else ``~/.cache/subnetdp``."""
    if path is None:
        path = os.environ.get("SUBNETDP_CACHE") or Path.home() / ".cache" / "subnetdp"
    return Path(path).expanduser()


def shared_data_dir(path: str | Path | None = None) -> Path | None:
    """The project's offline data folder (``../shared/data`` next to the repository), if any.

    Looks at ``path``, ``$SUBNETDP_SHARED_DATA``, ``../shared/data`` and ``shared/data`` relative to
    the working directory, and ``../shared/data`` relative to this source checkout.
    """
    candidates: list[Path] = []
    if path is not None:
        candidates.append(Path(path))
    if os.environ.get("SUBNETDP_SHARED_DATA"):
        candidates.append(Path(os.environ["SUBNETDP_SHARED_DATA"]))
    cwd = Path.cwd()
    candidates += [cwd.parent / "shared" / "data", cwd / "shared" / "data",
                   Path(__file__).resolve().parents[4] / "shared" / "data"]
    for candidate in candidates:
        if candidate.expanduser().is_dir():
            return candidate.expanduser()
    return None


def default_text_path() -> Path:
    """Tiny Shakespeare from the shared data folder (the default char-level corpus)."""
    root = shared_data_dir()
    path = root / "tinyshakespeare" / "input.txt" if root else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "Tiny Shakespeare not found: expected ../shared/data/tinyshakespeare/input.txt "
            "(or set SUBNETDP_SHARED_DATA, or pass a text file or folder explicitly)")
    return path
