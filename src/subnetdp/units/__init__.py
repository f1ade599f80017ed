"""Finding units in a model: residual blocks (block level) and inner-width slices (neuron level)."""

from subnetdp.units.blocks import BlockInfo, BlockSelector, candidate_paths, find_blocks
from subnetdp.units.widths import AttrSpec, SliceSpec, WidthGroup, WidthPair, find_width_groups

__all__ = [
    "AttrSpec",
    "BlockInfo",
    "BlockSelector",
    "SliceSpec",
    "WidthGroup",
    "WidthPair",
    "candidate_paths",
    "find_blocks",
    "find_width_groups",
]
