"""Expert placement: which GPU holds which replica of which expert (EPLB-style, migration-aware).

Pure functions on tensors; no process groups. :func:`plan` is the entry point.
"""

from .placement import Placement, count_moves, gpu_loads, imbalance
from .planner import plan
from .recovery import Recovery, replan_after_join, replan_after_loss, single_copy_experts

__all__ = ["plan", "Placement", "count_moves", "gpu_loads", "imbalance", "replan_after_loss", "replan_after_join",
           "single_copy_experts", "Recovery"]
