"""SwiGLU experts: a dense one (shared experts) and a grouped bank (routed experts).

Shape letters:
    M  rows (the tokens one rank received)     D  hidden size
    K  top-k                                   F  intermediate size of one expert
    L  local experts (on this rank)            E  experts in the whole group (L x ranks)
    P  token-expert pairs here: the entries of ``topk_idx`` that are not ``-1``

Data flow of :meth:`GroupedExperts.forward`: :func:`permute` sorts the P pairs by local expert
and gathers their rows into one ``[P, D]`` block (each expert's rows contiguous), the grouped
SwiGLU runs one GEMM per weight over those segments (each row's hidden activations scaled by
its pair's weight before the down projection), and :func:`unpermute` sums the pairs of a row
back into ``[M, D]``. This file is the only home of that permutation logic.

Grouped GEMM: ``torch._grouped_mm`` (one kernel for every expert) where it runs natively: CUDA,
bf16, compute capability >= 9.0. Elsewhere one ``mm`` per expert segment, which
``benchmarks/bench_experts.py`` measured at 0.9-1.1x the speed of one dense matmul chain of
the same FLOPs (the ceiling) at the demo's and ``moeflow bench-layer``'s shapes on a 2-core
CPU, fp32, one thread, ahead of the padded ``bmm`` (0.7-0.9x) and level with PyTorch's own
``_grouped_mm`` CPU fallback; the padded ``bmm`` (segments scattered into ``[L, max rows,
D]``) runs when segments are short (fewer than 64 rows per expert on average, where per-call
overhead dominates), as long as padding at most doubles the rows.

Weight layout: w1, w3 ``[L, D, F]`` and w2 ``[L, F, D]``, i.e. ``x @ w`` without a transpose
(``nn.Linear`` stores ``[out, in]``). That is the ``[groups, K, N]`` operand ``_grouped_mm``
takes as is, a plain row-major matmul in the loop, and ``w[e]`` reads as "expert e's matrix".
Loading an ``nn.Linear``-style checkpoint (``[E, F, D]``) needs one ``.transpose(-2, -1)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "GroupedExperts", "PermuteInfo", "permute", "unpermute"]

# std of the normal init of every expert weight (DeepSeek-V3 / torchtitan use 0.006-0.02)
_INIT_STD = 0.02


class SwiGLU(nn.Module):
    """One dense SwiGLU, ``(silu(x @ w1) * (x @ w3)) @ w2``, for shared experts.

    w1, w3: ``[D, F]``; w2: ``[F, D]`` (one expert of :class:`GroupedExperts`' layout).
    """

    def __init__(self, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        _check_positive("SwiGLU", hidden=hidden, ffn_hidden=ffn_hidden)
        self.w1 = nn.Parameter(torch.empty(hidden, ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(ffn_hidden, hidden))
        self.w3 = nn.Parameter(torch.empty(hidden, ffn_hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., D]``."""
        return (F.silu(x @ self.w1) * (x @ self.w3)) @ self.w2


# ------------------------------------------------------------------------------ permutation
@dataclass(frozen=True)
class PermuteInfo:
    """How :func:`permute` reordered the pairs; :func:`unpermute` consumes it.

    Attributes:
        row_idx: ``[P]`` int64, the source row in ``[0, M)`` of each sorted pair.
        weights: ``[P]`` float32, each sorted pair's weight, or None (unweighted sum).
        num_tokens_per_expert: ``L`` Python ints, the length of each expert's segment.
        num_rows: M.
    """

    row_idx: torch.Tensor
    weights: Optional[torch.Tensor]
    num_tokens_per_expert: list[int]
    num_rows: int


def permute(x: torch.Tensor, topk_idx: torch.Tensor, num_local_experts: int, *,
            topk_weights: Optional[torch.Tensor] = None,
            num_tokens_per_expert: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, PermuteInfo]:
    """Sort the token-expert pairs by local expert and gather their rows.

    Args:
        x: ``[M, D]``, the rows.
        topk_idx: ``[M, K]`` int64 local expert ids in ``[0, L)``, ``-1`` = no expert here.
        num_local_experts: L.
        topk_weights: ``[M, K]`` float32 or None; entries at ``-1`` are ignored.
        num_tokens_per_expert: the ``L`` segment sizes (pairs per local expert) when the caller
            has them on the host, e.g. ``Buffer.dispatch``'s ``num_recv_tokens_per_expert_list``
            with ``expert_alignment=1``: saves a device-to-host sync. Trusted, not re-counted.

    Returns:
        ``x_sorted`` ``[P, D]`` (expert 0's rows, then expert 1's, ...; row order kept inside
        an expert) and the :class:`PermuteInfo` for :func:`unpermute`.
    """
    if x.dim() != 2:
        raise ValueError(f"permute: `x` must be [M, D], got shape {list(x.shape)}")
    M = x.size(0)
    if topk_idx.dim() != 2 or topk_idx.size(0) != M:
        raise ValueError(f"permute: `topk_idx` must be [M={M}, K], got shape {list(topk_idx.shape)}")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"permute: `topk_idx` must be int64 (or int32), got {topk_idx.dtype}")
    if topk_weights is not None and topk_weights.shape != topk_idx.shape:
        raise ValueError(f"permute: `topk_weights` must have topk_idx's shape {list(topk_idx.shape)}, "
                         f"got {list(topk_weights.shape)}")
    L, K = num_local_experts, topk_idx.size(1)
    if num_tokens_per_expert is not None and len(num_tokens_per_expert) != L:
        raise ValueError(f"permute: `num_tokens_per_expert` must hold num_local_experts={L} counts, "
                         f"got {len(num_tokens_per_expert)}")

    flat_idx = topk_idx.flatten().long()                            # [M * K]
    key = torch.where(flat_idx < 0, L, flat_idx)                    # "-1" sorts last, then is cut
    if num_tokens_per_expert is None:
        counts = torch.bincount(key, minlength=L + 1).tolist()      # host sync: the segment sizes
        if len(counts) > L + 1:
            raise ValueError(f"permute: `topk_idx` holds local expert id {len(counts) - 1} >= "
                             f"num_local_experts={L}")
        num_tokens_per_expert = counts[:L]
    num_tokens_per_expert = [int(n) for n in num_tokens_per_expert]
    P = sum(num_tokens_per_expert)
    order = torch.argsort(key, stable=True)[:P]                     # stable: row order inside an expert
    row_idx = order // K
    weights = None
    if topk_weights is not None:
        weights = topk_weights.flatten().index_select(0, order).float()
    # the one gather the grouped GEMM needs: each expert's rows contiguous
    return x.index_select(0, row_idx), PermuteInfo(row_idx, weights, num_tokens_per_expert, M)


