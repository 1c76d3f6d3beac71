"""``moeflow.Buffer``: DeepEP's normal-mode dispatch / combine contract on any torch.distributed backend.

Shape letters:
    N  tokens on this rank          H  hidden size            K  top-k
    E  experts in the group         L  local experts (E / R)  R  ranks in the group
    S  rows this rank sends (one per token-rank pair)         M  rows this rank receives

What goes on the wire:
  fresh dispatch  1. a count exchange, ``[R, 9 + L + R]`` int64 per rank: rows and per-expert
                     counts for each peer (they size the receive buffers) plus every rank's hidden
                     size, dtype and input status, so that bad input on one rank is an error on
                     all ranks instead of a hang, and its ``num_worst_tokens`` and rows for every
                     rank (the handle's DeepEP ``rank_prefix_matrix``);
                  2. the payload rows, in R-1 pairwise send/recv steps (see
                     ``FlatTransport.exchange_pairwise``): each peer's rows are gathered into a
                     reused send buffer just before they leave and received straight into
                     ``recv_x``; this rank's own rows are gathered straight into ``recv_x``;
                  3. the rows' metadata (local top-k ids, weights, FP8 scales, source token
                     index) as packed bytes, one small all-to-all with the same splits.
  cached dispatch payload (+ FP8 scales) only: the handle holds every count.
  combine         payload back (+ top-k weights when given); no count exchange. Rows a rank
                  sent to itself are read from ``x`` in place.

With several nodes (``ranks_per_node`` < group size) a fresh dispatch adds one column to the count
exchange and moves rows node-aware instead (see :mod:`moeflow.comm.hierarchical`).

Why payload and metadata are two exchanges and not one packed message: interleaving metadata
with the payload forces a staging buffer and a full-size copy out of it on every receive (or a
strided ``recv_x``); measured here that copy and its page faults cost more than a second,
small collective issued back to back with the first.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from .. import layout as _layout
from ..quant import FP8_BLOCK
from .checks import DTYPE_CODE, FLOAT_DTYPES, ArgChecker
from .compat import SHRINK_UNSUPPORTED, DeepEPBufferMethods, DeepEPTuple
from .health import Watchdog, resolve_timeout
from .low_latency import LowLatency, LowLatencyHandle, finish_low_latency
from .hierarchical import HierarchicalDispatcher, NodeRoute, num_tokens_per_node, resolve_ranks_per_node
from .transport import ByteCounters, EventOverlap, FlatTransport, RowFormat, Workspace, rows_view, unpack_topk_meta

__all__ = ["Buffer", "DispatchHandle", "EventOverlap"]

FP8Tuple = tuple[torch.Tensor, torch.Tensor]
_ACC_BYTES = 4 << 20  # fp32 accumulator per combine pass (token blocks of this many bytes)
_HEADER = 8  # status, rows, then the signature: hidden, dtype, num_experts, num_topk, has idx, has weights


@dataclass(frozen=True)
class DispatchHandle(DeepEPTuple):
    """What a dispatch learned about the layout; pass it back to ``combine`` or a cached dispatch.

    Attributes:
        num_tokens: N, tokens this rank dispatched.
        hidden: H of the dispatched ``x``.
        send_token_idx: ``[S]`` int64, the token each sent row carried, grouped by destination rank.
        num_send_tokens_per_rank: rows sent to each rank.
        num_recv_tokens_per_rank: rows received from each rank (``recv_x`` is grouped this way).
        is_token_in_rank: ``[N, R]`` bool, as given to dispatch.
        route: the node-level path (:class:`~moeflow.comm.hierarchical.NodeRoute`) when the
            group spans several nodes, else None.
        num_send_tokens_matrix: ``[R, R]`` int32, row ``i``: rows rank ``i`` sent to each rank
            (every rank's counts, from the count exchange).
        recv_src_idx: ``[M']`` int32, the source token index of each received row (flat route;
            None on the node-aware route, whose DeepEP handle has no such entry).
        num_worst_tokens: W, the row count dispatch padded its outputs to (0: none, ``M' = M``;
            else ``M' = W``).
        num_recv_tokens_per_node: rows that reached this rank at node level from each node
            (node-aware route only).

    Indexing and unpacking it gives DeepEP's handle tuple (``handle[0]``, ``a, b, ... = handle``):
    on one node DeepEP's intranode 6-tuple, ``(rank_prefix_matrix [R, R], channel_prefix_matrix
    [R, 1], recv_channel_prefix_matrix [R, 1], recv_src_idx [M'], is_token_in_rank [N, R],
    send_head [N, R])``, all int32 but the bool mask, with one "channel" (DeepEP splits the
    transfer over SM channels; here there is one); on several nodes DeepEP's internode 10-tuple,
    whose last three entries (``recv_src_meta``, ``send_rdma_head``, ``send_nvl_head``: DeepEP's
    kernel bookkeeping) are None. docs/deep_ep.md lists every entry.
    """

    num_tokens: int
    hidden: int
    send_token_idx: torch.Tensor
    num_send_tokens_per_rank: tuple[int, ...]
    num_recv_tokens_per_rank: tuple[int, ...]
    is_token_in_rank: torch.Tensor
    route: Optional[NodeRoute] = None
    num_send_tokens_matrix: Optional[torch.Tensor] = None
    recv_src_idx: Optional[torch.Tensor] = None
    num_worst_tokens: int = 0
    num_recv_tokens_per_node: tuple[int, ...] = ()

    @property
    def num_recv_tokens(self) -> int:
        return sum(self.num_recv_tokens_per_rank)

    @property
    def num_recv_rows(self) -> int:
        """M', the rows of ``recv_x``: W when dispatch padded to ``num_worst_tokens``, else M."""
        return self.num_worst_tokens or self.num_recv_tokens

    def _deep_ep_entries(self) -> tuple:
        in_rank = self.is_token_in_rank
        device = in_rank.device

        def ints(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        sent = ints(self.num_send_tokens_per_rank).view(-1, 1)
        if self.route is None:
            rank_prefix_matrix = self.num_send_tokens_matrix.cumsum(0, dtype=torch.int32)
            # send_head[t, r]: the place of token t among the rows sent to rank r, -1 if none
            send_head = torch.where(in_rank, in_rank.cumsum(0, dtype=torch.int32) - 1, -1).to(torch.int32)
            return rank_prefix_matrix, sent, torch.zeros_like(sent), self.recv_src_idx, in_rank, send_head
        recv_per_node = ints(self.num_recv_tokens_per_node)
        recv_per_rank = ints(self.num_recv_tokens_per_rank)
        recv_rank_prefix = recv_per_rank.cumsum(0, dtype=torch.int32)
        return (in_rank, num_tokens_per_node(in_rank, self.route.ranks_per_node).view(-1, 1), sent,
                recv_per_node.view(-1, 1), recv_per_node.cumsum(0, dtype=torch.int32),
                (recv_rank_prefix - recv_per_rank).view(-1, 1), recv_rank_prefix, None, None, None)


class Buffer(DeepEPBufferMethods):
    """Expert-parallel communication for one process group (DeepEP normal-mode contract).

    The positional parameters are DeepEP V1's, in its order (``deep_ep.Buffer`` before V2;
    docs/deep_ep.md maps every call); moeflow's own options are keyword-only.

    Args:
        group: the expert-parallel process group (default: the world). Any backend works;
            tensors must live where the backend wants them (CPU for Gloo, CUDA for NCCL).
        num_nvl_bytes, num_rdma_bytes: DeepEP's preallocated buffer sizes; ignored, moeflow
            sizes its memory per call (and keeps send buffers for reuse, see :meth:`destroy`).
        low_latency_mode: enables :meth:`low_latency_dispatch` / :meth:`low_latency_combine`
            (static shapes, no host sync on counts; see :mod:`moeflow.comm.low_latency`).
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric: DeepEP's
            RDMA queue pairs, NVLink and fabric-memory choices; ignored, the torch.distributed
            backend picks its links.
        explicitly_destroy: ignored; :meth:`destroy` may be called either way and the Buffer
            stays usable after it.
        enable_shrink: DeepEP's shrink mode (mask failed ranks); ``True`` raises
            ``NotImplementedError`` (a collective cannot leave a member out; a lost rank raises
            :class:`~moeflow.comm.health.PeerFailureError` instead).
        comm: DeepEP's ``mpi4py`` communicator alternative to ``group``: only None is accepted
            (moeflow moves data through torch.distributed; pass a process group).
        ranks_per_node: P, ranks per node (keyword; default: env ``LOCAL_WORLD_SIZE``, else all
            ranks on one node); must divide the group size. Group rank ``r`` is taken to live on
            node ``r // P``. With more than one node, dispatch and combine go node-aware (see
            :mod:`moeflow.comm.hierarchical`): a token crosses to another node once.
        timeout_s: seconds any one wait on a transfer may take (keyword; default: env
            ``MOEFLOW_TIMEOUT_S``, else 30). Past it, or as soon as the backend reports a lost
            peer, every waiting rank raises :class:`~moeflow.comm.health.PeerFailureError`
            naming the ranks that are dead or stopped calling in (see :mod:`moeflow.comm.health`).
        check_finite: (keyword) check ``x`` and ``topk_weights`` of every dispatch and combine
            for NaN/Inf and raise ``ValueError`` naming the rank, the argument and the first bad
            row. Off by default: non-finite values are moved like any other (one extra pass over
            the data and a host sync per call when on). A fresh dispatch's error reaches every
            rank through the count exchange; in a cached dispatch or a combine the other ranks
            see this rank stop calling in (``PeerFailureError``).

    Attributes:
        rank, group_size, group: as in DeepEP.
        counters: :class:`ByteCounters`, bytes sent/received per peer for ``"layout"``,
            ``"dispatch"`` and ``"combine"`` (payload and metadata) since ``counters.reset()``.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_nvl_bytes: int = 0,
                 num_rdma_bytes: int = 0, low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm: object = None, *, ranks_per_node: Optional[int] = None,
                 timeout_s: Optional[float] = None, check_finite: bool = False) -> None:
        if enable_shrink:
            raise NotImplementedError(f"moeflow.Buffer: enable_shrink=True is not supported. {SHRINK_UNSUPPORTED}")
        if comm is not None:
            raise NotImplementedError("moeflow.Buffer: `comm` (an mpi4py communicator) is not supported: moeflow "
                                      "moves data through torch.distributed; pass `group` (a ProcessGroup)")
        if not dist.is_initialized():
            raise RuntimeError("moeflow.Buffer: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first (or use moeflow.launch.spawn)")
        self.group = group
        rank, R = dist.get_rank(group), dist.get_world_size(group)
        P = resolve_ranks_per_node(ranks_per_node, rank, R)
        self.ranks_per_node, self.num_nodes = P, R // P
        if not isinstance(check_finite, bool):
            raise TypeError(f"moeflow.Buffer: `check_finite` must be a bool, got {check_finite!r}")
        self.timeout_s = resolve_timeout(timeout_s)
        self.check_finite = check_finite
        # One rank has no peer to lose: no watchdog, no heartbeat thread.
        self._watchdog = Watchdog(group, self.timeout_s) if R > 1 else None
        self.transport = FlatTransport(group, P, self._watchdog)
        self.rank = self.transport.rank
        self.group_size = self.transport.num_ranks
        # Node-aware path only when there is more than one node: one node is the flat path.
        self._node = HierarchicalDispatcher(self.transport, P) if self.num_nodes > 1 else None
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self._workspace = Workspace()
        self._low_latency = LowLatency(self.transport) if low_latency_mode else None
        self._check = ArgChecker(self.rank, self.group_size)

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """``dist.all_reduce`` of ``tensor`` (in place) over the Buffer's group, counted and
        waited on like a transfer: a dead or stuck peer raises :class:`PeerFailureError` naming
        it within ``timeout_s`` instead of hanging. For the small collectives layers built on
        the Buffer make between dispatches (load counts, chunk counts, checks)."""
        if self.group_size == 1:
            return tensor
        self._arrive("all_reduce")
        self._watchdog.wrap(dist.all_reduce(tensor, op=op, group=self.group, async_op=True)).wait()
        return tensor

    # ------------------------------------------------------------------ DeepEP API surface
    @property
    def counters(self) -> ByteCounters:
        return self.transport.counters

    def destroy(self) -> None:
        """Free the send buffers kept for reuse (they come back on the next call)."""
        self._workspace.clear()
        if self._low_latency is not None:
            self._low_latency.destroy()

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False
                            ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Count what this rank sends to each rank and expert. Local: no communication.

        Args:
            topk_idx: ``[N, K]`` int64, expert ids in ``[-1, num_experts)``; ``-1`` = no expert.
            num_experts: E, divisible by the group size.
            previous_event: waited on first. async_finish, allocate_on_comm_stream: accepted;
                the work is local and done when this returns.

        Returns:
            num_tokens_per_rank: ``[R]`` int32, tokens sent to each rank.
            num_tokens_per_rdma_rank: ``[G]`` int32, tokens sent to each node (None with one node).
            num_tokens_per_expert: ``[E]`` int32, token-expert pairs per expert.
            is_token_in_rank: ``[N, R]`` bool.
            event: an already-complete :class:`EventOverlap`.
        """
        if previous_event is not None:
            previous_event.current_stream_wait()
        self._check.num_experts("get_dispatch_layout", num_experts)
        self._check.topk_idx("get_dispatch_layout", topk_idx, None, num_experts)
        per_rank, per_expert, in_rank = _layout.dispatch_layout(topk_idx, num_experts, self.group_size)
        per_node = num_tokens_per_node(in_rank, self.ranks_per_node) if self._node is not None else None
        return per_rank, per_node, per_expert, in_rank, EventOverlap()

    # ------------------------------------------------------------------ dispatch
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
            x: ``[N, H]`` bf16, fp16 or fp32; or the FP8 tuple ``(float8_e4m3fn [N, H], float32
                [N, H / 128])`` (see :mod:`moeflow.quant`).
            handle: from an earlier dispatch: reuse its layout (cached dispatch, no count
                exchange); then ``topk_idx``/``topk_weights`` must be None.
            num_tokens_per_rank: ``[R]`` int, from :meth:`get_dispatch_layout` (optional: derived
                from ``is_token_in_rank``).
            num_tokens_per_rdma_rank: ignored (derived from ``is_token_in_rank``).
            is_token_in_rank: ``[N, R]`` bool, from :meth:`get_dispatch_layout`. Required for a
                fresh dispatch.
            num_tokens_per_expert: ``[E]`` int, from :meth:`get_dispatch_layout`: gives E and the
                per-expert receive counts. Required with ``topk_idx``; without it, optional (the
                counts are returned when given, as DeepEP does).
            topk_idx: ``[N, K]`` int64 or None; ``-1`` = no expert.
            topk_weights: ``[N, K]`` float32 or None (requires ``topk_idx``).
            expert_alignment: round each entry of ``num_recv_tokens_per_expert_list`` up to this.
            num_worst_tokens: W; 0 (default) returns the M rows received. W > 0 returns exactly
                W rows (static shapes, e.g. for CUDA graphs): the first M are the received rows,
                the rest zeros with ``recv_topk_idx`` -1 and weights 0, and the per-expert list
                is empty, as in DeepEP. W must be at least M on every rank (``ValueError`` on
                every rank otherwise); DeepEP users pass ``num_tokens * num_ranks``. A cached
                dispatch and the combine of this handle take and give W rows as well.
            config, allocate_on_comm_stream: accepted for DeepEP compatibility (a :class:`Config`
                tunes DeepEP's kernels; moeflow has none).
            previous_event: waited on before anything is read.
            async_finish: return as soon as the transfer is under way; the returned tensors are
                filled when ``event.current_stream_wait()`` returns.

        Returns:
            recv_x: ``[M, H]`` (``[W, H]`` with ``num_worst_tokens``; or the FP8 tuple), grouped
                by source rank in rank order, the source's token order kept inside each group.
            recv_topk_idx: ``[M, K]`` int64 local expert ids, ``-1`` where the expert lives on
                another rank (None without ``topk_idx`` and for a cached dispatch).
            recv_topk_weights: ``[M, K]`` float32, 0 where ``recv_topk_idx`` is ``-1``.
            num_recv_tokens_per_expert_list: ``[L]`` Python ints, token-expert pairs each local
                expert received, each rounded up to ``expert_alignment`` (``[]`` with
                ``num_worst_tokens``; None without ``num_tokens_per_expert`` and for a cached
                dispatch).
            handle: :class:`DispatchHandle` for combine and cached dispatch.
            event: :class:`EventOverlap`.
        """
        if previous_event is not None:
            previous_event.current_stream_wait()
        self._arrive("dispatch")
        if handle is not None:
            return self._cached_dispatch(x, handle, topk_idx, topk_weights, num_worst_tokens, async_finish)
        return self._fresh_dispatch(x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                                    topk_idx, topk_weights, expert_alignment, num_worst_tokens, async_finish)

    def _fresh_dispatch(self, x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                        topk_idx, topk_weights, expert_alignment, num_worst_tokens, async_finish):
        R = self.group_size
        where = "dispatch"
        # Validate locally; an error is held back until every rank has seen it in the count
        # exchange, so a mistake on one rank never leaves the others waiting in a collective.
        error: Optional[Exception] = None
        num_local_experts = 0
        signature = None
        try:
            if not isinstance(expert_alignment, int) or expert_alignment < 1:
                raise ValueError(f"Buffer.dispatch: `expert_alignment` on rank {self.rank} must be "
                                 f"a positive int, got {expert_alignment!r}")
            _check_worst(self.rank, num_worst_tokens)
            x_payload, x_scales, dtype = self._check.x(where, x)
            self._finite(where, x_payload, x_scales)
            N, H = x_payload.shape
            if is_token_in_rank is None:
                raise ValueError(f"Buffer.dispatch: `is_token_in_rank` on rank {self.rank} is required "
                                 "for a fresh dispatch (from get_dispatch_layout), or pass `handle`")
            self._check.tensor(where, "is_token_in_rank", is_token_in_rank, torch.bool, (N, R))
            if num_tokens_per_rank is not None:
                self._check.tensor(where, "num_tokens_per_rank", num_tokens_per_rank, None, (R,))
            if topk_weights is not None and topk_idx is None:
                raise ValueError(f"Buffer.dispatch: `topk_weights` on rank {self.rank} given without `topk_idx`")
            num_experts = 0
            if topk_idx is not None and num_tokens_per_expert is None:
                raise ValueError(f"Buffer.dispatch: `num_tokens_per_expert` on rank {self.rank} is "
                                 "required with `topk_idx` (from get_dispatch_layout)")
            if num_tokens_per_expert is not None:
                if not isinstance(num_tokens_per_expert, torch.Tensor) or num_tokens_per_expert.dim() != 1:
                    raise TypeError(f"Buffer.dispatch: `num_tokens_per_expert` on rank {self.rank} must be a "
                                    f"1-D tensor [num_experts], got {_describe(num_tokens_per_expert)}")
                num_experts = num_tokens_per_expert.numel()
                self._check.num_experts(where, num_experts)
                num_local_experts = num_experts // R
            if topk_idx is not None:
                self._check.topk_idx(where, topk_idx, N, num_experts)
                if topk_weights is not None:
                    self._check.tensor(where, "topk_weights", topk_weights, torch.float32, tuple(topk_idx.shape))
                    if self.check_finite:
                        self._check.finite(where, "topk_weights", topk_weights)
            K = topk_idx.size(1) if topk_idx is not None else 0
            signature = (H, DTYPE_CODE[dtype], num_experts, K, int(topk_idx is not None),
                         int(topk_weights is not None))
        except (ValueError, TypeError) as e:
            error = e
            if isinstance(num_tokens_per_expert, torch.Tensor):
                num_local_experts = num_tokens_per_expert.numel() // R

        device = _device_of(x)
        # Node-aware: one more column, the phase-1 rows each rail peer receives from this rank.
        first = _HEADER + (self._node is not None)
        # After the per-expert counts, the same to every peer: this rank's W and its rows for
        # every rank, so that every rank knows the [R, R] row matrix (DeepEP's rank_prefix_matrix,
        # in the handle) and can check every rank's W: R + 1 more int64 per peer.
        extra = first + num_local_experts
        header = torch.zeros(R, extra + 1 + R, dtype=torch.int64, device=device)
        if error is None:
            send_token_idx, send_rank_idx = _layout.send_order(is_token_in_rank)
            num_send_per_rank_t = is_token_in_rank.sum(0)
            header[:, 1] = num_send_per_rank_t
            header[:, extra] = num_worst_tokens
            header[:, extra + 1:] = num_send_per_rank_t.to(torch.int64)
            header[:, 2:8] = torch.tensor(signature, dtype=torch.int64, device=device)
            if self._node is not None:
                send1 = self._node.plan_send(is_token_in_rank)
                header[:, _HEADER] = torch.tensor(send1[2], dtype=torch.int64, device=device)
            if num_experts:
                header[:, first:extra] = num_tokens_per_expert.to(device=device, dtype=torch.int64).view(R, -1)
        else:
            header[:, 0] = 1
        # Collective 1: the count exchange (see the module docstring). Host sync: the counts
        # size the receive buffers.
        recv_header = self.transport.exchange_counts(header).cpu()
        if error is not None:
            raise error
        bad = recv_header[:, 0].nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"Buffer.dispatch: rank(s) {bad} passed invalid input (see their error); "
                             f"rank {self.rank} stops too instead of waiting for them")
        self._check.signatures(recv_header[:, 2:8])
        send_matrix = recv_header[:, extra + 1:]                       # [R, R]: rank i's rows to rank j
        W = num_worst_tokens
        short = [(r, int(w), int(m)) for r, (w, m) in enumerate(zip(recv_header[:, extra].tolist(),
                                                                   send_matrix.sum(0).tolist())) if 0 < w < m]
        if short:
            shown = ", ".join(f"rank {r}: {w} < {m}" for r, w, m in short)
            raise ValueError(f"Buffer.dispatch: `num_worst_tokens` is below the rows received ({shown}); "
                             "it must be at least the rows a rank can receive (e.g. num_tokens * num_ranks)")

        num_send_per_rank = header[:, 1].tolist()
        num_recv_per_rank = recv_header[:, 1].tolist()
        M = sum(num_recv_per_rank)
        num_recv_tokens_per_expert_list = None
        if num_experts:
            # DeepEP returns no per-expert list with num_worst_tokens (it would need a host sync)
            num_recv_tokens_per_expert_list = [] if W else [
                _layout.align_up(int(n), expert_alignment) for n in recv_header[:, first:extra].sum(0).tolist()]
        counts = dict(num_send_tokens_per_rank=tuple(int(n) for n in num_send_per_rank),
                      num_recv_tokens_per_rank=tuple(int(n) for n in num_recv_per_rank),
                      is_token_in_rank=is_token_in_rank, num_worst_tokens=W,
                      num_send_tokens_matrix=send_matrix.to(device=device, dtype=torch.int32))
        if self._node is not None:
            recv_x, recv_scales, recv_topk_idx, recv_topk_weights, route, works, finalizers = \
                self._node.fresh_dispatch(x_payload, x_scales, topk_idx, topk_weights, is_token_in_rank,
                                          num_experts if topk_idx is not None else 0, send1,
                                          recv_header[:, _HEADER].tolist(), num_recv_per_rank, async_finish)
            own_node = self.rank // self.ranks_per_node
            handle = DispatchHandle(N, H, send_token_idx, route=route, num_recv_tokens_per_node=tuple(
                len(route.own_token_idx) if m == own_node else c for m, c in enumerate(route.num_recv1_per_node)),
                **counts)
            return self._node_outputs([recv_x, recv_scales, recv_topk_idx, recv_topk_weights],
                                      num_recv_tokens_per_expert_list, handle, works, finalizers, async_finish)

        # Collective 2: the payload, gathered into a reused send buffer, received into recv_x
        # (into its first M rows: with num_worst_tokens it has W).
        rows = max(M, W)
        recv_x = torch.empty(rows, H, dtype=x_payload.dtype, device=device)
        recv_x[M:].zero_()
        works, release = self._exchange_payload(x_payload, send_token_idx, recv_x[:M], num_recv_per_rank,
                                                num_send_per_rank, async_finish)

        # Collective 3: the metadata rows, issued right behind the payload. Every row carries its
        # source token index (the handle's recv_src_idx, DeepEP's handle[3]).
        idx_dtype = _layout.smallest_int_dtype(max(num_local_experts - 1, 0))
        fmt = RowFormat((("scales", (H // FP8_BLOCK) * 4 if x_scales is not None else 0),
                         ("weights", 4 * K if topk_weights is not None else 0),
                         ("ids", K * _itemsize(idx_dtype)), ("src", 4)))
        send_meta = torch.empty(send_token_idx.numel(), fmt.width, dtype=torch.uint8, device=device)
        fmt.view(send_meta, "src", torch.int32).copy_(send_token_idx.view(-1, 1))
        if x_scales is not None:
            torch.index_select(x_scales, 0, send_token_idx,
                               out=fmt.view(send_meta, "scales", torch.float32))
        if K:
            local_idx, local_weights = _layout.local_topk(
                topk_idx.index_select(0, send_token_idx),
                topk_weights.index_select(0, send_token_idx) if topk_weights is not None else None,
                send_rank_idx, num_local_experts)
            fmt.view(send_meta, "ids", idx_dtype).copy_(local_idx)
            if local_weights is not None:
                fmt.view(send_meta, "weights", torch.float32).copy_(local_weights)
        recv_meta = torch.empty(M, fmt.width, dtype=torch.uint8, device=device)
        works.append(self.transport.all_to_all_rows(recv_meta, send_meta, num_recv_per_rank,
                                                    num_send_per_rank, "dispatch", async_op=async_finish,
                                                    new_call=False))

        recv_scales = torch.zeros(rows, H // FP8_BLOCK, dtype=torch.float32, device=device) \
            if x_scales is not None else None
        has_topk = topk_idx is not None
        recv_topk_idx = torch.full((rows, K), -1, dtype=torch.int64, device=device) if has_topk else None
        recv_topk_weights = torch.zeros(rows, K, dtype=torch.float32, device=device) if has_topk else None
        recv_src_idx = torch.full((rows,), -1, dtype=torch.int32, device=device)

        def unpack() -> None:
            release()
            unpack_topk_meta(fmt, recv_meta, *(None if t is None else t[:M] for t in
                                               (recv_scales, recv_topk_idx, recv_topk_weights)),
                             idx_dtype, topk_weights is not None)
            recv_src_idx[:M].copy_(fmt.view(recv_meta, "src", torch.int32).view(-1))

        handle = DispatchHandle(N, H, send_token_idx, recv_src_idx=recv_src_idx, **counts)
        event = EventOverlap(tuple(works), (unpack,))
        if not async_finish:
            event.current_stream_wait()
        out_x = (recv_x, recv_scales) if recv_scales is not None else recv_x
        return out_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event

    def _exchange_payload(self, src: torch.Tensor, row_idx: torch.Tensor, recv: torch.Tensor,
                          num_recv_per_rank: list[int], num_send_per_rank: list[int], async_op: bool,
                          kind: str = "dispatch") -> tuple[list, Callable[[], None]]:
        """Send rows ``src[row_idx]`` (``row_idx`` grouped by destination) and receive into ``recv``
        (grouped by source).

        Each peer's rows are gathered into a reused send buffer just before they leave, so the
        next gather overlaps the previous transfer; this rank's own rows are gathered straight
        into ``recv`` while the first transfer is in flight. Returns the works to wait on and a
        callback that gives the send buffer back once they are done.
        """
        R, rank = self.group_size, self.rank
        src_w, recv_w = _layout.wide_rows(src), _layout.wide_rows(recv)
        send_off, recv_off = _offsets(num_send_per_rank), _offsets(num_recv_per_rank)
        recv_by_rank = [recv_w[recv_off[r]:recv_off[r + 1]] for r in range(R)]
        num_remote = send_off[-1] - num_send_per_rank[rank]
        buf = None
        if num_remote:
            buf = self._workspace.take(num_remote * src_w.size(1) * src_w.element_size(), src.device)
            send_rows = rows_view(buf, num_remote, src_w)
        cursor = 0

        def send_for(dst: int) -> torch.Tensor:
            nonlocal cursor
            n = num_send_per_rank[dst]
            if n == 0:
                return src_w[:0]
            rows = send_rows[cursor:cursor + n]
            cursor += n
            torch.index_select(src_w, 0, row_idx[send_off[dst]:send_off[dst + 1]], out=rows)
            return rows

        def own_rows() -> None:
            torch.index_select(src_w, 0, row_idx[send_off[rank]:send_off[rank + 1]], out=recv_by_rank[rank])

        works = self.transport.exchange_pairwise(recv_by_rank, send_for, kind, own_rows)

        def release() -> None:
            if buf is not None:
                self._workspace.give(buf)

        if not async_op:
            for w in works:
                w.wait()
            release()
            return [], _noop
        return works, release

    def _node_outputs(self, outputs: list, list_per_expert, handle: DispatchHandle, works, finalizers,
                      async_finish: bool):
        """Return of a node-aware dispatch, ``outputs = [recv_x, recv_scales, recv_topk_idx,
        recv_topk_weights]``. With ``num_worst_tokens`` they are padded to W rows: the route builds
        its outputs itself, so the received rows are copied once into the padded tensors when
        they are in (a full-size copy the flat route does not make)."""
        W = handle.num_worst_tokens
        if W:
            received = outputs
            padded = [None if t is None else _pad_rows(t, W, fill) for t, fill in zip(received, (0, 0, -1, 0))]

            def copy_in() -> None:
                for t, dst in zip(received, padded):
                    if t is not None:
                        dst[:t.size(0)].copy_(t)

            outputs, finalizers = padded, tuple(finalizers) + (copy_in,)
        event = EventOverlap(tuple(w for w in works if w is not None), tuple(finalizers))
        if not async_finish:
            event.current_stream_wait()
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights = outputs
        out_x = (recv_x, recv_scales) if recv_scales is not None else recv_x
        return out_x, recv_topk_idx, recv_topk_weights, list_per_expert, handle, event

    def _cached_dispatch(self, x, handle, topk_idx, topk_weights, num_worst_tokens, async_finish):
        where = "dispatch"
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"Buffer.dispatch: `handle` on rank {self.rank} must be a DispatchHandle "
                            f"returned by dispatch, got {type(handle).__name__}")
        if topk_idx is not None or topk_weights is not None:
            raise ValueError(f"Buffer.dispatch: rank {self.rank}: a cached dispatch (with `handle`) "
                             "takes no `topk_idx`/`topk_weights`; the handle fixes the layout")
        _check_worst(self.rank, num_worst_tokens)
        if num_worst_tokens not in (0, handle.num_worst_tokens):
            raise ValueError(f"Buffer.dispatch: `num_worst_tokens` on rank {self.rank} is {num_worst_tokens} but "
                             f"the handle's dispatch used {handle.num_worst_tokens}; a cached dispatch returns "
                             "the handle's row count (pass 0 or the same W)")
        x_payload, x_scales, _ = self._check.x(where, x)
        self._finite(where, x_payload, x_scales)
        N, H = x_payload.shape
        if N != handle.num_tokens or H != handle.hidden:
            raise ValueError(f"Buffer.dispatch: `x` on rank {self.rank} has shape {tuple(x_payload.shape)} "
                             f"but the handle was made for [{handle.num_tokens}, {handle.hidden}]")
        M = handle.num_recv_tokens
        recv_splits, send_splits = list(handle.num_recv_tokens_per_rank), list(handle.num_send_tokens_per_rank)
        if handle.route is not None:
            if self._node is None:
                raise ValueError(f"Buffer.dispatch: rank {self.rank}: the handle comes from a node-aware "
                                 "dispatch but this Buffer has one node")
            recv_x, works = self._node.cached_dispatch(x_payload, handle.route, recv_splits, True)
            recv_scales = None
            if x_scales is not None:
                recv_scales, scale_works = self._node.cached_dispatch(x_scales, handle.route, recv_splits, False)
                works += scale_works
            return self._node_outputs([recv_x, recv_scales, None, None], None, handle, works, (), async_finish)
        # Received into the first M rows (a handle from a dispatch with num_worst_tokens has W).
        rows = handle.num_recv_rows
        recv_x = torch.empty(rows, H, dtype=x_payload.dtype, device=x_payload.device)
        recv_x[M:].zero_()
        works, release = self._exchange_payload(x_payload, handle.send_token_idx, recv_x[:M], recv_splits,
                                                send_splits, async_finish)
        out_x, releases = recv_x, [release]
        if x_scales is not None:
            recv_scales = torch.zeros(rows, H // FP8_BLOCK, dtype=torch.float32, device=x_payload.device)
            scale_works, scale_release = self._exchange_payload(x_scales, handle.send_token_idx, recv_scales[:M],
                                                                recv_splits, send_splits, async_finish)
            works += scale_works
            releases.append(scale_release)
            out_x = (recv_x, recv_scales)
        event = EventOverlap(tuple(works), tuple(releases))
        if not async_finish:
            event.current_stream_wait()
        return out_x, None, None, None, handle, event

    # ------------------------------------------------------------------ low-latency mode
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """DeepEP's low-latency dispatch: static shapes, no host sync on counts (needs ``low_latency_mode``).

        Args:
            x: ``[N, H]`` bf16, ``N <= num_max_dispatch_tokens_per_rank``.
            topk_idx: ``[N, K]`` int64, ``-1`` = no expert.
            num_max_dispatch_tokens_per_rank: T, the same on every rank.
            num_experts: E.
            cumulative_local_expert_recv_stats: ``[L]`` int32 or None; ``recv_count`` is added to it.
            use_fp8: cast to FP8 per token and 128 channels before sending.
            round_scale: (with ``use_fp8``) round each scale up to a power of two.
            use_ue8m0: (with ``round_scale``, ``H % 512 == 0``) return the scales as UE8M0
                exponent bytes, four per int32 (see :func:`moeflow.quant.pack_ue8m0`).
            async_finish: return while the transfer runs; ``event.current_stream_wait()`` finishes.
            return_recv_hook: return right after sending; calling ``hook()`` receives.
            dispatch_wait_recv_cost_stats: must be None: DeepEP adds per-source wait times to it,
                which one collective cannot attribute (``NotImplementedError``; a slow or dead
                rank is named by :class:`~moeflow.comm.health.PeerFailureError` instead).

        Returns:
            recv_x: ``[L, R * T, H]`` bf16, or with ``use_fp8`` the tuple (``float8_e4m3fn [L, R * T, H]``,
                scales ``float32 [L, R * T, H / 128]``, or with ``use_ue8m0`` ``int32 [L, R * T, H / 512]``;
                as in DeepEP the scales are column-major in their last two dims). Expert ``e``'s first
                ``recv_count[e]`` slots are valid: a block per source rank in rank order, each
                source's token order kept. Valid until the second low-latency dispatch after it.
            recv_count: ``[L]`` int32.
            handle: :class:`LowLatencyHandle` for :meth:`low_latency_combine`.
            event: :class:`EventOverlap`. hook: a callable with ``return_recv_hook``, else None.
        """
        _no_wait_stats("low_latency_dispatch", dispatch_wait_recv_cost_stats)
        ll = self._need_low_latency("low_latency_dispatch")
        self._arrive("low_latency_dispatch")
        if self.check_finite and isinstance(x, torch.Tensor):
            self._check.finite("low_latency_dispatch", "x", x)
        recv_x, recv_count, handle, works, receive = ll.dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, cumulative_local_expert_recv_stats,
            round_scale, use_ue8m0)
        return (recv_x, recv_count, handle) + finish_low_latency(works, receive, async_finish, return_recv_hook)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """DeepEP's low-latency combine: each token's expert outputs, weighted and summed.

        Args:
            x: ``[L, R * T, H]`` bf16 (fp16/fp32 accepted), expert outputs in ``recv_x``'s slots.
            topk_idx: ``[N, K]`` int64 and topk_weights: ``[N, K]`` float32, as dispatched.
            handle: from :meth:`low_latency_dispatch`.
            use_logfmt: DeepEP's 10-bit LogFMT wire format for the combine. moeflow has no LogFMT
                codec and sends ``x.dtype`` rows: the result is the plain combine's (at least as
                precise as DeepEP's LogFMT result), the bytes are not reduced. Warns once.
            zero_copy: read the expert outputs from :meth:`get_next_low_latency_combine_buffer`
                (filled by the caller) instead of ``x``.
            async_finish, return_recv_hook: as in :meth:`low_latency_dispatch`.
            out: ``[N, H]`` of ``x.dtype`` to write into, or None.
            combine_wait_recv_cost_stats: must be None (see ``dispatch_wait_recv_cost_stats``).

        Returns:
            combined_x: ``[N, H]``, ``sum_k topk_weights[t, k] * expert_k(t)`` (fp32 inside a rank,
                see :mod:`moeflow.comm.low_latency`). event, hook: as in dispatch.
        """
        _no_wait_stats("low_latency_combine", combine_wait_recv_cost_stats)
        ll = self._need_low_latency("low_latency_combine")
        if use_logfmt:
            warnings.warn("Buffer.low_latency_combine: use_logfmt=True sends the rows uncompressed (moeflow "
                          "has no LogFMT codec): the result is the plain combine's, the bytes are not reduced",
                          stacklevel=2)
        if zero_copy:
            x = ll.combine_buffer(handle)
        self._arrive("low_latency_combine")
        if self.check_finite and isinstance(x, torch.Tensor):
            self._check.finite("low_latency_combine", "x", x)
        combined, works, receive = ll.combine(x, topk_idx, topk_weights, handle, out)
        return (combined,) + finish_low_latency(works, receive, async_finish, return_recv_hook)

    def _arrive(self, kind: str) -> None:
        """Count this call for the watchdog (hot path: an int increment)."""
        if self._watchdog is not None:
            self._watchdog.arrive(kind)

    def _finite(self, where: str, x_payload: torch.Tensor, x_scales: Optional[torch.Tensor]) -> None:
        if not self.check_finite:
            return
        self._check.finite(where, "x" if x_scales is None else "x[0]", x_payload)
        if x_scales is not None:
            self._check.finite(where, "x[1]", x_scales)

    def _need_low_latency(self, where: str) -> LowLatency:
        if self._low_latency is None:
            raise ValueError(f"Buffer.{where}: rank {self.rank}: create the Buffer with low_latency_mode=True")
        return self._low_latency

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """``[L, R * T, H]`` bf16 for the expert outputs of ``handle``'s tokens: fill it and call
        :meth:`low_latency_combine` with ``zero_copy=True``, which reads it instead of ``x``.
        Kept per configuration, as DeepEP's; its contents are read by that combine call."""
        return self._need_low_latency("get_next_low_latency_combine_buffer").combine_buffer(handle)

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, tuple, None] = None, config: object = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Send each received row back to its source and sum a token's copies there.

        Args:
            x: ``[M, H]`` bf16, fp16 or fp32, row ``i`` answering row ``i`` of the dispatch's
                ``recv_x`` (``[W, H]`` after a dispatch with ``num_worst_tokens``; rows past M are
                padding and ignored).
            handle: the :class:`DispatchHandle` from that dispatch.
            topk_weights: ``[M, K]`` (or ``[W, K]``) float32 or None; summed over ranks like ``x``.
            bias: None, a ``[N, H]`` tensor or a tuple of up to two, added to the result.
            previous_event: waited on first. async_finish: as in :meth:`dispatch`.
            config, allocate_on_comm_stream: accepted for DeepEP compatibility.

        Returns:
            combined_x: ``[N, H]``, ``x.dtype``, the sum of each token's copies over ranks,
                accumulated in fp32 in rank order; 0 for a token that went nowhere.
            combined_topk_weights: ``[N, K]`` float32, or None.
            event: :class:`EventOverlap`.
        """
        if previous_event is not None:
            previous_event.current_stream_wait()
        self._arrive("combine")
        where = "combine"
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"Buffer.combine: `handle` on rank {self.rank} must be a DispatchHandle "
                            f"returned by dispatch, got {type(handle).__name__}")
        if isinstance(x, tuple):
            raise TypeError(f"Buffer.combine: `x` on rank {self.rank} must be a bf16/fp16/fp32 tensor; "
                            "FP8 tuples are dispatch-only")
        M = handle.num_recv_tokens
        self._check.tensor(where, "x", x, FLOAT_DTYPES, (handle.num_recv_rows, None))
        H = x.size(1)
        if H != handle.hidden:
            raise ValueError(f"Buffer.combine: `x` on rank {self.rank} has hidden {H} but the handle's "
                             f"dispatch had hidden {handle.hidden}")
        if topk_weights is not None:
            self._check.tensor(where, "topk_weights", topk_weights, torch.float32, (handle.num_recv_rows, None))
            topk_weights = topk_weights[:M]
        x = x[:M]  # rows past M: the padding of a dispatch with num_worst_tokens, never sent
        if self.check_finite:
            self._check.finite(where, "x", x)
            if topk_weights is not None:
                self._check.finite(where, "topk_weights", topk_weights)
        N = handle.num_tokens
        biases = () if bias is None else (bias if isinstance(bias, tuple) else (bias,))
        if len(biases) > 2:
            raise ValueError(f"Buffer.combine: `bias` on rank {self.rank} takes at most 2 tensors, got {len(biases)}")
        for i, b in enumerate(biases):
            self._check.tensor(where, f"bias[{i}]", b, FLOAT_DTYPES, (N, H))
        device = x.device
        R, rank = self.group_size, self.rank
        x = x.contiguous()  # no copy for the expert outputs a layer passes
        if handle.route is not None:
            return self._node_combine(x, handle, topk_weights, biases, async_finish)
        # Combine runs dispatch backwards: rows go back to the ranks they came from.
        num_send_per_rank = list(handle.num_recv_tokens_per_rank)
        num_recv_per_rank = list(handle.num_send_tokens_per_rank)
        send_off, recv_off = _offsets(num_send_per_rank), _offsets(num_recv_per_rank)
        x_w = _layout.wide_rows(x)
        # Rows this rank sent to itself never move: they are read from x in place. The others
        # land in one reused buffer, one contiguous segment per source rank.
        num_remote = recv_off[-1] - num_recv_per_rank[rank]
        buf = self._workspace.take(num_remote * H * x.element_size(), device) if num_remote else None
        segments, cursor = [], 0
        for r in range(R):
            if r == rank:
                segments.append(x[send_off[rank]:send_off[rank + 1]])
            else:
                n = num_recv_per_rank[r]
                segments.append(rows_view(buf, num_remote, x)[cursor:cursor + n] if n else x[:0])
                cursor += n
        works = self.transport.exchange_pairwise(
            [_layout.wide_rows(seg) for seg in segments],
            lambda dst: x_w[send_off[dst]:send_off[dst + 1]], "combine")
        recv_w = None
        if topk_weights is not None:
            recv_w = torch.empty(recv_off[-1], topk_weights.size(1), dtype=torch.float32, device=device)
            works.append(self.transport.all_to_all_rows(recv_w, topk_weights.contiguous(), num_recv_per_rank,
                                                        num_send_per_rank, "combine", async_op=async_finish,
                                                        new_call=False))

        combined_x = torch.empty(N, H, dtype=x.dtype, device=device)
        combined_w = None
        if topk_weights is not None:
            combined_w = torch.zeros(N, topk_weights.size(1), dtype=torch.float32, device=device)
        idx = handle.send_token_idx
        token_idx_by_rank = [idx[recv_off[r]:recv_off[r + 1]] for r in range(R)]

        def reduce() -> None:
            _reduce_rows(combined_x, segments, token_idx_by_rank, biases)
            if buf is not None:
                self._workspace.give(buf)
            if combined_w is not None:
                combined_w.index_add_(0, idx, recv_w)

        event = EventOverlap(tuple(w for w in works if w is not None), (reduce,))
        if not async_finish:
            event.current_stream_wait()
        return combined_x, combined_w, event

    def _node_combine(self, x, handle, topk_weights, biases, async_finish):
        """Combine along a node-aware route (see :mod:`moeflow.comm.hierarchical`)."""
        if self._node is None:
            raise ValueError(f"Buffer.combine: rank {self.rank}: the handle comes from a node-aware "
                             "dispatch but this Buffer has one node")
        combined_x, combined_w, works, reduce = self._node.combine_all(x, handle.route, handle.num_tokens,
                                                                       list(handle.num_recv_tokens_per_rank),
                                                                       topk_weights, biases)
        event = EventOverlap(tuple(w for w in works if w is not None), (reduce,))
        if not async_finish:
            event.current_stream_wait()
        return combined_x, combined_w, event


def _reduce_rows(out: torch.Tensor, segments: list[torch.Tensor], token_idx: list[torch.Tensor],
                 biases: tuple) -> None:
    """``out[t] = sum over ranks r of segments[r][i] where token_idx[r][i] == t`` (+ biases), in fp32.

    ``out`` is ``[N, H]``; ``segments[r]`` ``[S_r, H]`` of the same dtype holds the rows that came
    back from rank ``r``, whose token ids ``token_idx[r]`` ascend (the wire order). Sums in rank
    order. Works through blocks of tokens so the fp32 accumulator and the converted rows stay
    small and contiguous; a block's rows are a contiguous range inside every segment.
    """
    N, H = out.shape
    if out.dtype == torch.float32 and not biases:
        out.zero_()
        for seg, idx in zip(segments, token_idx):
            out.index_add_(0, idx, seg)
        return
    block = max(1, min(N, _ACC_BYTES // max(4 * H, 1)))
    edges = torch.arange(0, N + block, block, device=out.device).clamp_(max=N)
    # Row ranges of every token block inside every segment: one searchsorted per segment.
    parts = [(seg, idx, torch.searchsorted(idx, edges).tolist())  # host sync (CUDA): slicing bounds
             for seg, idx in zip(segments, token_idx) if idx.numel()]
    acc_buf = torch.empty(block, H, dtype=torch.float32, device=out.device)
    # A segment holds a token at most once, so a block's rows from one segment fit in `block`
    # rows; converting into this buffer instead of a fresh `.float()` saves the page faults.
    rows_buf = torch.empty(block, H, dtype=torch.float32, device=out.device)
    edges = edges.tolist()
    for b in range(len(edges) - 1):
        t0, t1 = edges[b], edges[b + 1]
        if t1 <= t0:
            continue
        acc = acc_buf[:t1 - t0]
        acc.zero_()
        for seg, idx, cut in parts:
            lo, hi = cut[b], cut[b + 1]
            if hi > lo:
                converted = rows_buf[:hi - lo]
                converted.copy_(seg[lo:hi])
                acc.index_add_(0, idx[lo:hi] - t0, converted)
        for bias in biases:
            acc.add_(bias[t0:t1])
        out[t0:t1].copy_(acc)


def _no_wait_stats(where: str, stats) -> None:
    if stats is not None:
        raise NotImplementedError(
            f"Buffer.{where}: the *_wait_recv_cost_stats tensors are not supported: DeepEP adds each "
            "source rank's wait to them, and moeflow's low-latency exchange is one collective whose wait "
            "cannot be split by source. Pass None; a slow or dead rank is named by moeflow.PeerFailureError")


def _check_worst(rank: int, num_worst_tokens) -> None:
    if isinstance(num_worst_tokens, bool) or not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
        raise ValueError(f"Buffer.dispatch: `num_worst_tokens` on rank {rank} must be a non-negative int, "
                         f"got {num_worst_tokens!r}")


def _pad_rows(t: torch.Tensor, rows: int, fill: int) -> torch.Tensor:
    """An empty ``[rows, ...]`` tensor like ``t`` whose rows past ``t``'s hold ``fill``."""
    out = torch.empty(rows, *t.shape[1:], dtype=t.dtype, device=t.device)
    out[t.size(0):].fill_(fill)
    return out


def _offsets(counts: list[int]) -> list[int]:
    """``[0, c0, c0+c1, ...]``: where each rank's rows start, and the total last."""
    out = [0]
    for c in counts:
        out.append(out[-1] + int(c))
    return out


def _noop() -> None:
    pass


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _device_of(x) -> torch.device:
    if isinstance(x, tuple) and x and isinstance(x[0], torch.Tensor):
        return x[0].device
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device("cpu")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
