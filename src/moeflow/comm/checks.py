"""Argument checks of the Buffer's calls, normal and low-latency: one home for every message.

Every message names the call, the argument, the rank and the bad value, so that on a run with
hundreds of ranks the one log line says where to look. ``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong shape or value.

Shape letters (docs/architecture.md): T tokens on this rank, H hidden, K top-k, E experts, R ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..quant import FP8_BLOCK
from .agree import describe

__all__ = ["ArgChecker", "DispatchArgs", "FLOAT_DTYPES", "resolve_ranks_per_node"]

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.float8_e4m3fn: 4}
CODE_DTYPE = {v: k for k, v in DTYPE_CODE.items()}
SIGNATURE = ("hidden", "dtype", "num_experts", "num_topk", "has topk_idx", "has topk_weights")


@dataclass(frozen=True)
class DispatchArgs:
    """A fresh dispatch's checked input.

    Attributes:
        x: ``[T, H]`` payload (FP8 rows for an FP8 tuple), contiguous. scales: ``[T, H / 128]``
        float32 or None. num_experts: E (0 without ``topk_idx``). signature: what every rank
        must agree on, in :data:`SIGNATURE` order.
    """

    x: torch.Tensor
    scales: Optional[torch.Tensor]
    num_experts: int
    signature: tuple[int, ...]


class ArgChecker:
    """Checks for one rank of a group of ``num_ranks``; ``where`` names the Buffer call."""

    def __init__(self, rank: int, num_ranks: int):
        self.rank = rank
        self.num_ranks = num_ranks

    def fail(self, where: str, name: str, msg: str, exc: type = ValueError):
        raise exc(f"Buffer.{where}: `{name}` on rank {self.rank} {msg}")

    def x(self, where: str, x) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``x`` or the FP8 tuple -> ``(payload [T, H], scales [T, H / 128] or None)``, contiguous."""
        if isinstance(x, tuple):
            if len(x) != 2 or not all(isinstance(t, torch.Tensor) for t in x):
                raise TypeError(f"Buffer.{where}: `x` on rank {self.rank}: an FP8 tuple must be "
                                f"(float8_e4m3fn [T, H], float32 [T, H/128]), got {len(x)} items")
            x_fp8, scales = x
            self.tensor(where, "x[0]", x_fp8, torch.float8_e4m3fn, (None, None))
            T, H = x_fp8.shape
            if H % FP8_BLOCK:
                raise ValueError(f"Buffer.{where}: `x` on rank {self.rank}: FP8 hidden size {H} is not a "
                                 f"multiple of {FP8_BLOCK}")
            self.tensor(where, "x[1]", scales, torch.float32, (T, H // FP8_BLOCK))
            return x_fp8.contiguous(), scales.contiguous()
        self.tensor(where, "x", x, FLOAT_DTYPES, (None, None))
        return x.contiguous(), None

    def tensor(self, where: str, name: str, t, dtype, shape: tuple) -> None:
        if not isinstance(t, torch.Tensor):
            self.fail(where, name, f"must be a tensor, got {type(t).__name__}", TypeError)
        if dtype is not None:
            allowed = dtype if isinstance(dtype, tuple) else (dtype,)
            if t.dtype not in allowed:
                names = " or ".join(str(d).replace("torch.", "") for d in allowed)
                self.fail(where, name, f"must be {names}, got {t.dtype}", TypeError)
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            self.fail(where, name, f"must have shape {want}, got {list(t.shape)}")

    def no_wait_stats(self, where: str, stats) -> None:
        """DeepEP's ``*_wait_recv_cost_stats``: refused (``NotImplementedError``) unless None."""
        if stats is not None:
            raise NotImplementedError(
                f"Buffer.{where}: the *_wait_recv_cost_stats tensors are not supported: DeepEP adds each source "
                "rank's wait to them, and moeflow's low-latency exchange is one collective whose wait cannot be "
                "split by source. Pass None; a slow or dead rank is named by moeflow.PeerFailureError")

    def positive_int(self, where: str, name: str, value, least: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            self.fail(where, name, f"must be a {'positive' if least else 'non-negative'} int, got {value!r}")

    def num_experts(self, where: str, num_experts) -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1 \
                or num_experts % self.num_ranks:
            self.fail(where, "num_experts", f"must be a positive multiple of the group size {self.num_ranks}, "
                                            f"got {num_experts!r}")

    def topk_idx(self, where: str, topk_idx, num_tokens: Optional[int], num_experts: int,
                 values: bool = True, num_tokens_per_expert: Optional[torch.Tensor] = None,
                 distinct: bool = False) -> None:
        """Shape and dtype; with ``values`` the ids too, and with ``num_tokens_per_expert``
        (``[E]``) that it counts ``topk_idx``'s pairs per expert (one host sync for all). With
        ``distinct``, that no token lists an expert twice (low-latency mode sizes each expert's
        slots for one copy of each token)."""
        self.tensor(where, "topk_idx", topk_idx, torch.int64, (num_tokens, None))
        if not values:
            return
        stats = list(torch.aminmax(topk_idx)) if topk_idx.numel() else []
        repeated = None
        if distinct and topk_idx.numel():
            ids = topk_idx.sort(1).values
            repeated = ((ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)).any(1)
            stats.append(repeated.sum())
        if num_tokens_per_expert is not None:
            # counts from another batch would size the receive buffers and the per-expert list
            # wrongly, and nothing downstream could tell: [E] pairs per expert (shifted by one so
            # that -1 has a bin; ids out of range, reported below, clamped into the end bins)
            counted = torch.bincount((topk_idx.clamp(-1, num_experts) + 1).flatten(),
                                     minlength=num_experts + 2)[1:num_experts + 1]
            differ = counted != num_tokens_per_expert.to(counted)
            stats.append(differ.sum())
        if not stats:
            return
        # Host sync (one, for every statistic): out-of-range ids or stale counts would silently
        # corrupt the layout.
        got = torch.stack(stats).tolist()
        if topk_idx.numel():
            lo, hi = got[0], got[1]
            if lo < -1 or hi >= num_experts:
                self.fail(where, "topk_idx", f"must lie in [-1, {num_experts}), found {lo if lo < -1 else hi}")
        if repeated is not None and got[2]:
            t = int(repeated.nonzero()[0])
            self.fail(where, "topk_idx", f"lists an expert twice for token {t} ({topk_idx[t].tolist()}; {got[2]} such "
                      "tokens): each token's experts must be distinct, as torch.topk gives them")
        if num_tokens_per_expert is not None and got[-1]:
            e = int(differ.nonzero()[0])
            self.fail(where, "num_tokens_per_expert", f"does not count `topk_idx`: expert {e} has "
                      f"{int(num_tokens_per_expert[e])} pairs in it, {int(counted[e])} in topk_idx ({got[-1]} "
                      "experts differ); pass the counts get_dispatch_layout returned for this topk_idx")

    def finite(self, where: str, name: str, t: torch.Tensor) -> None:
        """Raise naming the first row of ``t`` holding NaN or Inf (``Buffer(check_finite=True)``)."""
        if t.numel() == 0:
            return
        # float8_e4m3fn has no isfinite kernel; its NaN survives the cast to fp32.
        values = t.float() if t.dtype == torch.float8_e4m3fn else t
        bad_rows = (~torch.isfinite(values)).reshape(t.size(0), -1).any(1).nonzero()
        if bad_rows.numel():  # host sync, paid only with check_finite
            row = int(bad_rows[0])
            shown = values[row].reshape(-1)
            value = shown[~torch.isfinite(shown)][0].item()
            self.fail(where, name, f"holds a non-finite value ({value}) in row {row} ({bad_rows.numel()} bad rows "
                                   f"of {t.size(0)}); check_finite=True was set on the Buffer")

    def dispatch(self, x, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, topk_idx, topk_weights,
                 expert_alignment, num_worst_tokens, check_finite: bool, check_layout: bool = True) -> DispatchArgs:
        """Everything a fresh dispatch checks on this rank before the count exchange; with
        ``check_layout``, that ``num_tokens_per_expert`` counts ``topk_idx``."""
        where = "dispatch"
        self.positive_int(where, "expert_alignment", expert_alignment)
        self.positive_int(where, "num_worst_tokens", num_worst_tokens, least=0)
        payload, scales = self.x(where, x)
        if check_finite:
            self.finite(where, "x" if scales is None else "x[0]", payload)
            if scales is not None:
                self.finite(where, "x[1]", scales)
        T, H = payload.shape
        if is_token_in_rank is None:
            self.fail(where, "is_token_in_rank", "is required for a fresh dispatch (from get_dispatch_layout), "
                                                 "or pass `handle`")
        self.tensor(where, "is_token_in_rank", is_token_in_rank, torch.bool, (T, self.num_ranks))
        if num_tokens_per_rank is not None:
            self.tensor(where, "num_tokens_per_rank", num_tokens_per_rank, None, (self.num_ranks,))
        if topk_weights is not None and topk_idx is None:
            self.fail(where, "topk_weights", "given without `topk_idx`")
        E = 0
        if topk_idx is not None and num_tokens_per_expert is None:
            self.fail(where, "num_tokens_per_expert", "is required with `topk_idx` (from get_dispatch_layout)")
        if num_tokens_per_expert is not None:  # with or without topk_idx: it gives the per-expert counts
            if not isinstance(num_tokens_per_expert, torch.Tensor) or num_tokens_per_expert.dim() != 1:
                got = num_tokens_per_expert
                self.fail(where, "num_tokens_per_expert", "must be a 1-D tensor [num_experts], got "
                          + (f"shape {list(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__),
                          TypeError)
            E = num_tokens_per_expert.numel()
            self.num_experts(where, E)
        if topk_idx is not None:
            self.topk_idx(where, topk_idx, T, E, num_tokens_per_expert=num_tokens_per_expert if check_layout else None)
            if topk_weights is not None:
                self.tensor(where, "topk_weights", topk_weights, torch.float32, tuple(topk_idx.shape))
                if check_finite:
                    self.finite(where, "topk_weights", topk_weights)
        K = topk_idx.size(1) if topk_idx is not None else 0
        dtype = torch.float8_e4m3fn if scales is not None else payload.dtype
        signature = (H, DTYPE_CODE[dtype], E, K, int(topk_idx is not None), int(topk_weights is not None))
        return DispatchArgs(payload, scales, E, signature)

    def handle(self, where: str, handle, cls: type) -> None:
        if not isinstance(handle, cls):
            self.fail(where, "handle", f"must be a {cls.__name__} returned by dispatch, got {type(handle).__name__}",
                      TypeError)

    def cached_dispatch(self, x, handle, topk_idx, topk_weights, num_worst_tokens,
                        check_finite: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A cached dispatch's ``x`` (``[T, H]`` of the handle) -> ``(payload, scales or None)``."""
        where, num_tokens, hidden = "dispatch", handle.num_tokens, handle.hidden
        if topk_idx is not None or topk_weights is not None:
            raise ValueError(f"Buffer.dispatch: rank {self.rank}: a cached dispatch (with `handle`) "
                             "takes no `topk_idx`/`topk_weights`; the handle fixes the layout")
        self.positive_int(where, "num_worst_tokens", num_worst_tokens, least=0)
        if num_worst_tokens not in (0, handle.num_worst_tokens):
            self.fail(where, "num_worst_tokens", f"is {num_worst_tokens} but the handle's dispatch used "
                      f"{handle.num_worst_tokens}; a cached dispatch returns the handle's rows (pass 0 or the same)")
        payload, scales = self.x(where, x)
        if check_finite:
            self.finite(where, "x" if scales is None else "x[0]", payload)
            if scales is not None:
                self.finite(where, "x[1]", scales)
        if tuple(payload.shape) != (num_tokens, hidden):
            self.fail(where, "x", f"has shape {tuple(payload.shape)} but the handle was made for "
                                  f"[{num_tokens}, {hidden}]")
        return payload, scales

    def combine(self, x, handle, topk_weights, bias, check_finite: bool) -> tuple:
        """A combine's arguments (``x`` ``[M', H]``, ``topk_weights`` ``[M', K]``, up to two
        ``[T, H]`` biases; ``M'`` the handle's ``num_recv_rows``, rows past M are padding and not
        read) -> the biases as a tuple."""
        where, rows, M, hidden = "combine", handle.num_recv_rows, handle.num_recv_tokens, handle.hidden
        if isinstance(x, tuple):
            self.fail(where, "x", "must be a bf16/fp16/fp32 tensor; FP8 tuples are dispatch-only", TypeError)
        self.tensor(where, "x", x, FLOAT_DTYPES, (rows, None))
        if x.size(1) != hidden:
            self.fail(where, "x", f"has hidden {x.size(1)} but the handle's dispatch had hidden {hidden}")
        if topk_weights is not None:
            self.tensor(where, "topk_weights", topk_weights, torch.float32, (rows, None))
        if check_finite:
            self.finite(where, "x", x[:M])
            if topk_weights is not None:
                self.finite(where, "topk_weights", topk_weights[:M])
        biases = () if bias is None else (bias if isinstance(bias, tuple) else (bias,))
        if len(biases) > 2:
            self.fail(where, "bias", f"takes at most 2 tensors, got {len(biases)}")
        for i, b in enumerate(biases):
            self.tensor(where, f"bias[{i}]", b, FLOAT_DTYPES, (handle.num_tokens, hidden))
        return biases

    def worst(self, num_worst_tokens: list[int], num_recv: list[int]) -> None:
        """Every rank's ``num_worst_tokens`` against the rows it receives: raise on every rank if
        one is short (DeepEP: a device assert)."""
        short = ", ".join(f"rank {r}: {w} < {m}" for r, (w, m) in enumerate(zip(num_worst_tokens, num_recv))
                          if 0 < w < m)
        if short:
            raise ValueError(f"Buffer.dispatch: `num_worst_tokens` is below the rows received ({short}); it must "
                             "be at least the rows a rank can receive (e.g. num_tokens * num_ranks)")

    def signatures(self, sigs: torch.Tensor) -> None:
        """``sigs`` ``[R, len(SIGNATURE)]``, every rank's: raise on every rank if they differ."""
        for col, name in enumerate(SIGNATURE):
            values = sigs[:, col].tolist()
            if len(set(values)) > 1:
                if name == "dtype":
                    values = [str(CODE_DTYPE.get(v, v)).replace("torch.", "") for v in values]
                raise ValueError(f"Buffer.dispatch: ranks disagree on {name} ({describe(values)}); every rank of "
                                 "the group must dispatch the same kind of tensor")


def resolve_ranks_per_node(ranks_per_node, rank: int, num_ranks: int) -> int:
    """Ranks per node from the argument, else env ``LOCAL_WORLD_SIZE`` (capped at the group
    size), else R (one node); checked to divide R."""
    if ranks_per_node is None:
        env = os.environ.get("LOCAL_WORLD_SIZE", "")
        if not env.isdigit() or int(env) < 1:
            return num_ranks
        ranks_per_node, source = min(int(env), num_ranks), "env LOCAL_WORLD_SIZE"
    else:
        source = "`ranks_per_node`"
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1 \
            or num_ranks % ranks_per_node:
        raise ValueError(f"moeflow.Buffer: {source} on rank {rank} must be a positive int dividing the "
                         f"group size {num_ranks}, got {ranks_per_node!r}")
    return ranks_per_node
