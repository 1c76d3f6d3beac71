"""Who goes where: pure tensor math on routing decisions, no communication.

Shape letters (the package legend, docs/architecture.md): T tokens on this rank, K top-k,
E experts the ids range over (a layer's physical slots when it dispatches over replicas),
L = E / R experts per rank, R ranks in the group, N nodes.

Experts are split evenly and contiguously over ranks: expert ``e`` lives on rank ``e // L`` as
local expert ``e % L``. ``-1`` in ``topk_idx`` means "no expert" and is ignored everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["dispatch_layout", "is_token_in_rank", "is_token_in_node", "num_tokens_per_node", "slot_in_rank",
           "local_topk", "rank_in_expert", "align_up", "smallest_int_dtype", "itemsize", "wide_rows", "wide_pair"]


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count what each rank and expert receives from this rank.

    Args:
        topk_idx: ``[T, K]`` int64, expert ids in ``[-1, num_experts)``; validated by the caller.
        num_experts: E, divisible by ``num_ranks``.
        num_ranks: R.

    Returns:
        num_tokens_per_rank: ``[R]`` int32, tokens sent to each rank (a token counts once per rank
            however many of its experts live there).
        num_tokens_per_expert: ``[E]`` int32, token-expert pairs per expert.
        is_token_in_rank: ``[T, R]`` bool.
    """
    in_rank = is_token_in_rank(topk_idx, num_experts, num_ranks)
    num_tokens_per_rank = in_rank.sum(0, dtype=torch.int32)
    # ids shifted by one: -1 entries land in bin 0, dropped afterwards (one bincount, no boolean indexing)
    num_tokens_per_expert = torch.bincount((topk_idx + 1).flatten(), minlength=num_experts + 1)[1:].to(torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert, in_rank


def is_token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """``[T, R]`` bool: whether each token has an expert on each rank. No host sync.

    Args:
        topk_idx: ``[T, K]`` int (any width), ids in ``[-1, num_experts)``; ``num_experts``: E;
            ``num_ranks``: R, divides E.
    """
    T = topk_idx.size(0)
    L = num_experts // num_ranks
    # rank + 1 (floor division: -1 entries give 0): column 0 collects them and is dropped; one
    # scatter, no boolean indexing
    rank_idx = (topk_idx.long() + L) // L
    hit = torch.zeros(T, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, rank_idx, True)
    return hit[:, 1:].contiguous()


def num_tokens_per_node(is_token_in_rank: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``[N]`` int32: tokens reaching at least one rank of each node (DeepEP's
    ``num_tokens_per_rdma_rank``); rank ``r`` lives on node ``r // (R / N)``.

    Args:
        is_token_in_rank: ``[T, R]`` bool. num_nodes: N, divides R.
    """
    return is_token_in_node(is_token_in_rank, num_nodes).sum(0, dtype=torch.int32)


def is_token_in_node(is_token_in_rank: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``[T, N]`` bool: whether each token reaches a rank of each node."""
    T, R = is_token_in_rank.shape
    return is_token_in_rank.view(T, num_nodes, R // num_nodes).any(2)


def slot_in_rank(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """``[T, R]`` int32: each token's place among this rank's rows for each rank (the wire order),
    -1 where it is not sent there (DeepEP's ``send_head``, V2's ``dst_buffer_slot_idx``)."""
    return torch.where(is_token_in_rank, is_token_in_rank.cumsum(0, dtype=torch.int32) - 1, -1).to(torch.int32)


def local_topk(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, dst_rank: torch.Tensor,
               num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Translate global expert ids into the destination rank's local ids.

    Args:
        topk_idx: ``[rows, K]`` int64 global expert ids (``-1`` = none), one row per sent row.
        topk_weights: ``[rows, K]`` float32 or None.
        dst_rank: ``[rows]`` int64, the rank each row goes to.
        num_local_experts: L.

    Returns:
        local_idx: ``[rows, K]`` int64, ids in ``[0, L)`` where the expert lives on ``dst_rank``,
            else ``-1``.
        local_weights: ``[rows, K]`` float32 with 0 where ``local_idx`` is ``-1`` (None if no weights).
    """
    local = topk_idx - dst_rank.unsqueeze(1) * num_local_experts  # -1 (no expert) stays below 0
    mine = (local >= 0) & (local < num_local_experts)
    # Arithmetic and bit masks, not torch.where: a bool-mask where runs ~3x slower on CPU.
    local_idx = local.add_(1).mul_(mine).sub_(1)  # local where mine, else -1
    local_weights = None
    if topk_weights is not None:
        # all bits kept or none: exactly the weight or +0.0, NaN and Inf included
        keep = mine.to(torch.int32).neg_()
        local_weights = (topk_weights.float().view(torch.int32) & keep).view(torch.float32)
    return local_idx, local_weights


def rank_in_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each pair's 0-based position among the pairs of its expert, in the given order.

    Args:
        expert_ids: ``[T * K]`` int64 in ``[-1, num_experts)`` (e.g. a flattened ``topk_idx``: token
            order, then k order); ``-1`` pairs are numbered among themselves.
        num_experts: E.

    Returns:
        ``[T * K]`` int64. One stable sort and a count, on device: no host sync.
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


def itemsize(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def wide_rows(t: torch.Tensor) -> torch.Tensor:
    """View a row-contiguous 2-D tensor with the widest integer type its row width allows.

    Row gathers and copies then move 8 (or 4, 2) bytes per element instead of one element of a
    narrow float type: ``index_select`` on bf16 rows takes ~30x longer than on int64 rows here.
    """
    nbytes = t.size(1) * t.element_size()
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = itemsize(dtype)
        if nbytes % size == 0 and (t.stride(0) * t.element_size()) % size == 0 \
                and (t.storage_offset() * t.element_size()) % size == 0:
            return t.view(torch.uint8).view(dtype) if t.element_size() != size else t.view(dtype)
    return t.view(torch.uint8)


def wide_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` (rows of one byte width) viewed by :func:`wide_rows` as the same type
    (bytes when their alignments differ), for row gathers and copies from one into the other."""
    wa, wb = wide_rows(a), wide_rows(b)
    if wa.dtype != wb.dtype:
        wa, wb = a.view(torch.uint8), b.view(torch.uint8)
    return wa, wb
