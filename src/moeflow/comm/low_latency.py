"""Low-latency dispatch / combine (DeepEP's decode mode) with static slots.

docs/scale.md ("Low-latency mode") explains the design and its byte cost; in short: every rank
reserves ``T_max`` slot rows per destination rank in the one row format (payload | FP8 scales |
local top-k ids | source token and call signature), so the message never depends on the
routing: :meth:`Transport.exchange_slots` moves it with no count exchange and no host sync (the
symmetric-memory transport moves only the used slots). The receiver numbers its (row, local
expert) pairs with one sort on the device and gathers each expert's slots into
``recv_x [L, R * T_max, H]``. Combine sends the tokens' top-k weights to the experts' ranks,
which weight and sum their experts' outputs in fp32 (one ``embedding_bag``) and send one row per
slot back. On CPU (host = device) only the used pairs are touched; elsewhere every call runs at
the static size, so nothing waits on the host and a CUDA graph can capture it. Buffers alternate
between two sets per configuration: a result stays valid until the second call after it.
FP8 scales are returned column-major in their last two dims, as DeepEP returns them (optionally
rounded to powers of two and packed as UE8M0 bytes: ``round_scale``, ``use_ue8m0``).

Shape letters (docs/architecture.md): T tokens on this rank (``T <= T_max``), ``T_max`` =
``num_max_dispatch_tokens_per_rank`` (the same on every rank), H hidden, K top-k, E experts,
L = E / R local experts, R ranks.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import layout as _layout
from ..quant import FP8_BLOCK, pack_ue8m0, per_token_cast_to_fp8
from .checks import ArgChecker
from .compat import DeepEPTuple
from .plan import RowFormat
from .transport import EventOverlap, Transport

__all__ = ["LowLatencyHandle", "LowLatency", "static_bytes"]


@dataclass(frozen=True)
class LowLatencyHandle(DeepEPTuple):
    """What :meth:`LowLatency.dispatch` returns for :meth:`LowLatency.combine`.

    The first five fields are DeepEP's handle tuple, in its order: indexing and unpacking the
    handle gives them (``src_info, layout_range, T_max, H, E = handle``).

    Attributes:
        src_info: ``[L, R * T_max]`` int32, the source token index of each expert slot (-1 unused).
        layout_range: ``[L, R]`` int64, ``(first slot << 32) | count`` of each source rank's block.
        num_max_dispatch_tokens_per_rank: T_max. hidden: H. num_experts: E.
        num_tokens: T, tokens this rank dispatched.
        slot_token: ``[R, T_max]`` int64, the token this rank sent in each slot (-1 unused).
        token_slot: ``[T, R]`` int64, the slot ``d * T_max + j`` a token went to on rank ``d``
            (``R * T_max``: none).
        recv_pair_slot: ``[R * T_max, K]`` int64, for each received row and top-k column of its
            source, the expert slot (of the flattened ``[L * R * T_max]``) holding it here
            (``L * R * T_max``: the expert lives elsewhere or the row is unused).
    """

    src_info: torch.Tensor
    layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_tokens: int
    slot_token: torch.Tensor
    token_slot: torch.Tensor
    recv_pair_slot: torch.Tensor

    def _deep_ep_entries(self) -> tuple:
        return (self.src_info, self.layout_range, self.num_max_dispatch_tokens_per_rank, self.hidden,
                self.num_experts)


@dataclass(frozen=True)
class _Config:
    """One configuration of the static buffers (every rank must use the same)."""

    T_max: int
    H: int
    E: int
    K: int
    fp8: bool
    device: torch.device
    round_scale: bool = False
    ue8m0: bool = False

    def signature(self) -> int:
        key = (self.T_max, self.H, self.K, self.E, self.fp8, self.round_scale, self.ue8m0)
        return zlib.crc32(repr(key).encode()) & 0x7FFFFFFF

    def row_format(self, R: int) -> RowFormat:
        """A dispatch slot row: payload | FP8 scales | local top-k ids | (source token, signature)."""
        ids_dtype = _layout.smallest_int_dtype(max(self.E // R - 1, 0))
        return RowFormat((("x", self.H * (1 if self.fp8 else 2)),
                          ("scales", 4 * (self.H // FP8_BLOCK) if self.fp8 else 0),
                          ("ids", self.K * _layout.itemsize(ids_dtype)), ("src", 8)), ids_dtype)


class _Slots:
    """One set of static dispatch buffers for one configuration (kept: addresses never change)."""

    def __init__(self, cfg: _Config, R: int, fmt: RowFormat):
        T_max, H, L, device = cfg.T_max, cfg.H, cfg.E // R, cfg.device
        self.send = torch.zeros(R * T_max, fmt.width, dtype=torch.uint8, device=device)
        self.recv = torch.empty(R * T_max, fmt.width, dtype=torch.uint8, device=device)
        self.recv_x = torch.empty(L * R * T_max, H, dtype=torch.float8_e4m3fn if cfg.fp8 else torch.bfloat16,
                                  device=device)
        # FP8 scales stored [L, H / 128, R * T_max] and handed out transposed: column-major in their
        # last two dims, as DeepEP returns them. UE8M0: four exponent bytes per int32.
        G = H // FP8_BLOCK
        self.recv_scales_t = (torch.empty(L, G // 4, R * T_max, dtype=torch.int32, device=device) if cfg.ue8m0 else
                              torch.empty(L, G, R * T_max, dtype=torch.float32, device=device)) if cfg.fp8 else None
        self.src_info = torch.empty(L, R * T_max, dtype=torch.int32, device=device)
        # FP8 cast of this rank's tokens, kept so that no call page-faults fresh megabytes
        self.cast = (torch.empty(T_max, H, dtype=torch.float8_e4m3fn, device=device),
                     torch.empty(T_max, H // FP8_BLOCK, dtype=torch.float32, device=device),
                     torch.empty(T_max, H, dtype=torch.float32, device=device)) if cfg.fp8 else None


class LowLatency:
    """Low-latency dispatch and combine over ``transport``'s group. See the module docstring."""

    def __init__(self, transport: Transport):
        self.transport = transport
        # On CPU, touch only the used pairs (counts read for free); False runs the static-shape
        # path that other devices run, so the CPU tests can cover it too.
        self.trim_on_cpu = True
        self.rank, self.R = transport.rank, transport.num_ranks
        self._check = ArgChecker(self.rank, self.R)
        self._pools: dict[tuple, list] = {}  # configuration -> [turn, up to two buffer sets]
        self._zero_copy: dict[tuple, torch.Tensor] = {}  # configuration -> the zero-copy combine input

    def _next(self, key: tuple, make: Callable[[], object]):
        """The next of two buffer sets for ``key``, in turn (made on first use)."""
        pool = self._pools.setdefault(key, [0])
        if len(pool) < 3:
            pool.append(make())
        pool[0] += 1
        return pool[1 + (pool[0] - 1) % 2]

    def destroy(self) -> None:
        """Free every kept buffer set; the next call makes them anew."""
        self._pools.clear()
        self._zero_copy.clear()

    def combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """``[L, R * T_max, H]`` bf16, kept per configuration: what :meth:`combine` reads with
        ``zero_copy=True`` instead of its ``x`` (DeepEP's ``get_next_low_latency_combine_buffer``).
        Combine reads it before it returns, so one buffer serves every call."""
        self._check.handle("get_next_low_latency_combine_buffer", handle, LowLatencyHandle)
        T_max, H, E = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        device = handle.src_info.device
        key = (T_max, H, E, device)
        if key not in self._zero_copy:
            self._zero_copy[key] = torch.zeros(E // self.R, self.R * T_max, H, dtype=torch.bfloat16, device=device)
        return self._zero_copy[key]

    def _trim(self, device: torch.device) -> bool:
        return device.type == "cpu" and self.trim_on_cpu

    def _check_dispatch(self, x, topk_idx, T_max, E, use_fp8, round_scale, use_ue8m0, wait_stats,
                        check_finite: bool) -> _Config:
        where, c = "low_latency_dispatch", self._check
        c.no_wait_stats(where, wait_stats)
        if check_finite and isinstance(x, torch.Tensor):
            c.finite(where, "x", x)
        c.positive_int(where, "num_max_dispatch_tokens_per_rank", T_max)
        c.num_experts(where, E)
        c.tensor(where, "x", x, torch.bfloat16, (None, None))
        T, H = x.shape
        if T > T_max:
            c.fail(where, "x", f"has {T} tokens, more than num_max_dispatch_tokens_per_rank={T_max}")
        if use_fp8 and H % FP8_BLOCK:
            c.fail(where, "x", f"hidden size {H} must be a multiple of {FP8_BLOCK} with use_fp8=True")
        if (round_scale or use_ue8m0) and not use_fp8:
            c.fail(where, "round_scale" if round_scale else "use_ue8m0", "needs use_fp8=True")
        if use_ue8m0 and not round_scale:
            c.fail(where, "use_ue8m0", "needs round_scale=True (UE8M0 holds powers of two only)")
        if use_ue8m0 and H % (4 * FP8_BLOCK):
            c.fail(where, "x", f"hidden size {H} must be a multiple of {4 * FP8_BLOCK} with use_ue8m0=True")
        # Id values are checked on CPU only, where it costs no device sync; on CUDA it would be a
        # host sync and this path must stay capturable, so ids must be valid there.
        c.topk_idx(where, topk_idx, T, E, values=topk_idx.device.type == "cpu" if isinstance(topk_idx, torch.Tensor)
                   else True, distinct=True)
        return _Config(T_max, H, E, topk_idx.size(1), bool(use_fp8), x.device, bool(round_scale), bool(use_ue8m0))

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                 num_experts: int, use_fp8: bool, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                 async_finish: bool, return_recv_hook: bool, *, round_scale: bool = False, use_ue8m0: bool = False,
                 wait_stats: Optional[torch.Tensor] = None, check_finite: bool = False):
        """DeepEP's ``low_latency_dispatch``.

        Args:
            x: ``[T, H]`` bf16, ``T <= num_max_dispatch_tokens_per_rank``.
            topk_idx: ``[T, K]`` int64, ``-1`` = no expert.
            num_max_dispatch_tokens_per_rank: T_max, the same on every rank. num_experts: E.
            use_fp8: cast to FP8 per token and 128 channels before sending.
            cumulative_local_expert_recv_stats: ``[L]`` int32 or None; ``recv_count`` is added to it.
            async_finish: return while the transfer runs; ``event.current_stream_wait()`` finishes.
            return_recv_hook: return right after sending; calling ``hook()`` receives.
            round_scale: (with ``use_fp8``) round each scale up to a power of two.
            use_ue8m0: (with ``round_scale``, ``H % 512 == 0``) scales as UE8M0 exponent bytes,
                four per int32 (:func:`moeflow.quant.pack_ue8m0`).
            wait_stats: DeepEP's ``dispatch_wait_recv_cost_stats``: must be None.
            check_finite: raise on NaN/Inf in ``x`` (``Buffer(check_finite=True)``).

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` ``[L, R * T_max, H]`` bf16, or
            with ``use_fp8`` (``float8_e4m3fn [L, R * T_max, H]``, scales ``float32 [L, R * T_max,
            H / 128]`` or with ``use_ue8m0`` ``int32 [L, R * T_max, H / 512]``, column-major in
            their last two dims); expert ``e``'s first ``recv_count[e]`` slots are valid, valid until the second
            low-latency dispatch after it. ``recv_count`` ``[L]`` int32; ``handle`` a
            :class:`LowLatencyHandle`; ``hook`` a callable with ``return_recv_hook``, else None.
        """
        cfg = self._check_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale,
                                   use_ue8m0, wait_stats, check_finite)
        fmt = cfg.row_format(self.R)
        slots: _Slots = self._next(("dispatch", cfg), lambda: _Slots(cfg, self.R, fmt))
        slot_token, token_slot, in_rank = self._pack(x, topk_idx, cfg, fmt, slots)
        # The one exchange: static slots (the symmetric-memory transport moves only the used ones).
        work, recv_valid = self.transport.exchange_slots(slots.send, slots.recv, in_rank.sum(0), "dispatch")
        R, L, T_max, H, K = self.R, cfg.E // self.R, cfg.T_max, cfg.H, cfg.K
        recv_count = torch.empty(L, dtype=torch.int32, device=cfg.device)
        handle = LowLatencyHandle(slots.src_info, torch.empty(L, R, dtype=torch.int64, device=cfg.device), T_max, H,
                                  cfg.E, x.size(0), slot_token, token_slot,
                                  torch.empty(R * T_max, K, dtype=torch.int64, device=cfg.device))

        def receive() -> None:
            self._receive(cfg, fmt, slots, recv_valid, handle, recv_count)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count)

        recv_x = slots.recv_x.view(L, R * T_max, H)
        if use_fp8:  # column-major [L, R * T_max, G]; with one column both layouts agree: keep its stride 1
            scales_t = slots.recv_scales_t
            recv_x = (recv_x, scales_t.view(L, R * T_max, 1) if scales_t.size(1) == 1 else scales_t.transpose(1, 2))
        return (recv_x, recv_count, handle) + _finish([work], receive, async_finish, return_recv_hook)

    def _pack(self, x, topk_idx, cfg: _Config, fmt: RowFormat, slots: _Slots):
        """Fill the send slots on the device, static shapes: a token's slot in its block for rank
        ``d`` is the number of earlier tokens bound for ``d`` (cumsum); unused slots hold -1 ids.
        Returns ``(slot_token [R, T_max], token_slot [T, R], is_token_in_rank [T, R])``."""
        R, L, T_max, device = self.R, cfg.E // self.R, cfg.T_max, cfg.device
        T = x.size(0)
        in_rank = _layout.is_token_in_rank(topk_idx, cfg.E, R)
        pos = torch.cumsum(in_rank, 0) - 1                                          # [T, R]
        token_slot = torch.where(in_rank, torch.arange(R, device=device) * T_max + pos, R * T_max)
        slot_token = torch.full((R * T_max + 1,), -1, dtype=torch.int64, device=device)
        slot_token.scatter_(0, token_slot.flatten(), torch.arange(T, device=device).repeat_interleave(R))
        slot_token = slot_token[:R * T_max].view(R, T_max)
        rows, tok = slots.send, slot_token.flatten().clamp(min=0)
        if T:
            if cfg.fp8:
                x_fp8, scales = per_token_cast_to_fp8(x, out=(slots.cast[0][:T], slots.cast[1][:T]),
                                                      workspace=slots.cast[2][:T], round_scale=cfg.round_scale)
                _gather(fmt.view(rows, "x", torch.uint8), x_fp8.view(torch.uint8), tok)
                torch.index_select(scales, 0, tok, out=fmt.view(rows, "scales", torch.float32))
            else:
                _gather(fmt.view(rows, "x", torch.uint8), x.view(torch.uint8), tok)
            # local ids on the slot's rank; unused slots (token -1) hold none
            ids, _ = _layout.local_topk(topk_idx.index_select(0, tok), None,
                                        torch.arange(R * T_max, device=device) // T_max, L)
            fmt.view(rows, "ids", fmt.ids_dtype).copy_(ids.masked_fill_(slot_token.view(-1, 1) < 0, -1))
        else:
            fmt.view(rows, "ids", fmt.ids_dtype).fill_(-1)
        src_sig = fmt.view(rows, "src", torch.int32)                                # [R * T_max, 2]
        src_sig[:, 0].copy_(slot_token.flatten())
        src_sig[:, 1].fill_(cfg.signature())
        return slot_token, token_slot, in_rank

    def _receive(self, cfg: _Config, fmt: RowFormat, slots: _Slots, recv_valid, handle: LowLatencyHandle,
                 recv_count: torch.Tensor) -> None:
        """Number the received (row, local expert) pairs and gather each expert's slots."""
        R, L, T_max, K, device = self.R, cfg.E // self.R, cfg.T_max, cfg.K, cfg.device
        RT, LRT = R * T_max, L * R * T_max
        rows = slots.recv
        if device.type == "cpu" and recv_valid is None:
            self._check_signatures(fmt.view(rows, "src", torch.int32)[::T_max, 1].tolist(), cfg)
        ids = fmt.view(rows, "ids", fmt.ids_dtype).long()                          # [R * T_max, K]
        if recv_valid is not None:
            ids = torch.where(recv_valid.unsqueeze(1), ids, -1)  # slots nobody filled
        # Sorting (expert, row, column) groups the pairs by expert, rows in order (a row holds an
        # expert at most once), so a pair's slot is its rank in its expert's run. Pairs of no
        # local expert sort last, to "slot" L * R * T_max.
        RK = RT * K
        key = torch.where(ids >= 0, ids, L) * RK + torch.arange(RK, device=device).view(RT, K)
        key_sorted, order = key.view(-1).sort()
        e_sorted = key_sorted // RK                                                 # L = none
        counts = torch.zeros(L + 1, dtype=torch.int64, device=device).scatter_add_(
            0, e_sorted, torch.ones_like(e_sorted))
        first = torch.cumsum(counts, 0) - counts                                    # [L + 1]
        slot_sorted = torch.where(e_sorted < L, e_sorted * RT + torch.arange(RK, device=device) - first[e_sorted], LRT)
        row_sorted = order // K
        handle.recv_pair_slot.view(-1).scatter_(0, order, slot_sorted)
        recv_count.copy_(counts[:L])
        per_src = torch.zeros(L + 1, R, dtype=torch.int64, device=device)
        per_src.view(-1).scatter_add_(0, e_sorted * R + row_sorted // T_max, torch.ones_like(e_sorted))
        per_src = per_src[:L]
        handle.layout_range.copy_(((torch.cumsum(per_src, 1) - per_src) << 32) | per_src)
        # slot -> received row (row 0 for unused slots: gathered, never read)
        slot_row = torch.zeros(LRT + 1, dtype=torch.int64, device=device).scatter_(0, slot_sorted, row_sorted)
        slot_row = slot_row[:LRT].view(L, RT)
        used = torch.arange(RT, device=device) < recv_count.view(L, 1)
        slots.src_info.copy_(torch.where(used, fmt.view(rows, "src", torch.int32)[:, 0][slot_row], -1))
        x_field = _layout.wide_rows(fmt.view(rows, "x", torch.uint8))
        out_x = _layout.wide_rows(slots.recv_x.view(torch.uint8))

        def scales_of(row_idx: torch.Tensor) -> torch.Tensor:
            """``[n, H / 128]`` fp32 scales of received rows (``[n, H / 512]`` UE8M0 int32): a small
            temporary, as the output is column-major and a row gather cannot land in it."""
            picked = fmt.view(rows, "scales", torch.float32).index_select(0, row_idx)
            return pack_ue8m0(picked) if cfg.ue8m0 else picked

        if self._trim(device):
            # Host = device: gather each expert's used slots only, straight into place.
            for e, (n, at) in enumerate(zip(counts[:L].tolist(), first[:L].tolist())):
                torch.index_select(x_field, 0, row_sorted[at:at + n], out=out_x[e * RT:e * RT + n])
                if cfg.fp8:
                    slots.recv_scales_t[e, :, :n].copy_(scales_of(row_sorted[at:at + n]).t())
        else:  # static: every slot, used or not
            torch.index_select(x_field, 0, slot_row.view(-1), out=out_x)
            if cfg.fp8:
                slots.recv_scales_t.copy_(scales_of(slot_row.view(-1)).view(L, RT, -1).transpose(1, 2))

    def _check_signatures(self, sigs: list[int], cfg: _Config) -> None:
        """CPU only (free there; on CUDA a host sync): every rank called with the same configuration."""
        bad = [r for r, v in enumerate(sigs) if v != cfg.signature()]
        if bad:
            raise ValueError(f"Buffer.low_latency_dispatch: rank(s) {bad} called with other num_max_dispatch_"
                             f"tokens_per_rank / hidden / num_topk / num_experts / use_fp8 / round_scale / use_ue8m0 "
                             f"than rank {self.rank} ({cfg.T_max}, {cfg.H}, {cfg.K}, {cfg.E}, {cfg.fp8}, "
                             f"{cfg.round_scale}, {cfg.ue8m0}); every rank must pass the same")

    # ------------------------------------------------------------------ combine
    def _check_combine(self, x, topk_idx, topk_weights, handle, out, wait_stats, check_finite: bool) -> None:
        where, c = "low_latency_combine", self._check
        c.no_wait_stats(where, wait_stats)
        T_max, H, E, T = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts, handle.num_tokens
        c.tensor(where, "x", x, (torch.bfloat16, torch.float16, torch.float32), (E // self.R, self.R * T_max, H))
        c.topk_idx(where, topk_idx, T, E, values=topk_idx.device.type == "cpu" if isinstance(topk_idx, torch.Tensor)
                   else True, distinct=True)
        c.tensor(where, "topk_weights", topk_weights, torch.float32, (T, topk_idx.size(1)))
        if out is not None:
            c.tensor(where, "out", out, x.dtype, (T, H))
        if check_finite:
            c.finite(where, "x", x)

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                handle: LowLatencyHandle, out: Optional[torch.Tensor], async_finish: bool, return_recv_hook: bool, *,
                use_logfmt: bool = False, zero_copy: bool = False, wait_stats: Optional[torch.Tensor] = None,
                check_finite: bool = False):
        """DeepEP's ``low_latency_combine``.

        Args:
            x: ``[L, R * T_max, H]`` bf16 (fp16/fp32 accepted), expert outputs in ``recv_x``'s slots.
            topk_idx: ``[T, K]`` int64 and topk_weights: ``[T, K]`` float32, as dispatched.
            handle: from :meth:`dispatch`. out: ``[T, H]`` of ``x.dtype`` to write into, or None.
            use_logfmt: DeepEP's 10-bit LogFMT wire format. There is no LogFMT codec here: the rows
                travel in ``x.dtype`` (the result is the plain combine's, at least as precise as
                DeepEP's; the bytes are not reduced), with a warning.
            zero_copy: read the expert outputs from :meth:`combine_buffer` (filled by the caller)
                instead of ``x``.
            wait_stats: DeepEP's ``combine_wait_recv_cost_stats``: must be None.
            async_finish, return_recv_hook, check_finite: as in :meth:`dispatch`.

        Returns:
            ``(combined_x, event, hook)``: ``combined_x`` ``[T, H]``,
            ``sum_k topk_weights[t, k] * expert_k(t)`` (see the module docstring).
        """
        self._check.handle("low_latency_combine", handle, LowLatencyHandle)
        if use_logfmt:
            warnings.warn("Buffer.low_latency_combine: use_logfmt=True sends the rows uncompressed (moeflow has no "
                          "LogFMT codec): the result is the plain combine's, the bytes are not reduced", stacklevel=3)
        if zero_copy:
            x = self.combine_buffer(handle)
        self._check_combine(x, topk_idx, topk_weights, handle, out, wait_stats, check_finite)
        R, T_max, H, T = self.R, handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_tokens
        K, device = topk_idx.size(1), x.device
        w_send, w_recv, back = self._next(("combine", T_max, H, handle.num_experts, K, x.dtype, device),
                                          lambda: _combine_buffers(R, T_max, H, K, x.dtype, device))
        self._slot_weights(topk_idx, topk_weights, handle, w_send)
        # The weights go to the experts' ranks (they weight the sum there, see the module doc).
        work_w, _ = self.transport.exchange_slots(w_send, w_recv, None, "combine")
        if work_w is not None:
            work_w.wait()  # the weighted sums below need them
        part = self._weighted_sums(x, w_recv, handle)                                # [R * T_max, H]
        # One row per slot back to the token's rank.
        work, _ = self.transport.exchange_slots(_layout.wide_rows(part), _layout.wide_rows(back[:R * T_max]), None,
                                                "combine", new_call=False)
        combined = out if out is not None else torch.empty(T, H, dtype=x.dtype, device=device)

        def receive() -> None:
            # A token's rows over ranks, in rank order, summed in fp32 and rounded once (the same
            # fused bag sum; "no slot" entries point at the zero padding row).
            combined.copy_(F.embedding_bag(handle.token_slot, back, mode="sum", padding_idx=R * T_max))

        return (combined,) + _finish([work], receive, async_finish, return_recv_hook)

    def _slot_weights(self, topk_idx, topk_weights, handle: LowLatencyHandle, w_send: torch.Tensor) -> None:
        """``w_send [R * T_max, K]``: each slot's token's weights, kept where the expert lives on
        that slot's rank (0 elsewhere and for unused slots)."""
        R, T_max, K, L = self.R, handle.num_max_dispatch_tokens_per_rank, topk_idx.size(1), handle.num_experts // self.R
        slot_token = handle.slot_token
        if not handle.num_tokens:
            w_send.zero_()
            return
        tok = slot_token.flatten().clamp(min=0)
        idx_s = topk_idx.index_select(0, tok).view(R, T_max, K)
        on_rank = (idx_s >= 0) & (idx_s // L == torch.arange(R, device=idx_s.device).view(R, 1, 1)) \
            & (slot_token >= 0).unsqueeze(2)
        w_send.view(R, T_max, K).copy_(torch.where(on_rank, topk_weights.index_select(0, tok).view(R, T_max, K), 0.0))

    def _weighted_sums(self, x: torch.Tensor, w_recv: torch.Tensor, handle: LowLatencyHandle) -> torch.Tensor:
        """Per received row: its local experts' outputs weighted and summed in fp32 by one fused
        gather-multiply-add (``embedding_bag``, one bag per row), rounded once to ``x.dtype``."""
        L, RT, H = x.shape
        LRT, K, device = L * RT, w_recv.size(1), x.device
        pair_slot = handle.recv_pair_slot                                          # [R * T_max, K]
        ok = pair_slot < LRT
        if self._trim(device):
            # Host = device: the used pairs only (row-major, so each row's pairs are one bag).
            pick = ok.view(-1).nonzero().squeeze(1)
            bags, w_bag = pair_slot.view(-1)[pick], w_recv.view(-1)[pick]
            per_row = ok.sum(1)
            offsets = torch.cumsum(per_row, 0) - per_row
        else:
            # Static: every (row, column) pair; an unused one reads its row's first used slot (or
            # slot 0) with weight 0 (never an unused slot, whose content may be NaN); a row with no
            # expert here is never read back by its source.
            first_used = pair_slot.gather(1, ok.to(torch.int8).argmax(1, keepdim=True))
            bags = torch.where(ok, pair_slot, torch.where(first_used < LRT, first_used, 0)).view(-1)
            w_bag = torch.where(ok, w_recv, 0.0).view(-1)
            offsets = torch.arange(RT, device=device) * K
        if x.dtype != torch.float32:
            # embedding_bag wants weights of x's dtype: split each fp32 weight into a high and a
            # low part of that dtype so the products keep ~16 mantissa bits (2 entries per pair).
            hi = w_bag.to(x.dtype)
            w_bag = torch.stack([hi, (w_bag - hi.float()).to(x.dtype)], 1).view(-1)
            bags, offsets = bags.repeat_interleave(2), offsets * 2
        return F.embedding_bag(bags, x.reshape(LRT, H), offsets, per_sample_weights=w_bag, mode="sum")


def static_bytes(R: int, T_max: int, H: int, E: int, K: int, fp8: bool) -> int:
    """Bytes :class:`LowLatency` keeps on a rank for one configuration (bf16 expert outputs): its
    two sets of dispatch buffers (:class:`_Slots`) and two sets of combine buffers."""
    cfg = _Config(T_max, H, E, K, fp8, torch.device("meta"))  # sized as allocated, nothing allocated
    slots = _Slots(cfg, R, cfg.row_format(R))
    kept = [t for t in (*vars(slots).values(), *(slots.cast or ())) if isinstance(t, torch.Tensor)]
    kept += _combine_buffers(R, T_max, H, K, torch.bfloat16, cfg.device)
    return 2 * sum(t.numel() * t.element_size() for t in kept)


def _combine_buffers(R: int, T_max: int, H: int, K: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """One set of combine buffers: the slots' top-k weights out and in ``[R * T_max, K]`` float32,
    and the rows back ``[R * T_max + 1, H]`` (one zero row past them: token_slot's "no slot")."""
    return (torch.empty(R * T_max, K, dtype=torch.float32, device=device),
            torch.empty(R * T_max, K, dtype=torch.float32, device=device),
            torch.zeros(R * T_max + 1, H, dtype=dtype, device=device))


def _gather(out_u8: torch.Tensor, src_u8: torch.Tensor, idx: torch.Tensor) -> None:
    """``out[i] = src[idx[i]]`` for byte rows, as wide words, straight into the (row-strided) field."""
    out_w, src_w = _layout.wide_pair(out_u8, src_u8)
    torch.index_select(src_w, 0, idx, out=out_w)


def _finish(works: list, receive: Callable[[], None], async_finish: bool, return_recv_hook: bool) -> tuple:
    """``(event, hook)`` of a low-latency call whose transfer ``works`` are in flight."""
    if return_recv_hook:
        # The hook completes the receive; the event covers the send, already posted.
        return EventOverlap(), EventOverlap(works, (receive,)).current_stream_wait
    event = EventOverlap(works, (receive,))
    if not async_finish:
        event.current_stream_wait()
    return event, None
