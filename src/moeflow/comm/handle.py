"""The normal-mode dispatch handle: what a dispatch learned, for ``combine`` and cached dispatch.

Frozen and typed (moeflow's code reads its named fields); indexed, unpacked or measured, it is
DeepEP V1's handle tuple (docs/deep_ep.md lists every entry).

Shape letters (docs/architecture.md): T tokens on this rank, R ranks, N nodes, M rows received
here, M' rows returned (M, or W = ``num_worst_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import layout as _layout
from .compat import DeepEPTuple
from .plan import Plan

__all__ = ["DispatchHandle"]


@dataclass(frozen=True)
class DispatchHandle(DeepEPTuple):
    """What a dispatch learned; pass it back to ``combine`` or to a cached dispatch.

    Attributes:
        num_tokens: T. hidden: H of the dispatched ``x``.
        num_send_tokens_per_rank: rows of this rank's tokens each rank receives.
        num_recv_tokens_per_rank: rows received from each rank (``recv_x`` is grouped this way).
        is_token_in_rank: ``[T, R]`` bool, as given to dispatch.
        plan: the route (:class:`~moeflow.comm.plan.Plan`): one hop, or two across nodes.
        num_send_tokens_matrix: ``[R, R]`` int32 on the host, row ``i``: rows rank ``i`` sent to
            each rank (from the count exchange).
        recv_src_idx: ``[M']`` int32, each received row's token index on its source rank (-1
            past M).
        num_worst_tokens: W, the rows the dispatch padded its outputs to (0: none, ``M' = M``).

    Indexing, unpacking and ``len()`` give DeepEP's handle tuple. One node: the intranode 6-tuple
    ``(rank_prefix_matrix [R, R], channel_prefix_matrix [R, 1], recv_channel_prefix_matrix [R, 1],
    recv_src_idx [M'], is_token_in_rank [T, R], send_head [T, R])``, all int32 but the mask, with
    one "channel" (DeepEP splits a transfer over SM channels; here there is one). Several nodes:
    the internode 10-tuple, whose last three entries (DeepEP's kernel bookkeeping) are None.
    """

    num_tokens: int
    hidden: int
    num_send_tokens_per_rank: tuple[int, ...]
    num_recv_tokens_per_rank: tuple[int, ...]
    is_token_in_rank: torch.Tensor
    plan: Plan
    num_send_tokens_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    num_worst_tokens: int = 0

    @property
    def num_recv_tokens(self) -> int:
        """M, the rows received."""
        return sum(self.num_recv_tokens_per_rank)

    @property
    def num_recv_rows(self) -> int:
        """M', the rows of ``recv_x``: W after a dispatch with ``num_worst_tokens``, else M."""
        return max(self.num_worst_tokens, self.num_recv_tokens)

    def _deep_ep_entries(self) -> tuple:
        """DeepEP's tuple (see the class docstring), built from the named fields."""
        in_rank = self.is_token_in_rank

        def ints(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=in_rank.device)

        sent = ints(self.num_send_tokens_per_rank).view(-1, 1)
        hops = self.plan.hops
        if len(hops) == 1:
            rank_prefix_matrix = self.num_send_tokens_matrix.cumsum(0, dtype=torch.int32).to(in_rank.device)
            return (rank_prefix_matrix, sent, torch.zeros_like(sent), self.recv_src_idx, in_rank,
                    _layout.slot_in_rank(in_rank))
        rail = hops[0]  # its arrivals: the rows that reach this rank at node level, one block per node
        recv_per_node, recv_per_rank = ints(rail.recv_counts), ints(self.num_recv_tokens_per_rank)
        recv_rank_prefix = recv_per_rank.cumsum(0, dtype=torch.int32)
        per_node = _layout.num_tokens_per_node(in_rank, len(rail.recv_counts))
        return (in_rank, per_node.view(-1, 1), sent, recv_per_node.view(-1, 1),
                recv_per_node.cumsum(0, dtype=torch.int32), (recv_rank_prefix - recv_per_rank).view(-1, 1),
                recv_rank_prefix, None, None, None)
