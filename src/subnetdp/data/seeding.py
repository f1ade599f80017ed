"""The one stable-seed helper of the loaders: the same integers give the same seed on every machine,
every Python and every run (unlike ``hash``), so each rank's batch stream is reproducible."""

from __future__ import annotations

import numpy as np

TORCH_SEED_MODULUS = 2**63 - 1  # the image loader keeps its seeds in the signed 64-bit range (its streams unchanged)


def stable_seed(*parts: int, modulus: int | None = None) -> int:
    """A 64-bit seed mixed from ``parts`` by NumPy's ``SeedSequence``, reduced ``% modulus`` when given."""
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])
    return seed % modulus if modulus is not None else seed
