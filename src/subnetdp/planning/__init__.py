"""Planning: which worker holds which unit, and the memory costs plans are balanced on.

``data`` (the :class:`Plan` and its answers), ``placement`` (slots that balance the workers' windows),
``assign`` (:func:`plan`: units found, costed, placed), ``text`` (the plan as a table), ``counting``
(saved-for-backward bytes), ``profile`` (the full model's activation profile), ``memory`` (predicted
bytes per worker, memory costs, memory-balanced plans), ``shards`` (the FSDP2 groups of
``sharding="holders"`` and their predicted bytes), ``job`` (:func:`main_job_plan`, the plan the main
job makes); and, imported by name, ``budget`` (``subnetdp plan --budget``: the largest coverage that fits
a memory budget). Nothing here reads ``measure/``.
"""

from subnetdp.planning.data import (
    BALANCES,
    JOB_BALANCES,
    LEVELS,
    TRANSITIONS,
    Plan,
    Unit,
    check_coverage,
    valid_coverages,
)
from subnetdp.planning.assign import plan
from subnetdp.planning.placement import _arrange
from subnetdp.planning.counting import LossFn, SavedTensorMeter, loss_of, storage_key
from subnetdp.planning.profile import ActivationProfile, profile_activations, profile_sample, profile_weight_grads
from subnetdp.planning.memory import (
    BYTES_PER_ELEMENT,
    backward_memory_cost,
    backward_trainable_elements,
    memory_balanced_plan,
    memory_cost,
    memory_plan,
    model_state_bytes,
    plan_summary,
    predict_backward_worker,
    predict_worker,
)
from subnetdp.planning.shards import check_shardable, predict_sharded_worker, shard_groups, storage_summary
from subnetdp.planning.job import (
    WorkloadLike,
    backward_weight_grads,
    main_job_plan,
    plan_prediction,
    profile_workload,
    sdp_plan,
)

__all__ = [
    "BALANCES", "BYTES_PER_ELEMENT", "JOB_BALANCES", "LEVELS", "TRANSITIONS",
    "ActivationProfile", "LossFn", "Plan", "SavedTensorMeter", "Unit", "WorkloadLike",
    "backward_memory_cost", "backward_trainable_elements", "backward_weight_grads", "check_coverage", "check_shardable",
    "loss_of", "main_job_plan", "memory_balanced_plan", "memory_cost", "memory_plan", "model_state_bytes",
    "plan", "plan_prediction", "plan_summary", "predict_backward_worker",
    "predict_sharded_worker", "predict_worker", "profile_activations", "profile_sample", "profile_weight_grads",
    "profile_workload", "sdp_plan", "shard_groups", "storage_key", "storage_summary", "valid_coverages",
]
