"""Expert placement planning: EPLB's hierarchical policy, migration-aware and affinity-aware.

From scratch (DeepSeek EPLB's policy, one code path; the global policy is the hierarchical one with
one group on one node):
  1. pack expert groups onto nodes (greedy, then swaps between nodes),
  2. replicate experts inside each node (min-max load per replica; at most one replica per GPU),
  3. pack replicas onto the node's GPUs (greedy, never two replicas of one expert on one GPU,
     then swaps between GPUs).
With ``previous``: keep every replica that may stay, place only the rest, then swap (cheapest in
weight copies first) until the GPU max is within ``tolerance`` of the plan from scratch; a layer
where that fails takes the plan from scratch relabelled to match ``previous`` as closely as
possible; a layer where neither beats keeping ``previous`` (or keeping it is already within
``tolerance``) keeps it. With ``affinity``: relabel nodes layer by layer (balance unchanged) so that experts
that are often used one after the other share a node.

Shape letters: L layers, E logical experts, R replicas (slots), G groups, N nodes, P GPUs,
S slots per GPU, B rows (layers x nodes), M experts per node, K GPUs per node.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .packing import greedy_assign, greedy_pack, refine_swaps, repair_conflicts, replicate, to_slots
from .placement import Placement


def plan(loads, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
         previous: Placement | None = None, *, tolerance: float = 0.02, affinity=None) -> Placement:
    """Plan which GPU holds which replica of which expert.

    Args:
        loads: [L, E] (or [E] for one layer) tensor / array / nested list, non-negative finite
            per-expert load (e.g. tokens routed to each expert over a window).
        num_replicas: R, physical expert slots per layer; a multiple of ``num_gpus``, >= E.
        num_groups: G expert groups (DeepSeek-V3: 8); each group stays on one node when G is a
            multiple of ``num_nodes`` and divides E (hierarchical policy), else the global policy
            is used (as in EPLB).
        num_nodes: N nodes; ``num_gpus`` must be a multiple of it.
        num_gpus: P GPUs.
        previous: the placement in use; the plan then moves as few expert weights as it can while
            keeping each layer's GPU max load within ``tolerance`` of a plan from scratch. Per
            layer, the result's GPU max load is never above that of keeping ``previous`` (an exact
            bound, no tolerance) where ``previous`` holds every expert, and a layer keeps
            ``previous`` unchanged (no moves) where that is already within ``tolerance`` of a plan
            from scratch.
        tolerance: allowed relative excess of a layer's GPU max load over the plan from scratch
            when re-planning from ``previous`` (0.02 = 2%).
        affinity: optional [L - 1, E, E] non-negative co-activation counts, ``affinity[l, i, j]``
            tokens that used expert i in layer l and expert j in layer l + 1. Used only without
            ``previous``: nodes are relabelled so those pairs share a node more often.

    Returns:
        A :class:`Placement`; ``moves`` counts the weight copies from ``previous``.
    """
    w_LE = _check_loads(loads)
    L, E = w_LE.shape
    _check_sizes(E, num_replicas, num_groups, num_nodes, num_gpus)
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got tolerance={tolerance!r}")
    if previous is not None:
        prev_LR = _check_previous(previous, L, E, num_replicas, num_nodes, num_gpus)
    A = None if affinity is None or previous is not None else _check_affinity(affinity, L, E)

    hierarchical = num_groups % num_nodes == 0 and E % num_groups == 0
    G, N = (num_groups, num_nodes) if hierarchical else (1, 1)
    if (num_replicas // num_gpus) > E // N:
        raise ValueError(f"num_replicas / num_gpus = {num_replicas // num_gpus} replicas per GPU exceeds "
                         f"the {E // N} experts each GPU may choose from (num_nodes={N}), so some GPU "
                         f"would hold two replicas of one expert; lower num_replicas={num_replicas}")

    group_LNg = _pack_groups(w_LE, G, N)
    fresh_LR = _place_in_nodes(w_LE, group_LNg, num_replicas, num_gpus)
    if previous is None:
        if A is not None and num_nodes > 1:
            fresh_LR = _relabel_for_affinity(fresh_LR, A, E, num_gpus, num_nodes, hierarchical)
        return Placement.from_phy2log(fresh_LR, E, num_gpus, num_nodes)

    target_L = _gpu_max(w_LE, fresh_LR, num_gpus) * (1 + tolerance)
    aligned_LR = _align_to(fresh_LR, prev_LR, num_gpus, N)
    sticky_LR = _sticky(w_LE, prev_LR, group_LNg, G, N, num_replicas, num_gpus, target_L)
    ok_L = _gpu_max(w_LE, sticky_LR, num_gpus) <= target_L * (1 + 1e-9) + 1e-12
    fewer_L = (sticky_LR != prev_LR).sum(1) <= (aligned_LR != prev_LR).sum(1)
    new_LR = np.where((ok_L & fewer_L)[:, None], sticky_LR, aligned_LR)
    # Per layer, never worse than staying put, and no moves for a gain within the tolerance: a
    # layer keeps `previous` unchanged where that is already within `tolerance` of the plan from
    # scratch, or where the plan above would not lower its GPU max load. Only a `previous` that
    # holds every expert can stay (after a GPU loss it may not: replan_after_loss).
    complete_L = np.stack([np.bincount(row, minlength=E) for row in prev_LR]).min(1) >= 1
    keep_max_L = _gpu_max(w_LE, prev_LR, num_gpus)
    stay_L = complete_L & ((keep_max_L <= target_L * (1 + 1e-9) + 1e-12)
                           | (_gpu_max(w_LE, new_LR, num_gpus) >= keep_max_L))
    new_LR = np.where(stay_L[:, None], prev_LR, new_LR)
    return Placement.from_phy2log(new_LR, E, num_gpus, num_nodes, moves=int((new_LR != prev_LR).sum()))


# ---- validation -------------------------------------------------------------------------------

def _check_loads(loads) -> np.ndarray:
    if isinstance(loads, torch.Tensor):
        w = loads.detach().cpu().double().numpy()
    elif isinstance(loads, (np.ndarray, list, tuple)):
        try:
            w = np.asarray(loads, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"loads must be numeric, got {type(loads).__name__}: {e}") from None
    else:
        raise TypeError(f"loads must be a torch.Tensor, numpy array or list, got {type(loads).__name__}")
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"loads must have shape [layers, logical_experts], got shape {tuple(w.shape)}")
    if not np.isfinite(w).all():
        bad = np.argwhere(~np.isfinite(w))[0]
        raise ValueError(f"loads must be finite, got loads[{bad[0]}, {bad[1]}]={w[tuple(bad)]}")
    if (w < 0).any():
        bad = np.argwhere(w < 0)[0]
        raise ValueError(f"loads must be >= 0, got loads[{bad[0]}, {bad[1]}]={w[tuple(bad)]}")
    return w


def _check_sizes(E: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    for name, v in (("num_replicas", num_replicas), ("num_groups", num_groups),
                    ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {name}={v!r}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {name}={v}")
    if num_replicas < E:
        raise ValueError(f"num_replicas must be >= the number of logical experts ({E}), got num_replicas={num_replicas}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas must be divisible by num_gpus={num_gpus}, got num_replicas={num_replicas}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus must be divisible by num_nodes={num_nodes}, got num_gpus={num_gpus}")


def _check_previous(previous, L: int, E: int, R: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    if not isinstance(previous, Placement):
        raise TypeError(f"previous must be a Placement, got {type(previous).__name__}")
    if tuple(previous.phy2log.shape) != (L, R):
        raise ValueError(f"previous.phy2log has shape {tuple(previous.phy2log.shape)}, expected "
                         f"(layers, num_replicas) = ({L}, {R})")
    if previous.num_gpus != num_gpus or previous.num_nodes != num_nodes:
        raise ValueError(f"previous was planned for num_gpus={previous.num_gpus}, num_nodes={previous.num_nodes}, "
                         f"got num_gpus={num_gpus}, num_nodes={num_nodes}")
    prev = previous.phy2log.numpy().astype(np.int64)
    if prev.min() < 0 or prev.max() >= E:
        raise ValueError(f"previous.phy2log holds expert ids in [{prev.min()}, {prev.max()}], expected [0, {E})")
    return prev


def _check_affinity(affinity, L: int, E: int) -> np.ndarray:
    A = (affinity.detach().cpu().double().numpy() if isinstance(affinity, torch.Tensor)
         else np.asarray(affinity, dtype=np.float64))
    if A.shape != (L - 1, E, E):
        raise ValueError(f"affinity must have shape [layers - 1, E, E] = ({L - 1}, {E}, {E}), got {tuple(A.shape)}")
    if not np.isfinite(A).all() or (A < 0).any():
        raise ValueError("affinity must be finite and >= 0")
    return A


# ---- planning from scratch ----------------------------------------------------------------------

def _pack_groups(w_LE: np.ndarray, G: int, N: int) -> np.ndarray:
    """Step 1: [L, N, G / N] int64, the groups on each node (balanced by group load)."""
    L, E = w_LE.shape
    gw_LG = w_LE.reshape(L, G, E // G).sum(2)
    if N == 1:
        return np.tile(np.arange(G), (L, 1))[:, None, :]
    keys = np.tile(np.arange(G), (L, 1))
    pack = greedy_pack(gw_LG, keys, np.full((L, N), G // N), np.zeros((L, N)), np.zeros((L, G, N), bool))
    group_LNg = to_slots(pack, N, G // N)
    gw_LNg = np.take_along_axis(gw_LG, group_LNg.reshape(L, -1), 1).reshape(group_LNg.shape)
    refine_swaps(gw_LNg, group_LNg)
    return group_LNg


def _node_experts(group_LNg: np.ndarray, E: int, G: int) -> np.ndarray:
    """[L, N, M] the logical experts on each node, group by group."""
    L, N, g = group_LNg.shape
    size = E // G
    return (group_LNg[..., None] * size + np.arange(size)).reshape(L, N, g * size)


def _replica_items(cnt_BM: np.ndarray, n: int) -> np.ndarray:
    """[B, n] key of each item when key m appears cnt[m] times (then -1 padding)."""
    cum_BM = np.cumsum(cnt_BM, 1)
    t = np.arange(n)
    key = (cum_BM[:, None, :] <= t[None, :, None]).sum(2)
    return np.where(t[None, :] < cum_BM[:, -1:], key, -1)


def _place_in_nodes(w_LE: np.ndarray, group_LNg: np.ndarray, R: int, P: int) -> np.ndarray:
    """Steps 2 and 3: [L, R] phy2log with the given groups on each node."""
    L, E = w_LE.shape
    _, N, g = group_LNg.shape
    G = g * N
    K, S = P // N, R // P
    mlog_BM = _node_experts(group_LNg, E, G).reshape(L * N, -1)
    w_BM = np.take_along_axis(np.repeat(w_LE, N, 0), mlog_BM, 1)
    B, M = w_BM.shape
    cnt_BM = replicate(w_BM, R // N, K)
    key_Bn = _replica_items(cnt_BM, R // N)
    item_w_Bn = np.take_along_axis(w_BM / cnt_BM, key_Bn, 1)
    pack_Bn = greedy_pack(item_w_Bn, key_Bn, np.full((B, K), S), np.zeros((B, K)), np.zeros((B, M, K), bool))
    item_BKS = to_slots(pack_Bn, K, S)
    key_BKS = np.take_along_axis(key_Bn, item_BKS.reshape(B, -1), 1).reshape(B, K, S)
    slot_w_BKS = np.take_along_axis(item_w_Bn, item_BKS.reshape(B, -1), 1).reshape(B, K, S)
    repair_conflicts(key_BKS, slot_w_BKS)
    refine_swaps(slot_w_BKS, key_BKS)
    return np.take_along_axis(mlog_BM, key_BKS.reshape(B, -1), 1).reshape(L, R)


def _gpu_max(w_LE: np.ndarray, phy_LR: np.ndarray, P: int) -> np.ndarray:
    """[L] the largest GPU load of each layer."""
    L, E = w_LE.shape
    cnt_LE = np.zeros((L, E))
    np.add.at(cnt_LE, (np.arange(L)[:, None], phy_LR), 1)
    rep_LR = np.take_along_axis(w_LE, phy_LR, 1) / np.take_along_axis(cnt_LE, phy_LR, 1)
    return rep_LR.reshape(L, P, -1).sum(2).max(1)


# ---- re-planning from a previous placement --------------------------------------------------------

def _align_slots(new_BS: np.ndarray, prev_BS: np.ndarray) -> np.ndarray:
    """Reorder each GPU's experts so that one it held before sits in its old slot. [B, S] -> [B, S]."""
    B, S = new_BS.shape
    match_BSS = new_BS[:, :, None] == prev_BS[:, None, :]          # [B, new slot, old slot]
    has_B_S = match_BSS.any(2)
    dest = np.where(has_B_S, match_BSS.argmax(2), S)               # old slot for matched items
    taken = np.zeros((B, S + 1), bool)
    taken[np.arange(B)[:, None], dest] = True
    free_order = np.argsort(taken[:, :S], axis=1, kind="stable")   # free slots first, in order
    unmatched_rank = np.cumsum(~has_B_S, 1) - 1
    dest = np.where(has_B_S, dest, np.take_along_axis(free_order, np.clip(unmatched_rank, 0, S - 1), 1))
    out = np.empty_like(new_BS)
    out[np.arange(B)[:, None], dest] = new_BS
    return out


