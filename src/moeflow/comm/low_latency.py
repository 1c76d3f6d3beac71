"""Low-latency dispatch / combine (DeepEP's decode mode) on a collective transport.

Shape letters:
    N  tokens on this rank (N <= T)    T  num_max_dispatch_tokens_per_rank (same on every rank)
    H  hidden size                     K  top-k          E  experts       L  local experts (E / R)
    R  ranks in the group              P  (row, local expert) pairs received (<= R * T * K)
    W  bytes of one dispatch slot row  (payload | FP8 scales | local top-k ids | source token, signature)

Static shapes on a collective transport. DeepEP writes each token straight into its experts'
slots on the remote GPU and signals a per-expert count; a collective transport has neither
remote writes nor device-side signals. Instead every rank reserves, for every destination
rank, T slot rows (a token reaches a rank at most once): a send buffer ``[R, T, W]`` whose
size depends on (T, H, K, FP8) and never on the routing. One ``all_to_all_single`` with equal splits moves it, so no rank needs to
know what the others send: no count exchange, no host sync, the same buffer addresses every
call. Unused slots carry top-k ids of -1; every row also carries a code of the call's signature
(T, H, K, E, FP8), checked on receipt where that costs no device sync (CPU). The receiver
numbers its (row, local expert) pairs by one sort on the device and fills ``recv_x [L, R * T, H]``
by gathering, for each expert slot, the received row it holds. Each expert's slots hold its
tokens compactly: a block per source rank in rank order, each source's token order kept;
``recv_count[e]`` says how many slots are valid.

Where the host is the device (CPU), reading a count costs no sync, so the gathers and the
combine's weighted sums touch only the used pairs (~T * K of the L * R * T slots); elsewhere they
run at the static size (every slot gathered, every (row, top-k column) pair summed with weight 0
where unused), so nothing waits on the host and a CUDA graph can capture the call.

Combine: the weighted sum DeepEP forms on the source would need, per (source, rank), one row per
(token, local expert) -- up to ``min(K, L)`` times the dispatch rows at a static size. Instead combine sends
the top-k weights of the tokens (``[R, T, K]`` fp32, one small equal-split all-to-all) to the
experts' ranks, each rank sums its local experts' outputs of a token weighted in fp32 (one
fused ``embedding_bag``) and sends back one row per slot (``[R, T, H]`` in ``x.dtype``, a
second equal-split all-to-all); the source sums a token's rows over ranks in fp32 in rank order. A token with experts on one
rank is weighted and summed entirely in fp32 as in DeepEP; one spread over ranks pays one
rounding of each rank's partial sum to ``x.dtype`` (as the normal-mode combine does).

Cost in bytes against the normal mode: every rank sends ``R * T`` dispatch rows and
``R * T`` combine rows, used or not, where the normal mode sends one row per (token, rank) it
actually reaches; the static rows cost ``T / N`` (batch below capacity) times ``1 / reach``
(share of ranks a token reaches: ~0.9 for 4 ranks, top-8 of 64) more, plus the weights.
``moeflow bench-ll`` measures it.

Buffers: the send/receive buffers and the returned ``recv_x`` are kept per configuration and
alternate between two sets (as DeepEP's): a result stays valid until the second call after it;
hold at most two at a time.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import layout as _layout
from ..quant import FP8_BLOCK, pack_ue8m0, per_token_cast_to_fp8
from .compat import DeepEPTuple
from .transport import EventOverlap, FlatTransport, RowFormat

__all__ = ["LowLatencyHandle", "LowLatency", "finish_low_latency", "static_bytes"]



@dataclass(frozen=True)
class LowLatencyHandle(DeepEPTuple):
    """What :meth:`LowLatency.dispatch` returns for :meth:`LowLatency.combine`.

    The first five fields are DeepEP's handle tuple, in its order: indexing and unpacking the
    handle gives them (``src_info, layout_range, T, H, E = handle``).

    Attributes:
        src_info: ``[L, R * T]`` int32, the source token index of each expert slot (-1 unused).
        layout_range: ``[L, R]`` int64, ``(first slot << 32) | count`` of each source rank's block.
        num_max_dispatch_tokens_per_rank: T.
        hidden: H.
        num_experts: E.
        num_tokens: N, tokens this rank dispatched.
        slot_token: ``[R, T]`` int64, the token this rank sent in each slot (-1 unused).
        token_slot: ``[N, R]`` int64, the slot ``d * T + j`` token went to on rank ``d`` (``R * T`` = none).
        recv_pair_slot: ``[R * T, K]`` int64, for each received row and top-k column of its
            source, the expert slot (in the flattened ``[L * R * T]``) that holds it here
            (``L * R * T`` = the expert lives elsewhere or the row is unused).
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


