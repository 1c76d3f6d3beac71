"""``moeflow.Buffer``: DeepEP's dispatch / combine contract on any torch.distributed backend.

The façade: validate, exchange counts, plan the route (:mod:`moeflow.comm.plan`), run it
(:mod:`moeflow.comm.route`) over the Buffer's :class:`~moeflow.comm.transport.Transport`.
docs/architecture.md describes the data path: which messages, in which order, which copies.

Shape letters (docs/architecture.md): T tokens on this rank, H hidden, K top-k, E experts,
L = E / R local experts, R ranks, N nodes, M rows received here.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from .. import layout as _layout
from .agree import check_same
from .checks import SIGNATURE, ArgChecker, DispatchArgs, resolve_ranks_per_node
from .compat import DeepEPBufferMethods
from .handle import DispatchHandle
from .low_latency import LowLatency, LowLatencyHandle
from .plan import GAP_COLS, CountTable, RowMeta
from .route import PlanRunner
from .transport import ByteCounters, EventOverlap, Transport, Workspace, host_driven, make_transport

__all__ = ["Buffer", "DispatchHandle", "EventOverlap"]

FP8Tuple = tuple[torch.Tensor, torch.Tensor]


class Buffer(DeepEPBufferMethods):
    """Expert-parallel communication for one process group (DeepEP's contract).

    The positional parameters are DeepEP V1's, in its order (docs/deep_ep.md maps every call);
    moeflow's own options are keyword-only.

    Args:
        group: the expert-parallel process group (default: the world). Any backend works;
            tensors must live where the backend wants them (CPU for Gloo, CUDA for NCCL).
        num_nvl_bytes, num_rdma_bytes, num_qps_per_rank, allow_nvlink_for_low_latency_mode,
        allow_mnnvl, use_fabric, explicitly_destroy: DeepEP's buffer sizes, links and teardown;
            ignored: moeflow sizes its memory per call (keeping send buffers for reuse, see
            :meth:`destroy`, which works either way) and the backend picks its links.
        low_latency_mode: enables :meth:`low_latency_dispatch` / :meth:`low_latency_combine`.
        enable_shrink, comm: DeepEP's shrink mode and mpi4py communicator: ``NotImplementedError``
            unless False / None (a collective cannot leave a failed member out; pass a group).
        ranks_per_node: (keyword; default: env ``LOCAL_WORLD_SIZE``, else all ranks on one node)
            must divide the group size; group rank ``r`` lives on node ``r // ranks_per_node``.
            With several nodes a token crosses to another node once (docs/architecture.md).
        timeout_s: (keyword; default: env ``MOEFLOW_TIMEOUT_S``, else 30) seconds a wait may
            take; past it, or as soon as the backend reports a lost peer, every waiting rank
            raises :class:`~moeflow.comm.health.PeerFailureError` naming the lost ranks.
        check_finite: (keyword) raise ``ValueError`` naming the rank, the argument and the first
            bad row when ``x`` or ``topk_weights`` holds NaN/Inf (one more pass and a host sync
            per call). A fresh dispatch's error reaches every rank through the count exchange;
            elsewhere the other ranks see this rank stop calling in (``PeerFailureError``).
        check_layout: (keyword) a fresh dispatch checks that ``num_tokens_per_expert`` counts
            ``topk_idx``'s pairs (layout counts from another batch would size the receive
            buffers and the per-expert list wrongly): one bincount, in the host sync the id
            check makes anyway. False skips it.

    Agreement: the constructor checks once that every rank of the group made its Buffer with
    the same ``ranks_per_node`` and ``low_latency_mode`` (one small exchange); every fresh
    dispatch checks hidden size, dtype, experts, top-k and weights inside its count exchange.
    Ranks that differ get a ``ValueError`` on every rank naming the ranks and their values.

    Attributes:
        rank, group_size, group: as in DeepEP. num_nodes, ranks_per_node: the topology.
        transport: the :class:`~moeflow.comm.transport.Transport` every call goes through.
        counters: its :class:`ByteCounters`, bytes per peer for ``"layout"``, ``"dispatch"``,
            ``"combine"``, ... since ``counters.reset()``.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_nvl_bytes: int = 0,
                 num_rdma_bytes: int = 0, low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm: object = None, *, ranks_per_node: Optional[int] = None,
                 timeout_s: Optional[float] = None, check_finite: bool = False, check_layout: bool = True) -> None:
        self._refuse(enable_shrink, comm)
        if not dist.is_initialized():
            raise RuntimeError("moeflow.Buffer: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first (or use moeflow.launch.spawn)")
        for name, flag in (("check_finite", check_finite), ("check_layout", check_layout)):
            if not isinstance(flag, bool):
                raise TypeError(f"moeflow.Buffer: `{name}` must be a bool, got {flag!r}")
        rank, R = dist.get_rank(group), dist.get_world_size(group)
        self.ranks_per_node = resolve_ranks_per_node(ranks_per_node, rank, R)
        self.num_nodes = R // self.ranks_per_node
        self.group, self.check_finite, self.check_layout = group, check_finite, check_layout
        self.num_nvl_bytes, self.num_rdma_bytes, self.low_latency_mode = num_nvl_bytes, num_rdma_bytes, low_latency_mode
        self.explicitly_destroy, self.enable_shrink = explicitly_destroy, enable_shrink
        self.transport: Transport = make_transport(group, timeout_s=timeout_s, ranks_per_node=self.ranks_per_node)
        self.timeout_s = self.transport.timeout_s
        self.rank, self.group_size = rank, R
        self._workspace = Workspace()
        self._runner = PlanRunner(self.transport, self._workspace)
        self._low_latency = LowLatency(self.transport) if low_latency_mode else None
        self._check = ArgChecker(rank, R)
        # L of the count table's per-expert columns, the same on every rank (see _exchange_counts)
        self._num_local_experts = 0
        # Gap lists in the count table (flat hops then send long runs of tokens without a gather):
        # few ranks only (with many, no list fits), one node (node-aware hops do not use them),
        # and host-driven copies only (see _exchange_counts).
        self._gaps_fit = R <= 8 and self.num_nodes == 1
        # Collective, once: a rank with another topology would size its count tables and routes
        # differently from the first dispatch on.
        check_same(self.transport, dict(ranks_per_node=self.ranks_per_node, low_latency_mode=bool(low_latency_mode)),
                   "moeflow.Buffer", "create the Buffers of a group with the same options on every rank "
                   "(ranks_per_node defaults to env LOCAL_WORLD_SIZE)")

    @property
    def counters(self) -> ByteCounters:
        return self.transport.counters

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """``tensor`` reduced in place over the Buffer's group through its transport: counted and
        waited on with the timeout (a lost peer is named, never waited on forever). For the small
        collectives of layers built on the Buffer (load counts, chunk counts, checks)."""
        return self.transport.all_reduce(tensor, op)

    def destroy(self) -> None:
        """Free the buffers kept for reuse (send buffers, low-latency slots, symmetric memory);
        they come back on the next call."""
        self._workspace.clear()
        if self._low_latency is not None:
            self._low_latency.destroy()
        self.transport.destroy()

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """Count what this rank sends to each rank and expert. Local: no communication.

        Args:
            topk_idx: ``[T, K]`` int64, expert ids in ``[-1, num_experts)``; ``-1`` = no expert.
            num_experts: E, divisible by the group size.
            previous_event: waited on first. async_finish, allocate_on_comm_stream: accepted;
                the work is local and done when this returns.

        Returns:
            ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [N] int32 (tokens per
            node; None with one node), num_tokens_per_expert [E] int32, is_token_in_rank [T, R]
            bool, event)``, the event already complete.
        """
        if previous_event is not None:
            previous_event.current_stream_wait()
        self._check.num_experts("get_dispatch_layout", num_experts)
        self._check.topk_idx("get_dispatch_layout", topk_idx, None, num_experts)
        per_rank, per_expert, in_rank = _layout.dispatch_layout(topk_idx, num_experts, self.group_size)
        per_node = _layout.num_tokens_per_node(in_rank, self.num_nodes) if self.num_nodes > 1 else None
        return per_rank, per_node, per_expert, in_rank, EventOverlap()

    def dispatch(self, x: Union[torch.Tensor, FP8Tuple], handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: object = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Send each token to every rank that holds one of its experts, once per rank.

        Args:
            x: ``[T, H]`` bf16, fp16 or fp32; or the FP8 tuple ``(float8_e4m3fn [T, H], float32
                [T, H / 128])`` (see :mod:`moeflow.quant`).
            handle: from an earlier dispatch: reuse its route (cached dispatch, no count
                exchange); then ``topk_idx``/``topk_weights`` must be None.
            num_tokens_per_rank: ``[R]`` int (optional: derived from ``is_token_in_rank``).
            num_tokens_per_rdma_rank: ignored (derived from ``is_token_in_rank``).
            is_token_in_rank: ``[T, R]`` bool, from :meth:`get_dispatch_layout`; required fresh.
            num_tokens_per_expert: ``[E]`` int, from :meth:`get_dispatch_layout`: gives E and the
                per-expert receive counts (with or without ``topk_idx``); required with ``topk_idx``.
            topk_idx: ``[T, K]`` int64 or None; ``-1`` = no expert.
            topk_weights: ``[T, K]`` float32 or None (requires ``topk_idx``).
            expert_alignment: round each entry of ``num_recv_tokens_per_expert_list`` up to this.
            num_worst_tokens: W > 0: return exactly W rows (the M received ones first, then zeros,
                ids -1), as DeepEP does for static shapes; a rank receiving more than its W is a
                ``ValueError`` on every rank. 0: M rows.
            config, allocate_on_comm_stream: accepted for DeepEP compatibility (no kernels to tune).
            previous_event: waited on before anything is read.
            async_finish: return while the transfer runs; the returned tensors are filled when
                ``event.current_stream_wait()`` returns.

        Returns:
            recv_x: ``[M', H]`` (or the FP8 tuple), grouped by source rank in rank order, each
                source's token order kept; ``M'`` is W with ``num_worst_tokens``, else M.
            recv_topk_idx: ``[M', K]`` int64 local expert ids, ``-1`` where the expert lives on
                another rank (None without ``topk_idx`` and for a cached dispatch).
            recv_topk_weights: ``[M', K]`` float32, 0 where ``recv_topk_idx`` is ``-1``.
            num_recv_tokens_per_expert_list: ``[L]`` ints (aligned) with ``num_tokens_per_expert``
                (``[]`` with ``num_worst_tokens``, as DeepEP: no host sync), else None.
            handle: :class:`DispatchHandle`. event: :class:`EventOverlap`.
        """
        if previous_event is not None:
            previous_event.current_stream_wait()
        self.transport.arrive("dispatch")
        if handle is not None:
            return self._cached_dispatch(x, handle, topk_idx, topk_weights, num_worst_tokens, async_finish)
        try:
            args, error = self._check.dispatch(x, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert,
                                               topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                                               self.check_finite, self.check_layout), None
        except (ValueError, TypeError) as e:
            # Held back until every rank has seen it in the count exchange: one rank's mistake
            # never leaves the others waiting in a collective.
            args, error = None, e
        device = _device_of(x, is_token_in_rank)
        table, sent, recv = self._exchange_counts(args, is_token_in_rank, num_tokens_per_expert, num_worst_tokens,
                                                  device, error)
        matrix = table.matrix(recv)                                          # [R, R]: rank i's rows to rank j
        W, num_recv_per_rank = num_worst_tokens, matrix[:, self.rank].tolist()
        num_recv_per_expert = None
        if args.num_experts:  # DeepEP returns no list with num_worst_tokens (it would need a host sync)
            num_recv_per_expert = [] if W else [_layout.align_up(int(n), expert_alignment)
                                                for n in table.num_recv_per_expert(recv)]
        meta = RowMeta(args.scales, topk_idx, topk_weights)
        routed = self._runner.dispatch(args.x, meta, is_token_in_rank, num_recv_per_rank, args.num_experts,
                                       table.rail(recv, self.rank), W, (table.gaps(sent), table.gaps(recv)))
        out = routed.outputs(args.scales is not None, meta)
        handle = DispatchHandle(routed.plan.num_tokens, args.x.size(1), tuple(matrix[self.rank].tolist()),
                                tuple(num_recv_per_rank), is_token_in_rank, routed.plan,
                                matrix.to(torch.int32), out.recv_src_idx, W)
        event = _event(routed.works, routed.releases + [out.unpack], async_finish)
        return out.recv_x, out.recv_topk_idx, out.recv_topk_weights, num_recv_per_expert, handle, event

    def _exchange_counts(self, args: Optional[DispatchArgs], is_token_in_rank, num_tokens_per_expert,
                         num_worst_tokens: int, device: torch.device,
                         error: Optional[Exception]) -> tuple[CountTable, torch.Tensor, torch.Tensor]:
        """The count exchange (see :class:`~moeflow.comm.plan.CountTable`). Returns the table,
        this rank's rows (as sent) and every rank's rows on the host; raises on every rank when
        any rank's input was bad or the ranks disagree.

        The table's per-expert columns are as many as the experts every rank last agreed on, not
        as this call's ``num_tokens_per_expert`` says: tables of different sizes cannot even be
        exchanged (Gloo aborts the process), so a rank with another expert count could not be
        told. The signature columns carry each rank's count; once every rank agrees on a new
        one (the first dispatch, or E changed everywhere), all exchange again with its columns.
        """
        R = self.group_size
        # Gap lists where the host gathers (a CPU copy of most of x); on a device a gather is a
        # cheap kernel and reading the lists would cost host syncs.
        gap_cols = GAP_COLS if self._gaps_fit and host_driven(device) else 0

        def exchange(table: CountTable) -> tuple[torch.Tensor, torch.Tensor]:
            send = table.failed(device) if error is not None else table.pack(
                self.rank, args.signature, is_token_in_rank, num_tokens_per_expert, num_worst_tokens)
            # Collective: the count exchange. Host sync: the counts size what follows.
            return send, self.transport.exchange_counts(send).cpu()

        table = CountTable(R, self.ranks_per_node, self._num_local_experts, len(SIGNATURE), gap_cols)
        sent, recv = exchange(table)
        if error is not None:
            raise error
        bad = table.bad_ranks(recv)
        if bad:
            raise ValueError(f"Buffer.dispatch: rank(s) {bad} passed invalid input (see their error); "
                             f"rank {self.rank} stops too instead of waiting for them")
        self._check.signatures(table.signatures(recv))
        self._check.worst(table.num_worst_tokens(recv), table.matrix(recv).sum(0).tolist())
        L = args.num_experts // R
        if L and L != table.num_local_experts:  # every rank agrees on E, so every rank gets here
            self._num_local_experts = L
            table = CountTable(R, self.ranks_per_node, L, len(SIGNATURE), gap_cols)
            sent, recv = exchange(table)
        return table, sent, recv

    def _cached_dispatch(self, x, handle, topk_idx, topk_weights, num_worst_tokens, async_finish):
        self._check_handle("dispatch", handle)
        payload, scales = self._check.cached_dispatch(x, handle, topk_idx, topk_weights, num_worst_tokens,
                                                      self.check_finite)
        rows = handle.num_recv_rows  # W rows after a dispatch with num_worst_tokens
        recv_x, works, releases = self._runner.forward(handle.plan, payload, "dispatch", num_rows=rows)
        if scales is not None:
            recv_scales, more, more_releases = self._runner.forward(handle.plan, scales, "dispatch", new_call=False,
                                                                    num_rows=rows)
            recv_x, works, releases = (recv_x, recv_scales), works + more, releases + more_releases
        return recv_x, None, None, None, handle, _event(works, releases, async_finish)

    def _check_handle(self, where: str, handle) -> None:
        self._check.handle(where, handle, DispatchHandle)
        if (len(handle.plan.hops) > 1) != (self.num_nodes > 1):
            raise ValueError(f"Buffer: rank {self.rank}: the handle's route has {len(handle.plan.hops)} hop(s) but "
                             f"this Buffer spans {self.num_nodes} node(s); pass handles back to their Buffer")

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, tuple, None] = None, config: object = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Send each received row back to its source and sum a token's copies there.

        Args:
            x: ``[M', H]`` bf16, fp16 or fp32, row ``i`` answering row ``i`` of the dispatch's
                ``recv_x`` (``M' = W`` after a dispatch with ``num_worst_tokens``: rows past M are
                padding and not read).
            handle: the :class:`DispatchHandle` from that dispatch.
            topk_weights: ``[M', K]`` float32 or None; summed over ranks like ``x``.
            bias: None, a ``[T, H]`` tensor or a tuple of up to two, added to the result.
            previous_event: waited on first. async_finish: as in :meth:`dispatch`.
            config, allocate_on_comm_stream: accepted for DeepEP compatibility.

        Returns:
            combined_x: ``[T, H]``, ``x.dtype``, the sum of each token's copies, accumulated in
                fp32 in rank order (across nodes: a node's partial sum, rounded to ``x.dtype``
                once, in node order); 0 for a token that went nowhere.
            combined_topk_weights: ``[T, K]`` float32, or None. event: :class:`EventOverlap`.
        """
        if previous_event is not None:
            previous_event.current_stream_wait()
        self.transport.arrive("combine")
        self._check_handle("combine", handle)
        biases = self._check.combine(x, handle, topk_weights, bias, self.check_finite)
        T, H, M = handle.num_tokens, handle.hidden, handle.num_recv_tokens
        combined_x = x.new_empty(T, H)
        works, finish = self._runner.backward(handle.plan, x[:M].contiguous(), "combine", out=combined_x,
                                              biases=biases)
        finishes, combined_w = [finish], None
        if topk_weights is not None:
            combined_w = topk_weights.new_empty(T, topk_weights.size(1))
            more, finish_w = self._runner.backward(handle.plan, topk_weights[:M].contiguous(), "combine",
                                                   out=combined_w, new_call=False)
            works, finishes = works + more, finishes + [finish_w]
        return combined_x, combined_w, _event(works, finishes, async_finish)

    # ------------------------------------------------------------------ low-latency mode
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """DeepEP's low-latency dispatch: static shapes, no host sync on counts (needs
        ``low_latency_mode``); see :meth:`moeflow.comm.low_latency.LowLatency.dispatch`.
        ``dispatch_wait_recv_cost_stats`` must be None (``NotImplementedError``)."""
        ll = self._need_low_latency("low_latency_dispatch")
        self.transport.arrive("low_latency_dispatch")
        return ll.dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8,
                           cumulative_local_expert_recv_stats, async_finish, return_recv_hook, round_scale=round_scale,
                           use_ue8m0=use_ue8m0, wait_stats=dispatch_wait_recv_cost_stats,
                           check_finite=self.check_finite)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """DeepEP's low-latency combine: each token's expert outputs, weighted and summed (see
        :meth:`moeflow.comm.low_latency.LowLatency.combine`, also for ``use_logfmt`` and
        ``zero_copy``). ``combine_wait_recv_cost_stats`` must be None (``NotImplementedError``)."""
        ll = self._need_low_latency("low_latency_combine")
        self.transport.arrive("low_latency_combine")
        return ll.combine(x, topk_idx, topk_weights, handle, out, async_finish, return_recv_hook, use_logfmt=use_logfmt,
                          zero_copy=zero_copy, wait_stats=combine_wait_recv_cost_stats, check_finite=self.check_finite)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """``[L, R * T_max, H]`` bf16 for the expert outputs of ``handle``'s slots: fill it and call
        :meth:`low_latency_combine` with ``zero_copy=True``, which reads it instead of ``x``."""
        return self._need_low_latency("get_next_low_latency_combine_buffer").combine_buffer(handle)

    def _need_low_latency(self, where: str) -> LowLatency:
        if self._low_latency is None:
            raise ValueError(f"Buffer.{where}: rank {self.rank}: create the Buffer with low_latency_mode=True")
        return self._low_latency


def _event(works: list, finalizers: list, async_finish: bool) -> EventOverlap:
    event = EventOverlap(works, finalizers)
    if not async_finish:
        event.current_stream_wait()
    return event


def _device_of(x, is_token_in_rank) -> torch.device:
    for t in (x[0] if isinstance(x, tuple) and x else x, is_token_in_rank):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")