def _align_to(fresh_LR: np.ndarray, prev_LR: np.ndarray, P: int, N: int) -> np.ndarray:
    """Relabel nodes, then GPUs inside nodes, then slots inside GPUs of ``fresh`` to match ``prev``."""
    L, R = fresh_LR.shape
    E = int(max(fresh_LR.max(), prev_LR.max())) + 1
    K, S = P // N, R // P
    onehot = lambda phy: (np.eye(E, dtype=np.float32)[phy.reshape(L, P, S)].sum(2))  # [L, P, E]
    overlap_LPP = np.einsum("lae,lbe->lab", onehot(fresh_LR), onehot(prev_LR))
    ov = overlap_LPP.reshape(L, N, K, N, K)
    node_LN = greedy_assign(ov.sum((2, 4)), 1)                     # fresh node -> old node
    sub = ov[np.arange(L)[:, None], np.arange(N)[None, :], :, node_LN, :]   # [L, N, K(fresh), K(old)]
    gpu_BK = greedy_assign(sub.reshape(L * N, K, K), 1)                                 # fresh GPU -> old GPU in that node
    new_gpu_LP = (node_LN[:, :, None] * K + gpu_BK.reshape(L, N, K)).reshape(L, P)
    out = np.empty((L, P, S), np.int64)
    out[np.arange(L)[:, None], new_gpu_LP] = fresh_LR.reshape(L, P, S)
    return _align_slots(out.reshape(L * P, S), prev_LR.reshape(L * P, S)).reshape(L, R)


