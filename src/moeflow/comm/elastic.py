"""``moeflow.ElasticBuffer``: DeepEP V2's expert-parallel entry points on moeflow's Buffer.

Shape letters (docs/architecture.md): T tokens on this rank, H hidden, K top-k, E experts,
L = E / R local experts, R ranks, M rows received here; and DeepEP V2's own:
    T_max  num_max_tokens_per_rank          P   ranks per node (V2's scale-up domain)
    M'     rows returned (M, or R * T_max)  X   expanded rows (one per (row, local expert), each
                                                expert's block aligned)

DeepEP V2 (``deep_ep.ElasticBuffer``) folds the layout into ``dispatch`` (it takes ``topk_idx``
and ``num_experts`` directly) and adds an *expanded* layout: one row per (token, local expert),
grouped by expert, each expert's block padded to ``expert_alignment``, which a grouped GEMM
reads as is. This class gives that contract on :class:`~moeflow.comm.buffer.Buffer`:

- ``dispatch`` = ``get_dispatch_layout`` + ``Buffer.dispatch`` (``do_cpu_sync=False``: the
  worst-case row count ``R * T_max``, DeepEP's shape, via ``num_worst_tokens``); with ``do_expand``
  the received rows are then gathered into the expanded layout on this rank (DeepEP writes them
  there straight from the wire; here it costs one gather of the received rows).
- ``combine`` = ``Buffer.combine``; with an expanded handle the rows of a token are first summed
  on this rank in fp32 (DeepEP's ``allow_multiple_reduction``) and their top-k weights put back
  in their top-k columns.

Rows come grouped by source rank in rank order, each source's token order kept: sorted by the
source's global token index ``rank * T_max + t``, the order DeepEP's ``deterministic=True`` sorts
into, for every call. Weights of top-k entries whose expert lives on another rank are 0 (DeepEP
V2 leaves them as sent; its own test masks them before comparing). Everything moves through the
Buffer's plan and Transport, node-aware when ``ranks_per_node`` is below the group size (every
row carries its source token either way: ``recv_src_metadata``). Engram, pipeline send/recv and
AGRS sessions have no moeflow counterpart and raise, naming the torch.distributed calls to use.
docs/deep_ep.md maps every entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from .. import layout as _layout
from .buffer import Buffer, DispatchHandle
from .checks import resolve_ranks_per_node
from .compat import DeepEPBufferMethods
from .transport import EventOverlap

__all__ = ["ElasticBuffer", "EPHandle"]


@dataclass
class EPHandle:
    """DeepEP V2's dispatch handle: pass it to ``combine`` or back to ``dispatch`` (cached).

    Attributes (DeepEP's names):
        do_expand, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms: as dispatched.
        topk_idx: ``[T, K]`` int64, the dispatched ids (a clone with ``do_handle_copy``).
        num_recv_tokens: M. num_expanded_tokens: X (expanded handles; else 0).
        num_recv_tokens_per_expert_list: per local expert, rows received rounded up to
            ``expert_alignment`` (DeepEP returns it with ``do_cpu_sync``; here always).
        psum_num_recv_tokens_per_scaleup_rank: ``[P]`` int32, inclusive prefix sum over local
            rank index ``j`` of the rows received from the ranks with that index on every node.
        psum_num_recv_tokens_per_expert: ``[L]`` int32; plain: inclusive prefix sum of the aligned
            counts; expanded: ``psum[i] = align(psum[i - 1]) + count[i]``, where expert ``i + 1``'s
            block starts at ``align(psum[i])``.
        num_unaligned_recv_tokens_per_expert: ``[L]`` int32 counts (expanded handles; else None).
        recv_src_metadata: ``[M', 2 + K]`` int32: column 0 the source's global token index
            ``src_rank * T_max + t``; column 1 ``src_rank * K + k0`` with ``k0`` the first top-k
            column whose expert is here (DeepEP's non-hybrid value); columns ``2 + k`` the
            expanded row of top-k entry ``k`` (-1: not here, or a plain handle). Rows past M: -1.
        dst_buffer_slot_idx: ``[T, R]`` int32, the place of each token among the rows sent to
            each rank (-1: not sent).
        token_metadata_at_forward, channel_linked_list: None (DeepEP's hybrid-mode bookkeeping).
        inner: moeflow's :class:`DispatchHandle` under it.
    """

    do_expand: bool
    num_experts: int
    expert_alignment: int
    num_max_tokens_per_rank: int
    num_sms: int
    topk_idx: torch.Tensor
    num_recv_tokens: int
    num_expanded_tokens: int
    num_recv_tokens_per_expert_list: list
    psum_num_recv_tokens_per_scaleup_rank: torch.Tensor
    psum_num_recv_tokens_per_expert: torch.Tensor
    num_unaligned_recv_tokens_per_expert: Optional[torch.Tensor]
    recv_src_metadata: torch.Tensor
    dst_buffer_slot_idx: torch.Tensor
    inner: DispatchHandle
    recv_topk_idx: Optional[torch.Tensor] = None  # [M', K] local ids, what a cached plain dispatch returns
    expanded_slot: Optional[torch.Tensor] = None  # [M, K] int64: expanded row of (row, k), X = not here
    token_metadata_at_forward: Optional[torch.Tensor] = None
    channel_linked_list: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class _Call:
    """A dispatch's resolved arguments (from the call, or the handle's for a cached one)."""

    topk_idx: torch.Tensor
    num_experts: int
    alignment: int
    T_max: int
    do_cpu_sync: bool
    do_expand: bool


_NO_ENGRAM = "Engram (remote KV-cache fetch over RDMA) has no moeflow counterpart"
_NO_PP = ("pipeline send/recv: use torch.distributed.pipelining (moeflow composes with it) or "
          "dist.isend/dist.irecv")
_NO_AGRS = "AGRS sessions: use dist.all_gather_into_tensor / dist.reduce_scatter_tensor"


class ElasticBuffer:
    """DeepEP V2's ``ElasticBuffer`` (expert-parallel part) on any torch.distributed backend.

    Args (DeepEP's, in its order):
        group: the expert-parallel process group.
        num_bytes, num_cpu_bytes: buffer sizes; ignored (memory is sized per call).
        num_max_tokens_per_rank: T_max, the default for ``dispatch`` (tokens a rank may dispatch;
            sets the source token numbering and the ``do_cpu_sync=False`` row count).
        hidden, num_topk, use_fp8_dispatch: sizing hints; ignored.
        deterministic: accepted; moeflow's order is always the sorted one (see the module doc).
        allow_multiple_reduction: True (default): an expanded combine sums a token's rows on each
            rank and sends the partial sums in ``x.dtype``; False: it sends them in fp32 and the
            result is rounded once (twice the combine bytes, as in DeepEP "may increase data
            transfer size").
        allow_hybrid_mode, prefer_overlap_with_compute, sl_idx, num_allocated_qps,
        num_gpu_timeout_secs: DeepEP's kernel and RDMA choices; ignored.
        num_cpu_timeout_secs: seconds a wait on a peer may take (moeflow's ``timeout_s``).
        explicitly_destroy: ignored; :meth:`destroy` may be called either way.
        ranks_per_node: (keyword, moeflow's) P, as for :class:`~moeflow.comm.buffer.Buffer`
            (default: env ``LOCAL_WORLD_SIZE``, else one node): the domain sizes, and below the
            group size the node-aware route.
    """

    def __init__(self, group: dist.ProcessGroup, num_bytes: Optional[int] = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True, sl_idx: int = 3,
                 num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100,
                 explicitly_destroy: bool = False, *, ranks_per_node: Optional[int] = None) -> None:
        R = dist.get_world_size(group)
        P = resolve_ranks_per_node(ranks_per_node, dist.get_rank(group), R)
        self._buffer = Buffer(group, ranks_per_node=P, timeout_s=num_cpu_timeout_secs)
        self.group = group
        self.rank_idx, self.num_ranks = self._buffer.rank, R
        self.num_scaleout_ranks, self.num_scaleup_ranks = R // P, P
        self.scaleout_rank_idx, self.scaleup_rank_idx = divmod(self.rank_idx, self.num_scaleup_ranks)
        self.num_rdma_ranks, self.num_nvlink_ranks = self.num_scaleout_ranks, self.num_scaleup_ranks
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_bytes = num_bytes or 0
        self.deterministic = deterministic
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.num_allocated_qps = num_allocated_qps
        self.explicitly_destroy = explicitly_destroy

    # ------------------------------------------------------------------ small entry points
    def destroy(self) -> None:
        """Free the buffers kept for reuse; the ElasticBuffer stays usable."""
        self._buffer.destroy()

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        """Bytes DeepEP would preallocate: 0 here, moeflow sizes memory per call."""
        return 0

    @staticmethod
    def capture() -> EventOverlap:
        """An already-complete event (see :meth:`Buffer.capture`)."""
        return EventOverlap()

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False, sequential: bool = True) -> None:
        """A barrier over the group, through the Buffer's Transport (watched, counted)."""
        self._buffer.transport.barrier()

    def get_comm_stream(self):
        return self._buffer.get_comm_stream()  # raises, saying what to use

    def get_physical_domain_size(self) -> tuple[int, int]:
        """``(nodes, ranks per node)``, from ``ranks_per_node`` (moeflow cannot see the links)."""
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self) -> tuple[int, int]:
        """``(nodes, ranks per node)``: rank ``r`` is local rank ``r % P`` of node ``r // P``."""
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, *args, **kwargs) -> int:
        """DeepEP's SM estimate; here the class-wide ``Buffer.num_sms`` (moeflow launches no kernels)."""
        return DeepEPBufferMethods.num_sms

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        """DeepEP's RDMA queue-pair estimate; here ``num_allocated_qps`` (no queue pairs)."""
        return self.num_allocated_qps

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 num_experts: Optional[int] = None, num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None, num_sms: int = 0, num_qps: int = 0,
                 previous_event: Optional[EventOverlap] = None,
                 previous_event_before_epilogue: Optional[EventOverlap] = None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                 handle: Optional[EPHandle] = None, do_handle_copy: bool = True,
                 do_cpu_sync: Optional[bool] = None, do_expand: bool = False, do_zero_padding: bool = False,
                 use_tma_aligned_col_major_sf: bool = False):
        """DeepEP V2's dispatch. Returns ``(recv_x, recv_topk_idx, recv_topk_weights, handle, event)``.

        Args (DeepEP's):
            x: ``[T, H]`` bf16 (fp16/fp32 too), or ``(float8_e4m3fn [T, H], float32 [T, H / 128])``.
            topk_idx: ``[T, K]`` int64, -1 = none (None with ``handle``: the handle's).
            topk_weights: ``[T, K]`` float32 or None (also allowed with ``handle``).
            cumulative_local_expert_recv_stats: ``[L]`` int32; each local expert's received
                (unaligned) count is added to it.
            num_experts, num_max_tokens_per_rank, expert_alignment: E, T_max (default: the
                constructor's), alignment (default 1); taken from ``handle`` when given.
            previous_event, previous_event_before_epilogue: waited on first.
            async_with_compute_stream, allocate_on_comm_stream, num_sms, num_qps: accepted; the
                call returns when the rows are in (the event is complete).
            handle: an :class:`EPHandle` to reuse (cached dispatch: no layout, no count exchange
                unless ``topk_weights`` is given, which makes it a fresh dispatch of the same ids).
            do_handle_copy: keep a clone of ``topk_idx`` in the handle.
            do_cpu_sync: True (default without ``handle``): M rows; False: ``R * T_max`` rows (the
                first M real, the rest zeros with ids -1), and X the worst case.
            do_expand: the expanded layout (X rows, ``recv_topk_idx`` None, weights ``[X]``).
            do_zero_padding: alignment padding rows are zeros (they always are here).
            use_tma_aligned_col_major_sf: FP8 scales returned column-major.

        Returns:
            recv_x: ``[M', H]`` (expanded ``[X, H]``), or the FP8 tuple.
            recv_topk_idx: ``[M', K]`` int64 local ids, -1 elsewhere (None when expanded).
            recv_topk_weights: ``[M', K]`` (expanded ``[X]``) float32, or None without weights.
            handle: :class:`EPHandle`. event: a complete :class:`EventOverlap`.
        """
        _wait(previous_event, previous_event_before_epilogue)
        call = self._resolve(x, handle, topk_idx, num_experts, num_max_tokens_per_rank, expert_alignment,
                             do_cpu_sync, do_expand)
        b = self._buffer
        if handle is not None and topk_weights is None:
            # Collective: the payload (and FP8 scales) along the handle's plan, no count exchange.
            recv_x, _, _, _, _, _ = b.dispatch(x, handle=handle.inner)
            # the handle's local ids again (DeepEP recomputes them; a copy, the caller may write it)
            recv_topk_idx = None if handle.recv_topk_idx is None else handle.recv_topk_idx.clone()
            recv_topk_weights = None
        else:
            per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(call.topk_idx, call.num_experts)
            # Collectives: Buffer.dispatch's count exchange, payload and metadata.
            recv_x, recv_topk_idx, recv_topk_weights, _, inner, _ = b.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=call.topk_idx, topk_weights=topk_weights,
                num_worst_tokens=0 if call.do_cpu_sync else self.num_ranks * call.T_max)
            if handle is None:
                ids = call.topk_idx.clone() if do_handle_copy else call.topk_idx
                handle = self._handle(inner, recv_topk_idx, ids, call, num_sms)
        if cumulative_local_expert_recv_stats is not None:
            counts = handle.num_unaligned_recv_tokens_per_expert if call.do_expand else torch.bincount(
                recv_topk_idx[recv_topk_idx >= 0], minlength=call.num_experts // self.num_ranks)
            cumulative_local_expert_recv_stats.add_(counts.to(cumulative_local_expert_recv_stats.dtype))
        x_rows, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        if call.do_expand:
            x_rows, scales, recv_topk_weights = self._expand(handle, x_rows, scales, recv_topk_weights)
            recv_topk_idx = None
        if scales is not None and use_tma_aligned_col_major_sf:
            scales = scales.t().contiguous().t()
        out_x = (x_rows, scales) if scales is not None else x_rows
        return out_x, recv_topk_idx, recv_topk_weights, handle, EventOverlap()

    def _resolve(self, x, handle: Optional[EPHandle], topk_idx, num_experts, T_max, alignment, do_cpu_sync,
                 do_expand) -> _Call:
        """The call's arguments checked, or a cached call's taken from ``handle``."""
        where = f"ElasticBuffer.dispatch: rank {self.rank_idx}:"
        if handle is not None:
            if not isinstance(handle, EPHandle):
                raise TypeError(f"ElasticBuffer.dispatch: `handle` on rank {self.rank_idx} must be an EPHandle, "
                                f"got {type(handle).__name__}")
            if topk_idx is not None:
                raise ValueError(f"{where} a cached dispatch takes no `topk_idx` (the handle's is used)")
            if do_cpu_sync:
                raise ValueError(f"{where} do_cpu_sync=True with a handle")
            given = (num_experts, alignment, T_max)
            fixed = (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)
            if any(g is not None and g != f for g, f in zip(given, fixed)):
                raise ValueError(f"{where} (num_experts, expert_alignment, num_max_tokens_per_rank) {given} differ "
                                 f"from the handle's {fixed}")
            call = _Call(handle.topk_idx, *fixed, handle.inner.num_worst_tokens == 0, handle.do_expand)
        else:
            if topk_idx is None or num_experts is None:
                raise ValueError(f"{where} `topk_idx` and `num_experts` are required without a handle")
            call = _Call(topk_idx, num_experts, 1 if alignment is None else alignment,
                         self.num_max_tokens_per_rank if T_max is None else T_max,
                         True if do_cpu_sync is None else do_cpu_sync, do_expand)
        T = (x[0] if isinstance(x, tuple) else x).size(0)
        if not isinstance(call.T_max, int) or call.T_max < max(T, 1):
            raise ValueError(f"ElasticBuffer.dispatch: `num_max_tokens_per_rank` on rank {self.rank_idx} must be "
                             f"at least the {T} tokens dispatched, got {call.T_max!r}")
        if not isinstance(call.alignment, int) or call.alignment < 1:
            raise ValueError(f"ElasticBuffer.dispatch: `expert_alignment` on rank {self.rank_idx} must be a "
                             f"positive int, got {call.alignment!r}")
        return call

    def _handle(self, inner: DispatchHandle, recv_topk_idx: torch.Tensor, topk_idx: torch.Tensor, call: _Call,
                num_sms: int) -> EPHandle:
        R, P, K = self.num_ranks, self.num_scaleup_ranks, topk_idx.size(1)
        L = call.num_experts // R
        M, rows = inner.num_recv_tokens, inner.num_recv_rows
        device = recv_topk_idx.device
        ids = recv_topk_idx[:M]
        here = ids >= 0                                                          # [M, K]
        counts = torch.bincount(ids[here], minlength=L).to(torch.int32)          # [L]
        aligned = [_layout.align_up(int(c), call.alignment) for c in counts.tolist()]  # host sync (CUDA): the list
        per_rank = torch.tensor(inner.num_recv_tokens_per_rank, dtype=torch.int32, device=device)
        # Source global token index and (source rank, first local top-k column) of every received row
        src_rank = torch.repeat_interleave(torch.arange(R, device=device), per_rank.long())
        meta = torch.full((rows, 2 + K), -1, dtype=torch.int32, device=device)
        meta[:M, 0] = (src_rank * call.T_max + inner.recv_src_idx[:M]).to(torch.int32)
        meta[:M, 1] = (src_rank * K + here.to(torch.int8).argmax(1)).to(torch.int32)
        fields = dict(do_expand=call.do_expand, num_experts=call.num_experts, expert_alignment=call.alignment,
                      num_max_tokens_per_rank=call.T_max, num_sms=num_sms, topk_idx=topk_idx, num_recv_tokens=M,
                      num_recv_tokens_per_expert_list=aligned,
                      psum_num_recv_tokens_per_scaleup_rank=per_rank.view(-1, P).sum(0).cumsum(0, dtype=torch.int32),
                      recv_src_metadata=meta, dst_buffer_slot_idx=_layout.slot_in_rank(inner.is_token_in_rank),
                      inner=inner, recv_topk_idx=recv_topk_idx)
        if not call.do_expand:
            psum = torch.tensor(aligned, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
            return EPHandle(num_expanded_tokens=0, psum_num_recv_tokens_per_expert=psum,
                            num_unaligned_recv_tokens_per_expert=None, **fields)
        # Expanded row of each (row, k): experts' blocks in expert order, each block's rows in
        # received order, block e starting at the aligned end of block e - 1.
        starts, at = [], 0
        for n in counts.tolist():
            starts.append(at)
            at = _layout.align_up(at + n, call.alignment)
        X = at if inner.num_worst_tokens == 0 else _layout.align_up(
            R * call.T_max * min(K, L) + (call.alignment - 1) * L, call.alignment)
        rank_in_expert = _layout.rank_in_expert(torch.where(here, ids, -1).flatten(), L).view(M, K)
        start = torch.tensor(starts + [X], dtype=torch.int64, device=device)
        expanded_slot = torch.where(here, start[ids.clamp(min=0)] + rank_in_expert, X)
        meta[:M, 2:] = torch.where(here, expanded_slot, -1).to(torch.int32)
        psum = torch.tensor([s + n for s, n in zip(starts, counts.tolist())], dtype=torch.int32, device=device)
        return EPHandle(num_expanded_tokens=X, psum_num_recv_tokens_per_expert=psum,
                        num_unaligned_recv_tokens_per_expert=counts, expanded_slot=expanded_slot, **fields)

    @staticmethod
    def _expand(handle: EPHandle, x_rows: torch.Tensor, scales: Optional[torch.Tensor],
                weights: Optional[torch.Tensor]):
        """Received rows -> the expanded layout: one gather of the rows (padding rows zero)."""
        M, X = handle.num_recv_tokens, handle.num_expanded_tokens
        slot = handle.expanded_slot                                 # [M, K], X = not here
        K = slot.size(1)
        row = torch.arange(M, device=slot.device).repeat_interleave(K)

        def scatter(src: torch.Tensor) -> torch.Tensor:
            """``out[slot[i, k]] = src[i]`` (``[X, ...]``); entries that are not here land in a
            spare last row, dropped."""
            out = torch.zeros(X + 1, *src.shape[1:], dtype=src.dtype, device=src.device)
            out[slot.flatten()] = src[row]
            return out[:X]

        out_x = scatter(x_rows[:M])
        out_scales = scatter(scales[:M]) if scales is not None else None
        out_w = None
        if weights is not None:
            out_w = torch.zeros(X + 1, dtype=weights.dtype, device=weights.device)
            out_w[slot.flatten()] = weights[:M].flatten()
            out_w = out_w[:X]
        return out_x, out_scales, out_w

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, handle: EPHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, tuple, None] = None, num_sms: int = 0, num_qps: int = 0,
                previous_event: Optional[EventOverlap] = None,
                previous_event_before_epilogue: Optional[EventOverlap] = None,
                async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP V2's combine. Returns ``(combined_x [T, H], combined_topk_weights [T, K] or None, event)``.

        Args:
            x: ``[M', H]`` rows answering the dispatch's ``recv_x`` (expanded: ``[X, H]``; a token's
                expanded rows are summed here first, in fp32, and sent in ``x.dtype``, or in fp32
                without ``allow_multiple_reduction``).
            handle: the dispatch's :class:`EPHandle`.
            topk_weights: ``[M', K]`` (expanded: ``[X]``) float32 or None; summed back into the
                top-k columns of each token.
            bias: None, one or two ``[T, H]`` tensors added to the result.
            the rest: accepted, as in :meth:`dispatch`.
        """
        _wait(previous_event, previous_event_before_epilogue)
        if not isinstance(handle, EPHandle):
            raise TypeError(f"ElasticBuffer.combine: `handle` on rank {self.rank_idx} must be an EPHandle, "
                            f"got {type(handle).__name__}")
        inner = handle.inner
        out_dtype = x.dtype
        if handle.do_expand:
            M, X, H = handle.num_recv_tokens, handle.num_expanded_tokens, x.size(-1)
            if x.dim() != 2 or x.size(0) != X:
                raise ValueError(f"ElasticBuffer.combine: `x` on rank {self.rank_idx} must be [{X}, H] (the "
                                 f"expanded rows), got {list(x.shape)}")
            slot = handle.expanded_slot                                     # [M, K], X = not here
            K = slot.size(1)
            # A token's expanded rows summed in fp32 (one fused gather-add; index X reads a zero row).
            padded = torch.cat([x.float(), x.new_zeros(1, H, dtype=torch.float32)])
            # Without multiple reductions the partial sums travel in fp32: one rounding in all.
            wire = x.dtype if self.allow_multiple_reduction else torch.float32
            rows = torch.zeros(inner.num_recv_rows, H, dtype=wire, device=x.device)
            rows[:M] = torch.nn.functional.embedding_bag(slot, padded, mode="sum").to(wire)
            weights = None
            if topk_weights is not None:
                if topk_weights.shape != (X,):
                    raise ValueError(f"ElasticBuffer.combine: `topk_weights` on rank {self.rank_idx} must be "
                                     f"[{X}] with an expanded handle, got {list(topk_weights.shape)}")
                w = torch.cat([topk_weights, topk_weights.new_zeros(1)])
                weights = torch.zeros(inner.num_recv_rows, K, dtype=topk_weights.dtype, device=x.device)
                weights[:M] = w[slot]
            x, topk_weights = rows, weights
        # Collectives: Buffer.combine's payload (and weights) back to the sources.
        combined, combined_w, _ = self._buffer.combine(x, inner, topk_weights=topk_weights, bias=bias)
        return combined.to(out_dtype), combined_w, EventOverlap()


def _wait(*events: Optional[EventOverlap]) -> None:
    for ev in events:
        if ev is not None:
            ev.current_stream_wait()


def _unsupported(name: str, why: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"ElasticBuffer.{name}: {why}")
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"Raises ``NotImplementedError``: {why}."
    return call


# DeepEP V2's non-EP entry points: each raises, naming what to use instead.
for _why, _names in ((_NO_ENGRAM, ("get_engram_storage_size_hint", "engram_write", "engram_fetch")),
                     (_NO_PP, ("get_pp_buffer_size_hint", "pp_set_config", "pp_send", "pp_recv")),
                     (_NO_AGRS, ("get_agrs_num_max_session_bytes", "get_agrs_buffer_size_hint", "create_agrs_session",
                                 "destroy_agrs_session", "agrs_new_session", "agrs_set_config",
                                 "agrs_get_inplace_tensor", "all_gather"))):
    for _name in _names:
        setattr(ElasticBuffer, _name, _unsupported(_name, _why))
