"""Node-aware (hierarchical) dispatch and combine: a token crosses to another node once.

Shape letters:
    N  tokens on this rank          H  hidden size            K  top-k
    E  experts in the group         L  local experts (E / R)  R  ranks in the group
    P  ranks per node               G  nodes (R / P)
    S1 rows this rank sends to other nodes (one per token-node pair)
    Q  rows this rank receives from other nodes          M  rows this rank finally receives
    F_m rows this rank forwards inside its node that came from node m

Rank ``r`` is local rank ``r % P`` of node ``r // P``. Rank ``(n, l)``'s *rail peers* are the
ranks ``(m, l)`` with the same local index on the other nodes (DeepEP's RDMA ranks).

Dispatch (token on rank ``(n, l)``):
  phase 1, inter-node: for every other node ``m`` where the token has a destination rank, one
      row goes to the rail peer ``(m, l)`` (one all-to-all, non-zero only between rail peers),
      with a metadata row (one more all-to-all): FP8 scales, top-k weights, global top-k ids,
      and a P-byte mask of the ranks of node ``m`` the token must reach.
  phase 2, intra-node: every rank forwards its *forward set*, block by source node ``m`` (its
      own tokens bound for its own node when ``m == n``, else what phase 1 brought from
      ``(m, l)``), to the ranks of its node that the masks name: one message per (destination,
      source node), tagged with ``m``, so that it lands straight in its place in ``recv_x``,
      which therefore comes out grouped by source rank ``(m, l)`` in rank order with each
      source's token order kept, exactly as the flat dispatch lays it out. The metadata turns
      into the flat format on the way (local top-k ids of the destination, weights 0 elsewhere).
  Inter-node bytes are thus the per-node-dedup minimum: one payload row per (token, node).
  With FP8 the payload is DeepEP's FP8 token, the FP8 row *and* its fp32 scale per 128
  channels (``H + H / 32`` bytes): the scales are part of every token and count toward the
  minimum. The metadata on top is ``4 K`` bytes of weights, ``K`` (E <= 128) or ``2 K`` bytes of
  top-k ids and a ``P``-byte rank mask, each field padded to 8 bytes: 48 bytes per row for
  K = 8, P <= 8, i.e. 2.3% of an FP8 token of H = 2048 and 0.65% at H = 7168 (bf16: 1.2%,
  0.33%). ``moeflow bench --ranks-per-node P`` prints the measured figure.

Combine runs it backwards: each received row goes back to the rank that forwarded it (phase A,
intra-node); that rank sums the rows of one token over its node's ranks in fp32 and sends the
sum across nodes once, in the dtype of ``x`` (phase B); the source sums its nodes' partial sums
in fp32 in node order. A token held by one rank per node combines exactly as in the flat
transport; one held by several ranks of a node differs from the flat sum by at most the
rounding of its node's partial sum to ``x.dtype`` (as in DeepEP's internode combine).

Cost: phase 2 waits for phase 1 (a row must arrive before it is forwarded), so ``async_finish``
returns while phase 2 (dispatch) or phase B (combine) is in flight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import layout as _layout
from ..quant import FP8_BLOCK
from .transport import FlatTransport, RowFormat, unpack_topk_meta

__all__ = ["NodeRoute", "HierarchicalDispatcher", "num_tokens_per_node", "resolve_ranks_per_node"]

_TAG_PAYLOAD, _TAG_META = 0, 1  # message tag = 2 * source node + one of these


def resolve_ranks_per_node(ranks_per_node, rank: int, num_ranks: int) -> int:
    """P from the argument, else env ``LOCAL_WORLD_SIZE`` (capped at the group size), else R."""
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


def num_tokens_per_node(is_token_in_rank: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """``[G]`` int32: tokens that reach at least one rank of each node (DeepEP's ``num_tokens_per_rdma_rank``).

    Args:
        is_token_in_rank: ``[N, R]`` bool.
        ranks_per_node: P, divides R.
    """
    N, R = is_token_in_rank.shape
    return is_token_in_rank.view(N, R // ranks_per_node, ranks_per_node).any(2).sum(0, dtype=torch.int32)


@dataclass(frozen=True)
class NodeRoute:
    """The node-level path of one dispatch, kept in the handle for combine and cached dispatch.

    Attributes:
        ranks_per_node: P.
        send1_token_idx: ``[S1]`` int64, the token each phase-1 row carries, grouped by node.
        num_send1_per_node: phase-1 rows sent to each node (0 for this rank's own node).
        num_recv1_per_node: phase-1 rows received from each node's rail peer (0 for own node).
        own_token_idx: ``[F_n]`` int64, this rank's tokens bound for its own node.
        forward_idx: ``forward_idx[j][m]``: ``[c]`` int64, rows of forward block ``m`` that go
            to local rank ``j`` of this node, in order.
    """

    ranks_per_node: int
    send1_token_idx: torch.Tensor
    num_send1_per_node: tuple[int, ...]
    num_recv1_per_node: tuple[int, ...]
    own_token_idx: torch.Tensor
    forward_idx: tuple[tuple[torch.Tensor, ...], ...]


def _offsets(counts) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + int(c))
    return out


class HierarchicalDispatcher:
    """Phase-1 / phase-2 movement of rows for a Buffer whose group spans several nodes.

    Every method returns the works still in flight and callbacks to run once they are done;
    the Buffer wraps them into its event. Arguments are validated by the Buffer beforehand.
    """

    def __init__(self, transport: FlatTransport, ranks_per_node: int):
        self.transport = transport
        self.P = ranks_per_node
        self.R = transport.num_ranks
        self.G = self.R // ranks_per_node
        self.rank = transport.rank
        self.node, self.local = divmod(self.rank, ranks_per_node)

    # ------------------------------------------------------------------ planning
    def plan_send(self, is_token_in_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Phase-1 send order. Returns ``(send1_token_idx [S1], send1_node [S1], num_send1_per_rank [R])``:
        per rank the phase-1 rows it gets from this rank (non-zero for rail peers only), the
        column the Buffer's count exchange carries so that every rail peer sizes its receive."""
        N = is_token_in_rank.size(0)
        in_node = is_token_in_rank.view(N, self.G, self.P).any(2)
        in_node[:, self.node] = False
        # (node, token) pairs node-major: the phase-1 wire order. Host sync: S1 sizes the send.
        pairs = in_node.t().nonzero()
        per_node = in_node.sum(0).tolist()  # host sync: the count exchange carries these
        per_rank = [0] * self.R
        for m in range(self.G):
            per_rank[m * self.P + self.local] = per_node[m]
        return pairs[:, 1].contiguous(), pairs[:, 0].contiguous(), per_rank

    def meta1_format(self, scale_bytes: int, num_topk: int, has_weights: bool, num_experts: int) -> tuple[RowFormat, torch.dtype]:
        ids_dtype = _layout.smallest_int_dtype(max(num_experts - 1, 0))
        ids_bytes = num_topk * torch.empty((), dtype=ids_dtype).element_size()
        return RowFormat((("scales", scale_bytes), ("weights", 4 * num_topk if has_weights else 0),
                          ("ids", ids_bytes), ("mask", self.P))), ids_dtype

    # ------------------------------------------------------------------ dispatch
    def fresh_dispatch(self, x_payload: torch.Tensor, x_scales: Optional[torch.Tensor],
                       topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
                       is_token_in_rank: torch.Tensor, num_experts: int,
                       send1: tuple[torch.Tensor, torch.Tensor, list[int]], num_recv1_per_rank: list[int],
                       num_recv_per_rank: list[int], async_op: bool):
        """Move rows and metadata; returns ``(recv_x, recv_scales, recv_topk_idx, recv_topk_weights,
        route, works, finalizers)``. ``recv_topk_*`` are None without ``topk_idx``."""
        N, H = x_payload.shape
        R, P, G, n, l = self.R, self.P, self.G, self.node, self.local
        device = x_payload.device
        K = topk_idx.size(1) if topk_idx is not None else 0
        L = num_experts // R if num_experts else 0
        send1_tok, send1_node, num_send1_per_rank = send1
        num_send1_per_node = [num_send1_per_rank[m * P + l] for m in range(G)]
        num_recv1_per_node = [int(num_recv1_per_rank[m * P + l]) for m in range(G)]
        scale_bytes = x_scales.size(1) * 4 if x_scales is not None else 0
        fmt1, ids_dtype = self.meta1_format(scale_bytes, K, topk_weights is not None, num_experts)
        mask_NGP = is_token_in_rank.view(N, G, P)

        def meta1_rows(tok: torch.Tensor, mask_rows: torch.Tensor) -> torch.Tensor:
            rows = torch.empty(tok.numel(), fmt1.width, dtype=torch.uint8, device=device)
            if x_scales is not None:
                torch.index_select(x_scales, 0, tok, out=fmt1.view(rows, "scales", torch.float32))
            if K:
                fmt1.view(rows, "ids", ids_dtype).copy_(topk_idx.index_select(0, tok))
                if topk_weights is not None:
                    torch.index_select(topk_weights, 0, tok, out=fmt1.view(rows, "weights", torch.float32))
            fmt1.view(rows, "mask", torch.bool).copy_(mask_rows)
            return rows

        # Phase 1: payload and metadata rows to the rail peers of the other nodes.
        recv1_x, works1 = self._phase1(x_payload, send1_tok, num_send1_per_rank, num_recv1_per_rank, True)
        send1_meta = meta1_rows(send1_tok, mask_NGP[send1_tok, send1_node])
        recv1_meta = torch.empty(sum(num_recv1_per_node), fmt1.width, dtype=torch.uint8, device=device)
        # Collective: phase-1 metadata, same splits as the payload.
        works1.append(self.transport.all_to_all_rows(recv1_meta, send1_meta, num_recv1_per_rank,
                                                     num_send1_per_rank, "dispatch", async_op=True, new_call=False))
        # Meanwhile: this rank's own-node forward block.
        own_tok = mask_NGP[:, n].any(1).nonzero().flatten()  # host sync (CUDA): sizes the block
        own_meta = meta1_rows(own_tok, mask_NGP[own_tok, n])
        for w in works1:
            if w is not None:
                w.wait()  # phase 2 forwards what phase 1 brought: it must have arrived
        recv1_off = _offsets(num_recv1_per_node)
        block_meta = [own_meta if m == n else recv1_meta[recv1_off[m]:recv1_off[m + 1]] for m in range(G)]
        # forward_idx[j][m]: rows of block m that local rank j needs. Host sync: message sizes.
        forward_idx = tuple(tuple(fmt1.view(block_meta[m], "mask", torch.bool)[:, j].nonzero().flatten()
                                  for m in range(G)) for j in range(P))
        route = NodeRoute(P, send1_tok, tuple(num_send1_per_node), tuple(num_recv1_per_node), own_tok, forward_idx)

        # Phase 2: payload, forwarded block by block straight into recv_x.
        recv_off = _offsets(num_recv_per_rank)
        M = recv_off[-1]
        recv_x = torch.empty(M, H, dtype=x_payload.dtype, device=device)
        x_w = _layout.wide_rows(x_payload)
        recv1_w = _layout.wide_rows(recv1_x)

        def payload_segment(j: int, m: int) -> torch.Tensor:
            idx = forward_idx[j][m]
            if m == n:
                return x_w.index_select(0, own_tok.index_select(0, idx))
            return recv1_w[recv1_off[m]:recv1_off[m + 1]].index_select(0, idx)

        works = self._phase2(route, payload_segment, _layout.wide_rows(recv_x), recv_off, _TAG_PAYLOAD, True)

        # Phase 2: metadata in the flat format (scales | local weights | local ids).
        local_ids_dtype = _layout.smallest_int_dtype(max(L - 1, 0))
        fmt2 = RowFormat((("scales", scale_bytes), ("weights", 4 * K if topk_weights is not None else 0),
                          ("ids", K * torch.empty((), dtype=local_ids_dtype).element_size())))
        recv_meta = None
        if fmt2.width:
            def meta_segment(j: int, m: int) -> torch.Tensor:
                src = block_meta[m].index_select(0, forward_idx[j][m])
                out = torch.empty(src.size(0), fmt2.width, dtype=torch.uint8, device=device)
                if x_scales is not None:
                    fmt2.view(out, "scales", torch.float32).copy_(fmt1.view(src, "scales", torch.float32))
                if K:
                    ids = fmt1.view(src, "ids", ids_dtype).long()
                    w = fmt1.view(src, "weights", torch.float32) if topk_weights is not None else None
                    dst = torch.full((src.size(0),), n * P + j, dtype=torch.int64, device=device)
                    local_idx, local_w = _layout.local_topk(ids, w, dst, L)
                    fmt2.view(out, "ids", local_ids_dtype).copy_(local_idx)
                    if local_w is not None:
                        fmt2.view(out, "weights", torch.float32).copy_(local_w)
                return out

            recv_meta = torch.empty(M, fmt2.width, dtype=torch.uint8, device=device)
            works += self._phase2(route, meta_segment, recv_meta, recv_off, _TAG_META, False)

        recv_scales = torch.empty(M, H // FP8_BLOCK, dtype=torch.float32, device=device) \
            if x_scales is not None else None
        recv_topk_idx = torch.empty(M, K, dtype=torch.int64, device=device) if num_experts else None
        recv_topk_weights = torch.zeros(M, K, dtype=torch.float32, device=device) if num_experts else None

        def unpack() -> None:
            unpack_topk_meta(fmt2, recv_meta, recv_scales, recv_topk_idx, recv_topk_weights, local_ids_dtype,
                             topk_weights is not None)

        return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, route, works, (unpack,)

    def cached_dispatch(self, src: torch.Tensor, route: NodeRoute, num_recv_per_rank: list[int],
                        new_call: bool) -> tuple[torch.Tensor, list]:
        """Rows ``src [N, W]`` along a known route. Returns ``(recv [M, W], works)``."""
        n = self.node
        num_send1_per_rank, num_recv1_per_rank = self._rail_splits(route)
        recv1, works1 = self._phase1(src, route.send1_token_idx, num_send1_per_rank, num_recv1_per_rank, new_call)
        for w in works1:
            if w is not None:
                w.wait()  # phase 2 forwards what phase 1 brought: it must have arrived
        recv_off = _offsets(num_recv_per_rank)
        recv1_off = _offsets(route.num_recv1_per_node)
        src_w, recv1_w = _layout.wide_rows(src), _layout.wide_rows(recv1)
        recv = torch.empty(recv_off[-1], src.size(1), dtype=src.dtype, device=src.device)

        def segment(j: int, m: int) -> torch.Tensor:
            idx = route.forward_idx[j][m]
            if m == n:
                return src_w.index_select(0, route.own_token_idx.index_select(0, idx))
            return recv1_w[recv1_off[m]:recv1_off[m + 1]].index_select(0, idx)

        works = self._phase2(route, segment, _layout.wide_rows(recv), recv_off, _TAG_PAYLOAD, False)
        return recv, works

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, route: NodeRoute, num_tokens: int, num_recv_per_rank: list[int],
                wire_dtype: torch.dtype, new_call: bool) -> tuple[torch.Tensor, list, Callable[[], None]]:
        """Rows ``x [M, W]`` back to their sources, summed per token in fp32.

        Returns ``(acc [N, W] fp32, works, finish)``: ``acc`` holds the sum once the works are
        done and ``finish()`` has run.
        """
        P, G, n, l = self.P, self.G, self.node, self.local
        device = x.device
        W = x.size(1)
        recv_off = _offsets(num_recv_per_rank)
        # Phase A: each row back to the rank of this node that forwarded it (source (m, l') ->
        # forwarder (n, l')), tagged with the source node; received per (local rank j, node m).
        back = [[torch.empty(route.forward_idx[j][m].numel(), W, dtype=x.dtype, device=device)
                 for m in range(G)] for j in range(P)]
        sends, recvs = [], []
        for m in range(G):
            for lp in range(P):
                src = m * P + lp
                rows = x[recv_off[src]:recv_off[src + 1]]
                if lp == l:
                    back[l][m] = rows  # forwarded by this rank itself: read in place
                else:
                    sends.append((n * P + lp, 2 * m + _TAG_PAYLOAD, rows))
            for j in range(P):
                if j != l:
                    recvs.append((n * P + j, 2 * m + _TAG_PAYLOAD, back[j][m]))
        works_a = self.transport.exchange_segments(sends, recvs, "combine", new_call)
        for w in works_a:
            w.wait()  # phase B sends the node's sums: every row of the node must be in
        # Node partial sums per forward block, local ranks in order, in fp32.
        partial = []
        for m in range(G):
            F_m = route.own_token_idx.numel() if m == n else route.num_recv1_per_node[m]
            acc = torch.zeros(F_m, W, dtype=torch.float32, device=device)
            for j in range(P):
                if back[j][m].numel():
                    acc.index_add_(0, route.forward_idx[j][m], back[j][m].to(torch.float32))
            partial.append(acc)
        # Phase B: other nodes' sums back across, once per (token, node), in the wire dtype.
        num_send1_per_rank, num_recv1_per_rank = self._rail_splits(route)
        send_b = torch.cat([partial[m] for m in range(G) if m != n]).to(wire_dtype)
        recv_b = torch.empty(route.send1_token_idx.numel(), W, dtype=wire_dtype, device=device)
        # Collective: phase B, the reverse of phase 1's splits.
        work_b = self.transport.all_to_all_rows(_layout.wide_rows(recv_b), _layout.wide_rows(send_b),
                                                num_send1_per_rank, num_recv1_per_rank,
                                                "combine", async_op=True, new_call=False)
        out = torch.zeros(num_tokens, W, dtype=torch.float32, device=device)
        send1_off = _offsets(route.num_send1_per_node)

        def finish() -> None:
            # Sum over nodes in node order (own node's partial sum never left fp32).
            for m in range(G):
                if m == n:
                    out.index_add_(0, route.own_token_idx, partial[n])
                else:
                    lo, hi = send1_off[m], send1_off[m + 1]
                    if hi > lo:
                        out.index_add_(0, route.send1_token_idx[lo:hi], recv_b[lo:hi].to(torch.float32))

        return out, [work_b], finish

    def combine_all(self, x: torch.Tensor, route: NodeRoute, num_tokens: int, num_recv_per_rank: list[int],
                    topk_weights: Optional[torch.Tensor], biases: tuple):
        """The Buffer's combine: rows (and weights) back, biases added, cast to ``x.dtype``.

        Returns ``(combined_x [N, H], combined_w [N, K] or None, works, reduce)``; the outputs
        are filled once the works are done and ``reduce()`` has run.
        """
        acc, works, finish = self.combine(x, route, num_tokens, num_recv_per_rank, x.dtype, True)
        finishes = [finish]
        acc_w = None
        if topk_weights is not None:
            acc_w, works_w, finish_w = self.combine(topk_weights.contiguous(), route, num_tokens,
                                                    num_recv_per_rank, torch.float32, False)
            works += works_w
            finishes.append(finish_w)
        combined_x = torch.empty(num_tokens, x.size(1), dtype=x.dtype, device=x.device)

        def reduce() -> None:
            for f in finishes:
                f()
            for bias in biases:
                acc.add_(bias)
            combined_x.copy_(acc)

        return combined_x, acc_w, works, reduce

    # ------------------------------------------------------------------ the two phases
    def _rail_splits(self, route: NodeRoute) -> tuple[list[int], list[int]]:
        send, recv = [0] * self.R, [0] * self.R
        for m in range(self.G):
            send[m * self.P + self.local] = route.num_send1_per_node[m]
            recv[m * self.P + self.local] = route.num_recv1_per_node[m]
        return send, recv

    def _phase1(self, src: torch.Tensor, send1_tok: torch.Tensor, num_send1_per_rank: list[int],
                num_recv1_per_rank: list[int], new_call: bool) -> tuple[torch.Tensor, list]:
        src_w = _layout.wide_rows(src)
        send_rows = src_w.index_select(0, send1_tok)
        recv1 = torch.empty(sum(num_recv1_per_rank), src.size(1), dtype=src.dtype, device=src.device)
        # Collective: phase 1, one row per (token, other node), between rail peers only.
        work = self.transport.all_to_all_rows(_layout.wide_rows(recv1), send_rows, num_recv1_per_rank,
                                              num_send1_per_rank, "dispatch", async_op=True, new_call=new_call)
        return recv1, [work]

    def _phase2(self, route: NodeRoute, segment: Callable[[int, int], torch.Tensor], recv: torch.Tensor,
                recv_off: list[int], tag: int, new_call: bool) -> list:
        """Forward: ``segment(j, m)`` rows of block ``m`` to local rank ``j``, received from
        forwarder ``(n, l')`` straight into ``recv``'s slice of source rank ``(m, l')``."""
        P, G, n, l = self.P, self.G, self.node, self.local
        sends, recvs = [], []
        for m in range(G):
            for j in range(P):
                if route.forward_idx[j][m].numel():
                    rows = segment(j, m)
                    if j == l:
                        src = m * P + l
                        recv[recv_off[src]:recv_off[src + 1]].copy_(rows)  # own rows never leave
                    else:
                        sends.append((n * P + j, 2 * m + tag, rows))
            for lp in range(P):
                src = m * P + lp
                if lp != l:
                    recvs.append((n * P + lp, 2 * m + tag, recv[recv_off[src]:recv_off[src + 1]]))
        works = self.transport.exchange_segments(sends, recvs, "dispatch", new_call)
        return works