def _sticky(w_LE, prev_LR, group_LNg, G, N, R, P, target_L) -> np.ndarray:
    """Keep what may stay, place the rest, swap until within target. [L, R] phy2log."""
    L, E = w_LE.shape
    K, S = P // N, R // P
    rows_L = np.arange(L)
    if N > 1:
        # groups stay on the node that held them, if that packing is valid and balanced enough
        size = E // G
        node_of_slot = np.arange(R) // (R // N)
        votes = np.zeros((L, G, N))
        np.add.at(votes, (rows_L[:, None], prev_LR // size, np.broadcast_to(node_of_slot, (L, R))), 1)
        prev_node_LG = votes.argmax(2)
        valid = (np.stack([(prev_node_LG == n).sum(1) for n in range(N)], 1) == G // N).all(1)
        gw_LG = w_LE.reshape(L, G, size).sum(2)
        node_load = lambda node_LG: np.stack([(gw_LG * (node_LG == n)).sum(1) for n in range(N)], 1).max(1)
        fresh_node_LG = np.empty((L, G), np.int64)
        fresh_node_LG[rows_L[:, None, None], group_LNg] = np.arange(N)[None, :, None]
        fresh_node_LG = _relabel_nodes(fresh_node_LG, prev_node_LG, N)
        # necessary for the GPU max to meet the target: the node's mean GPU load meets it
        keep = valid & (node_load(prev_node_LG) / K <= target_L)
        node_LG = np.where(keep[:, None], prev_node_LG, fresh_node_LG)
        group_LNg = np.argsort(node_LG, axis=1, kind="stable").reshape(L, N, G // N)
    mlog_BM = _node_experts(group_LNg, E, G).reshape(L * N, -1)
    B, M = mlog_BM.shape
    w_BM = np.take_along_axis(np.repeat(w_LE, N, 0), mlog_BM, 1)
    cnt_BM = replicate(w_BM, R // N, K)
    rep_w_BM = w_BM / cnt_BM
    # local key of each previous slot on this node, -1 when its expert is no longer on the node
    local_LE = np.full((L * N, E), -1, np.int64)
    local_LE[np.arange(B)[:, None], mlog_BM] = np.arange(M)
    old_Bn = prev_LR.reshape(B, R // N)
    origin_Bn = np.take_along_axis(local_LE, old_Bn, 1)
    # keep the first cnt[m] old slots of each key m
    order = np.argsort(np.where(origin_Bn >= 0, origin_Bn, M), axis=1, kind="stable")
    srt = np.take_along_axis(origin_Bn, order, 1)
    first = np.concatenate([np.ones((B, 1), bool), srt[:, 1:] != srt[:, :-1]], 1)
    start = np.maximum.accumulate(np.where(first, np.arange(R // N), 0), 1)
    occ = np.empty_like(order)
    np.put_along_axis(occ, order, np.arange(R // N) - start, 1)
    safe = np.maximum(origin_Bn, 0)
    keep_Bn = (origin_Bn >= 0) & (occ < np.take_along_axis(cnt_BM, safe, 1))
    key_BKS = np.where(keep_Bn, origin_Bn, -1).reshape(B, K, S)
    kept_BM = np.zeros((B, M), np.int64)
    np.add.at(kept_BM, (np.arange(B)[:, None], np.where(keep_Bn, origin_Bn, 0)), keep_Bn.astype(np.int64))
    has_BMK = np.zeros((B, M + 1, K), bool)
    has_BMK[np.arange(B)[:, None, None], np.where(key_BKS >= 0, key_BKS, M), np.arange(K)[None, :, None]] = True
    has_BMK = has_BMK[:, :M]
    w_BKS = np.where(key_BKS >= 0, np.take_along_axis(rep_w_BM, np.maximum(key_BKS, 0).reshape(B, -1), 1)
                     .reshape(B, K, S), 0.0)
    # place the replicas that are still missing into the free slots
    item_Bn = _replica_items(cnt_BM - kept_BM, R // N)
    item_w = np.where(item_Bn >= 0, np.take_along_axis(rep_w_BM, np.maximum(item_Bn, 0), 1), 0.0)
    pack_Bn = greedy_pack(item_w, item_Bn, (key_BKS < 0).sum(2), w_BKS.sum(2), has_BMK)
    item_order = np.argsort(np.where(pack_Bn >= 0, pack_Bn, K), axis=1, kind="stable")
    free_flat = np.argsort(np.where(key_BKS.reshape(B, -1) < 0, 0, 1), axis=1, kind="stable")
    n_free = (key_BKS < 0).reshape(B, -1).sum(1)
    real = np.arange(R // N)[None, :] < n_free[:, None]
    bb, tt = np.nonzero(real)
    flat_key = key_BKS.reshape(B, -1)
    flat_key[bb, free_flat[bb, tt]] = item_Bn[bb, item_order[bb, tt]]
    key_BKS = flat_key.reshape(B, K, S)
    w_BKS = np.take_along_axis(rep_w_BM, key_BKS.reshape(B, -1), 1).reshape(B, K, S)
    repair_conflicts(key_BKS, w_BKS)
    refine_swaps(w_BKS, key_BKS, target_B=np.repeat(target_L, N), origin_BKS=origin_Bn.reshape(B, K, S),
                 max_rounds=4 * R // N)
    new_LR = np.take_along_axis(mlog_BM, key_BKS.reshape(B, -1), 1).reshape(L, R)
    return _align_slots(new_LR.reshape(L * P, S), prev_LR.reshape(L * P, S)).reshape(L, R)


def _relabel_nodes(node_LG: np.ndarray, prev_node_LG: np.ndarray, N: int) -> np.ndarray:
    """Rename the nodes of ``node_LG`` so that as many groups as possible keep ``prev_node_LG``."""
    L, G = node_LG.shape
    agree = (node_LG[:, :, None, None] == np.arange(N)[:, None]) & \
            (prev_node_LG[:, :, None, None] == np.arange(N)[None, :])
    to_LN = greedy_assign(agree.sum(1).astype(np.float64), 1)
    return np.take_along_axis(to_LN, node_LG, 1)


# ---- affinity ------------------------------------------------------------------------------------

def _relabel_for_affinity(phy_LR, A, E, P, N, hierarchical) -> np.ndarray:
    """Relabel nodes (hierarchical) or move whole GPUs between nodes (global) layer after layer so
    that experts with high co-activation with the previous layer's experts share their node."""
    L, R = phy_LR.shape
    S, K = R // P, P // N
    out = phy_LR.reshape(L, P, S).copy()
    for l in range(1, L):
        on_gpu = lambda phy_PS: np.eye(E)[phy_PS].sum(1).T          # [E, P] replicas per GPU
        prev_EP = on_gpu(out[l - 1])
        prev_EN = prev_EP.reshape(E, N, K).sum(2) / prev_EP.sum(1, keepdims=True)
        cur_EP = on_gpu(out[l])
        cur_EP = cur_EP / cur_EP.sum(1, keepdims=True)
        pull_EN = A[l - 1].T @ prev_EN                               # [E(layer l), N]
        score_PN = cur_EP.T @ pull_EN                                # GPU of layer l -> node
        if hierarchical:
            node_N = greedy_assign(score_PN.reshape(N, K, N).sum(1)[None], 1)[0]
            gpu_P = (node_N[:, None] * K + np.arange(K)).reshape(P)
        else:
            node_P = greedy_assign(score_PN[None], K)[0]
            gpu_P = np.empty(P, np.int64)
            gpu_P[np.argsort(node_P, kind="stable")] = np.arange(P)
        new = np.empty_like(out[l])
        new[gpu_P] = out[l]
        out[l] = new
    return out.reshape(L, R)
