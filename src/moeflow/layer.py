"""``MoELayer``: router -> dispatch -> grouped experts -> combine, plus shared experts and overlap.

Shape letters:
    T  tokens on this rank (batch x sequence, flattened)    D  hidden size
    K  top-k                                                 E  routed (logical) experts in the group
    M  rows received by this rank                            C  chunks of the token pipeline
    N  physical expert slots in the group (num_replicas)     S  slots on this rank (N / ranks)
    R  ranks in the group

Overlap: dispatch and combine are issued with ``async_finish`` and waited on only when their
result is needed, so the shared experts run while chunk 0's tokens travel, and with C > 1 the
experts work on chunk i while chunk i+1 is dispatched and chunk i-1 is combined. Backward runs
the same communication (one combine per dispatch, one cached dispatch per combine). Every wait,
forward and backward, goes through :func:`moeflow.interleave.wait`: when two micro-batches run
as lanes (:mod:`moeflow.parallel.overlap`), the one about to wait lets the other compute first.

Placement: the router picks logical experts; each pair then goes to one physical slot holding a
replica of its expert (``phy2log``), spread evenly over the replicas, and dispatch runs over the
N slots (S per rank, split contiguously). With N = E and the identity placement (the default)
the mapping is skipped: that path is unchanged. :meth:`MoELayer.apply_placement` moves expert
weights and optimizer state between ranks in one all-to-all; docs/placement.md has the details.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import interleave
from .balance import Placement, plan
from .balance.replicas import (check_phy2log, default_phy2log, off_node_slot, plan_migration, replica_tables,
                               slot_states, spread_over_replicas)
from .comm.buffer import Buffer, DispatchHandle, EventOverlap
from .comm.rows import exchange_rows
from .experts import GroupedExperts, SwiGLU
from .layout import rank_in_expert
from .routing import Router

__all__ = ["MoELayer"]


class _Pending:
    """A holder the autograd functions fill: the event to wait on and the handle (if any)."""

    __slots__ = ("event", "handle", "counts")

    def __init__(self) -> None:
        self.event: Optional[EventOverlap] = None
        self.handle: Optional[DispatchHandle] = None
        self.counts: Optional[list[int]] = None


class _DispatchAsync(torch.autograd.Function):
    """Forward: an async fresh dispatch (tensors valid after :class:`_Wait`). Backward: a combine."""

    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx, num_experts, pending):
        with interleave.issuing():
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights, async_finish=True)
        pending.event, pending.handle, pending.counts = event, handle, counts
        # Kept as attributes, not saved tensors: the event fills recv_idx in place after this
        # returns, which would trip autograd's version check on a saved tensor.
        ctx.buffer, ctx.handle, ctx.recv_idx = buffer, handle, recv_idx
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_idx, grad_recv_w):
        handle = ctx.handle
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(handle.num_recv_tokens, handle.hidden, device=ctx.recv_idx.device)
        if grad_recv_w is not None:
            # weights of experts on other ranks are constant zeros: no gradient flows back
            grad_recv_w = torch.where(ctx.recv_idx >= 0, grad_recv_w, 0.0).float()
        with interleave.issuing():
            grad_x, grad_w, event = ctx.buffer.combine(grad_recv_x.contiguous(), handle, topk_weights=grad_recv_w,
                                                       async_finish=True)
        interleave.wait(event)  # another lane may compute meanwhile
        return grad_x, grad_w, None, None, None, None


class _CombineAsync(torch.autograd.Function):
    """Forward: an async combine (valid after :class:`_Wait`). Backward: a cached dispatch."""

    @staticmethod
    def forward(ctx, x, buffer, handle, pending):
        with interleave.issuing():
            combined, _, event = buffer.combine(x, handle, async_finish=True)
        pending.event = event
        ctx.buffer, ctx.handle = buffer, handle
        return combined

    @staticmethod
    def backward(ctx, grad):
        with interleave.issuing():
            grad_x, *_, event = ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle, async_finish=True)
        interleave.wait(event)  # another lane may compute meanwhile
        return grad_x, None, None, None


class _Wait(torch.autograd.Function):
    """Wait for a pending transfer; identity for autograd (gradients pass straight through)."""

    @staticmethod
    def forward(ctx, pending, *tensors):
        interleave.wait(pending.event)  # another lane may compute meanwhile
        outs = tuple(t.view_as(t) for t in tensors)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN whose routed experts are split over the ranks of ``group``.

    Args:
        hidden: D.
        ffn_hidden: the intermediate size of one routed expert (SwiGLU).
        num_experts: E, routed experts in the whole group; divisible by its size.
        top_k: experts per token.
        num_shared_experts: experts every token goes through on its own rank (DeepSeek-style;
            fused into one SwiGLU of ``num_shared_experts * ffn_hidden``).
        group: the expert-parallel process group (default: the world). Ranks outside expert
            parallelism see the same weights as with a single rank.
        score_func, num_groups, topk_groups, route_scale, bias_update_rate, aux_loss_coeff,
        seq_aux_loss_coeff, global_aux_loss_coeff, z_loss_coeff: passed to :class:`Router`.
        max_nodes_per_token: node-limited routing: a token's experts lie on at most this many
            of the Buffer's nodes (``group size / ranks_per_node``; experts counted on the nodes
            of the default contiguous split); None = no limit. Passed to :class:`Router`.
        num_chunks: C, token chunks pipelined through dispatch / experts / combine; ``"auto"``
            picks ``max(1, min(4, T // 1024))`` per call (chunks under ~1k tokens pay more in
            per-message latency than they hide).
        capacity_factor: None (default) is dropless. A number drops, on each source rank, the
            token-expert pairs past ``ceil(capacity_factor * T * K / E)`` per expert, in token
            order.
        wire_dtype: dtype the tokens travel in (e.g. ``torch.bfloat16`` to halve fp32 traffic);
            None keeps the input dtype. Compute stays in the input dtype.
        num_replicas: N, physical expert slots in the group (>= E, divisible by the group size);
            None = E. Slot s lives on rank ``s // S`` and starts with logical expert ``s % E``
            (the identity for N = E; extra slots repeat experts 0, 1, ...); on several nodes, a
            node's slots take the node's own experts that way (see ``default_phy2log``).
        load_ema_decay: decay of the load averages kept by :meth:`update_bias` (0 = the last
            step only).

    ``forward`` returns the output with the input's shape; ``self.last_router_output`` holds the
    router's losses and load statistics of the latest forward (see :class:`Router`).

    Placement buffers: ``phy2log`` ``[N]`` int64 (saved with the model: it says which logical
    expert each row of ``experts.w1`` etc. holds), ``log2phy`` ``[E, X]`` int64 (-1 padded) and
    ``logcnt`` ``[E]`` int64 (derived, not saved). Load statistics (summed over the group, in
    token-expert pairs per step, EMA over steps): :meth:`expert_load` ``[E]``,
    :meth:`replica_load` ``[N]``, :meth:`rank_load` ``[R]``.

    Rebalancing in a training loop (every call on every rank of the group)::

        loss.backward()
        for layer in moe_layers:
            layer.sync_replica_grads()     # replicas of one expert get the sum of their gradients
        optimizer.step()
        optimizer.zero_grad()
        for layer in moe_layers:
            layer.update_bias()            # in place of layer.router.update_bias(): also the loads
        if (step + 1) % rebalance_every == 0:
            for layer in moe_layers:
                layer.apply_placement(layer.plan_placement(), optimizer=optimizer)
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int,
                 num_shared_experts: int = 0, group: Optional[dist.ProcessGroup] = None, *,
                 score_func: str = "softmax", num_groups: int = 1, topk_groups: int = 1,
                 route_scale: float = 1.0, norm_topk_prob: Optional[bool] = None,
                 bias_update_rate: float = 0.0, aux_loss_coeff: float = 0.0, seq_aux_loss_coeff: float = 0.0,
                 global_aux_loss_coeff: float = 0.0, z_loss_coeff: float = 0.0,
                 max_nodes_per_token: Optional[int] = None,
                 num_chunks: Union[int, str] = 1, capacity_factor: Optional[float] = None,
                 wire_dtype: Optional[torch.dtype] = None, buffer: Optional[Buffer] = None,
                 num_replicas: Optional[int] = None, load_ema_decay: float = 0.9) -> None:
        super().__init__()
        self.buffer = buffer if buffer is not None else Buffer(group)
        R = self.buffer.group_size
        if num_experts % R:
            raise ValueError(f"MoELayer: `num_experts` ({num_experts}) must divide by the group size {R}")
        N = num_experts if num_replicas is None else num_replicas
        if isinstance(N, bool) or not isinstance(N, int) or N < num_experts or N % R:
            raise ValueError(f"MoELayer: `num_replicas` must be an int >= num_experts={num_experts} and divisible "
                             f"by the group size {R} (rank {self.buffer.rank}), got {num_replicas!r}")
        if not 0.0 <= load_ema_decay < 1.0:
            raise ValueError(f"MoELayer: `load_ema_decay` must lie in [0, 1), got {load_ema_decay!r}")
        if not (num_chunks == "auto" or (isinstance(num_chunks, int) and num_chunks >= 1)):
            raise ValueError(f"MoELayer: `num_chunks` must be a positive int or 'auto', got {num_chunks!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MoELayer: `capacity_factor` must be positive or None, got {capacity_factor!r}")
        self.hidden, self.num_experts, self.top_k = hidden, num_experts, top_k
        self.num_replicas = N
        self.num_local_experts = N // R  # physical slots on this rank
        self.load_ema_decay = load_ema_decay
        self.num_chunks, self.capacity_factor, self.wire_dtype = num_chunks, capacity_factor, wire_dtype
        self.router = Router(hidden, num_experts, top_k, score_func=score_func, num_groups=num_groups,
                             topk_groups=topk_groups, route_scale=route_scale, norm_topk_prob=norm_topk_prob,
                             bias_update_rate=bias_update_rate, aux_loss_coeff=aux_loss_coeff,
                             seq_aux_loss_coeff=seq_aux_loss_coeff, global_aux_loss_coeff=global_aux_loss_coeff,
                             z_loss_coeff=z_loss_coeff, group=group, num_nodes=self.buffer.num_nodes,
                             max_nodes_per_token=max_nodes_per_token)
        # the router's load sums go through the Buffer: same group, and a missing peer is named
        self.router.group, self.router.sum_over_group = self.buffer.group, self.buffer.all_reduce
        self.experts = GroupedExperts(self.num_local_experts, hidden, ffn_hidden)
        self.shared = SwiGLU(hidden, ffn_hidden * num_shared_experts) if num_shared_experts else None
        self.last_router_output = None
        # [N] int64, logical expert of each slot; saved: a checkpoint's expert rows follow it
        phy2log = default_phy2log(num_experts, N, self.buffer.num_nodes)
        self.register_buffer("phy2log", phy2log.to(self.router.gate.weight.device))
        self._set_tables(phy2log)
        self._init_load_stats(self.router.gate.weight.device)
        self.register_load_state_dict_post_hook(MoELayer._after_load_state_dict)

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., D]`` (``[B, S, D]`` keeps the sequence structure for the sequence-wise
        aux loss); returns the same shape and dtype."""
        shape = x.shape
        D = shape[-1]
        if D != self.hidden:
            raise ValueError(f"MoELayer: input hidden size {D} != layer hidden {self.hidden}")
        route = self.router(x)
        if not interleave.in_backward():  # a checkpoint recompute leaves the forward's output in place
            self.last_router_output = route
        x_TD = x.reshape(-1, D)
        topk_idx, topk_weights = route.topk_idx, route.topk_weights
        slot_idx = topk_idx                                    # [T, K] physical slots
        if not self._identity:
            slot_idx = self._to_slots(topk_idx)
            if self.training and not interleave.in_backward():  # like the router's counts (not twice
                # under activation-checkpoint recompute): pairs routed, before capacity drops
                with torch.no_grad():
                    flat = slot_idx.flatten()
                    self.num_tokens_per_replica_since_update.scatter_add_(0, flat, torch.ones_like(flat))
        if self.capacity_factor is not None:
            topk_idx, topk_weights = self._drop_over_capacity(topk_idx, topk_weights)
            slot_idx = topk_idx if self._identity else torch.where(topk_idx >= 0, slot_idx, -1)
        y_TD = self._routed(x_TD, slot_idx, topk_weights)
        return y_TD.view(shape)

    def _to_slots(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """``[T, K]`` logical ids -> physical slots, each expert's pairs spread over its replicas
        (starting at a replica that depends on the rank, so the remainders spread over ranks)."""
        if self._one_replica_each:  # a permutation: one gather
            return torch.where(topk_idx >= 0, self.log2phy[:, 0][topk_idx.clamp(min=0)], -1)
        return spread_over_replicas(topk_idx, self.log2phy, self.logcnt, offset=self.buffer.rank)

    def _routed(self, x_TD, topk_idx, topk_weights):
        T = x_TD.size(0)
        C = self._num_chunks(T, x_TD.device)
        bounds = [T * c // C for c in range(C + 1)]  # a chunk may be empty: it still takes part
        wire = self.wire_dtype or x_TD.dtype
        def launch(c):
            lo, hi = bounds[c], bounds[c + 1]
            pending = _Pending()
            recv = _DispatchAsync.apply(x_TD[lo:hi].to(wire), topk_weights[lo:hi], self.buffer,
                                        topk_idx[lo:hi], self.num_replicas, pending)
            return pending, recv

        shared_out = None
        pending, recv = launch(0)
        if self.shared is not None:
            shared_out = self.shared(x_TD)  # runs while chunk 0 travels
        outs: list = [None] * C
        combines: list = []
        for c in range(C):
            recv_x, recv_idx, recv_w = _Wait.apply(pending, *recv)
            handle, counts = pending.handle, pending.counts
            if c + 1 < C:
                pending, recv = launch(c + 1)  # travels while the experts below run
            h = self.experts(recv_x.to(x_TD.dtype), recv_idx, recv_w, num_tokens_per_expert=counts)
            cpending = _Pending()
            combines.append((c, cpending, _CombineAsync.apply(h.to(wire), self.buffer, handle, cpending)))
            if len(combines) > 1:  # wait for the previous chunk's combine only now
                cc, cp, t = combines.pop(0)
                outs[cc] = _Wait.apply(cp, t)[0]
        for cc, cp, t in combines:
            outs[cc] = _Wait.apply(cp, t)[0]
        y = torch.cat(outs).to(x_TD.dtype) if C > 1 else outs[0].to(x_TD.dtype)
        if shared_out is not None:
            y = y + shared_out
        return y

    def _num_chunks(self, T: int, device: torch.device) -> int:
        """Every rank must run the same number of chunks, or their collectives would pair up
        wrongly: a fixed count is used as is, "auto" agrees on the largest T first."""
        if self.num_chunks != "auto":
            return self.num_chunks
        if self.buffer.group_size > 1:
            t = torch.tensor([T], device=device)
            # one tiny collective per forward so that ranks with different T pick the same C
            self.buffer.all_reduce(t, op=dist.ReduceOp.MAX)
            T = int(t)  # host sync: the chunk count shapes the loop
        return max(1, min(4, T // 1024))

    def _drop_over_capacity(self, topk_idx, topk_weights):
        """Keep at most ``ceil(cf * T * K / E)`` pairs per expert on this rank, earliest tokens first."""
        T, K = topk_idx.shape
        capacity = math.ceil(self.capacity_factor * T * K / self.num_experts)
        flat = topk_idx.flatten()
        valid = flat >= 0
        keep = valid & (rank_in_expert(flat, self.num_experts) < capacity)  # the earliest pairs of each expert
        new_idx = torch.where(keep, flat, -1).view(T, K)
        return new_idx, torch.where(keep.view(T, K), topk_weights, 0.0)

    # ----------------------------------------------------------------------------- weights
    @torch.no_grad()
    def load_global_weights(self, gate: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                            shared: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> None:
        """Load this rank's shard of full weights: slot s gets logical expert ``phy2log[s]``
        (with the default placement and N = E: experts split evenly and contiguously).

        Args:
            gate: ``[E, D]`` router weight.
            w1, w3: ``[E, D, F]`` gate and up projections; w2: ``[E, F, D]`` down projection
                (the layout of :class:`GroupedExperts`), indexed by logical expert.
            shared: the shared SwiGLU's ``(w1 [D, F_s], w2 [F_s, D], w3 [D, F_s])``.
        """
        S, rank = self.num_local_experts, self.buffer.rank
        if self._identity:
            sl = slice(rank * S, (rank + 1) * S)
        else:
            sl = self._phy2log_host[rank * S:(rank + 1) * S].to(w1.device)
        self.router.gate.weight.copy_(gate)
        self.experts.w1.copy_(w1[sl])
        self.experts.w2.copy_(w2[sl])
        self.experts.w3.copy_(w3[sl])
        if shared is not None:
            if self.shared is None:
                raise ValueError("MoELayer.load_global_weights: `shared` given but the layer has no shared experts")
            self.shared.w1.copy_(shared[0])
            self.shared.w2.copy_(shared[1])
            self.shared.w3.copy_(shared[2])

    # ----------------------------------------------------------------------------- placement
    def _set_tables(self, phy2log: torch.Tensor) -> None:
        """Derive the routing tables and the replica-gradient sum plan from a valid ``phy2log``.

        Host tensors are made on the CPU explicitly (the layer may be built under a
        ``torch.device`` context)."""
        E, N, R = self.num_experts, phy2log.numel(), self.buffer.group_size
        S, rank, cpu = N // R, self.buffer.rank, torch.device("cpu")
        phy2log = phy2log.to(cpu)
        log2phy, logcnt = replica_tables(phy2log, E)
        self._phy2log_host = phy2log.clone()
        # host flags, so forward never asks the device: no mapping at all for the default placement
        self._identity = N == E and bool((phy2log == torch.arange(E, device=cpu)).all())
        self._one_replica_each = N == E
        # the router limits a token to its best nodes assuming expert e on node e // (E / nodes)
        self._node_limited = self.router.max_nodes_per_token < self.router.num_nodes
        device = self.phy2log.device
        for name, t in (("log2phy", log2phy), ("logcnt", logcnt)):  # derived: not saved
            if name in self._buffers:
                setattr(self, name, t.to(device))
            else:
                self.register_buffer(name, t.to(device), persistent=False)
        # sync_replica_grads: the replicated experts are rows 0..n-1 of the summed buffer
        rep = (logcnt > 1).nonzero().flatten()
        row_of = torch.full((E,), -1, dtype=torch.int64, device=cpu)
        row_of[rep] = torch.arange(rep.numel(), device=cpu)
        mine = phy2log[rank * S:(rank + 1) * S]
        local_slots = (row_of[mine] >= 0).nonzero().flatten()
        is_first = log2phy[mine[local_slots], 0] == local_slots + rank * S      # the expert's lowest slot
        self._replica_sum = (None if rep.numel() == 0
                             else (local_slots, row_of[mine[local_slots]], is_first, int(rep.numel())))

    def _init_load_stats(self, device) -> None:
        E, N = self.num_experts, self.num_replicas
        # [E] / [N] fp32 EMAs of the group's pairs per step; [N] int64 pairs routed to each slot from
        # this rank since the last update_bias (counted only off the default placement: there they
        # equal the router's counts)
        self.register_buffer("expert_load_ema", torch.zeros(E, device=device), persistent=False)
        self.register_buffer("replica_load_ema", torch.zeros(N, device=device), persistent=False)
        self.register_buffer("num_tokens_per_replica_since_update",
                             torch.zeros(N, dtype=torch.int64, device=device), persistent=False)
        self._num_load_updates = 0
        self.last_replica_load: Optional[torch.Tensor] = None

    def _apply(self, fn, recurse=True):
        # module.to(dtype) casts floating buffers; the load averages stay fp32 (counts past 256
        # lose integers in bf16). Device moves still apply.
        keep = {k: getattr(self, k) for k in ("expert_load_ema", "replica_load_ema") if hasattr(self, k)}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            if getattr(self, k).dtype != torch.float32:
                setattr(self, k, old.to(device=getattr(self, k).device))
        return self

    @staticmethod
    def _after_load_state_dict(module: "MoELayer", incompatible_keys) -> None:
        # a loaded phy2log re-derives the tables (and is checked: a bad one would misroute silently)
        where = "MoELayer.load_state_dict"
        p = check_phy2log(module.phy2log, module.num_experts, module.num_replicas, where, module.buffer.rank)
        if module._node_limited and (bad := off_node_slot(p, module.num_experts, module.buffer.num_nodes)) >= 0:
            raise ValueError(f"{where}: the saved `phy2log` puts expert {int(p[bad])} in slot {bad}, off its node, "
                             f"which node-limited routing forbids (rank {module.buffer.rank})")
        if not torch.equal(p, module._phy2log_host):
            module.num_tokens_per_replica_since_update.zero_()  # counted for the old slots
        module._set_tables(p)

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """Per-step hook, in place of ``self.router.update_bias()``; call on every rank of the group.

        Runs :meth:`Router.update_bias` (sums the step's logical load over the group, moves the
        expert bias) and folds that load into :meth:`expert_load`. Off the default placement it
        also sums the per-slot counts over the group (one all-reduce of N int64) into
        :meth:`replica_load`; on it, slot loads are the expert loads. ``self.last_replica_load``
        holds the step's ``[N]`` int64 slot loads.

        Returns:
            ``[E]`` int64, the group's pairs per logical expert since the last call.
        """
        load_E = self.router.update_bias()
        if self._identity:
            load_N = load_E
        else:
            load_N = self.num_tokens_per_replica_since_update.clone()
            if self.buffer.group_size > 1:
                # every slot's pairs from every rank: what each rank's experts computed
                self.buffer.all_reduce(load_N)
            self.num_tokens_per_replica_since_update.zero_()
        decay = self.load_ema_decay if self._num_load_updates else 0.0
        self.expert_load_ema.mul_(decay).add_(load_E.to(self.expert_load_ema), alpha=1.0 - decay)
        self.replica_load_ema.mul_(decay).add_(load_N.to(self.replica_load_ema), alpha=1.0 - decay)
        self._num_load_updates += 1
        self.last_replica_load = load_N
        return load_E

    def expert_load(self) -> torch.Tensor:
        """``[E]`` float32, the group's pairs per logical expert per step (EMA over update_bias calls)."""
        return self.expert_load_ema.clone()

    def replica_load(self) -> torch.Tensor:
        """``[N]`` float32, the group's pairs per physical slot per step (EMA); after
        :meth:`apply_placement`, its prediction ``expert_load[e] / logcnt[e]`` until the next update."""
        return self.replica_load_ema.clone()

    def rank_load(self) -> torch.Tensor:
        """``[R]`` float32, pairs per rank per step (EMA): the work of each rank's experts.
        ``rank_load().max() / rank_load().mean()`` is the per-rank imbalance."""
        return self.replica_load_ema.view(self.buffer.group_size, -1).sum(1)

    def placement(self, num_nodes: int = 1) -> Placement:
        """The current placement as a one-layer :class:`moeflow.balance.Placement`."""
        return Placement.from_phy2log(self._phy2log_host[None], self.num_experts, self.buffer.group_size, num_nodes)

    def plan_placement(self, num_replicas: Optional[int] = None, num_nodes: Optional[int] = None,
                       num_groups: Optional[int] = None, tolerance: float = 0.02) -> Placement:
        """Plan a placement for :meth:`expert_load` with :func:`moeflow.balance.plan`.

        Pure host computation, no communication: every rank gets the same plan, since the loads
        were summed over the group.

        Args:
            num_replicas: N of the plan; None keeps the layer's. With the layer's N the plan starts
                from the current placement (``previous=``, few weight moves), else from scratch.
            num_nodes: nodes the group spans; None = the Buffer's. With node-limited routing
                (``max_nodes_per_token`` below the node count) each node is planned on its own,
                so that every expert stays on the node the router assumes.
            num_groups: expert groups for the hierarchical policy; None = the router's ``num_groups``.
            tolerance: allowed excess of the busiest rank over a plan from scratch (see ``plan``).

        Returns:
            A one-layer :class:`Placement` to pass to :meth:`apply_placement`.
        """
        if self._num_load_updates == 0:
            raise ValueError("MoELayer.plan_placement: no load statistics yet; call update_bias() after "
                             "training-mode forwards first")
        N = self.num_replicas if num_replicas is None else num_replicas
        nodes = self.buffer.num_nodes if num_nodes is None else num_nodes
        R, E = self.buffer.group_size, self.num_experts
        load_E = self.expert_load_ema.detach().cpu()
        keep = N == self.num_replicas
        if not self._node_limited:
            previous = self.placement(nodes) if keep else None
            return plan(load_E[None], N, num_groups or self.router.num_groups, nodes, R, previous=previous,
                        tolerance=tolerance)
        if N % nodes or nodes != self.buffer.num_nodes:
            raise ValueError(f"MoELayer.plan_placement: node-limited routing needs num_nodes = the Buffer's "
                             f"{self.buffer.num_nodes} and num_replicas divisible by it, got num_nodes={nodes}, "
                             f"num_replicas={N}")
        E_n, N_n, old_n = E // nodes, N // nodes, self.num_replicas // nodes
        parts, moves = [], 0
        for n in range(nodes):
            experts = slice(n * E_n, (n + 1) * E_n)
            previous = (Placement.from_phy2log(self._phy2log_host[n * old_n:(n + 1) * old_n][None] - n * E_n, E_n,
                                               R // nodes) if keep else None)
            p = plan(load_E[experts][None], N_n, 1, 1, R // nodes, previous=previous, tolerance=tolerance)
            parts.append(p.phy2log[0] + n * E_n)
            moves += p.moves
        return Placement.from_phy2log(torch.cat(parts)[None], E, R, nodes, moves=moves)

    @torch.no_grad()
    def apply_placement(self, placement: Union[Placement, torch.Tensor], optimizer: Optional[torch.optim.Optimizer] = None,
                        layer_index: int = 0) -> int:
        """Move expert weights (and optimizer state) so that slot s holds logical expert ``phy2log[s]``.

        Call on every rank of the group with the same placement, after ``optimizer.step()``
        (when anything moves, the expert weights' ``.grad`` is reset to None: it belonged to the
        old slots). Slots that
        keep their expert, or copy it from another slot on the same rank, are copied locally;
        every other slot's rows (w1, w2, w3 and each per-slot optimizer state) travel in one
        ``all_to_all_single`` of bytes, one flat buffer per destination. A new replica copies its
        expert from a rank that holds it. The parameters stay the same ``nn.Parameter`` objects
        (copied in place; resized through ``.data`` when N changes), so the optimizer keeps them.

        Args:
            placement: a :class:`moeflow.balance.Placement` for this group (``num_gpus`` = group
                size, E logical experts; row ``layer_index`` is used), or a ``[N']`` integer
                ``phy2log``. N' may differ from the layer's N (>= E, divisible by the group size).
            optimizer: moves the state tensors shaped like the expert weights (Adam's
                ``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``, ...) with their rows;
                scalar state (Adam's ``step``) is per tensor and stays.
            layer_index: the row of ``placement`` for this layer.

        Returns:
            Slots (over the group) whose weights crossed ranks.

        Raises:
            TypeError / ValueError: a bad placement (wrong group size or expert count, a
                logical expert without a slot, ids out of range), state the layer cannot move,
                or ranks that passed different placements (checked by one small all-reduce
                before anything moves).
        """
        where, rank, R, E = "MoELayer.apply_placement", self.buffer.rank, self.buffer.group_size, self.num_experts
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
            raise ValueError(f"{where}: `phy2log` must be 1-D with num_replicas >= num_experts={E} entries, "
                             f"divisible by the group size {R} (rank {rank}), got shape {shape}")
        new = check_phy2log(placement, E, n, where, rank)
        if self._node_limited and (bad := off_node_slot(new, E, self.buffer.num_nodes)) >= 0:
            raise ValueError(f"{where}: node-limited routing (max_nodes_per_token="
                             f"{self.router.max_nodes_per_token}) needs each expert on its own node, but "
                             f"`phy2log` puts expert {int(new[bad])} in slot {bad}, on node "
                             f"{bad // (n // self.buffer.num_nodes)} (rank {rank})")
        params = (self.experts.w1, self.experts.w2, self.experts.w3)
        states = slot_states(optimizer, dict(zip(("experts.w1", "experts.w2", "experts.w3"), params)),
                             where, rank)
        self._check_same_everywhere(new, states)
        if torch.equal(new, self._phy2log_host):
            return 0  # nothing to move (a re-plan that kept every slot)

        migration = plan_migration(self._phy2log_host, new, R, rank)
        fresh = self._exchange([*params, *(t for _, _, t in states)], migration, new.numel() // R)
        for p, t in zip(params, fresh[:3]):
            if p.shape == t.shape:
                p.copy_(t)
            else:
                p.data = t
            p.grad = None
        for (state, key, old), t in zip(states, fresh[3:]):
            if old.shape == t.shape:
                old.copy_(t)
            else:
                state[key] = t
        self.num_replicas = new.numel()
        self.num_local_experts = self.experts.num_local_experts = new.numel() // R
        device = self.phy2log.device
        self.phy2log = new.to(device)
        self._set_tables(new)
        # slot statistics restart: their slots changed; predict them from the expert loads
        self.num_tokens_per_replica_since_update = torch.zeros(new.numel(), dtype=torch.int64, device=device)
        self.replica_load_ema = (self.expert_load_ema / self.logcnt.to(self.expert_load_ema))[self.phy2log]
        return migration.moves

    def _check_same_everywhere(self, new: torch.Tensor, states) -> None:
        """Raise on every rank if the ranks' placements or optimizer state layouts differ."""
        N = new.numel()
        i = torch.arange(1, N + 1, dtype=torch.int64)
        fingerprint = torch.tensor([N, int((new * i).sum()), int(((new + 1) ** 2 * (7 * i + 3)).sum()),
                                    len(states), sum(t[0].numel() * t.element_size() for _, _, t in states)],
                                   dtype=torch.int64)
        if self.buffer.group_size > 1:
            both = torch.cat([fingerprint, -fingerprint]).to(self.phy2log.device)
            # one small all-reduce: a rank with another placement would exchange mismatched sizes
            self.buffer.all_reduce(both, op=dist.ReduceOp.MAX)
            both = both.cpu()
            if not torch.equal(both[:5], -both[5:]):
                raise ValueError(f"MoELayer.apply_placement: the ranks passed different placements or have "
                                 f"different optimizer state for the expert weights (rank {self.buffer.rank}: "
                                 f"num_replicas={N}, {len(states)} state tensors)")

    def _exchange(self, tensors: list[torch.Tensor], migration, S_new: int) -> list[torch.Tensor]:
        """New ``[S_new, ...]`` versions of ``tensors`` (each ``[S, ...]``, slot-major) per ``migration``."""
        device = tensors[0].device
        recvs = []
        if migration.moves:  # the same count on every rank: all join the collective or none does
            recvs = exchange_rows(tensors, migration.send_slots, [r.numel() for r in migration.recv_slots],
                                  self.buffer.group)
        keep = (migration.local_src >= 0).nonzero().flatten()
        keep_from = migration.local_src[keep].to(device)
        keep = keep.to(device)
        out = []
        for t in tensors:
            new = t.new_empty((S_new, *t.shape[1:]))
            new[keep] = t.index_select(0, keep_from)
            out.append(new)
        for slots, rows in zip(migration.recv_slots, recvs):
            for new, part in zip(out, rows):
                new[slots.to(device)] = part
        return out

    @torch.no_grad()
    def sync_replica_grads(self) -> None:
        """Give every replica of an expert the sum of its replicas' gradients (w1, w2, w3).

        Each replica's gradient holds only the tokens routed to it; call this after backward and
        before ``optimizer.step()`` on every rank of the group, so that replicas take the same
        step (the one a single copy of the expert would take) and stay identical. One all-reduce
        of the replicated experts' gradients; nothing (no collective) when no expert has two
        replicas.
        """
        params = (self.experts.w1, self.experts.w2, self.experts.w3)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self._sum_over_replicas(grads, first_only=False):
            for p, g in zip(params, grads):
                p.grad = g

    @torch.no_grad()
    def sync_replica_weights(self) -> None:
        """Copy each expert's first replica (lowest slot) over its other replicas (w1, w2, w3).

        For replicas that were initialised apart (e.g. ``experts.reset_parameters()`` with a
        different seed per rank); :meth:`load_global_weights` and :meth:`apply_placement` already
        give replicas equal weights. Call on every rank of the group; one all-reduce.
        """
        self._sum_over_replicas([self.experts.w1, self.experts.w2, self.experts.w3], first_only=True)

    def _sum_over_replicas(self, tensors: list[torch.Tensor], first_only: bool) -> bool:
        """In place: each local replica's rows of ``tensors`` (``[S, ...]``) become the sum over
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
        if self.buffer.group_size > 1:
            # each replicated expert's rows summed over its replicas on every rank
            self.buffer.all_reduce(summed)
        back = summed.index_select(0, rows).split(sizes, 1)
        for t, part in zip(tensors, back):
            t[local_slots] = part.reshape(-1, *t.shape[1:]).to(t.dtype)
        return True