def _row_format(T: int, H: int, L: int, K: int, fp8: bool) -> tuple[RowFormat, torch.dtype]:
    """A dispatch slot row: payload | FP8 scales | local top-k ids | (source token, signature)."""
    ids_dtype = _layout.smallest_int_dtype(max(L - 1, 0))
    return RowFormat((("x", H * (1 if fp8 else 2)), ("scales", 4 * (H // FP8_BLOCK) if fp8 else 0),
                      ("ids", K * torch.empty((), dtype=ids_dtype).element_size()), ("src", 8))), ids_dtype


def static_bytes(R: int, T: int, H: int, E: int, K: int, fp8: bool) -> int:
    """Bytes :class:`LowLatency` keeps on a rank for one configuration: two :class:`_Slots` sets
    and two sets of combine buffers (bf16 expert outputs), as allocated below."""
    L = E // R
    W = _row_format(T, H, L, K, fp8)[0].width
    G = H // FP8_BLOCK
    slots = (2 * R * T * W + L * R * T * (H * (1 if fp8 else 2) + (4 * G if fp8 else 0)) + 4 * L * R * T
             + (T * (H + 4 * G + 4 * H) if fp8 else 0))
    combine = 2 * R * T * K * 4 + (R * T + 1) * H * 2
    return 2 * (slots + combine)


class _Slots:
    """One set of static buffers for one configuration (kept, so addresses never change)."""

    def __init__(self, R: int, T: int, H: int, L: int, K: int, W: int, fp8: bool, ue8m0: bool,
                 device: torch.device):
        self.send = torch.zeros(R * T, W, dtype=torch.uint8, device=device)
        self.recv = torch.empty(R * T, W, dtype=torch.uint8, device=device)
        self.recv_x = torch.empty(L * R * T, H, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=device)
        # Scales column-major in the last two dims, as DeepEP returns them (TMA-friendly):
        # stored [L, G, R * T] and handed out transposed. UE8M0: four exponent bytes per int32.
        G = H // FP8_BLOCK
        self.recv_scales_t = (torch.empty(L, G // 4, R * T, dtype=torch.int32, device=device) if ue8m0 else
                              torch.empty(L, G, R * T, dtype=torch.float32, device=device)) if fp8 else None
        self.src_info = torch.empty(L, R * T, dtype=torch.int32, device=device)
        # FP8 cast of this rank's tokens, kept so that no call page-faults fresh megabytes
        self.cast = (torch.empty(T, H, dtype=torch.float8_e4m3fn, device=device),
                     torch.empty(T, H // FP8_BLOCK, dtype=torch.float32, device=device),
                     torch.empty(T, H, dtype=torch.float32, device=device)) if fp8 else None


class LowLatency:
    """Low-latency dispatch and combine over ``transport``'s group. See the module docstring."""

    def __init__(self, transport: FlatTransport):
        self.transport = transport
        # On CPU, touch only the used pairs (counts read for free); False runs the static-shape
        # path that other devices run, so the CPU tests can cover it too.
        self.trim_on_cpu = True
        self.rank, self.R = transport.rank, transport.num_ranks
        self._slots: dict[tuple, list[_Slots]] = {}
        self._turn: dict[tuple, int] = {}
        self._combine_bufs: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
        self._zero_copy: dict[tuple, torch.Tensor] = {}
        self._exchanges: dict[tuple, object] = {}

    def _trim(self, device: torch.device) -> bool:
        """Touch only the used pairs: where the host is the device, reading a count costs no sync."""
        return device.type == "cpu" and self.trim_on_cpu

    def _next(self, key: tuple, make: Callable[[], object], pool: dict) -> object:
        sets = pool.setdefault(key, [])
        turn = self._turn.get((id(pool), key), 0)
        self._turn[(id(pool), key)] = turn + 1
        if len(sets) < 2:
            sets.append(make())
        return sets[turn % 2]

    def _symm_mem(self, key: tuple, device: torch.device, T: int, W: int):
        """The symmetric-memory exchange for this configuration, or None (made once per key)."""
        if key not in self._exchanges:
            from .gpu import symm_mem_exchange  # CUDA only: the CPU path never imports it

            self._exchanges[key] = symm_mem_exchange(self.transport.group, device, T, W // 8)
        return self._exchanges[key]

    def destroy(self) -> None:
        self._slots.clear()
        self._combine_bufs.clear()
        self._zero_copy.clear()

    def combine_buffer(self, handle: "LowLatencyHandle") -> torch.Tensor:
        """``[L, R * T, H]`` bf16, kept per configuration: what :meth:`combine` reads with
        ``zero_copy=True`` instead of its ``x`` (DeepEP's ``get_next_low_latency_combine_buffer``).
        Combine reads it before it returns, so one buffer serves every call."""
        if not isinstance(handle, LowLatencyHandle):
            self._fail("get_next_low_latency_combine_buffer", "handle", "must be the handle low_latency_dispatch "
                       f"returned, got {type(handle).__name__}", TypeError)
        T, H, E = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        device = handle.src_info.device
        key = (T, H, E, str(device))
        if key not in self._zero_copy:
            self._zero_copy[key] = torch.zeros(E // self.R, self.R * T, H, dtype=torch.bfloat16, device=device)
        return self._zero_copy[key]

    # ------------------------------------------------------------------ checks
    def _fail(self, where: str, name: str, msg: str, exc=ValueError):
        raise exc(f"Buffer.{where}: `{name}` on rank {self.rank} {msg}")

    def _check_topk(self, where: str, topk_idx, N: Optional[int], E: int) -> None:
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 or topk_idx.dim() != 2:
            self._fail(where, "topk_idx", f"must be a [N, K] int64 tensor, got {_describe(topk_idx)}", TypeError)
        if N is not None and topk_idx.size(0) != N:
            self._fail(where, "topk_idx", f"must have {N} rows, got {topk_idx.size(0)}")
        if topk_idx.device.type == "cpu" and topk_idx.numel():
            # Value check on CPU only: there it costs no device sync. On CUDA it is skipped
            # (it would be a host sync, and this path must stay capturable); ids must be valid.
            lo, hi = (int(v) for v in torch.aminmax(topk_idx))
            if lo < -1 or hi >= E:
                self._fail(where, "topk_idx", f"must lie in [-1, {E}), found {lo if lo < -1 else hi}")

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                 num_experts: int, use_fp8: bool, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                 round_scale: bool = False, use_ue8m0: bool = False):
        """Returns ``(recv_x, recv_count, handle, works, receive)``: ``receive()`` completes the
        call once ``works`` are done (see :meth:`Buffer.low_latency_dispatch`)."""
        where, R, rank = "low_latency_dispatch", self.R, self.rank
        T, E = num_max_dispatch_tokens_per_rank, num_experts
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            self._fail(where, "num_max_dispatch_tokens_per_rank", f"must be a positive int, got {T!r}")
        if not isinstance(E, int) or isinstance(E, bool) or E < 1 or E % R:
            self._fail(where, "num_experts", f"must be a positive multiple of the group size {R}, got {E!r}")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
            self._fail(where, "x", f"must be a [N, H] bfloat16 tensor, got {_describe(x)}", TypeError)
        N, H = x.shape
        if N > T:
            self._fail(where, "x", f"has {N} tokens, more than num_max_dispatch_tokens_per_rank={T}")
        if use_fp8 and H % FP8_BLOCK:
            self._fail(where, "x", f"hidden size {H} must be a multiple of {FP8_BLOCK} with use_fp8=True")
        if (round_scale or use_ue8m0) and not use_fp8:
            self._fail(where, "round_scale", "and `use_ue8m0` need use_fp8=True")
        if use_ue8m0 and not round_scale:
            self._fail(where, "use_ue8m0", "needs round_scale=True (UE8M0 holds powers of two only)")
        if use_ue8m0 and H % (4 * FP8_BLOCK):
            self._fail(where, "x", f"hidden size {H} must be a multiple of {4 * FP8_BLOCK} with use_ue8m0=True")
        self._check_topk(where, topk_idx, N, E)
        K, L = topk_idx.size(1), E // R
        device = x.device
        fmt, ids_dtype = _row_format(T, H, L, K, use_fp8)
        W = fmt.width
        key = (T, H, E, K, bool(use_fp8), bool(use_ue8m0), str(device))
        slots: _Slots = self._next(key, lambda: _Slots(R, T, H, L, K, W, use_fp8, use_ue8m0, device), self._slots)

        # Send side, all on the device with static shapes. A token's slot in its block for rank
        # d is the number of earlier tokens bound for d (cumsum); unused slots point at -1.
        valid = topk_idx >= 0
        rank_of = torch.where(valid, topk_idx // L, R)
        hit = torch.zeros(N, R + 1, dtype=torch.bool, device=device)
        hit.scatter_(1, rank_of, True)
        in_rank = hit[:, :R]
        pos = torch.cumsum(in_rank, 0) - 1                                        # [N, R]
        dest = torch.arange(R, device=device) * T
        token_slot = torch.where(in_rank, dest + pos, R * T)                    # [N, R]
        slot_token = torch.full((R * T + 1,), -1, dtype=torch.int64, device=device)
        slot_token.scatter_(0, token_slot.flatten(), torch.arange(N, device=device).repeat_interleave(R))
        slot_token = slot_token[:R * T].view(R, T)
        rows = slots.send                                                         # [R*T, W]
        signature = zlib.crc32(repr((T, H, K, E, bool(use_fp8), bool(round_scale), bool(use_ue8m0))).encode()) \
            & 0x7FFFFFFF
        tok = slot_token.flatten().clamp(min=0)
        if N:
            if use_fp8:
                x_fp8, scales = per_token_cast_to_fp8(x, out=(slots.cast[0][:N], slots.cast[1][:N]),
                                                      workspace=slots.cast[2][:N], round_scale=round_scale)
                _gather_rows(fmt.view(rows, "x", torch.uint8), x_fp8.view(torch.uint8), tok)
                torch.index_select(scales, 0, tok, out=fmt.view(rows, "scales", torch.float32))
            else:
                _gather_rows(fmt.view(rows, "x", torch.uint8), x.view(torch.uint8), tok)
            # local id on the slot's rank; a -1 ("no expert") stays negative after the shift
            ids = topk_idx.index_select(0, tok) - (torch.arange(R * T, device=device) // T * L).unsqueeze(1)
            mine = (ids >= 0) & (ids < L) & (slot_token.view(-1, 1) >= 0)
            fmt.view(rows, "ids", ids_dtype).copy_(torch.where(mine, ids, -1))
        else:
            fmt.view(rows, "ids", ids_dtype).fill_(-1)
        src_sig = fmt.view(rows, "src", torch.int32)                              # [R*T, 2]
        src_sig[:, 0].copy_(slot_token.flatten())
        src_sig[:, 1].fill_(signature)

        recv_valid = None
        exchange = self._symm_mem(key, device, T, W) if device.type == "cuda" else None
        if exchange is not None:
            # CUDA with NVSHMEM symmetric memory (comm/gpu.py, not yet run on a GPU): only the
            # used slots move, their counts stay on the device. Counters get the static size.
            recv_valid = exchange.exchange(rows.view(torch.int64), in_rank.sum(0), slots.recv.view(torch.int64))
            self.transport.counters.record("dispatch", [T * W] * R, [T * W] * R)
            work = None
        else:
            # The one collective: equal splits, so the size never depends on the routing.
            work = self.transport.all_to_all_rows(slots.recv.view(R, -1), rows.view(R, -1), [1] * R, [1] * R,
                                                  "dispatch", async_op=True)

        RT, LRT = R * T, L * R * T
        recv_x = slots.recv_x.view(L, RT, H)
        recv_scales = None
        if use_fp8:  # [L, R*T, G (/ 4)], column-major; one column is both layouts: keep its stride 1
            scales_t = slots.recv_scales_t
            recv_scales = scales_t.view(L, RT, 1) if scales_t.size(1) == 1 else scales_t.transpose(1, 2)
        recv_count = torch.empty(L, dtype=torch.int32, device=device)
        layout_range = torch.empty(L, R, dtype=torch.int64, device=device)
        recv_pair_slot = torch.empty(R * T, K, dtype=torch.int64, device=device)
        handle = LowLatencyHandle(slots.src_info, layout_range, T, H, E, N, slot_token, token_slot, recv_pair_slot)
        trim = self._trim(device)

        def receive() -> None:
            rrows = slots.recv
            if device.type == "cpu" and recv_valid is None:
                # Signature check on CPU only (free there; on CUDA it would be a host sync).
                sigs = fmt.view(rrows, "src", torch.int32)[::T, 1].tolist()
                bad = [r for r, v in enumerate(sigs) if v != signature]
                if bad:
                    raise ValueError(f"Buffer.{where}: rank(s) {bad} called with other num_max_dispatch_tokens_"
                                     f"per_rank / hidden / num_topk / num_experts / use_fp8 / round_scale / "
                                     f"use_ue8m0 than rank {rank} ({T}, {H}, {K}, {E}, {bool(use_fp8)}, "
                                     f"{bool(round_scale)}, {bool(use_ue8m0)}); every rank must pass the same")
            ids = fmt.view(rrows, "ids", ids_dtype).long()                       # [R*T, K]
            if recv_valid is not None:
                ids = torch.where(recv_valid.unsqueeze(1), ids, -1)  # slots nobody filled
            # Number the pairs: sorting (expert, row, column) groups them by expert, rows in
            # order (a row holds an expert at most once), so a pair's slot is its rank in its
            # expert's run. Pairs of no local expert sort last, to "slot" L * R * T.
            RK = RT * K
            key = torch.where(ids >= 0, ids, L) * RK + torch.arange(RK, device=device).view(RT, K)
            key_sorted, order = key.view(-1).sort()
            e_sorted = key_sorted // RK                                           # [R*T*K], L = none
            counts = torch.zeros(L + 1, dtype=torch.int64, device=device).scatter_add_(
                0, e_sorted, torch.ones_like(e_sorted))
            first = torch.cumsum(counts, 0) - counts                              # [L + 1]
            slot_sorted = torch.where(e_sorted < L, e_sorted * RT + torch.arange(RK, device=device)
                                      - first[e_sorted], LRT)
            row_sorted = order // K
            recv_pair_slot.view(-1).scatter_(0, order, slot_sorted)
            recv_count.copy_(counts[:L])
            per_src = torch.zeros(L + 1, R, dtype=torch.int64, device=device)     # [L + 1, R]
            per_src.view(-1).scatter_add_(0, e_sorted * R + row_sorted // T, torch.ones_like(e_sorted))
            per_src = per_src[:L]
            layout_range.copy_(((torch.cumsum(per_src, 1) - per_src) << 32) | per_src)
            # slot -> received row (row 0 for unused slots: gathered, never read)
            slot_row = torch.zeros(LRT + 1, dtype=torch.int64, device=device).scatter_(0, slot_sorted, row_sorted)
            slot_row = slot_row[:LRT].view(L, RT)
            used = torch.arange(RT, device=device) < recv_count.view(L, 1)       # [L, R*T]
            src = fmt.view(rrows, "src", torch.int32)[:, 0]
            slots.src_info.copy_(torch.where(used, src[slot_row], -1))
            x_field = _layout.wide_rows(fmt.view(rrows, "x", torch.uint8))
            out_x = _layout.wide_rows(slots.recv_x.view(torch.uint8))
            scales_field = fmt.view(rrows, "scales", torch.float32) if use_fp8 else None

            def scales_of(row_idx: torch.Tensor) -> torch.Tensor:
                """``[n, G]`` fp32 scales of received rows (``[n, G / 4]`` UE8M0 int32), a small
                temporary: the output is column-major, so the gather cannot land in it directly."""
                picked = scales_field.index_select(0, row_idx)
                return pack_ue8m0(picked) if use_ue8m0 else picked

            if trim:
                # Host = device: gather each expert's used slots only, straight into place.
                for e, (n, at) in enumerate(zip(counts[:L].tolist(), first[:L].tolist())):
                    picked = row_sorted[at:at + n]
                    torch.index_select(x_field, 0, picked, out=out_x[e * RT:e * RT + n])
                    if use_fp8:
                        slots.recv_scales_t[e, :, :n].copy_(scales_of(picked).t())
            else:
                # static: every slot, used or not
                torch.index_select(x_field, 0, slot_row.view(-1), out=out_x)
                if use_fp8:
                    slots.recv_scales_t.copy_(scales_of(slot_row.view(-1)).view(L, RT, -1).transpose(1, 2))
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count)

        out = (recv_x, recv_scales) if use_fp8 else recv_x
        return out, recv_count, handle, [work], receive

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                handle: LowLatencyHandle, out: Optional[torch.Tensor]):
        """Returns ``(combined_x, works, receive)``: ``receive()`` completes the call once
        ``works`` are done (see :meth:`Buffer.low_latency_combine`)."""
        where, R = "low_latency_combine", self.R
        if not isinstance(handle, LowLatencyHandle):
            self._fail(where, "handle", f"must be the handle low_latency_dispatch returned, got "
                                        f"{type(handle).__name__}", TypeError)
        T, H, E, N = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts, handle.num_tokens
        L = E // R
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) \
                or tuple(x.shape) != (L, R * T, H):
            self._fail(where, "x", f"must be a [{L}, {R * T}, {H}] bf16/fp16/fp32 tensor, got {_describe(x)}",
                       TypeError if not isinstance(x, torch.Tensor) else ValueError)
        self._check_topk(where, topk_idx, N, E)
        K = topk_idx.size(1)
        if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32 \
                or tuple(topk_weights.shape) != (N, K):
            self._fail(where, "topk_weights", f"must be a [{N}, {K}] float32 tensor, got {_describe(topk_weights)}",
                       TypeError)
        if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (N, H)
                                or out.dtype != x.dtype):
            self._fail(where, "out", f"must be a [{N}, {H}] {x.dtype} tensor, got {_describe(out)}", TypeError)
        device = x.device
        LRT = L * R * T
        key = (T, H, E, K, x.dtype, str(device))
        w_send, w_recv, back = self._next(key, lambda: (
            torch.empty(R, T, K, dtype=torch.float32, device=device),
            torch.empty(R, T, K, dtype=torch.float32, device=device),
            # one zero row past the R * T received rows: the "no slot" entry of token_slot
            torch.zeros(R * T + 1, H, dtype=x.dtype, device=device)), self._combine_bufs)

        # 1. The weights of each slot's token, kept where the expert lives on that slot's rank.
        slot_token = handle.slot_token
        tok = slot_token.flatten().clamp(min=0)
        if N:
            idx_s = topk_idx.index_select(0, tok).view(R, T, K)
            on_rank = (idx_s >= 0) & (idx_s // L == torch.arange(R, device=device).view(R, 1, 1)) \
                & (slot_token >= 0).unsqueeze(2)
            w_send.copy_(torch.where(on_rank, topk_weights.index_select(0, tok).view(R, T, K), 0.0))
        else:
            w_send.zero_()
        # Collective: the weights go to the experts' ranks (they weight the sum there, see module doc).
        work_w = self.transport.all_to_all_rows(w_recv.view(R, -1), w_send.view(R, -1), [1] * R, [1] * R,
                                                "combine", async_op=True)
        if work_w is not None:
            work_w.wait()  # the weighted sums below need them

        # 2. Per received row: its local experts' outputs, weighted and summed in fp32 by one
        # fused gather-multiply-add (embedding_bag over one bag per row), rounded once to x.dtype.
        pair_slot = handle.recv_pair_slot                                         # [R*T, K]
        ok = pair_slot < LRT
        if self._trim(device):
            # Host = device: the used pairs only (row-major, so each row's pairs are one bag).
            pick = ok.view(-1).nonzero().squeeze(1)                               # [P]
            bags, w_bag = pair_slot.view(-1)[pick], w_recv.view(-1)[pick]
            per_row = ok.sum(1)
            offsets = torch.cumsum(per_row, 0) - per_row                          # [R*T]
        else:
            # Static: every (row, column) pair; an unused one reads its row's first used slot
            # (or slot 0) with weight 0 (never an unused slot, whose content may be NaN); a row
            # with no expert here is never read back by its source.
            first_used = pair_slot.gather(1, ok.to(torch.int8).argmax(1, keepdim=True))
            bags = torch.where(ok, pair_slot, torch.where(first_used < LRT, first_used, 0)).view(-1)
            w_bag = torch.where(ok, w_recv.view(R * T, K), 0.0).view(-1)
            offsets = torch.arange(R * T, device=device) * K
        if x.dtype != torch.float32:
            # embedding_bag wants weights of x's dtype: split each fp32 weight into a high and a
            # low part of that dtype so the products keep ~16 mantissa bits (2 entries per pair).
            hi = w_bag.to(x.dtype)
            w_bag = torch.stack([hi, (w_bag - hi.float()).to(x.dtype)], 1).view(-1)
            bags, offsets = bags.repeat_interleave(2), offsets * 2
        part = F.embedding_bag(bags, x.reshape(LRT, H), offsets, per_sample_weights=w_bag, mode="sum")  # [R*T, H]
        # Collective: one row per slot back to the token's rank, equal splits.
        work = self.transport.all_to_all_rows(_layout.wide_rows(back[:R * T].view(R, T * H)),
                                              _layout.wide_rows(part.view(R, T * H)),
                                              [1] * R, [1] * R, "combine", async_op=True, new_call=False)

        combined = out if out is not None else torch.empty(N, H, dtype=x.dtype, device=device)

        def receive() -> None:
            # A token's rows over ranks, in rank order, summed in fp32 and rounded once (the
            # same fused bag sum; "no slot" entries point at the zero padding row).
            combined.copy_(F.embedding_bag(handle.token_slot, back, mode="sum", padding_idx=R * T))

        return combined, [work], receive


def _gather_rows(out_u8: torch.Tensor, src_u8: torch.Tensor, idx: torch.Tensor) -> None:
    """``out[i] = src[idx[i]]`` for byte rows, moved as wide words when alignment allows."""
    out_w, src_w = _layout.wide_rows(out_u8), _layout.wide_rows(src_u8)
    if out_w.dtype != src_w.dtype:
        out_w, src_w = out_u8, src_u8
    # straight into the (row-strided) field: no temporary, no second copy
    torch.index_select(src_w, 0, idx, out=out_w)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def finish_low_latency(works: list, receive: Callable[[], None], async_finish: bool, return_recv_hook: bool):
    """``(event, hook)`` of a low-latency call whose transfer ``works`` are in flight."""
    if return_recv_hook:
        # The hook completes the receive; the event covers the send, already posted.
        pending = EventOverlap(tuple(works), (receive,))
        return EventOverlap(), pending.current_stream_wait
    event = EventOverlap(tuple(works), (receive,))
    if not async_finish:
        event.current_stream_wait()
    return event, None
