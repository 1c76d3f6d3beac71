"""The route of a dispatch as data: which rows go to which rank, hop by hop, and the one row format.

Pure: no collectives. Flat (one node) is one :class:`Hop`; node-aware is the *rail* hop (a token
once to each node it reaches, to the rank there with this rank's local index) and the *in-node*
hop (what arrived, on to the ranks of that node that need it). docs/architecture.md ("The route
as data") describes both.

Shape letters (docs/architecture.md): T tokens on this rank, R ranks, N nodes, E experts the
Buffer dispatches over, L = E / R local experts, K top-k, M rows received here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

from .. import layout as _layout

__all__ = ["GAP_COLS", "Hop", "Plan", "CountTable", "RowFormat", "RowMeta", "flat_hop", "rail_hop", "in_node_hop",
           "offsets", "pack_meta", "runs_between", "token_spans"]

_ALIGN = 8  # bytes; every field of a row starts on this boundary, so it can be viewed in place


def offsets(counts) -> list[int]:
    """``[0, c0, c0+c1, ...]``: where each block starts, the total last."""
    out = [0]
    for c in counts:
        out.append(out[-1] + int(c))
    return out


@dataclass(frozen=True)
class Hop:
    """One step of a route: the messages this rank sends and receives.

    Sent rows are rows of the hop's input (the tokens for the first hop, what the previous hop
    brought for the next), message after message. Received rows lie message after message in
    ``recv`` order: the hop's output. A message to or from this rank itself is a local copy.
    The k-th message from rank a to rank b pairs with the k-th message b expects from a.

    Attributes:
        send_idx: ``[rows sent]`` int64, the input row each sent row carries.
        send_peers, send_counts: destination rank and row count of each sent message.
        recv_peers, recv_counts: source rank and row count of each received message.
        send_runs, recv_runs: per message (empty: none), None or the message's rows as runs of
            consecutive input rows, ``((first row, rows), ...)`` sent (and received) as one wire
            message each, straight from the input: no gather (see :func:`runs_between`).
    """

    send_idx: torch.Tensor
    send_peers: tuple[int, ...]
    send_counts: tuple[int, ...]
    recv_peers: tuple[int, ...]
    recv_counts: tuple[int, ...]
    send_runs: tuple = ()
    recv_runs: tuple = ()

    @property
    def num_recv(self) -> int:
        return sum(self.recv_counts)

    @cached_property
    def send_offsets(self) -> list[int]:
        return offsets(self.send_counts)

    @cached_property
    def recv_offsets(self) -> list[int]:
        return offsets(self.recv_counts)

    def send_peer_of_rows(self) -> torch.Tensor:
        """``[rows sent]`` int64, the destination rank of each sent row."""
        peers = torch.tensor(self.send_peers, dtype=torch.int64, device=self.send_idx.device)
        counts = torch.tensor(self.send_counts, dtype=torch.int64, device=self.send_idx.device)
        return peers.repeat_interleave(counts, output_size=self.send_idx.numel())


@dataclass(frozen=True)
class Plan:
    """A dispatch's route: its hops, in dispatch order.

    Attributes:
        hops: one (flat) or two (node-aware: rail, then in-node).
        num_tokens: T, rows of the first hop's input.
    """

    hops: tuple[Hop, ...]
    num_tokens: int

    @property
    def num_recv(self) -> int:
        """M, rows the last hop delivers here."""
        return self.hops[-1].num_recv

    @cached_property
    def spans(self) -> Optional[list[tuple[int, int, list[tuple[int, int]]]]]:
        """:func:`token_spans` of the first hop's sent messages over the T tokens: the same for
        every combine of this plan, so worked out once (host sync: CPU plans only)."""
        hop, so = self.hops[0], self.hops[0].send_offsets
        return token_spans([hop.send_idx[so[k]:so[k + 1]] for k in range(len(hop.send_peers))], self.num_tokens)


@dataclass(frozen=True)
class CountTable:
    """The columns of a fresh dispatch's count exchange: ``[R, C]`` int64 per rank, row ``r`` to rank ``r``.

    Columns: status (1: this rank's input was bad, it raises and so does every rank), the
    rank's ``num_worst_tokens``, the call's signature (what every rank must agree on), with
    several nodes the rail hop's rows to each node's rank with this rank's local index, this
    rank's rows for every rank (the same in every row, so every rank learns the ``[R, R]`` row
    matrix: DeepEP's ``rank_prefix_matrix``), its rows per local expert of the destination,
    and with ``gap_cols`` the tokens it does not send to the destination when they are at most
    ``gap_cols`` (their count first, -1 when more): both sides then cut that message into the
    same runs (:func:`runs_between`). Read on the host (the counts size what follows).
    """

    num_ranks: int
    ranks_per_node: int
    num_local_experts: int
    signature_cols: int
    gap_cols: int = 0

    @property
    def _rail(self) -> int:
        return 2 + self.signature_cols

    @property
    def _matrix(self) -> int:
        return self._rail + (self.ranks_per_node < self.num_ranks)

    @property
    def _experts(self) -> int:
        return self._matrix + self.num_ranks

    @property
    def _gaps(self) -> int:
        return self._experts + self.num_local_experts

    def pack(self, rank: int, signature: tuple[int, ...], is_token_in_rank: torch.Tensor,
             num_tokens_per_expert: Optional[torch.Tensor], num_worst_tokens: int) -> torch.Tensor:
        """This rank's table: ``is_token_in_rank`` ``[T, R]``, ``num_tokens_per_expert`` ``[E]`` or None."""
        R, P = self.num_ranks, self.ranks_per_node
        table = self._zeros(is_token_in_rank.device)
        table[:, 1] = num_worst_tokens
        table[:, 2:self._rail] = torch.tensor(signature, dtype=torch.int64, device=table.device)
        if P < R:  # rail-hop rows: to this rank's peer of the same local index on each node
            table[rank % P::P, self._rail] = _layout.num_tokens_per_node(is_token_in_rank, R // P).to(table)
        table[:, self._matrix:self._experts] = is_token_in_rank.sum(0)
        # (counts for another E than the table's stay 0: the signature tells every rank, which raises)
        if self.num_local_experts and num_tokens_per_expert is not None \
                and num_tokens_per_expert.numel() == R * self.num_local_experts:
            table[:, self._experts:self._gaps] = num_tokens_per_expert.to(table).view(R, -1)
        if self.gap_cols:
            table[:, self._gaps] = -1
            for r, gaps in enumerate(_missing_tokens(is_token_in_rank, self.gap_cols)):
                if gaps is not None:
                    table[r, self._gaps] = gaps.numel()
                    table[r, self._gaps + 1:self._gaps + 1 + gaps.numel()] = gaps
        return table

    def failed(self, device: torch.device) -> torch.Tensor:
        """The table of a rank whose input was bad: status 1, nothing else."""
        table = self._zeros(device)
        table[:, 0] = 1
        return table

    def _zeros(self, device: torch.device) -> torch.Tensor:
        cols = self._gaps + (self.gap_cols + 1 if self.gap_cols else 0)
        return torch.zeros(self.num_ranks, cols, dtype=torch.int64, device=device)

    # Readers of the received table ``recv`` (row s: what rank s sent here), on the host.
    def bad_ranks(self, recv: torch.Tensor) -> list[int]:
        return recv[:, 0].nonzero().flatten().tolist()

    def num_worst_tokens(self, recv: torch.Tensor) -> list[int]:
        return recv[:, 1].tolist()

    def signatures(self, recv: torch.Tensor) -> torch.Tensor:
        return recv[:, 2:self._rail]

    def matrix(self, recv: torch.Tensor) -> torch.Tensor:
        """``[R, R]``: rows rank ``i`` sends to rank ``j``."""
        return recv[:, self._matrix:self._experts]

    def rail(self, recv: torch.Tensor, rank: int) -> Optional[list[int]]:
        """The rail hop's rows from each node's rank with this rank's local index (None on one node)."""
        P = self.ranks_per_node
        return recv[rank % P::P, self._rail].tolist() if P < self.num_ranks else None

    def num_recv_per_expert(self, recv: torch.Tensor) -> list[int]:
        """``[L]`` rows arriving here for each local expert."""
        return recv[:, self._experts:self._gaps].sum(0).tolist()

    def gaps(self, recv: torch.Tensor) -> Optional[list[Optional[list[int]]]]:
        """Per source rank, the tokens it does not send here (None: more than ``gap_cols``);
        None without gap columns."""
        if not self.gap_cols:
            return None
        at, lists = self._gaps, []
        for row in recv.tolist():
            n = row[at]
            lists.append(row[at + 1:at + 1 + n] if n >= 0 else None)
        return lists


def _missing_tokens(is_token_in_rank: torch.Tensor, limit: int) -> list[Optional[torch.Tensor]]:
    """Per rank, the tokens not sent there (``[gaps]`` int64), or None when more than ``limit``."""
    missing = ~is_token_in_rank
    counts = missing.sum(0).tolist()  # host sync (CUDA)
    return [missing[:, r].nonzero().flatten() if n <= limit else None for r, n in enumerate(counts)]


GAP_COLS = 32  # gap columns of a count table that has them: at most 33 runs, each one wire message
MIN_RUN_ROWS = 32  # mean rows per run (or combine span) below which one indexed op beats an op per run


def token_spans(index: list[torch.Tensor], T: int) -> Optional[list[tuple[int, int, list[tuple[int, int]]]]]:
    """Tokens ``[0, T)`` cut into spans ``(t0, t1, sources)`` in which every token has the same
    segments, at consecutive rows: ``sources`` lists ``(segment, row of token t0)``; token ``t``
    of the span is row ``row + t - t0`` of each. ``index[k]`` (ascending, distinct) lists the
    tokens of segment ``k``. None when the spans are shorter than ``MIN_RUN_ROWS`` tokens on average
    (then indexed ops are cheaper). Host sync: CPU only. The combine's two-source sum writes span
    by span (``moeflow.comm.route``)."""
    if T < MIN_RUN_ROWS:
        return None
    row = torch.full((len(index), T), -1, dtype=torch.int64)
    for k, idx in enumerate(index):
        row[k, idx] = torch.arange(idx.numel())
    before, after = row[:, :-1], row[:, 1:]
    same = ((after == before + 1) & (before >= 0)) | ((after < 0) & (before < 0))
    starts = [0] + (~same.all(0)).nonzero().flatten().add_(1).tolist()
    if len(starts) * MIN_RUN_ROWS > T:
        return None
    firsts = row[:, starts].t().tolist()
    return [(t0, t1, [(k, at) for k, at in enumerate(first) if at >= 0])
            for t0, t1, first in zip(starts, starts[1:] + [T], firsts)]


def runs_between(gaps: Optional[list[int]], num_tokens: int) -> Optional[tuple[tuple[int, int], ...]]:
    """The tokens ``[0, num_tokens)`` but ``gaps`` (ascending) as runs ``((first, rows), ...)``,
    or None when there is no gap list or the runs average fewer than ``MIN_RUN_ROWS`` rows. The
    sender and the receiver of a message call it with the same arguments, so they cut it alike."""
    if gaps is None:
        return None
    runs, start = [], 0
    for g in list(gaps) + [num_tokens]:
        if g > start:
            runs.append((start, g - start))
        start = g + 1
    if len(runs) * MIN_RUN_ROWS > num_tokens - len(gaps):
        return None
    return tuple(runs)


def flat_hop(is_token_in_rank: torch.Tensor, num_recv_per_rank: list[int],
             gaps: Optional[tuple[list, list]] = None, rank: int = -1) -> Hop:
    """Each token once to each rank it reaches, rank after rank, token order kept.

    Args:
        is_token_in_rank: ``[T, R]`` bool.
        num_recv_per_rank: ``[R]`` rows arriving from each rank (from the count exchange).
        gaps: the gap lists (:meth:`CountTable.gaps`) of this rank's table as sent (per
            destination) and as received (per source); with them, messages to and from ranks
            other than ``rank`` whose tokens form long runs travel run by run.
    """
    R = is_token_in_rank.size(1)
    # nonzero over the [R, T] transpose lists (rank, token) pairs rank-major: the wire order.
    # Host sync on CUDA: the row count sizes the send.
    pairs = is_token_in_rank.t().nonzero()
    counts = is_token_in_rank.sum(0).tolist()  # host sync (CUDA): message sizes
    ranks = tuple(range(R))
    num_recv = tuple(int(n) for n in num_recv_per_rank)
    if gaps is None or gaps[0] is None:
        return Hop(pairs[:, 1].contiguous(), ranks, tuple(counts), ranks, num_recv)
    T = is_token_in_rank.size(0)
    sent_gaps, recv_gaps = gaps
    send_runs = tuple(runs_between(g, T) if r != rank else None for r, g in enumerate(sent_gaps))
    recv_runs = tuple(runs_between(g, num_recv[s] + len(g)) if s != rank and g is not None else None
                      for s, g in enumerate(recv_gaps))
    return Hop(pairs[:, 1].contiguous(), ranks, tuple(counts), ranks, num_recv, send_runs, recv_runs)


def rail_hop(is_token_in_node: torch.Tensor, rank: int, ranks_per_node: int, num_recv_per_node: list[int]) -> Hop:
    """Each token once to each node it reaches, to the rank there with this rank's local index.

    Args:
        is_token_in_node: ``[T, N]`` bool.
        rank: this rank; ``ranks_per_node``: R / N.
        num_recv_per_node: ``[N]`` rows arriving from each node's rail peer; this rank's own
            node's entry is ignored (its own tokens for its node, known here).

    Returns:
        a hop whose output is one block per node, in node order: this rank's own tokens for its
        own node, else what that node's rail peer sent.
    """
    N = is_token_in_node.size(1)
    node, local = divmod(rank, ranks_per_node)
    pairs = is_token_in_node.t().nonzero()  # (node, token) node-major; host sync (CUDA): sizes
    counts = [int(n) for n in is_token_in_node.sum(0).tolist()]
    peers = tuple(m * ranks_per_node + local for m in range(N))
    recv = tuple(counts[m] if m == node else int(num_recv_per_node[m]) for m in range(N))
    return Hop(pairs[:, 1].contiguous(), peers, tuple(counts), peers, recv)


def in_node_hop(rank_mask: torch.Tensor, rail: Hop, rank: int, ranks_per_node: int,
                num_recv_per_rank: list[int]) -> Hop:
    """Forward what the rail hop brought to the ranks of this node that need it.

    Args:
        rank_mask: ``[rail.num_recv, R / N]`` bool: which ranks of this node each row of the rail
            hop's output must reach (the sender's ``is_token_in_rank`` for this node).
        rail: the rail hop; rank, ranks_per_node: as there.
        num_recv_per_rank: ``[R]`` rows arriving here from each source rank (count exchange).

    Returns:
        a hop with one message per (local destination, node block), whose output is grouped by
        source rank in rank order, each source's token order kept: the flat dispatch's layout.
    """
    per_node, N = ranks_per_node, len(rail.recv_counts)
    node = rank // per_node
    block = rail.recv_offsets
    send_idx, peers, counts = [], [], []
    for j in range(per_node):  # destination's local index
        for m in range(N):  # the source node's block, in node order
            rows = rank_mask[block[m]:block[m + 1], j].nonzero().flatten() + block[m]  # host sync: sizes
            send_idx.append(rows)
            peers.append(node * per_node + j)
            counts.append(rows.numel())
    # Source rank (m, l') reaches here through forwarder (node, l'): its rows, in rank order.
    R = len(num_recv_per_rank)
    recv_peers = tuple(node * per_node + s % per_node for s in range(R))
    idx = torch.cat(send_idx) if send_idx else rank_mask.new_zeros(0, dtype=torch.int64)
    return Hop(idx, tuple(peers), tuple(counts), recv_peers, tuple(int(n) for n in num_recv_per_rank))


@dataclass(frozen=True)
class RowFormat:
    """Byte layout of a packed row: named fields, each starting on an 8-byte boundary.

    The one row format of the package: the Buffer's metadata rows (FP8 scales | top-k weights |
    top-k ids | source token | rank mask) and the low-latency slot rows (payload | scales | ids |
    source).
    ``fields`` is ``((name, nbytes), ...)`` in wire order; zero-byte fields take no room.
    ``ids_dtype``: the integer type of the ``"ids"`` field (top-k ids travel as the narrowest
    type that holds them).
    """

    fields: tuple[tuple[str, int], ...]
    ids_dtype: torch.dtype = torch.int64

    def offset(self, name: str) -> int:
        at = 0
        for n, nbytes in self.fields:
            if n == name:
                return at
            at += _pad(nbytes)
        raise KeyError(name)

    def nbytes(self, name: str) -> int:
        return dict(self.fields)[name]

    @property
    def width(self) -> int:
        return sum(_pad(n) for _, n in self.fields)

    def view(self, rows_u8: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Field ``name`` of ``[rows, width]`` uint8, viewed in place as ``[rows, nbytes / itemsize]`` ``dtype``."""
        at = self.offset(name)
        return rows_u8[:, at:at + self.nbytes(name)].view(dtype)

    @staticmethod
    def meta(scale_cols: int, num_topk: int, has_weights: bool, ids_dtype: torch.dtype,
             mask_cols: int = 0) -> "RowFormat":
        """Metadata rows: ``scale_cols`` fp32 FP8 scales, ``num_topk`` fp32 weights (if any) and
        ids of ``ids_dtype``, the int32 source token index (always: the dispatch handle's
        ``recv_src_idx``), and a ``mask_cols``-byte rank mask (rail hop only)."""
        return RowFormat((("scales", 4 * scale_cols), ("weights", 4 * num_topk if has_weights else 0),
                          ("ids", num_topk * _layout.itemsize(ids_dtype)), ("src", 4), ("mask", mask_cols)),
                         ids_dtype)


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class RowMeta:
    """Per-row metadata of a hop's input, each ``[rows, ...]`` or None.

    Attributes:
        scales: FP8 scales ``[rows, H / 128]`` float32. topk_idx: ``[rows, K]`` global expert ids
        (any int dtype). topk_weights: ``[rows, K]`` float32. src: ``[rows]`` int32, the source
        token index of each row (None for the tokens themselves: a row's index is its token's).
    """

    scales: Optional[torch.Tensor] = None
    topk_idx: Optional[torch.Tensor] = None
    topk_weights: Optional[torch.Tensor] = None
    src: Optional[torch.Tensor] = None

    @staticmethod
    def of(fmt: RowFormat, rows_u8: torch.Tensor) -> "RowMeta":
        """The fields of packed rows ``rows_u8`` (views, no copy)."""
        get = (lambda name, dtype: fmt.view(rows_u8, name, dtype) if fmt.nbytes(name) else None)
        return RowMeta(get("scales", torch.float32), get("ids", fmt.ids_dtype), get("weights", torch.float32),
                       fmt.view(rows_u8, "src", torch.int32).view(-1))


def pack_meta(fmt: RowFormat, meta: RowMeta, idx: torch.Tensor, *, dst_rank: Optional[torch.Tensor] = None,
              num_local_experts: int = 0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``idx`` of ``meta`` packed as ``fmt``: ``[idx.numel(), fmt.width]`` uint8.

    With ``dst_rank`` (``[rows]`` int64, the rank each row goes to) the top-k ids become that
    rank's local ids (``-1`` elsewhere, weight 0 there); without, they stay global (the rail hop:
    the forwarder translates them per destination). ``mask``: ``[rows, mask bytes]`` bool.
    """
    rows = torch.empty(idx.numel(), fmt.width, dtype=torch.uint8, device=idx.device)
    if fmt.nbytes("scales"):
        torch.index_select(meta.scales, 0, idx, out=fmt.view(rows, "scales", torch.float32))
    if fmt.nbytes("ids"):
        ids = meta.topk_idx.index_select(0, idx).long()
        weights = meta.topk_weights.index_select(0, idx) if fmt.nbytes("weights") else None
        if dst_rank is not None:
            ids, weights = _layout.local_topk(ids, weights, dst_rank, num_local_experts)
        fmt.view(rows, "ids", fmt.ids_dtype).copy_(ids)
        if weights is not None:
            fmt.view(rows, "weights", torch.float32).copy_(weights)
    # the source token: the row's own index on the first hop, what arrived with it on later ones
    src = idx if meta.src is None else meta.src.index_select(0, idx)
    fmt.view(rows, "src", torch.int32).copy_(src.view(-1, 1))
    if mask is not None:
        fmt.view(rows, "mask", torch.bool).copy_(mask)
    return rows

