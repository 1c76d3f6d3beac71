"""``ExpertSlots``: the physical expert slots of one :class:`~moeflow.layer.MoELayer`.

The router picks logical experts; the layer's weights hold physical slots. This module owns the
map between them and everything that changes it:

- ``phy2log`` ``[S]`` int64 (saved with the model: row s of ``experts.w1`` etc. holds logical
  expert ``phy2log[s]``), ``log2phy`` ``[E, X]`` int64 (-1 padded) and ``logcnt`` ``[E]`` int64
  (derived, not saved); slot s lives on rank ``s // L`` (contiguous, the way ``Buffer`` splits
  expert ids);
- routing each token-expert pair to one replica of its expert (:meth:`to_slots`);
- the load each slot and rank carries, from the router's expert loads (:meth:`replica_load`,
  :meth:`rank_load`);
- planning a placement from those loads (:meth:`plan_placement`) and applying one, moving expert
  weights and optimizer state between ranks in one all-to-all (:meth:`apply_placement`);
- keeping replicas of one expert identical (:meth:`sync_replica_grads`,
  :meth:`sync_replica_weights`);
- moving the slots onto a new group when ranks are lost or join (:meth:`regroup`,
  :mod:`moeflow.elastic`).

With S = E and the identity placement (the default) the mapping is skipped. docs/placement.md
has the training-loop recipe.

Shape letters: T tokens, K top-k, E logical experts, S physical slots in the group, L slots on
this rank (S / R), R ranks in the expert-parallel group, X most replicas of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .balance import Placement, plan
from .balance.replicas import (check_phy2log, off_node_slot, plan_migration, replica_tables, slot_states,
                               spread_over_replicas)
from .comm.buffer import Buffer
from .comm.rows import exchange_rows
from .experts import GroupedExperts
from .parallel.mesh import is_dtensor, local_tensor
from .routing import Router

__all__ = ["ExpertSlots"]

_WEIGHTS = ("w1", "w2", "w3")


@dataclass(frozen=True)
class _Parts:
    """The layer's parts the slots work on (held, not owned: they stay the layer's submodules)."""

    experts: GroupedExperts
    router: Router
    buffer: Buffer


class ExpertSlots(nn.Module):
    """The S physical expert slots of a layer over the R ranks of its Buffer.

    Args:
        phy2log: ``[S]`` int64, the starting placement (``moeflow.balance.replicas.default_phy2log``).
        experts: the layer's :class:`GroupedExperts` (L = S / R rows, this rank's slots).
        router: the layer's :class:`Router`: its expert loads drive planning.
        buffer: the layer's :class:`Buffer` (rank, group size, nodes, watched all-reduce).

    Attributes:
        num_experts: E.  num_slots: S.  num_local_experts: L, the slots on this rank.
    """

    def __init__(self, phy2log: torch.Tensor, experts: GroupedExperts, router: Router, buffer: Buffer) -> None:
        super().__init__()
        self._parts = _Parts(experts, router, buffer)
        self.num_experts = router.num_experts
        R = buffer.group_size
        self.num_slots, self.num_local_experts = phy2log.numel(), phy2log.numel() // R
        # the router limits a token to its best nodes assuming expert e on node e // (E / nodes)
        self._node_limited = router.max_nodes_per_token < router.num_nodes
        self.register_buffer("phy2log", phy2log.to(router.gate.weight.device))
        self._set_tables(phy2log)
        self.register_load_state_dict_post_hook(ExpertSlots._after_load_state_dict)

    # ----------------------------------------------------------------------------- routing
    @property
    def is_identity(self) -> bool:
        """True for S = E and slot s holding expert s: :meth:`to_slots` is the identity."""
        return self._identity

    def local_experts(self) -> list[int]:
        """The logical expert of each of this rank's L slots (host ints)."""
        L, rank = self.num_local_experts, self._parts.buffer.rank
        return self._phy2log_host[rank * L:(rank + 1) * L].tolist()

    def to_slots(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """``[T, K]`` logical ids (``-1`` kept) -> physical slots, each expert's pairs spread evenly
        over its replicas (starting at a replica that depends on the rank, so the remainders
        spread over ranks). On device, no host sync; the identity placement returns the input."""
        if self._identity:
            return topk_idx
        if self.num_slots == self.num_experts:  # a permutation: one gather
            return torch.where(topk_idx >= 0, self.log2phy[:, 0][topk_idx.clamp(min=0)], -1)
        return spread_over_replicas(topk_idx, self.log2phy, self.logcnt, offset=self._parts.buffer.rank)

    # ----------------------------------------------------------------------------- loads
    def replica_load(self, expert_load: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[S]`` float32, the pairs each slot computes per step: ``expert_load[e] / logcnt[e]``
        for expert e's replicas (how :meth:`to_slots` spreads them; exact to one pair per source
        rank). ``expert_load`` ``[E]``: default the router's average,
        :meth:`Router.expert_load`."""
        load_E = self._parts.router.expert_load() if expert_load is None else expert_load.float()
        load_E = load_E.to(self.logcnt.device)
        return (load_E / self.logcnt.to(load_E))[self.phy2log]

    def rank_load(self, expert_load: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[R]`` float32, the pairs each rank's slots compute per step (see :meth:`replica_load`);
        ``rank_load().max() / rank_load().mean()`` is the per-rank imbalance."""
        return self.replica_load(expert_load).view(self._parts.buffer.group_size, -1).sum(1)

    # ----------------------------------------------------------------------------- planning
    def placement(self, num_nodes: int = 1) -> Placement:
        """The current placement as a one-layer :class:`moeflow.balance.Placement`."""
        return Placement.from_phy2log(self._phy2log_host[None], self.num_experts, self._parts.buffer.group_size,
                                      num_nodes)

    def plan_placement(self, num_slots: Optional[int] = None, num_nodes: Optional[int] = None,
                       num_groups: Optional[int] = None, tolerance: float = 0.02) -> Placement:
        """Plan a placement for the router's expert loads with :func:`moeflow.balance.plan`.

        Pure host computation, no communication: the loads were summed over every rank that
        routes tokens, so every rank gets the same plan.

        Args:
            num_slots: S of the plan; None keeps the layer's. With the layer's S the plan starts
                from the current placement (``previous=``, few weight moves), else from scratch.
            num_nodes: nodes the group spans; None = the Buffer's. With node-limited routing
                (``max_nodes_per_token`` below the node count) each node is planned on its own,
                so that every expert stays on the node the router assumes.
            num_groups: expert groups for the hierarchical policy; None = the router's ``num_groups``.
            tolerance: allowed excess of the busiest rank over a plan from scratch (see ``plan``).

        Returns:
            A one-layer :class:`Placement` to pass to :meth:`apply_placement`.
        """
        router, buffer = self._parts.router, self._parts.buffer
        if router.num_load_updates == 0:
            raise ValueError("ExpertSlots.plan_placement: no load statistics yet; call router.update_bias() "
                             "after training-mode forwards first")
        S = self.num_slots if num_slots is None else num_slots
        nodes = buffer.num_nodes if num_nodes is None else num_nodes
        R, E = buffer.group_size, self.num_experts
        load_E = router.expert_load().cpu()
        keep = S == self.num_slots
        if not self._node_limited:
            previous = self.placement(nodes) if keep else None
            return plan(load_E[None], S, num_groups or router.num_groups, nodes, R, previous=previous,
                        tolerance=tolerance)
        if S % nodes or nodes != buffer.num_nodes:
            raise ValueError(f"ExpertSlots.plan_placement: node-limited routing needs num_nodes = the Buffer's "
                             f"{buffer.num_nodes} and num_slots divisible by it, got num_nodes={nodes}, "
                             f"num_slots={S}")
        E_n, S_n, old_n = E // nodes, S // nodes, self.num_slots // nodes
        parts, moves = [], 0
        for n in range(nodes):
            experts = slice(n * E_n, (n + 1) * E_n)
            previous = (Placement.from_phy2log(self._phy2log_host[n * old_n:(n + 1) * old_n][None] - n * E_n, E_n,
                                               R // nodes) if keep else None)
            p = plan(load_E[experts][None], S_n, 1, 1, R // nodes, previous=previous, tolerance=tolerance)
            parts.append(p.phy2log[0] + n * E_n)
            moves += p.moves
        return Placement.from_phy2log(torch.cat(parts)[None], E, R, nodes, moves=moves)

    # ----------------------------------------------------------------------------- migration
    @torch.no_grad()
    def apply_placement(self, placement: Union[Placement, torch.Tensor],
                        optimizer: Optional[torch.optim.Optimizer] = None, layer_index: int = 0) -> int:
        """Move expert weights (and optimizer state) so that slot s holds logical expert ``phy2log[s]``.

        Call on every rank of the group with the same placement, after ``optimizer.step()``
        (when anything moves, the expert weights' ``.grad`` is reset to None: it belonged to the
        old slots). Slots that keep their expert, or copy it from another slot on the same rank,
        are copied locally; every other slot's rows (w1, w2, w3 and each per-slot optimizer
        state) travel in one ``all_to_all_single`` of bytes, one flat buffer per destination. A
        new replica copies its expert from a rank that holds it. The parameters stay the same
        ``nn.Parameter`` objects (copied in place; when S changes, given a new tensor with
        ``torch.utils.swap_tensors``), so
        the optimizer keeps them. Expert weights sharded by FSDP2 (:func:`moeflow.parallelize`
        splits them along dim 1, so each rank keeps whole slots) move the same way, each rank its
        own part, with S kept: FSDP2 owns their storage and cannot be resized.

        Args:
            placement: a :class:`moeflow.balance.Placement` for this group (``num_gpus`` = group
                size, E logical experts; row ``layer_index`` is used), or a ``[S']`` integer
                ``phy2log``. S' may differ from the layer's S (>= E, divisible by the group size).
            optimizer: moves the state tensors shaped like the expert weights (Adam's
                ``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``, ...) with their rows;
                scalar state (Adam's ``step``) is per tensor and stays.
            layer_index: the row of ``placement`` for this layer.

        Returns:
            Slots (over the group) whose weights crossed ranks.

        Raises:
            TypeError / ValueError: a bad placement (wrong group size or expert count, a
                logical expert without a slot, ids out of range), a new S for FSDP2-sharded
                experts, state the layer cannot move, or ranks that passed different placements
                (checked by one small all-reduce before anything moves).
        """
        buffer = self._parts.buffer
        where, rank, R, E = "ExpertSlots.apply_placement", buffer.rank, buffer.group_size, self.num_experts
        if isinstance(placement, Placement):
            if placement.num_gpus != R or placement.num_logical_experts != E:
                raise ValueError(f"{where}: `placement` is for num_gpus={placement.num_gpus} and "
                                 f"{placement.num_logical_experts} logical experts; this layer has a group of "
                                 f"{R} and num_experts={E} (rank {rank})")
            if not 0 <= layer_index < placement.num_layers:
                raise ValueError(f"{where}: `layer_index` must lie in [0, {placement.num_layers}) (rank {rank}), "
                                 f"got {layer_index}")
            placement = placement.phy2log[layer_index]
        shape = list(placement.shape) if isinstance(placement, torch.Tensor) else list(np.shape(placement))
        n = shape[0] if len(shape) == 1 else -1
        if n < E or n % R:
            raise ValueError(f"{where}: `phy2log` must be 1-D with num_slots >= num_experts={E} entries, "
                             f"divisible by the group size {R} (rank {rank}), got shape {shape}")
        new = check_phy2log(placement, E, n, where, rank)
        if self._node_limited and (bad := off_node_slot(new, E, buffer.num_nodes)) >= 0:
            raise ValueError(f"{where}: node-limited routing (max_nodes_per_token="
                             f"{self._parts.router.max_nodes_per_token}) needs each expert on its own node, but "
                             f"`phy2log` puts expert {int(new[bad])} in slot {bad}, on node "
                             f"{bad // (n // buffer.num_nodes)} (rank {rank})")
        params = self._params()
        if n != self.num_slots and any(is_dtensor(p) for p in params):
            raise ValueError(f"{where}: the expert weights are sharded by FSDP2 (moeflow.parallelize), whose storage "
                             f"cannot be resized: a placement must keep num_slots={self.num_slots}, got {n} (rank "
                             f"{rank}); choose num_slots when building the layers")
        states = slot_states(optimizer, dict(zip(("experts.w1", "experts.w2", "experts.w3"), params)), where, rank)
        self._check_same_everywhere(new, states)
        if torch.equal(new, self._phy2log_host):
            return 0  # nothing to move (a re-plan that kept every slot)

        migration = plan_migration(self._phy2log_host, new, R, rank)
        # this rank's rows: whole slots, also under FSDP2 (split along dim 1)
        self._migrate(params, states, migration, new, [local_tensor(t) for t in (*params, *(t for _, _, t in states))])
        return migration.moves

    @torch.no_grad()
    def regroup(self, buffer: Buffer, phy2log, *, previous: torch.Tensor, old_ranks: Sequence[int],
                old_num_ranks: int, optimizer: Optional[torch.optim.Optimizer] = None) -> torch.Tensor:
        """Move the slots onto a new group (ranks were lost, or joined): slot s of ``phy2log``, on
        rank ``s // L'`` of ``buffer``'s group, gets its expert's weights (and per-slot optimizer
        state) from a replica that a process of the old group still holds, in one all-to-all
        over the new group, as :meth:`apply_placement` moves them. Called by
        :meth:`MoELayer.regroup` (which also hands the router the new group) on every rank of
        the new group, with the same arguments.

        Args:
            buffer: the layer's Buffer over the new group.
            phy2log: ``[S']`` the new placement (S' >= E, divisible by the new group size).
            previous: ``[S]`` the placement in use in the old group (a joiner has it from a member).
            old_ranks: per new rank, the rank of the same process in the old group, or -1 for a
                process that held no slot (a joiner). Old ranks not listed are lost.
            old_num_ranks: the old group's size.
            optimizer: as for :meth:`apply_placement`; on a joiner its state must already exist
                (shaped like the weights), to be overwritten.

        Returns:
            ``[n]`` int64, this rank's new local slots whose expert no process holds any more
            (every replica was on a lost rank): their rows (and state) are zeros until the
            caller fills them, e.g. :func:`moeflow.checkpoint.load_experts`.

        Raises:
            ValueError: a bad placement, expert weights sharded by FSDP2, or ranks that passed
                different placements.
        """
        where, rank, R, E = "ExpertSlots.regroup", buffer.rank, buffer.group_size, self.num_experts
        S_new = phy2log.numel() if isinstance(phy2log, torch.Tensor) else len(phy2log)
        if S_new < E or S_new % R:
            raise ValueError(f"{where}: `phy2log` must have num_slots >= num_experts={E} entries, divisible by the "
                             f"new group size {R} (rank {rank}), got {S_new}")
        new = check_phy2log(phy2log, E, S_new, where, rank)
        old = check_phy2log(previous, E, previous.numel(), where, rank)
        if len(old_ranks) != R or old.numel() % old_num_ranks or any(o >= old_num_ranks for o in old_ranks):
            raise ValueError(f"{where}: `old_ranks` must hold one rank of the old group of {old_num_ranks} (over "
                             f"which the {old.numel()} slots of `previous` split) or -1 per rank of the new group "
                             f"({R}), got {list(old_ranks)} (rank {rank})")
        params = self._params()
        if any(is_dtensor(p) for p in params):
            raise ValueError(f"{where}: the expert weights are sharded by FSDP2 (moeflow.parallelize); a regroup "
                             f"moves plain tensors only (rank {rank})")
        states = slot_states(optimizer, dict(zip(("experts.w1", "experts.w2", "experts.w3"), params)), where, rank)
        self._parts = _Parts(self._parts.experts, self._parts.router, buffer)
        self._check_same_everywhere(new, states)
        migration = plan_migration(old, new, R, rank, old_ranks=old_ranks, old_num_ranks=old_num_ranks)
        held = [t if old_ranks[rank] >= 0 else t[:0] for t in (*params, *(t for _, _, t in states))]
        self._migrate(params, states, migration, new, held)
        return migration.missing

    def _migrate(self, params, states, migration, new: torch.Tensor, rows: list[torch.Tensor]) -> None:
        """Give the weights and state tensors their new rows (``rows``: this rank's old ones,
        weights then states) per ``migration``, and take ``new`` as the placement."""
        R = self._parts.buffer.group_size
        fresh = self._exchange(rows, migration, new.numel() // R)
        for p, t in zip(params, fresh[:3]):
            if local_tensor(p).shape == t.shape:
                local_tensor(p).copy_(t)
            else:
                # a new shape: the same Python object (the optimizer's key) takes a fresh tensor;
                # `p.data = t` would keep the autograd node a live graph (the last step's loss)
                # holds for p, with the old shape, and the next backward would fail
                torch.utils.swap_tensors(p, nn.Parameter(t, requires_grad=p.requires_grad))
            p.grad = None
        for (state, key, old), t in zip(states, fresh[3:]):
            if local_tensor(old).shape == t.shape:
                local_tensor(old).copy_(t)
            else:
                state[key] = t
        self.num_slots, self.num_local_experts = new.numel(), new.numel() // R
        self._parts.experts.num_local_experts = self.num_local_experts
        self.phy2log = new.to(self.phy2log.device)
        self._set_tables(new)

    def _params(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self._parts.experts, w) for w in _WEIGHTS)

    def _check_same_everywhere(self, new: torch.Tensor, states) -> None:
        """Raise on every rank if the ranks' placements or optimizer state layouts differ."""
        buffer, S = self._parts.buffer, new.numel()
        i = torch.arange(1, S + 1, dtype=torch.int64)
        fingerprint = torch.tensor([S, int((new * i).sum()), int(((new + 1) ** 2 * (7 * i + 3)).sum()),
                                    len(states),
                                    sum(local_tensor(t)[0].numel() * t.element_size() for _, _, t in states)],
                                   dtype=torch.int64)
        if buffer.group_size > 1:
            both = torch.cat([fingerprint, -fingerprint]).to(self.phy2log.device)
            # one small all-reduce: a rank with another placement would exchange mismatched sizes
            buffer.all_reduce(both, op=dist.ReduceOp.MAX)
            both = both.cpu()
            if not torch.equal(both[:5], -both[5:]):
                raise ValueError(f"ExpertSlots.apply_placement: the ranks passed different placements or have "
                                 f"different optimizer state for the expert weights (rank {buffer.rank}: "
                                 f"num_slots={S}, {len(states)} state tensors)")

    def _exchange(self, tensors: list[torch.Tensor], migration, L_new: int) -> list[torch.Tensor]:
        """New ``[L_new, ...]`` versions of ``tensors`` (each ``[L, ...]``, slot-major) per ``migration``."""
        device = tensors[0].device
        recvs = []
        if migration.moves:  # the same count on every rank: all join the collective or none does
            recvs = exchange_rows(self._parts.buffer.transport, tensors, migration.send_slots,
                                  [r.numel() for r in migration.recv_slots])
        keep = (migration.local_src >= 0).nonzero().flatten()
        keep_from = migration.local_src[keep].to(device)
        keep = keep.to(device)
        missing = migration.missing.to(device)
        out = []
        for t in tensors:
            new = t.new_empty((L_new, *t.shape[1:]))
            new[keep] = t.index_select(0, keep_from)
            new[missing] = 0  # no source left (regroup): zeros until the caller fills them
            out.append(new)
        for slots, rows in zip(migration.recv_slots, recvs):
            for new, part in zip(out, rows):
                new[slots.to(device)] = part
        return out

    # ----------------------------------------------------------------------------- replicas
    @torch.no_grad()
    def sync_replica_grads(self) -> None:
        """Give every replica of an expert the sum of its replicas' gradients (w1, w2, w3).

        Each replica's gradient holds only the tokens routed to it; call this after backward and
        before ``optimizer.step()`` on every rank of the group, so that replicas take the same
        step (the one a single copy of the expert would take) and stay identical. One all-reduce
        of the replicated experts' gradients; nothing (no collective) when no expert has two
        replicas.
        """
        params = self._params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self._sum_over_replicas([local_tensor(g) for g in grads], first_only=False):
            for p, g in zip(params, grads):
                p.grad = g

    @torch.no_grad()
    def sync_replica_weights(self) -> None:
        """Copy each expert's first replica (lowest slot) over its other replicas (w1, w2, w3).

        For replicas that were set apart (e.g. ``experts.reset_parameters()`` with a different
        seed per rank); the layer's own initialisation, ``load_global_weights`` and
        :meth:`apply_placement` already give replicas equal weights. Call on every rank of the
        group; one all-reduce.
        """
        self._sum_over_replicas([local_tensor(p) for p in self._params()], first_only=True)

    def _sum_over_replicas(self, tensors: list[torch.Tensor], first_only: bool) -> bool:
        """In place: each local replica's rows of ``tensors`` (``[L, ...]``) become the sum over
        the group of its expert's replicas' rows (only the first replica's with ``first_only``).
        False (and no collective) when no expert has two replicas."""
        if self._replica_sum is None:
            return False
        local_slots, rows, is_first, num_rows = self._replica_sum
        device = tensors[0].device
        local_slots, rows = local_slots.to(device), rows.to(device)
        sizes = [t[0].numel() for t in tensors]
        acc = torch.promote_types(tensors[0].dtype, torch.float32)
        summed = torch.zeros(num_rows, sum(sizes), dtype=acc, device=device)
        if local_slots.numel():
            mine = torch.cat([t.index_select(0, local_slots).reshape(local_slots.numel(), -1).to(acc)
                              for t in tensors], 1)
            if first_only:
                mine = torch.where(is_first.to(device).unsqueeze(1), mine, 0)
            summed.index_add_(0, rows, mine)
        if self._parts.buffer.group_size > 1:
            # each replicated expert's rows summed over its replicas on every rank
            self._parts.buffer.all_reduce(summed)
        back = summed.index_select(0, rows).split(sizes, 1)
        for t, part in zip(tensors, back):
            t[local_slots] = part.reshape(-1, *t.shape[1:]).to(t.dtype)
        return True

    # ----------------------------------------------------------------------------- tables
    def _set_tables(self, phy2log: torch.Tensor) -> None:
        """Derive the routing tables and the replica-sum plan from a valid ``phy2log``.

        Host tensors are made on the CPU explicitly (the layer may be built under a
        ``torch.device`` context)."""
        E, S, R, rank = self.num_experts, phy2log.numel(), self._parts.buffer.group_size, self._parts.buffer.rank
        L, cpu = S // R, torch.device("cpu")
        phy2log = phy2log.to(cpu)
        log2phy, logcnt = replica_tables(phy2log, E)
        self._phy2log_host = phy2log.clone()
        # a host flag, so forward never asks the device: no mapping at all for the default placement
        self._identity = S == E and bool((phy2log == torch.arange(E, device=cpu)).all())
        device = self.phy2log.device
        for name, t in (("log2phy", log2phy), ("logcnt", logcnt)):  # derived: not saved
            if name in self._buffers:
                setattr(self, name, t.to(device))
            else:
                self.register_buffer(name, t.to(device), persistent=False)
        # _sum_over_replicas: the replicated experts are rows 0..n-1 of the summed buffer
        rep = (logcnt > 1).nonzero().flatten()
        row_of = torch.full((E,), -1, dtype=torch.int64, device=cpu)
        row_of[rep] = torch.arange(rep.numel(), device=cpu)
        mine = phy2log[rank * L:(rank + 1) * L]
        local_slots = (row_of[mine] >= 0).nonzero().flatten()
        is_first = log2phy[mine[local_slots], 0] == local_slots + rank * L      # the expert's lowest slot
        self._replica_sum = (None if rep.numel() == 0
                             else (local_slots, row_of[mine[local_slots]], is_first, int(rep.numel())))

    @staticmethod
    def _after_load_state_dict(module: "ExpertSlots", incompatible_keys) -> None:
        # a loaded phy2log re-derives the tables (and is checked: a bad one would misroute silently)
        where, buffer = "MoELayer.load_state_dict", module._parts.buffer
        p = check_phy2log(module.phy2log, module.num_experts, module.num_slots, where, buffer.rank)
        if module._node_limited and (bad := off_node_slot(p, module.num_experts, buffer.num_nodes)) >= 0:
            raise ValueError(f"{where}: the saved `phy2log` puts expert {int(p[bad])} in slot {bad}, off its node, "
                             f"which node-limited routing forbids (rank {buffer.rank})")
        module._set_tables(p)
