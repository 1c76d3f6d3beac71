"""Re-planning when GPUs leave or join: placements for the new set of GPUs that keep every expert.

Pure functions on placements; no process groups. After a loss the survivors keep their slots per
GPU (or take more, when the kept slots cannot hold every expert), so the new placement has
``slots_per_gpu * survivors`` slots; the replicas already on the survivors stay where they are as
far as balance allows, and an expert whose every replica was on a lost GPU gets a slot again
(its weights come from a checkpoint, see :mod:`moeflow.checkpoint`). After a join the old GPUs
keep what they can and the new GPUs take the rest.

Shape letters: L layers, E logical experts, P GPUs, S slots per GPU, R slots (P * S).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .placement import Placement
from .planner import plan

__all__ = ["Recovery", "replan_after_loss", "replan_after_join", "single_copy_experts"]


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
                      tolerance: float = 0.02, num_slots_per_gpu: Optional[int] = None) -> Recovery:
    """Plan a placement for the GPUs left after ``lost_gpus`` failed.

    Args:
        previous: the placement in use when the GPUs were lost.
        lost_gpus: ids (in ``previous``) of the GPUs that are gone; at least one GPU must remain.
        loads: ``[L, E]`` (or ``[E]``) per-expert load as for :func:`~moeflow.balance.plan`;
            None balances replica counts only (uniform load).
        num_groups: expert groups, as for :func:`~moeflow.balance.plan`.
        tolerance: balance tolerance of the migration-aware re-plan.
        num_slots_per_gpu: S' of the survivors; None keeps ``previous``'s S. The plan starts
            from the survivors' part of ``previous`` (migration-aware
            :func:`~moeflow.balance.plan`); with S' > S each survivor's new slots first take
            stand-in experts (orphans first). ``max(S, ceil(E / survivors))`` always fits (what
            :class:`moeflow.elastic.ElasticRun` passes).

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
    S2 = S if num_slots_per_gpu is None else _slots_per_gpu(num_slots_per_gpu, "replan_after_loss")
    R2 = S2 * P2
    if R2 < E:
        need = -(-E // S2)
        raise ValueError(f"replan_after_loss: {P2} surviving GPUs x {S2} slots = {R2} slots cannot hold the {E} "
                         f"logical experts (lost_gpus={lost}); at least {need} GPUs with {S2} slots each, or "
                         f"{-(-E // P2)} slots on each survivor, are needed")
    gpus_per_node = P // previous.num_nodes
    kept_per_node = np.bincount([g // gpus_per_node for g in survivors], minlength=previous.num_nodes)
    N2 = previous.num_nodes if (kept_per_node == kept_per_node[0]).all() and kept_per_node[0] > 0 else 1
    if S2 > E // N2:
        N2 = 1  # a node keeps fewer experts than a GPU has slots: only the global policy fits
    slots = np.concatenate([np.arange(g * S, (g + 1) * S) for g in survivors])
    prev_LR = previous.phy2log.numpy()[:, slots]
    orphaned = torch.ones(L, E, dtype=torch.bool)
    for layer in range(L):
        orphaned[layer, torch.from_numpy(np.unique(prev_LR[layer]))] = False
    w = np.ones((L, E)) if loads is None else loads
    new = _plan_from(w, _pad(prev_LR.reshape(L, P2, S), S2, E), E, P2, N2, num_groups, tolerance)
    return Recovery(new, survivors, orphaned)


def replan_after_join(previous: Placement, num_new_gpus: int = 1, loads=None, *, num_groups: int = 1,
                      tolerance: float = 0.02, num_slots_per_gpu: Optional[int] = None) -> Placement:
    """Plan a placement for ``previous``'s GPUs plus ``num_new_gpus`` new ones (ids P, P+1, ...).

    Migration-aware (:func:`~moeflow.balance.plan` with ``previous``): the old GPUs keep their
    replicas where balance allows, the new GPUs' slots are copies (``moves`` counts every slot
    whose expert changed or that is new).

    Args:
        previous: the placement in use.
        num_new_gpus: GPUs joining, >= 1.
        loads: ``[L, E]`` (or ``[E]``) per-expert load; None balances replica counts only.
        num_groups: expert groups, as for :func:`~moeflow.balance.plan`.
        tolerance: balance tolerance of the migration-aware plan.
        num_slots_per_gpu: S' for every GPU; None keeps ``previous``'s S (at most E).

    Returns:
        A :class:`Placement` over ``P + num_new_gpus`` GPUs (the node structure is kept when
        the new GPU count divides by ``previous.num_nodes``, else one node).
    """
    if not isinstance(previous, Placement):
        raise TypeError(f"replan_after_join: previous must be a Placement, got {type(previous).__name__}")
    if isinstance(num_new_gpus, bool) or not isinstance(num_new_gpus, int) or num_new_gpus < 1:
        raise ValueError(f"replan_after_join: num_new_gpus must be an int >= 1, got {num_new_gpus!r}")
    P, S, E, L = previous.num_gpus, previous.num_replicas_per_gpu, previous.num_logical_experts, previous.num_layers
    S2 = min(S, E) if num_slots_per_gpu is None else _slots_per_gpu(num_slots_per_gpu, "replan_after_join")
    P2 = P + num_new_gpus
    N2 = previous.num_nodes if P2 % previous.num_nodes == 0 and S2 <= E // previous.num_nodes else 1
    prev_LPS = np.concatenate([previous.phy2log.numpy().reshape(L, P, S),
                               np.full((L, num_new_gpus, S), E, dtype=np.int64)], 1)
    w = np.ones((L, E)) if loads is None else loads
    return _plan_from(w, _pad(prev_LPS, S2, E), E, P2, N2, num_groups, tolerance)


def single_copy_experts(placement: Placement) -> list[list[int]]:
    """Per layer, the logical experts whose every replica lies on one GPU: losing that GPU
    loses them (their weights then come from a checkpoint). Empty lists mean any one GPU may
    be lost with no checkpoint read."""
    S = placement.num_replicas_per_gpu
    out = []
    for row in placement.phy2log.numpy():
        gpus: dict[int, set[int]] = {}
        for slot, e in enumerate(row.tolist()):
            gpus.setdefault(e, set()).add(slot // S)
        out.append(sorted(e for e, g in gpus.items() if len(g) == 1))
    return out


def _slots_per_gpu(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{where}: num_slots_per_gpu must be an int >= 1, got {value!r}")
    return int(value)


def _pad(prev_LPS: np.ndarray, S2: int, E: int) -> np.ndarray:
    """``[L, P, S]`` -> ``[L, P * S2]``: each GPU's first S2 slots, padded with ``E`` (an id no
    plan holds: those slots count as new) when S2 > S."""
    L, P, S = prev_LPS.shape
    out = np.full((L, P, S2), E, dtype=np.int64)
    out[:, :, :min(S, S2)] = prev_LPS[:, :, :S2]
    return out.reshape(L, P * S2)


def _plan_from(w, prev_LR: np.ndarray, E: int, P: int, N: int, num_groups: int, tolerance: float) -> Placement:
    """A migration-aware plan over P GPUs from ``prev_LR``, whose slots holding ``E`` are new.

    The new slots are first given stand-in experts (the migration-aware planner needs a full
    previous placement): each takes, among the experts its GPU lacks, the one with the most
    load per replica (an expert with no replica first), which the plan would add anyway; they
    cost a copy like any changed slot (``moves`` counts against ``prev_LR``)."""
    L, R = prev_LR.shape
    w_LE = np.broadcast_to(np.asarray(torch.as_tensor(w).double().cpu().numpy(), dtype=np.float64), (L, E))
    S = R // P
    filled = prev_LR.copy()
    for layer in range(L):
        row = filled[layer]
        cnt = np.bincount(row[row < E], minlength=E).astype(np.float64)
        for slot in np.flatnonzero(row == E):
            on_gpu = row[(slot // S) * S:(slot // S + 1) * S]
            score = np.where(cnt > 0, (w_LE[layer] + 1e-9) / np.maximum(cnt, 1), np.inf)
            score[on_gpu[on_gpu < E]] = -np.inf
            e = int(np.argmax(score))
            row[slot] = e
            cnt[e] += 1
    previous = Placement.from_phy2log(filled, E, P, N)
    new = plan(w_LE, R, num_groups, N, P, previous=previous, tolerance=tolerance).phy2log.numpy()
    return Placement.from_phy2log(new, E, P, N, moves=int((new != prev_LR).sum()))
