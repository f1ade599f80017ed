"""Helpers shared by the model zoo."""

from __future__ import annotations

from torch import nn


def init_all_(model: nn.Module) -> None:
    """Initialise a freshly built model with its own ``init_weights`` rule, module by module.

    Used at the end of each zoo model's ``__init__`` so that ordinary (non-SDP) use gets the
    standard initialisation; on the meta device there is nothing to fill, so it returns at once.
    subnetdp's seeded initialisation (``subnetdp.init.materialize``) calls the same rule per module.
    """
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        return
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            model.init_weights(module, name)  # type: ignore[operator]
