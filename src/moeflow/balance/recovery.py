"""Re-planning after GPUs are lost: a placement for the survivors that keeps every logical expert.

Pure functions on placements; no process groups. The survivors keep their slots per GPU, so the
new placement has ``slots_per_gpu * survivors`` slots; the replicas already on the survivors stay
where they are as far as balance allows (migration-aware :func:`~moeflow.balance.plan` from the
survivors' part of the old placement), and an expert whose every replica was on a lost GPU gets a
slot again (its weights come from a checkpoint, see :mod:`moeflow.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .placement import Placement
from .planner import plan

__all__ = ["Recovery", "replan_after_loss"]


@dataclass(frozen=True)
class Recovery:
    """What :func:`replan_after_loss` returns.

    Attributes:
        placement: the new placement over the survivors (GPU ids 0..P'-1).
        survivors: old GPU id of each new GPU id, in order.
        orphaned: ``[L, E]`` bool, logical experts that had no replica left on a survivor (their
            weights must be read from a checkpoint, not copied from a peer).
    """

    placement: Placement
    survivors: list[int]
    orphaned: torch.Tensor


def replan_after_loss(previous: Placement, lost_gpus, loads=None, *, num_groups: int = 1,
                      tolerance: float = 0.02) -> Recovery:
    """Plan a placement for the GPUs left after ``lost_gpus`` failed.

    Args:
        previous: the placement in use when the GPUs were lost.
        lost_gpus: ids (in ``previous``) of the GPUs that are gone; at least one GPU must remain.
        loads: ``[L, E]`` (or ``[E]``) per-expert load as for :func:`~moeflow.balance.plan`;
            None balances replica counts only (uniform load).
        num_groups: expert groups, as for :func:`~moeflow.balance.plan`.
        tolerance: balance tolerance of the migration-aware re-plan.

    The node structure is kept when every node keeps the same number of GPUs (survivor ``i``
    then lives on node ``i // (P' / nodes)``); otherwise the plan treats the survivors as one
    node (the global policy).

    Raises:
        ValueError: ``lost_gpus`` is not a set of GPU ids of ``previous`` leaving at least one, or
            the survivors have fewer slots than there are logical experts (no placement can keep
            every expert: the message says how many GPUs or slots are needed).
    """
    if not isinstance(previous, Placement):
        raise TypeError(f"replan_after_loss: previous must be a Placement, got {type(previous).__name__}")
    P, S, E, L = previous.num_gpus, previous.num_replicas_per_gpu, previous.num_logical_experts, previous.num_layers
    try:
        lost = sorted({int(g) for g in (lost_gpus.tolist() if isinstance(lost_gpus, torch.Tensor) else lost_gpus)})
    except (TypeError, ValueError):
        raise TypeError(f"replan_after_loss: lost_gpus must be a collection of GPU ids, got {lost_gpus!r}") from None
    if any(g < 0 or g >= P for g in lost):
        raise ValueError(f"replan_after_loss: lost_gpus must be GPU ids in [0, {P}), got {lost}")
    survivors = [g for g in range(P) if g not in lost]
    if not survivors:
        raise ValueError(f"replan_after_loss: lost_gpus={lost} leaves no GPU of {P}")
    P2 = len(survivors)
    R2 = S * P2
    if R2 < E:
        need = -(-E // S)
        raise ValueError(f"replan_after_loss: {P2} surviving GPUs x {S} slots = {R2} slots cannot hold the {E} "
                         f"logical experts (lost_gpus={lost}); at least {need} GPUs with {S} slots each, or "
                         f"{-(-E // P2)} slots on each survivor, are needed")
    gpus_per_node = P // previous.num_nodes
    kept_per_node = np.bincount([g // gpus_per_node for g in survivors], minlength=previous.num_nodes)
    N2 = previous.num_nodes if (kept_per_node == kept_per_node[0]).all() and kept_per_node[0] > 0 else 1
    if S > E // N2:
        N2 = 1  # a node keeps fewer experts than a GPU has slots: only the global policy fits
    slots = np.concatenate([np.arange(g * S, (g + 1) * S) for g in survivors])
    prev_LR = previous.phy2log.numpy()[:, slots]
    orphaned = torch.ones(L, E, dtype=torch.bool)
    for layer in range(L):
        orphaned[layer, torch.from_numpy(np.unique(prev_LR[layer]))] = False
    w = np.ones((L, E)) if loads is None else loads
    kept = Placement.from_phy2log(prev_LR, E, P2, N2)
    new = plan(w, R2, num_groups, N2, P2, previous=kept, tolerance=tolerance)
    return Recovery(new, survivors, orphaned)
