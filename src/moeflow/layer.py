"""``MoELayer``: router -> dispatch -> grouped experts -> combine, plus shared experts and overlap.

Shape letters:
    T  tokens on this rank (batch x sequence, flattened)    D  hidden size
    K  top-k                                                 E  routed (logical) experts in the group
    M  rows received by this rank                            C  chunks of the token pipeline
    S  physical expert slots in the group                    L  slots on this rank (S / R)
    R  ranks in the expert-parallel group

Overlap: dispatch and combine are issued with ``async_finish`` and waited on only when their
result is needed, so the shared experts run while chunk 0's tokens travel, and with C > 1 the
experts work on chunk i while chunk i+1 is dispatched and chunk i-1 is combined. Backward runs
the same communication without overlap (one combine per dispatch, one cached dispatch per
combine). Across micro-batches: every wait is a hand-over point (:mod:`moeflow.comm.interleave`),
so when two micro-batches run as lanes (:mod:`moeflow.parallel.overlap`), the one about to wait
lets the other compute first.

Placement: the router picks logical experts; :class:`~moeflow.slots.ExpertSlots` maps each pair
to one physical slot holding a replica of its expert, and dispatch runs over the S slots (L per
rank, split contiguously). Planning, migration and replica sync live there too.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .balance.replicas import default_phy2log
from .chunking import BackwardClock, ChunkTuner
from . import autograd as ag
from .comm.agree import check_same
from .comm.buffer import Buffer
from .comm.health import PeerFailureError
from .comm.interleave import in_backward
from .comm.transport import ProcessGroupTransport
from .experts import GroupedExperts, SwiGLU
from .layout import rank_in_expert
from .parallel.mesh import GroupLike, resolve_groups
from .routing import Router
from .slots import ExpertSlots

__all__ = ["MoELayer"]


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN whose routed experts are split over the ranks of ``group``.

    Args:
        hidden: D.
        ffn_hidden: F, the intermediate size of one routed expert (SwiGLU).
        num_experts: E, routed (logical) experts in the whole group; divisible by its size unless
            ``num_slots`` is given (8 experts on 3 ranks as 9 slots, say), and by its node count.
        num_topk: K, experts per token.
        num_shared_experts: experts every token goes through on its own rank (DeepSeek-style;
            fused into one SwiGLU of ``num_shared_experts * ffn_hidden``).
        group: the ranks to work over: the expert-parallel process group (default: the world;
            no data parallelism beside it), or a ``DeviceMesh`` with an ``"ep"`` dim (its other
            dims, but ``"pp"``, data parallel) or a :class:`~moeflow.parallel.MoEMesh`; see
            :mod:`moeflow.parallel.mesh`. The experts are split over the expert-parallel ranks;
            the router's load is summed over every rank that routes tokens (data parallel x
            expert parallel), so ``expert_bias`` stays the same on all of them.
        num_chunks: C, token chunks pipelined through dispatch / experts / combine; ``"auto"``
            times 1, 2 and 4 chunks on the first forwards of each token count and keeps the
            fastest (see :mod:`moeflow.chunking`).
        capacity_factor: None (default) is dropless. A number drops, on each source rank, the
            token-expert pairs past ``ceil(capacity_factor * T * K / E)`` per expert, in token
            order.
        wire_dtype: dtype the tokens travel in (e.g. ``torch.bfloat16`` to halve fp32 traffic);
            None keeps the input dtype. Compute stays in the input dtype.
        buffer: a :class:`Buffer` to share between layers (default: a new one over ``group``).
        num_slots: S, physical expert slots in the group (>= E, divisible by the group size);
            None = E. See :class:`~moeflow.slots.ExpertSlots`: slot s lives on rank ``s // L``
            and starts with logical expert ``s % E`` (the identity for S = E; extra slots repeat
            experts 0, 1, ...; on several nodes each node's slots take the node's own experts).
        **router_kwargs: passed to :class:`Router` (``score_func``, ``num_groups``,
            ``num_topk_groups``, ``route_scale``, ``norm_topk_prob``, ``bias_update_rate``, the
            loss coefficients, ``max_nodes_per_token`` (counted on the Buffer's nodes),
            ``load_ema_decay``).

    Parts: ``router`` (:class:`Router`: scores, top-k, expert bias, balance losses, load
    averages; call ``layer.router.update_bias()`` once per optimizer step), ``experts``
    (:class:`GroupedExperts`, this rank's L slots), ``shared`` (:class:`SwiGLU` or None),
    ``slots`` (:class:`~moeflow.slots.ExpertSlots`: placement, replicas, migration), ``buffer``.

    Initialisation: the gate and the shared experts draw from the global RNG as any module
    does; logical expert e's weights are drawn from a generator seeded by e and by one number
    the layer draws from the global RNG, so they do not depend on the rank or the number of
    ranks (the same global weights for any layout) and replicas start equal.

    ``forward`` returns the output with the input's shape; ``self.last_router_output`` holds the
    router's losses and load statistics of the latest forward (see :class:`Router`; an
    activation-checkpoint recompute leaves it alone).
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, num_topk: int,
                 num_shared_experts: int = 0, group: GroupLike = None, *,
                 num_chunks: Union[int, str] = 1, capacity_factor: Optional[float] = None,
                 wire_dtype: Optional[torch.dtype] = None, buffer: Optional[Buffer] = None,
                 num_slots: Optional[int] = None, **router_kwargs: Any) -> None:
        super().__init__()
        ep_group, routing_group, self.mesh = resolve_groups(group)
        self.buffer = buffer if buffer is not None else Buffer(ep_group)
        if self.mesh is not None and _ranks(self.buffer.group) != _ranks(ep_group):
            raise ValueError(f"MoELayer: `buffer` works over ranks {_ranks(self.buffer.group)}, the mesh's "
                             f"expert-parallel ranks are {_ranks(ep_group)} (rank {dist.get_rank()})")
        R, rank = self.buffer.group_size, self.buffer.rank
        if num_slots is None and num_experts % R:
            raise ValueError(f"MoELayer: `num_experts` ({num_experts}) must divide by the group size {R} (rank "
                             f"{rank}), or give `num_slots` >= {num_experts} divisible by {R} (e.g. "
                             f"{-(-num_experts // R) * R}): the slots then carry the uneven split")
        S = num_experts if num_slots is None else num_slots
        if isinstance(S, bool) or not isinstance(S, int) or S < num_experts or S % R:
            raise ValueError(f"MoELayer: `num_slots` must be an int >= num_experts={num_experts} and divisible "
                             f"by the group size {R} (rank {rank}), got {num_slots!r}")
        if num_experts % self.buffer.num_nodes:
            raise ValueError(f"MoELayer: `num_experts` ({num_experts}) must divide by the {self.buffer.num_nodes} "
                             f"nodes of the group (rank {rank}): each node starts with its own E / nodes experts")
        if not (num_chunks == "auto" or (isinstance(num_chunks, int) and num_chunks >= 1)):
            raise ValueError(f"MoELayer: `num_chunks` must be a positive int or 'auto', got {num_chunks!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MoELayer: `capacity_factor` must be positive or None, got {capacity_factor!r}")
        self.hidden, self.num_experts, self.num_topk = hidden, num_experts, num_topk
        self.num_chunks, self.capacity_factor, self.wire_dtype = num_chunks, capacity_factor, wire_dtype
        self._chunk_tuner: Optional[ChunkTuner] = None  # made at the first "auto" forward
        self._trials: collections.deque[BackwardClock] = collections.deque()  # see BackwardClock
        if self.mesh is None or self.mesh.dp is None:
            routing_group = self.buffer.group
        # the router's load sums go through a watched Transport, so that a missing peer is named:
        # this layer's when no data parallelism lies beside expert parallelism
        sums = (self.buffer.transport if routing_group is self.buffer.group
                else ProcessGroupTransport(routing_group, timeout_s=self.buffer.timeout_s))
        self.router = Router(hidden, num_experts, num_topk, group=routing_group,
                             num_nodes=self.buffer.num_nodes, transport=sums, **router_kwargs)
        phy2log = default_phy2log(num_experts, S, self.buffer.num_nodes)
        seed = int(torch.randint(0, 2**62, (), device="cpu"))  # one draw, whatever the layout
        self.experts = GroupedExperts(S // R, hidden, ffn_hidden, expert_ids=phy2log[rank * S // R:(rank + 1) * S // R],
                                      seed=seed)
        self.shared = SwiGLU(hidden, ffn_hidden * num_shared_experts) if num_shared_experts else None
        self.slots = ExpertSlots(phy2log, self.experts, self.router, self.buffer)
        self.last_router_output = None
        self._check_same_config(ffn_hidden, S, num_shared_experts)

    _ROUTER_OPTIONS = ("score_func", "num_groups", "num_topk_groups", "route_scale", "norm_topk_prob",
                       "bias_update_rate", "aux_loss_coeff", "seq_aux_loss_coeff", "global_aux_loss_coeff",
                       "z_loss_coeff", "max_nodes_per_token", "load_ema_decay")

    def _check_same_config(self, ffn_hidden: int, num_slots: int, num_shared_experts: int) -> None:
        """Collective, once: every rank that routes to these experts built the layer alike. A
        layer of other sizes or another chunk count on one rank pairs its collectives wrongly
        from the first forward on (an abort or a timeout far from the cause)."""
        fields = dict(hidden=self.hidden, ffn_hidden=ffn_hidden, num_experts=self.num_experts, num_topk=self.num_topk,
                      num_slots=num_slots, num_shared_experts=num_shared_experts, num_chunks=self.num_chunks,
                      capacity_factor=self.capacity_factor, wire_dtype=self.wire_dtype)
        fields.update((name, getattr(self.router, name)) for name in self._ROUTER_OPTIONS)
        check_same(self.router.transport, fields, "MoELayer",
                   "build the layer with the same arguments on every rank of its group")

    @property
    def num_local_experts(self) -> int:
        """L, the expert slots on this rank (``slots.num_local_experts``)."""
        return self.slots.num_local_experts

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., D]`` (``[B, S, D]`` keeps the sequence structure for the sequence-wise
        aux loss); returns the same shape and dtype."""
        shape = x.shape
        D = shape[-1]
        if D != self.hidden:
            raise ValueError(f"MoELayer: input hidden size {D} != layer hidden {self.hidden}")
        route = self.router(x)
        if not in_backward():  # an activation-checkpoint recompute leaves the forward's output in place
            self.last_router_output = route
        topk_idx, topk_weights = route.topk_idx, route.topk_weights     # [T, K] logical experts
        if self.capacity_factor is not None:
            topk_idx, topk_weights = self._drop_over_capacity(topk_idx, topk_weights)
        y_TD = self._routed(x.reshape(-1, D), self.slots.to_slots(topk_idx), topk_weights)
        return y_TD.view(shape)

    # Left to eager mode under torch.compile: the rows each rank receives are known only on the
    # host after the count exchange, so every step would bring new shapes (and a recompile),
    # and the transfers run through Python objects (events, watched works). The router around
    # it compiles.
    @torch.compiler.disable
    def _routed(self, x_TD, topk_idx, topk_weights):
        """Dispatch, experts and combine on ``[T, D]`` rows routed to ``[T, K]`` physical slots."""
        T = x_TD.size(0)
        C, T_agreed, t0 = self._num_chunks(T, x_TD.device)
        clock = None
        if t0 is not None and torch.is_grad_enabled() and x_TD.requires_grad:  # a trial: time its backward too
            clock = BackwardClock(x_TD.device, C, self._trials)
            x_TD = clock.enter(x_TD)
        bounds = [T * c // C for c in range(C + 1)]  # a chunk may be empty: it still takes part
        wire = self.wire_dtype or x_TD.dtype
        def launch(c):
            lo, hi = bounds[c], bounds[c + 1]
            return ag.dispatch(self.buffer, x_TD[lo:hi].to(wire), topk_idx[lo:hi], topk_weights[lo:hi],
                               self.slots.num_slots, async_finish=True)

        shared_out = None
        posted = [launch(0)]  # every transfer in flight or done, in order
        outs: list = [None] * C
        try:
            if self.shared is not None:
                shared_out = self.shared(x_TD)  # runs while chunk 0 travels
            pending = posted[0]
            combines: list = []
            for c in range(C):
                d = pending.wait()
                if c + 1 < C:
                    pending = launch(c + 1)  # travels while the experts below run
                    posted.append(pending)
                h = self.experts(d.recv_x.to(x_TD.dtype), d.recv_topk_idx, d.recv_topk_weights,
                                 num_tokens_per_expert=d.num_recv_tokens_per_expert_list)
                combines.append((c, ag.combine(self.buffer, h.to(wire), d.handle, async_finish=True)))
                posted.append(combines[-1][1])
                if len(combines) > 1:  # wait for the previous chunk's combine only now
                    cc, cp = combines.pop(0)
                    outs[cc] = cp.wait()
            for cc, cp in combines:
                outs[cc] = cp.wait()
        except BaseException as e:
            # torch ends an activation-checkpoint recompute (non-reentrant, early stop) by raising
            # as soon as it has every tensor it saves: transfers of the next chunk may be in
            # flight, posted alike on every rank. Left unwaited they stall the backward's transfers.
            if in_backward() and not isinstance(e, PeerFailureError):
                for p in posted:
                    p.finish()
            raise
        y = torch.cat(outs).to(x_TD.dtype) if C > 1 else outs[0].to(x_TD.dtype)
        if shared_out is not None:
            y = y + shared_out
        if t0 is not None:
            entry = self._chunk_tuner.stop(T_agreed, C, t0, x_TD.device)
            if clock is not None:
                clock.entry = entry
                y = clock.exit(y)
        return y

    def _num_chunks(self, T: int, device: torch.device) -> tuple[int, int, Optional[float]]:
        """``(C, T agreed by the ranks, start time if this forward is a timed trial)``. Every
        rank must run the same number of chunks, or their collectives would pair up wrongly: a
        fixed count is used as is, "auto" agrees on the largest T first (see ChunkTuner)."""
        if self.num_chunks != "auto":
            return self.num_chunks, T, None
        if in_backward() and self._trials:  # an activation-checkpoint recompute of a trial forward
            return self._trials.popleft().chunks, T, None
        if self.buffer.group_size > 1:
            t = torch.tensor([T], device=device)
            # one tiny collective per forward so that ranks with different T pick the same C
            self.buffer.all_reduce(t, op=dist.ReduceOp.MAX)
            T = int(t)  # host sync: the chunk count shapes the loop
        if self._chunk_tuner is None:
            self._chunk_tuner = ChunkTuner(self.buffer.all_reduce if self.buffer.group_size > 1 else None)
        C, timed = self._chunk_tuner.next(T)
        return C, T, self._chunk_tuner.start(device) if timed else None

    def _drop_over_capacity(self, topk_idx, topk_weights):
        """Keep at most ``ceil(cf * T * K / E)`` pairs per expert on this rank, earliest tokens first."""
        T, K = topk_idx.shape
        capacity = math.ceil(self.capacity_factor * T * K / self.num_experts)
        flat = topk_idx.flatten()
        valid = flat >= 0
        keep = valid & (rank_in_expert(flat, self.num_experts) < capacity)  # the earliest pairs of each expert
        new_idx = torch.where(keep, flat, -1).view(T, K)
        return new_idx, torch.where(keep.view(T, K), topk_weights, 0.0)

    # ----------------------------------------------------------------------------- regroup
    def regroup(self, buffer: Buffer, phy2log: torch.Tensor, *, previous: torch.Tensor, old_ranks: list[int],
                old_num_ranks: int, optimizer: Optional[torch.optim.Optimizer] = None) -> torch.Tensor:
        """Work over a new group from now on (ranks were lost or joined; :mod:`moeflow.elastic`):
        the router sums its load through ``buffer``'s transport, and the expert slots move to
        the new placement (:meth:`ExpertSlots.regroup`, which has the arguments and returns the
        slots left for a checkpoint to fill). Every rank of the new group calls it.

        Raises:
            ValueError: a layer built on a mesh or with node-limited routing (the nodes of a
                group that lost ranks are uneven), and what :meth:`ExpertSlots.regroup` raises.
        """
        if self.mesh is not None or self.router.max_nodes_per_token < self.router.num_nodes:
            raise ValueError(f"MoELayer.regroup: only layers over a process group without node-limited routing move to "
                             f"a new group (this one has {'a mesh' if self.mesh is not None else 'max_nodes_per_token'}"
                             f"; rank {buffer.rank})")
        self.buffer = buffer
        self.router.transport, self.router.group = buffer.transport, buffer.group
        self.router.num_nodes = self.router.max_nodes_per_token = buffer.num_nodes  # no node limit (checked above)
        self._chunk_tuner = None  # its timings were for the old group
        self._trials.clear()
        return self.slots.regroup(buffer, phy2log, previous=previous, old_ranks=old_ranks,
                                  old_num_ranks=old_num_ranks, optimizer=optimizer)

    # ----------------------------------------------------------------------------- weights
    @torch.no_grad()
    def load_global_weights(self, gate: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                            shared: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> None:
        """Load this rank's shard of full weights: each local slot gets its logical expert's rows
        (with the default placement and S = E: experts split evenly and contiguously).

        Args:
            gate: ``[E, D]`` router weight.
            w1, w3: ``[E, D, F]`` gate and up projections; w2: ``[E, F, D]`` down projection
                (the layout of :class:`GroupedExperts`), indexed by logical expert.
            shared: the shared SwiGLU's ``(w1 [D, F_s], w2 [F_s, D], w3 [D, F_s])``.
        """
        if shared is not None and self.shared is None:
            raise ValueError("MoELayer.load_global_weights: `shared` given but the layer has no shared experts")
        mine = torch.tensor(self.slots.local_experts(), device=w1.device)
        self.router.gate.weight.copy_(gate)
        for p, w in zip((self.experts.w1, self.experts.w2, self.experts.w3), (w1, w2, w3)):
            p.copy_(w.index_select(0, mine))
        if shared is not None:
            for p, w in zip((self.shared.w1, self.shared.w2, self.shared.w3), shared):
                p.copy_(w)


def _ranks(group: Optional[dist.ProcessGroup]) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
