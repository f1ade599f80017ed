"""subnetdp: Subnetwork Data Parallelism for PyTorch.

Each worker trains a structured subnetwork of the model (a subset of residual blocks, or of each
layer's inner width); parameters shared by several workers are averaged over exactly those workers.
"""

from subnetdp.assemble import assemble_state_dict
from subnetdp.buckets import Bucket, build_buckets
from subnetdp.recompute import checkpoint_blocks
from subnetdp.evaluation import evaluation_model, recalibrate_batchnorm, scale_residual_branches
from subnetdp.init import materialize
from subnetdp.options import SDPOptions
from subnetdp.planning import Plan, Unit, memory_balanced_plan, plan, valid_coverages
from subnetdp.engine import SubnetDataParallel, agree_finite, clip_grad_norm_
from subnetdp.simulate import Simulation
from subnetdp.subnet import build_subnetwork

__all__ = [
    "Bucket",
    "Plan",
    "SDPOptions",
    "Simulation",
    "SubnetDataParallel",
    "Unit",
    "agree_finite",
    "assemble_state_dict",
    "build_buckets",
    "build_subnetwork",
    "checkpoint_blocks",
    "clip_grad_norm_",
    "evaluation_model",
    "materialize",
    "memory_balanced_plan",
    "plan",
    "recalibrate_batchnorm",
    "scale_residual_branches",
    "valid_coverages",
]

__version__ = "0.1.0"