def unpermute(y_sorted: torch.Tensor, info: PermuteInfo) -> torch.Tensor:
    """``out[m] = sum over the pairs p of row m of weight[p] * y_sorted[p]``.

    Args:
        y_sorted: ``[P, D]``, one output per sorted pair (the order :func:`permute` returned).
        info: :func:`permute`'s :class:`PermuteInfo`.

    Returns:
        ``[M, D]`` in ``y_sorted``'s dtype, accumulated in fp32 (or wider); rows without a pair are 0.
    """
    P, D = y_sorted.shape
    if P != info.row_idx.numel():
        raise ValueError(f"unpermute: `y_sorted` has {P} rows, the permutation {info.row_idx.numel()}")
    acc_dtype = torch.promote_types(y_sorted.dtype, torch.float32)   # fp32, or fp64 for fp64
    y = y_sorted.to(acc_dtype)                                       # no copy when already so
    if info.weights is not None:
        y = y * info.weights.to(acc_dtype).unsqueeze(1)
    out = y.new_zeros(info.num_rows, D).index_add_(0, info.row_idx, y)
    return out.to(y_sorted.dtype)


# ------------------------------------------------------------------------------ grouped experts
class GroupedExperts(nn.Module):
    """``num_local_experts`` SwiGLU experts stored as 3-D parameters.

    Args:
        num_local_experts: L, the experts on this rank.
        hidden: D.
        ffn_hidden: F, the intermediate size of one expert.
        expert_ids, seed: see :meth:`reset_parameters` (keyword).

    Parameters: w1, w3 ``[L, D, F]`` (gate and up projections); w2 ``[L, F, D]`` (down).
    Expert parallelism splits the E experts evenly and contiguously over R ranks: rank r holds
    global experts ``[r * L, (r + 1) * L)``; :meth:`load_shard` / :meth:`from_full` cut that
    shard out of full ``[E, ...]`` weights.
    """

    def __init__(self, num_local_experts: int, hidden: int, ffn_hidden: int, *,
                 expert_ids: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> None:
        super().__init__()
        _check_positive("GroupedExperts", num_local_experts=num_local_experts, hidden=hidden,
                        ffn_hidden=ffn_hidden)
        self.num_local_experts = num_local_experts
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden, ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, ffn_hidden, hidden))
        self.w3 = nn.Parameter(torch.empty(num_local_experts, hidden, ffn_hidden))
        self.reset_parameters(expert_ids, seed)

    @torch.no_grad()
    def reset_parameters(self, expert_ids: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> None:
        """Normal(0, 0.02) weights.

        Args:
            expert_ids: the global (logical) expert each of the L rows holds; default ``0..L-1``.
            seed: None draws from the global RNG (the L rows in one go). An int draws row l from
                a CPU generator seeded by ``(seed, expert_ids[l])`` alone: a logical expert gets
                the same weights on any rank and for any number of ranks, two rows holding one
                expert get equal weights, and distinct experts differ.
        """
        if seed is None:
            for w in (self.w1, self.w2, self.w3):
                nn.init.normal_(w, std=_INIT_STD)
            return
        L = self.num_local_experts
        ids = range(L) if expert_ids is None else [int(e) for e in expert_ids]
        if len(ids) != L:
            raise ValueError(f"GroupedExperts.reset_parameters: `expert_ids` must hold L={L} ids, got {len(ids)}")
        for row, e in enumerate(ids):
            g = torch.Generator().manual_seed((seed + 0x9E3779B97F4A7C15 * (e + 1)) % 2**63)
            for w in (self.w1, self.w2, self.w3):
                w[row].copy_(torch.empty(w.shape[1:], device="cpu").normal_(0.0, _INIT_STD, generator=g))

    @classmethod
    def from_full(cls, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, rank: int = 0,
                  num_ranks: int = 1) -> "GroupedExperts":
        """Rank ``rank``'s experts out of full weights (w1, w3 ``[E, D, F]``, w2 ``[E, F, D]``):
        a module of ``E // num_ranks`` experts, on the weights' device and in their dtype."""
        E, D, Fh = w1.shape if w1.dim() == 3 else (0, 0, 0)
        if w1.dim() != 3 or num_ranks < 1 or E % num_ranks:
            raise ValueError(f"GroupedExperts.from_full: `w1` must be [E, D, F] with E divisible by "
                             f"num_ranks={num_ranks}, got shape {list(w1.shape)}")
        module = cls(E // num_ranks, D, Fh).to(device=w1.device, dtype=w1.dtype)
        module.load_shard(w1, w2, w3, rank, num_ranks)
        return module

    @torch.no_grad()
    def load_shard(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, rank: int,
                   num_ranks: int) -> None:
        """Copy global experts ``[rank * L, (rank + 1) * L)`` of full weights into this module.

        Args:
            w1, w3: ``[E, D, F]`` with ``E = L * num_ranks``; w2: ``[E, F, D]``.
            rank: this rank's index in ``[0, num_ranks)``.
            num_ranks: the ranks the experts are split over.
        """
        L, D, Fh = self.w1.shape
        if not 0 <= rank < num_ranks:
            raise ValueError(f"GroupedExperts.load_shard: `rank` must lie in [0, num_ranks={num_ranks}), "
                             f"got {rank}")
        E = L * num_ranks
        for name, w, shape in (("w1", w1, (E, D, Fh)), ("w2", w2, (E, Fh, D)), ("w3", w3, (E, D, Fh))):
            if tuple(w.shape) != shape:
                raise ValueError(f"GroupedExperts.load_shard: `{name}` must be {list(shape)} (L={L} local "
                                 f"experts x num_ranks={num_ranks}), got {list(w.shape)}")
        shard = slice(rank * L, (rank + 1) * L)
        self.w1.copy_(w1[shard])
        self.w2.copy_(w2[shard])
        self.w3.copy_(w3[shard])

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor] = None,
                num_tokens_per_expert: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``sum_k topk_weights[m, k] * expert_{topk_idx[m, k]}(x[m])`` for every row m.

        Args:
            x: ``[M, D]``, e.g. ``Buffer.dispatch``'s ``recv_x``.
            topk_idx: ``[M, K]`` int64 local expert ids, ``-1`` = the expert lives elsewhere
                (``recv_topk_idx``).
            topk_weights: ``[M, K]`` float32 (``recv_topk_weights``), or None for weight 1.
            num_tokens_per_expert: ``L`` host ints, the pairs per local expert, when known
                (``num_recv_tokens_per_expert_list``): saves a device-to-host sync.

        Returns:
            ``[M, D]`` in ``x``'s dtype; rows with no local expert are 0.
        """
        x_sorted, info = permute(x, topk_idx, self.num_local_experts, topk_weights=topk_weights,
                                 num_tokens_per_expert=num_tokens_per_expert)
        y_sorted = self.forward_sorted(x_sorted, info.num_tokens_per_expert, info.weights)
        return unpermute(y_sorted, replace(info, weights=None))  # the weights are in y_sorted already

    def forward_sorted(self, x_sorted: torch.Tensor, num_tokens_per_expert: Sequence[int],
                       weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The experts on rows already sorted by expert: ``[P, D]`` -> ``[P, D]``.

        Args:
            x_sorted: ``[P, D]``, expert e's rows following expert e-1's.
            num_tokens_per_expert: ``L`` host ints summing to P.
            weights: ``[P]`` float32 or None: each row's output is scaled by its weight. Applied
                to the ``[P, F]`` hidden rows before the (linear) down projection: the same
                result, and a pass over F rather than D columns.
        """
        if _native_grouped_mm(x_sorted, self.w1, self.w2, self.w3):
            # a cast copy of the weights only when they are kept in another dtype (e.g. fp32 masters)
            w1, w2, w3 = (w.to(x_sorted.dtype) for w in (self.w1, self.w2, self.w3))
            # ``offs`` = end row of each expert's segment; a host-to-device copy of L ints.
            offs = torch.tensor(num_tokens_per_expert, device=x_sorted.device).cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(x_sorted, w1, offs=offs)) * torch._grouped_mm(x_sorted, w3, offs=offs)
            if weights is not None:
                h = h * weights.to(h.dtype).unsqueeze(1)
            y = torch._grouped_mm(h, w2, offs=offs)
            if y.requires_grad:
                y.register_hook(_dense)
            return y
        L, N, P = len(num_tokens_per_expert), max(num_tokens_per_expert, default=0), x_sorted.size(0)
        if P < _MIN_ROWS_PER_MM * L and L * N <= _MAX_PADDING * P:
            return self._padded_bmm(x_sorted, num_tokens_per_expert, N, weights)
        return self._loop(x_sorted, num_tokens_per_expert, weights)

    def _loop(self, x_sorted: torch.Tensor, num_tokens_per_expert: Sequence[int],
              weights: Optional[torch.Tensor]) -> torch.Tensor:
        """One matmul per expert segment and weight."""
        # Every expert runs, empty ones on [0, D] rows: the output always hangs off the weights
        # and x, so backward reaches this rank's communication even when no pair came here.
        # split / unbind: backward concatenates the pieces' gradients once, where x[a:b] and
        # w[e] would zero-fill a full-size gradient per expert.
        counts = list(num_tokens_per_expert)
        w1s, w2s, w3s = self.w1.unbind(0), self.w2.unbind(0), self.w3.unbind(0)
        ws = weights.to(x_sorted.dtype).unsqueeze(1).split(counts) if weights is not None else None
        outs = []
        for e, seg in enumerate(x_sorted.split(counts)):
            h = F.silu(seg @ w1s[e]) * (seg @ w3s[e])
            outs.append((h if ws is None else h * ws[e]) @ w2s[e])
        return torch.cat(outs)  # one copy of [P, D]; out= would not record autograd

    def _padded_bmm(self, x_sorted: torch.Tensor, num_tokens_per_expert: Sequence[int], N: int,
                    weights: Optional[torch.Tensor]) -> torch.Tensor:
        """Rows scattered into ``[L, N, D]`` (N = the largest segment), three ``bmm``, gathered
        back: two extra copies of the rows and ``L * N / P`` times the FLOPs, faster on CPU
        than one ``mm`` per expert only when segments are short (benchmarks/bench_experts.py)."""
        L, D = self.w1.size(0), x_sorted.size(1)
        counts = torch.tensor(list(num_tokens_per_expert), device=x_sorted.device)
        starts = counts.cumsum(0) - counts
        expert = torch.repeat_interleave(torch.arange(L, device=x_sorted.device), counts, output_size=x_sorted.size(0))
        slot = expert * N + torch.arange(x_sorted.size(0), device=x_sorted.device) - starts[expert]  # [P]
        x_LND = x_sorted.new_zeros(L * N, D).index_copy(0, slot, x_sorted).view(L, N, D)
        h_LNF = F.silu(torch.bmm(x_LND, self.w1)) * torch.bmm(x_LND, self.w3)
        if weights is not None:
            h_LNF = h_LNF * x_sorted.new_zeros(L * N).index_copy(0, slot, weights.to(x_sorted.dtype)).view(L, N, 1)
        return torch.bmm(h_LNF, self.w2).view(L * N, D).index_select(0, slot)


