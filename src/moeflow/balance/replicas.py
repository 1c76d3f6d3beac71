"""Physical replicas in a running layer: lookup tables, spreading pairs over replicas, migration plans.

Pure functions on tensors; no process groups (the layer runs the collectives). A layer with
``num_replicas`` physical slots over ``num_ranks`` ranks keeps ``phy2log [num_replicas]``: slot s
lives on rank ``s // S`` (S = num_replicas / num_ranks, split contiguously, as ``Buffer`` splits
expert ids) and holds logical expert ``phy2log[s]``.

Shape letters: T tokens, K top-k, E logical experts, N physical slots (num_replicas), S slots per
rank, X most replicas of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..layout import rank_in_expert
from .placement import Placement

__all__ = ["check_phy2log", "default_phy2log", "off_node_slot", "replica_tables", "spread_over_replicas", "Migration",
           "plan_migration", "slot_states"]


def default_phy2log(num_experts: int, num_replicas: int, num_nodes: int = 1) -> torch.Tensor:
    """``[N]`` int64, the starting placement: on each node, the node's slots hold the node's
    ``E / num_nodes`` contiguous experts in turn (slot i of node n holds expert
    ``n * E / num_nodes + i % (E / num_nodes)``). One node: slot s holds ``s % E``. The identity
    when N = E; extra slots repeat a node's experts from its first one. With at most
    ``E / num_nodes`` slots per rank no rank holds two replicas of one expert."""
    E_node, N_node = num_experts // num_nodes, num_replicas // num_nodes
    s = torch.arange(num_replicas, dtype=torch.int64, device="cpu")
    return (s // N_node) * E_node + (s % N_node) % E_node


def off_node_slot(phy2log: torch.Tensor, num_experts: int, num_nodes: int) -> int:
    """The first slot holding an expert of another node (experts and slots split contiguously
    over nodes), or -1 when every replica lies on its expert's node."""
    N = phy2log.numel()
    s = torch.arange(N)
    bad = ((phy2log // (num_experts // num_nodes)) != s // (N // num_nodes)).nonzero().flatten()
    return int(bad[0]) if bad.numel() else -1


def check_phy2log(phy2log, num_experts: int, num_replicas: int, where: str, rank: int = 0) -> torch.Tensor:
    """Validate a ``[N]`` map from slots to logical experts; returns it as a CPU int64 tensor.

    Raises:
        TypeError: not an integer tensor / array / list.
        ValueError: wrong shape, an id outside ``[0, E)``, or a logical expert with no slot.
    """
    if isinstance(phy2log, torch.Tensor):
        p = phy2log.detach().cpu()
    else:
        try:
            p = torch.as_tensor(np.asarray(phy2log), device="cpu")
        except (TypeError, ValueError) as e:
            raise TypeError(f"{where}: `phy2log` must be an integer tensor, array or list (rank {rank}), "
                            f"got {type(phy2log).__name__}: {e}") from None
    if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
        raise TypeError(f"{where}: `phy2log` must hold integers (rank {rank}), got dtype {p.dtype}")
    if tuple(p.shape) != (num_replicas,):
        raise ValueError(f"{where}: `phy2log` must have shape [num_replicas] = [{num_replicas}] (rank {rank}), "
                         f"got {list(p.shape)}")
    p = p.long()
    if p.numel() and (p.min() < 0 or p.max() >= num_experts):
        bad = int(((p < 0) | (p >= num_experts)).nonzero()[0])
        raise ValueError(f"{where}: `phy2log` must hold logical expert ids in [0, {num_experts}) (rank {rank}), "
                         f"got phy2log[{bad}]={int(p[bad])}")
    missing = (torch.bincount(p, minlength=num_experts) == 0).nonzero().flatten()
    if missing.numel():
        raise ValueError(f"{where}: `phy2log` gives no slot to logical expert(s) {missing[:8].tolist()} "
                         f"(rank {rank}); every expert needs at least one replica")
    return p


def replica_tables(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``log2phy [E, X]`` int64 (the slots of each expert in slot order, ``-1`` padded) and
    ``logcnt [E]`` int64 (replicas of each expert) for a valid ``phy2log [N]`` (on the CPU)."""
    p = Placement.from_phy2log(phy2log.cpu()[None], num_experts, num_gpus=1)
    return p.log2phy[0], p.logcnt[0]


def spread_over_replicas(topk_idx: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                         offset: int = 0) -> torch.Tensor:
    """Map logical expert ids to physical slots, spreading each expert's pairs over its replicas.

    The pairs of expert e (in token order, ``k`` order inside a token) take its replicas in
    turn, starting at replica ``offset % logcnt[e]``: each replica gets ``floor`` or ``ceil`` of
    ``n_e / logcnt[e]`` of the ``n_e`` pairs, and ranks passing their rank as ``offset`` start on
    different replicas, so the remainders spread too. On device, no host sync.

    Args:
        topk_idx: ``[T, K]`` int64 logical ids in ``[0, E)``, ``-1`` = no expert (kept).
        log2phy: ``[E, X]`` int64, see :func:`replica_tables`.
        logcnt: ``[E]`` int64, >= 1.
        offset: where the rotation starts (the layer passes its rank).

    Returns:
        ``[T, K]`` int64 physical slot ids, ``-1`` where ``topk_idx`` is ``-1``.
    """
    T, K = topk_idx.shape
    flat = topk_idx.flatten()                                               # [T * K]
    valid = flat >= 0
    pos = rank_in_expert(flat, logcnt.numel())                              # the pair's turn in its expert
    e = torch.where(valid, flat, 0)
    replica = (pos + offset) % logcnt[e]
    return torch.where(valid, log2phy[e, replica], -1).view(T, K)


@dataclass(frozen=True)
class Migration:
    """What one rank does to go from one ``phy2log`` to another (see :func:`plan_migration`).

    Attributes:
        local_src: ``[S_new]`` int64, for each new local slot the old local slot it copies, or
            ``-1`` when its weights arrive from another rank (or from nowhere: ``missing``).
        send_slots: one ``[n]`` int64 tensor per destination rank, the old local slots to send
            there (in the order the receiver expects; empty for this rank).
        recv_slots: one ``[n]`` int64 tensor per source rank, the new local slots the rows
            arriving from there fill, in arrival order.
        moves: slots, over the whole group, whose weights cross ranks.
        copies: slots, over the whole group, whose logical expert changed (the planner's moves).
        missing: ``[n]`` int64, this rank's new local slots whose expert no process left holds
            (every replica was on a lost rank): they must be filled from elsewhere (a checkpoint).
    """

    local_src: torch.Tensor
    send_slots: list[torch.Tensor]
    recv_slots: list[torch.Tensor]
    moves: int
    copies: int
    missing: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


def plan_migration(old: torch.Tensor, new: torch.Tensor, num_ranks: int, rank: int, *,
                   old_ranks: Optional[Sequence[int]] = None, old_num_ranks: Optional[int] = None) -> Migration:
    """Plan the weight movement from ``old [N_old]`` to ``new [N_new]`` phy2log (CPU int64).

    A new slot copies its expert from the same process when the old placement has it there;
    otherwise from another process's replica, the replicas of an expert taking the fetches in
    turn so that no one rank sends every copy of a popular expert. Every rank computes the same
    plan from the same inputs: no communication is needed to agree on the split sizes.

    Args:
        old, new: the placements; ``new`` is over ``num_ranks`` ranks, ``rank`` is this rank.
        old_ranks: when the group changed (ranks lost or joined), per new rank the rank of the
            same process in the group ``old`` was for, or -1 (a process that held no slot). The
            old group's ranks not listed are gone: their slots are no source, and a new slot
            whose expert only they held is ``missing``. Default: the same group.
        old_num_ranks: the old group's size (default ``num_ranks``).
    """
    R_old = num_ranks if old_num_ranks is None else old_num_ranks
    S_old, S_new = old.numel() // R_old, new.numel() // num_ranks
    now = {o: n for n, o in enumerate(range(num_ranks) if old_ranks is None else old_ranks) if o >= 0}
    old_l, new_l = old.tolist(), new.tolist()
    holders: dict[int, list[int]] = {}                     # expert -> old global slots still held, in order
    for s, e in enumerate(old_l):
        if s // S_old in now:
            holders.setdefault(e, []).append(s)
    fetched: dict[int, int] = {}                           # expert -> remote fetches so far
    local_src = [-1] * S_new
    send = [[] for _ in range(num_ranks)]
    recv = [[] for _ in range(num_ranks)]
    missing = []
    moves = 0
    for s, e in enumerate(new_l):
        dst = s // S_new
        if s < len(old_l) and old_l[s] == e and now.get(s // S_old) == dst:
            src_slot = s                                   # stays
        elif e not in holders:                             # every replica was on a lost rank
            if dst == rank:
                missing.append(s - dst * S_new)
            continue
        else:
            local = [o for o in holders[e] if now[o // S_old] == dst]
            if local:
                src_slot = local[0]
            else:
                k = fetched.get(e, 0)
                fetched[e] = k + 1
                src_slot = holders[e][k % len(holders[e])]
        src = now[src_slot // S_old]
        src_local = src_slot - (src_slot // S_old) * S_old
        if src == dst:
            if dst == rank:
                local_src[s - dst * S_new] = src_local
            continue
        moves += 1
        if src == rank:
            send[dst].append(src_local)
        if dst == rank:
            recv[src].append(s - dst * S_new)
    copies = sum(1 for s, e in enumerate(new_l) if s >= len(old_l) or old_l[s] != e)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return Migration(as_t(local_src), [as_t(x) for x in send], [as_t(x) for x in recv], moves, copies,
                     as_t(missing))


def slot_states(optimizer, params: dict, where: str, rank: int = 0) -> list[tuple[dict, str, torch.Tensor]]:
    """``(state dict, key, tensor)`` of every optimizer state tensor shaped like one of ``params``
    (name -> ``[S, ...]`` expert weight), in a fixed order: these move with the slots' rows. Scalar
    state (Adam's ``step``) is per tensor, not per slot, and is skipped.

    Raises:
        TypeError: ``optimizer`` is not an optimizer, or holds state of another non-scalar shape
            (it could not be split by slot).
        ValueError: ``optimizer`` holds none of ``params``.
    """
    if optimizer is None:
        return []
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: `optimizer` must be a torch.optim.Optimizer or None (rank {rank}), "
                        f"got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in params.values()):
        raise ValueError(f"{where}: `optimizer` does not hold this layer's expert weights (rank {rank})")
    out = []
    for name, p in params.items():
        state = optimizer.state.get(p, {})
        for key in sorted(state):
            v = state[key]
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            if v.shape != p.shape:
                raise TypeError(f"{where}: optimizer state {key!r} of {name} has shape {list(v.shape)}, "
                                f"not the weight's {list(p.shape)}; it cannot be split by slot (rank {rank})")
            out.append((state, key, v))
    return out
