"""Metrics as JSON lines (one record per logged step and per epoch), plus TensorBoard when installed;
the byte formatting and plotting that reports share."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

from subnetdp.files import atomic_write


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, one decimal (bytes whole); ``None`` -> ``"n/a"``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend; matplotlib is the optional ``plots`` extra, so
    its absence is one clear ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib, an optional extra: pip install 'subnetdp[plots]' "
                          "(or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log, oldest first (none when the file is absent).

    A torn last line (a crash mid-append: the log is append-only) is dropped. Any other line that is not a
    JSON object is a ``ValueError`` naming the file and line: a run folder is data, and a damaged log is
    reported, never silently thinned.
    """
    p = Path(path)
    if not p.exists():
        return []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not a readable JSON-lines log ({e}); repair it or move it away") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{p}, line {number}: not a JSON record ({e}); repair the line or move the file "
                             "away") from None
        if not isinstance(record, dict):
            raise ValueError(f"{p}, line {number}: expected a JSON object, found {type(record).__name__}; repair "
                             "the line or move the file away")
        records.append(record)
    return records


def records_up_to(path: str | Path, step: float) -> list[dict[str, Any]]:
    """The log's records at or before ``step`` (what a resumed run keeps); a record whose step is not a
    number is a ``ValueError`` naming the file, so a damaged log stops a resume before anything is written."""
    kept = []
    for record in read_jsonl(path):
        at = record.get("step", 0)
        if isinstance(at, bool) or not isinstance(at, (int, float)):
            raise ValueError(f"{path}: a record with step {at!r}, not a number; repair it or move the file away")
        if at <= step:
            kept.append(record)
    return kept


class MetricsLog:
    """Appends ``{"kind": "step"|"epoch", ...}`` records to ``RUN/metrics.jsonl``.

    On resume, records past the checkpoint's step are dropped first, so the log matches the
    training that actually continues.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resume_from_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        kept = records_up_to(self.path, resume_from_step) if resume_from_step else []
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self._tb = None

    def _write(self, kind: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"kind": kind, **record}) + "\n")
        if self._tb is not None:
            x = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{kind}/{k}", v, x)

    def step(self, record: dict[str, Any]) -> None:
        self._write("step", record)

    def epoch(self, record: dict[str, Any]) -> None:
        self._write("epoch", record)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
