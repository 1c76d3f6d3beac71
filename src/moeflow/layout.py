"""Who goes where: pure tensor math on routing decisions, no communication.

Shape letters:
    N  tokens on this rank            K  top-k (experts chosen per token)
    E  experts in the group           L  experts per rank (E / R)
    R  ranks in the group             S  rows this rank sends (one per token-rank pair)

Experts are split evenly and contiguously over ranks: expert ``e`` lives on rank ``e // L`` as
local expert ``e % L``. ``-1`` in ``topk_idx`` means "no expert" and is ignored everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["dispatch_layout", "send_order", "local_topk", "rank_in_expert", "align_up", "smallest_int_dtype",
           "wide_rows"]


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count what each rank and expert receives from this rank.

    Args:
        topk_idx: ``[N, K]`` int64, expert ids in ``[-1, num_experts)``; validated by the caller.
        num_experts: E, divisible by ``num_ranks``.
        num_ranks: R.

    Returns:
        num_tokens_per_rank: ``[R]`` int32, tokens sent to each rank (a token counts once per rank
            however many of its experts live there).
        num_tokens_per_expert: ``[E]`` int32, token-expert pairs per expert.
        is_token_in_rank: ``[N, R]`` bool.
    """
    N = topk_idx.size(0)
    L = num_experts // num_ranks
    valid = topk_idx >= 0
    # Invalid entries go to an extra column R (resp. bin E) that is dropped afterwards, so that
    # one scatter / one bincount does the work with no boolean indexing (no host sync on CUDA).
    rank_idx = torch.where(valid, topk_idx // L, num_ranks)
    hit = torch.zeros(N, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, rank_idx, True)
    is_token_in_rank = hit[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    expert_idx = torch.where(valid, topk_idx, num_experts).flatten()
    num_tokens_per_expert = torch.bincount(expert_idx, minlength=num_experts + 1)[:num_experts].to(torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


def send_order(is_token_in_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows this rank sends, grouped by destination rank, token order kept inside a group.

    Args:
        is_token_in_rank: ``[N, R]`` bool.

    Returns:
        send_token_idx: ``[S]`` int64, the token each sent row carries.
        send_rank_idx: ``[S]`` int64, the rank each row goes to (non-decreasing).
    """
    # nonzero over the [R, N] transpose enumerates (rank, token) pairs rank-major, which is
    # exactly the wire order. Host sync on CUDA: the row count S sizes the send buffer.
    pairs = is_token_in_rank.t().nonzero()
    return pairs[:, 1].contiguous(), pairs[:, 0].contiguous()


def local_topk(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, dst_rank: torch.Tensor,
               num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Translate global expert ids into the destination rank's local ids.

    Args:
        topk_idx: ``[S, K]`` int64 global expert ids (``-1`` = none), one row per sent row.
        topk_weights: ``[S, K]`` float32 or None.
        dst_rank: ``[S]`` int64, the rank each row goes to.
        num_local_experts: L.

    Returns:
        local_idx: ``[S, K]`` int64, ids in ``[0, L)`` where the expert lives on ``dst_rank``,
            else ``-1``.
        local_weights: ``[S, K]`` float32 with 0 where ``local_idx`` is ``-1`` (None if no weights).
    """
    local = topk_idx - dst_rank.unsqueeze(1) * num_local_experts
    mine = (topk_idx >= 0) & (local >= 0) & (local < num_local_experts)
    local_idx = torch.where(mine, local, -1)
    local_weights = None
    if topk_weights is not None:
        local_weights = torch.where(mine, topk_weights, 0.0)
    return local_idx, local_weights


def rank_in_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each pair's 0-based position among the pairs of its expert, in the given order.

    Args:
        expert_ids: ``[P]`` int64 in ``[-1, num_experts)`` (e.g. a flattened ``topk_idx``: token
            order, then k order); ``-1`` pairs are numbered among themselves.
        num_experts: E.

    Returns:
        ``[P]`` int64. One stable sort and a count, on device: no host sync.
    """
    key = torch.where(expert_ids >= 0, expert_ids, num_experts)             # "-1" as its own group
    order = torch.argsort(key, stable=True)                                  # pairs grouped by expert
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key.device).scatter_add_(
        0, key, torch.ones_like(key))
    starts = counts.cumsum(0) - counts                                       # first sorted pair of each
    pos = torch.empty_like(key)
    pos[order] = torch.arange(key.numel(), device=key.device) - starts[key[order]]
    return pos


def align_up(n: int, alignment: int) -> int:
    """Round ``n`` up to a multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment


def smallest_int_dtype(max_value: int) -> torch.dtype:
    """The narrowest signed int dtype that holds ``-1 .. max_value`` (for ids on the wire)."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        if max_value <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def wide_rows(t: torch.Tensor) -> torch.Tensor:
    """View a row-contiguous 2-D tensor with the widest integer type its row width allows.

    Row gathers and copies then move 8 (or 4, 2) bytes per element instead of one element of a
    narrow float type: ``index_select`` on bf16 rows takes ~30x longer than on int64 rows here.
    """
    nbytes = t.size(1) * t.element_size()
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = torch.empty((), dtype=dtype).element_size()
        if nbytes % size == 0 and (t.stride(0) * t.element_size()) % size == 0 \
                and (t.storage_offset() * t.element_size()) % size == 0:
            return t.view(torch.uint8).view(dtype) if t.element_size() != size else t.view(dtype)
    return t.view(torch.uint8)