# The padded bmm runs when experts average fewer rows than this (per-call overhead dominates
# a matmul that small) and padding at most doubles the rows; otherwise one matmul per expert,
# which measured at 0.8-0.9x the speed of one dense matmul chain of the same FLOPs on this CPU
# at the demo's and the layer benchmark's shapes, where the padded bmm measured 0.6-0.8x
# (benchmarks/bench_experts.py).
_MIN_ROWS_PER_MM = 64
_MAX_PADDING = 2.0


def _dense(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with row-major strides: ``_grouped_mm``'s backward refuses others (the expanded
    gradient of ``y.sum()``, or an empty one with zero strides, which ``contiguous()`` keeps)."""
    if grad.stride() == (grad.size(1), 1):
        return grad
    return grad.clone(memory_format=torch.contiguous_format)


def _native_grouped_mm(x: torch.Tensor, *banks: torch.Tensor) -> bool:
    # torch._grouped_mm's fused kernel: CUDA, bf16, compute capability >= 9.0, and operands it
    # takes (16-byte aligned start and rows: D and F multiples of 8; a bank that is a view into
    # a flat buffer may not be): else it raises, so such shapes take the loop. The branch's
    # logic runs in CI through PyTorch's CPU fallback (tests/test_experts.py), which measured
    # slower than the padded bmm there (benchmarks/bench_experts.py).
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and all(t.data_ptr() % 16 == 0 and t.size(-1) * x.element_size() % 16 == 0 for t in (x, *banks)))


def _check_positive(owner: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: `{name}` must be a positive int, got {value!r}")
