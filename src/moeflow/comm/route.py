"""Run a :class:`~moeflow.comm.plan.Plan`: rows forward along its hops (dispatch), or backward with
a token's copies summed at each hop (combine). The only code that moves a Buffer's rows;
:class:`PlanRunner` also plans and runs a fresh dispatch (payload and metadata rows).
docs/architecture.md ("The data path", "Copies per call") says which copies happen and why.

Shape letters (docs/architecture.md): T tokens on this rank, H hidden (W: any row width), M rows
received here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import layout as _layout
from ..quant import FP8_BLOCK
from .plan import Hop, Plan, RowFormat, RowMeta, flat_hop, in_node_hop, pack_meta, rail_hop, token_spans
from .transport import Transport, Workspace, host_driven, rows_view

__all__ = ["PlanRunner", "Routed", "Outputs", "reduce_rows", "wait"]

_ACC_BYTES = 4 << 20  # fp32 accumulator per reduce pass (token blocks of this many bytes)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as flat bytes: what travels (both sides see the same dtype and count)."""
    return t.reshape(-1).view(torch.uint8)


def _own_pairs(hop: Hop, rank: int) -> list[tuple[int, int]]:
    """(sent message, received message) pairs of this rank to itself, in order."""
    sent = [k for k, p in enumerate(hop.send_peers) if p == rank]
    recv = [k for k, p in enumerate(hop.recv_peers) if p == rank]
    return list(zip(sent, recv))


@dataclass(frozen=True)
class Routed:
    """What a fresh dispatch's route delivers, once ``works`` are done and ``releases`` have run.

    Attributes:
        plan: the route. recv_x: ``[M', H]`` payload rows: the M received ones, then zero rows
        up to the ``num_rows`` asked for (DeepEP's ``num_worst_tokens``). meta_format, recv_meta:
        the received metadata rows ``[M, width]`` uint8 and their format.
    """

    plan: Plan
    recv_x: torch.Tensor
    meta_format: RowFormat
    recv_meta: torch.Tensor
    works: list
    releases: list

    def outputs(self, fp8: bool, sent: RowMeta) -> "Outputs":
        """The dispatch's outputs for what ``sent`` held (see :class:`Outputs`), ``M'`` rows like
        ``recv_x``; rows past M hold scales 0, ids -1, weights 0, source -1."""
        (rows, H), M, device = self.recv_x.shape, self.plan.num_recv, self.recv_x.device
        K = sent.topk_idx.size(1) if sent.topk_idx is not None else 0
        scales = torch.zeros(rows, H // FP8_BLOCK, dtype=torch.float32, device=device) if fp8 else None
        idx = torch.full((rows, K), -1, dtype=torch.int64, device=device) if sent.topk_idx is not None else None
        weights = torch.zeros(rows, K, dtype=torch.float32, device=device) if sent.topk_idx is not None else None
        src = torch.full((rows,), -1, dtype=torch.int32, device=device)

        def unpack() -> None:
            got = RowMeta.of(self.meta_format, self.recv_meta)
            src[:M].copy_(got.src)
            if scales is not None:
                scales[:M].copy_(got.scales)
            if idx is not None:
                idx[:M].copy_(got.topk_idx)
                if sent.topk_weights is not None:
                    weights[:M].copy_(got.topk_weights)

        return Outputs((self.recv_x, scales) if fp8 else self.recv_x, idx, weights, src, unpack)


@dataclass(frozen=True)
class Outputs:
    """A fresh dispatch's outputs, filled by ``unpack()`` once the metadata rows have arrived.

    Attributes:
        recv_x: ``[M', H]``, or with FP8 the tuple with ``[M', H / 128]`` float32 scales.
        recv_topk_idx: ``[M', K]`` int64 local ids (None without ids). recv_topk_weights:
        ``[M', K]`` float32, 0 where the id is -1. recv_src_idx: ``[M']`` int32, each row's
        token index on its source rank.
    """

    recv_x: object
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    recv_src_idx: torch.Tensor
    unpack: Callable[[], None]


class PlanRunner:
    """Moves rows along plans over ``transport``, with send buffers reused through ``workspace``."""

    def __init__(self, transport: Transport, workspace: Workspace):
        self.transport, self.workspace = transport, workspace

    # ------------------------------------------------------------------ one hop
    def send_forward(self, hop: Hop, src: torch.Tensor, out: torch.Tensor, kind: str, *, gather: bool = True,
                     new_call: bool = True) -> tuple[list, Callable[[], None]]:
        """Move rows along ``hop``: with ``gather`` rows ``src[hop.send_idx]``, else ``src`` is
        already in send order; arrivals fill ``out`` ``[hop.num_recv, W]``. Returns the works to
        wait on and a callback that gives the send buffer back once they are done. With
        ``gather``, a message the hop cuts into runs (``hop.send_runs``) is sent run by run
        straight from ``src``, and one it receives in runs (``hop.recv_runs``) is received so."""
        rank, so, ro = self.transport.rank, hop.send_offsets, hop.recv_offsets
        src_w, out_w = _layout.wide_pair(src, out)
        send_runs = hop.send_runs if gather and hop.send_runs else (None,) * len(hop.send_peers)
        recv_runs = hop.recv_runs if gather and hop.recv_runs else (None,) * len(hop.recv_peers)
        # every message to a peer, empty ones too: a message's tag is its place among the pair's
        remote = [k for k, p in enumerate(hop.send_peers) if p != rank]
        num_gathered = sum(hop.send_counts[k] for k in remote if send_runs[k] is None)
        buf = self.workspace.take(num_gathered * src_w.size(1) * src_w.element_size(), src.device) \
            if gather and num_gathered else None
        cursor = [0]

        def rows_for(k: int) -> Callable[[], torch.Tensor]:
            def build() -> torch.Tensor:  # called when the message's turn comes (see Transport.exchange)
                n, at = hop.send_counts[k], cursor[0]
                if not n or not gather:
                    return _bytes(src_w[so[k]:so[k + 1]] if n else src_w[:0])
                cursor[0] += n
                rows = rows_view(buf, num_gathered, src_w)[at:at + n]
                torch.index_select(src_w, 0, hop.send_idx[so[k]:so[k + 1]], out=rows)
                return _bytes(rows)
            return build

        own = _own_pairs(hop, rank)

        def own_rows() -> None:  # runs while the first message travels
            for ks, kr in own:
                dst = out_w[ro[kr]:ro[kr + 1]]
                if gather:
                    torch.index_select(src_w, 0, hop.send_idx[so[ks]:so[ks + 1]], out=dst)
                else:
                    dst.copy_(src_w[so[ks]:so[ks + 1]])

        sends, recvs = [], []
        for k in remote:
            runs = send_runs[k]
            sends += [(hop.send_peers[k], rows_for(k))] if runs is None else \
                [(hop.send_peers[k], _bytes(src_w[first:first + n])) for first, n in runs]
        for k, p in enumerate(hop.recv_peers):
            if p != rank:
                rows, runs = out_w[ro[k]:ro[k + 1]], recv_runs[k]
                recvs += [(p, _bytes(rows))] if runs is None else \
                    [(p, _bytes(part)) for part in rows.split([n for _, n in runs])]
        own_bytes = sum(hop.send_counts[ks] for ks, _ in own) * out.size(1) * out.element_size()
        works = self.transport.exchange(sends, recvs, kind, device=out.device, new_call=new_call,
                                        on_first_step=own_rows, own_bytes=own_bytes)
        return works, self._release(buf)

    def send_backward(self, hop: Hop, rows: torch.Tensor, kind: str, *, wire_dtype: Optional[torch.dtype] = None,
                      new_call: bool = True, on_first_step: Optional[Callable[[list], None]] = None
                      ) -> tuple[list[torch.Tensor], list[tuple[list, Optional[int]]], Callable[[], None]]:
        """Rows of ``hop``'s output ``[hop.num_recv, W]`` back to the ranks they came from, in
        ``wire_dtype`` (default: their own). Returns one segment per sent message of the hop
        (what came back for it, ``[send_counts[k], W]``; this rank's own: a view of ``rows``),
        the pieces to wait on in order, each ``(works, rows)``: once its works are done the
        first ``rows`` rows of every segment have arrived (None: all of them; see
        :func:`_piece_cuts`), and a callback that gives the buffer back.
        ``on_first_step(segments)`` runs while the first message travels (this rank's own
        segments are ready then)."""
        rank, ro = self.transport.rank, hop.recv_offsets
        wire = wire_dtype or rows.dtype
        W = rows.size(1)
        remote = [k for k, p in enumerate(hop.send_peers) if p != rank]
        num_remote = sum(hop.send_counts[k] for k in remote)
        buf = self.workspace.take(num_remote * W * _layout.itemsize(wire), rows.device) if num_remote else None
        like = rows.new_empty(0, W, dtype=wire)
        segments: list = [None] * len(hop.send_peers)
        at = 0
        for k in remote:
            n = hop.send_counts[k]
            segments[k] = rows_view(buf, num_remote, like)[at:at + n] if n else like
            at += n
        own = _own_pairs(hop, rank)
        for ks, kr in own:
            segments[ks] = rows[ro[kr]:ro[kr + 1]]  # never leaves: read in place

        def back(k: int, a: int, b: int) -> Callable[[], torch.Tensor]:
            return lambda: _bytes(rows[ro[k] + a:ro[k] + b].to(wire))  # a cast only where the wire is narrower

        cpu = host_driven(rows.device)
        sent = [[(p, back(k, a, b)) for a, b in _piece_cuts(hop.recv_counts[k], len(hop.recv_peers), cpu)]
                for k, p in enumerate(hop.recv_peers) if p != rank]
        cuts = [_piece_cuts(hop.send_counts[k], len(hop.send_peers), cpu) for k in remote]
        recvd = [[(hop.send_peers[k], _bytes(segments[k][a:b])) for a, b in c] for k, c in zip(remote, cuts)]
        got = [[b for _, b in c] for c in cuts]
        num_pieces = max([len(m) for m in sent + recvd] + [1])
        own_bytes = sum(hop.send_counts[ks] for ks, _ in own) * W * rows.element_size()
        pieces = []
        for j in range(num_pieces):  # piece j of every message, in one exchange: its works say when it landed
            first = j == 0 and on_first_step is not None
            works = self.transport.exchange(
                [m[j] for m in sent if j < len(m)], [m[j] for m in recvd if j < len(m)], kind, device=rows.device,
                new_call=new_call and j == 0, own_bytes=own_bytes if j == 0 else 0,
                on_first_step=(lambda: on_first_step(segments)) if first else None)
            # rows arrived in every segment once pieces 0..j are done; the last piece: all of them
            upto = None if j + 1 == num_pieces else min((g[min(j, len(g) - 1)] for g in got if g), default=0)
            pieces.append((works, upto))
        return segments, pieces, self._release(buf)

    def _release(self, buf: Optional[torch.Tensor]) -> Callable[[], None]:
        return (lambda: self.workspace.give(buf)) if buf is not None else _noop

    # ------------------------------------------------------------------ whole plans
    def forward(self, plan: Plan, rows: torch.Tensor, kind: str, new_call: bool = True, num_rows: int = 0
                ) -> tuple[torch.Tensor, list, list]:
        """Rows ``[T, W]`` along every hop: returns ``(out [M', W], works, releases)``; ``out`` is
        filled once the works are done (earlier hops are waited on here: a hop forwards what the
        one before brought). ``M' = max(M, num_rows)``: rows past M are zeros."""
        for h, hop in enumerate(plan.hops):
            out = _rows_out(rows, hop.num_recv, num_rows if h + 1 == len(plan.hops) else 0)
            works, release = self.send_forward(hop, rows, out[:hop.num_recv], kind, new_call=new_call and h == 0)
            if h + 1 < len(plan.hops):
                wait(works)
                release()
            rows = out
        return rows, works, [release]

    def backward(self, plan: Plan, rows: torch.Tensor, kind: str, *, out: torch.Tensor, biases: tuple = (),
                 new_call: bool = True) -> tuple[list, Callable[[], None]]:
        """Rows ``[M, W]`` back along ``plan``, each token's copies summed in fp32 into ``out``
        ``[T, W]`` (+ ``biases``), in source order: rank order (flat), node order across nodes.

        Hops before the first are summed here into fp32 partial sums (a node's sum crosses nodes
        once, in ``rows.dtype``); the first hop's arrivals are summed by the returned ``finish``
        once the returned works are done.
        """
        wire = rows.dtype
        for h in range(len(plan.hops) - 1, -1, -1):
            hop = plan.hops[h]
            index = [hop.send_idx[hop.send_offsets[k]:hop.send_offsets[k + 1]] for k in range(len(hop.send_peers))]
            if h == 0:
                total = _Sum(out, index, biases, [ks for ks, _ in _own_pairs(hop, self.transport.rank)],
                             {wire, rows.dtype}, spans=lambda: plan.spans)
                segments, pieces, release = self.send_backward(hop, rows, kind, wire_dtype=wire, new_call=new_call
                                                               and len(plan.hops) == 1, on_first_step=total.own)

                def finish(segments=segments, pieces=pieces, release=release) -> None:
                    for works, upto in pieces:  # each piece summed as it lands, while the next travels
                        wait(works)
                        total.rest(segments, upto)
                    release()
                return [], finish
            segments, pieces, release = self.send_backward(hop, rows, kind, wire_dtype=wire,
                                                           new_call=new_call and h == len(plan.hops) - 1)
            for works, _ in pieces:  # this hop's partial sums need every row of the node
                wait(works)
            rows = torch.empty(plan.hops[h - 1].num_recv, rows.size(1), dtype=torch.float32, device=rows.device)
            reduce_rows(rows, segments, index)
            release()
        raise AssertionError("a plan has at least one hop")

    # ------------------------------------------------------------------ fresh dispatch
    def dispatch(self, x: torch.Tensor, meta: RowMeta, is_token_in_rank: torch.Tensor, num_recv_per_rank: list[int],
                 num_experts: int, num_recv_per_node: Optional[list[int]] = None, num_rows: int = 0,
                 gaps: Optional[tuple[list, list]] = None) -> Routed:
        """Plan and run a fresh dispatch of payload rows ``x`` ``[T, H]`` and their metadata
        ``meta``: one hop (flat), or with ``num_recv_per_node`` (the rail hop's rows from each
        node, from the count exchange) two. Metadata reaches the destination with its local ids
        (E / R local experts; -1 and weight 0 elsewhere) and its source token index. The payload
        lands in ``recv_x`` ``[max(M, num_rows), H]``, zero rows past M. ``gaps``: the count
        exchange's gap lists (:meth:`CountTable.gaps`) of what this rank sent and received; with
        them a flat hop sends long runs of tokens without gathering them."""
        R = is_token_in_rank.size(1)
        fmt = _meta_format(meta, num_experts // R - 1)
        if num_recv_per_node is None:
            hop = flat_hop(is_token_in_rank, num_recv_per_rank, gaps, self.transport.rank)
            recv_x = _rows_out(x, hop.num_recv, num_rows)
            works, release = self.send_forward(hop, x, recv_x[:hop.num_recv], "dispatch")
            recv_meta = self._send_meta(hop, fmt, meta, works, dst_rank=hop.send_peer_of_rows(),
                                        num_local_experts=num_experts // R)
            return Routed(Plan((hop,), x.size(0)), recv_x, fmt, recv_meta, works, [release])
        return self._dispatch_node_aware(x, meta, fmt, is_token_in_rank, num_recv_per_node, num_recv_per_rank,
                                         num_experts, num_rows)

    def _dispatch_node_aware(self, x, meta: RowMeta, fmt: RowFormat, is_token_in_rank, num_recv_per_node,
                             num_recv_per_rank, num_experts: int, num_rows: int) -> Routed:
        """Two hops: the rail hop across nodes (payload, and metadata rows with global ids and the
        destination node's rank mask), then the in-node hop that forwards what arrived (metadata
        in ``fmt``: the destination's local ids)."""
        (T, H), R, N = x.shape, is_token_in_rank.size(1), len(num_recv_per_node)
        per_node = R // N
        rail_fmt = _meta_format(meta, num_experts - 1, mask_cols=per_node)
        rail = rail_hop(_layout.is_token_in_node(is_token_in_rank, N), self.transport.rank, per_node,
                        num_recv_per_node)
        stage = x.new_empty(rail.num_recv, H)
        works, release = self.send_forward(rail, x, stage, "dispatch")
        mask = is_token_in_rank.view(T, N, per_node)[rail.send_idx, rail.send_peer_of_rows() // per_node]
        stage_meta = self._send_meta(rail, rail_fmt, meta, works, mask=mask)
        wait(works)  # the in-node hop forwards what the rail hop brought
        release()
        hop = in_node_hop(rail_fmt.view(stage_meta, "mask", torch.bool), rail, self.transport.rank, per_node,
                          num_recv_per_rank)
        recv_x = _rows_out(x, hop.num_recv, num_rows)
        works, release = self.send_forward(hop, stage, recv_x[:hop.num_recv], "dispatch", new_call=False)
        recv_meta = self._send_meta(hop, fmt, RowMeta.of(rail_fmt, stage_meta), works,
                                    dst_rank=hop.send_peer_of_rows(), num_local_experts=num_experts // R)
        return Routed(Plan((rail, hop), T), recv_x, fmt, recv_meta, works, [release])

    def _send_meta(self, hop: Hop, fmt: RowFormat, meta: RowMeta, works: list, **kw) -> torch.Tensor:
        """Metadata rows of ``hop``'s sent rows, packed and sent right behind the payload (same
        messages); returns the received rows."""
        rows = pack_meta(fmt, meta, hop.send_idx, **kw)
        out = rows.new_empty(hop.num_recv, fmt.width)
        more, _ = self.send_forward(hop, rows, out, "dispatch", gather=False, new_call=False)
        works += more
        return out


class _Sum:
    """A hop's returned segments summed onto its input rows ``out``, as :func:`reduce_rows` does.

    With at most two sources per row, no biases and segments of ``out``'s dtype the sum is done
    in that dtype (exact: ``0 + a`` is ``a``, and ``a + b`` is computed in fp32 and rounded once,
    as the fp32 accumulation rounds it; two terms add the same in any order), and what needs
    only this rank's own segments is written while the other rows travel. On CPU, when the
    tokens fall into long spans with the same sources (:func:`~moeflow.comm.plan.token_spans`), each span is one copy or
    one two-input add, which reads each row once; elsewhere the own rows are placed and the
    others added with ``index_add_``.
    """

    def __init__(self, out: torch.Tensor, index: list[torch.Tensor], biases: tuple, own: list[int],
                 dtypes: set[torch.dtype], spans: Optional[Callable[[], Optional[list]]] = None):
        """``dtypes``: of the segments (own ones in the rows' dtype, the others in the wire's).
        ``spans``: gives :func:`~moeflow.comm.plan.token_spans` of ``index`` when asked (a plan's
        cached :attr:`~moeflow.comm.plan.Plan.spans`); default: computed here."""
        self.out, self.index, self.biases, self.own_msgs = out, index, biases, own
        self.direct = not biases and dtypes == {out.dtype} and sum(1 for i in index if i.numel()) <= 2
        self.spans = None
        if self.direct and host_driven(out.device):
            self.spans = spans() if spans is not None else token_spans(index, out.size(0))
        self._todo: Optional[list] = None  # the spans _write_rest has still to write, from _next on
        self._next = 0

    def own(self, segments: list) -> None:
        if not self.direct:
            return
        if self.spans is not None:
            self._write_spans(segments, own=True)
            return
        if not self.own_msgs:
            self.out.zero_()
            return
        first = self.own_msgs[0]
        _place_rows(self.out, self.index[first], segments[first])  # 0 + a is a: a copy
        for k in self.own_msgs[1:]:
            self.out.index_add_(0, self.index[k], segments[k])

    def rest(self, segments: list, upto: Optional[int] = None) -> None:
        """Sum what the other ranks sent: all of it (``upto`` None), or, on the span path (one
        other segment, arriving in pieces), the spans' parts whose rows of it lie below ``upto``."""
        if self.spans is not None:
            self._write_rest(segments, upto)
        elif upto is not None:
            return  # indexed ops: once everything has arrived
        elif not self.direct:
            reduce_rows(self.out, segments, self.index, self.biases)
        else:
            for k, seg in enumerate(segments):
                if k not in self.own_msgs and seg.numel():
                    self.out.index_add_(0, self.index[k], seg)

    def _write_spans(self, segments: list, own: bool) -> None:
        """The spans whose sources are all this rank's own (``own``), or the others."""
        for t0, t1, sources in self.spans:
            if all(k in self.own_msgs for k, _ in sources) == own:
                self._write(segments, t0, t1, sources)

    def _write_rest(self, segments: list, upto: Optional[int]) -> None:
        """The spans with another rank's rows, in token order (their rows of it ascend too), as
        far as ``upto`` rows of it have arrived; a span the limit cuts is written in two parts."""
        if self._todo is None:
            self._todo = [span for span in self.spans if not all(k in self.own_msgs for k, _ in span[2])]
            self._next = 0
        while self._next < len(self._todo):
            t0, t1, sources = self._todo[self._next]
            if upto is not None:
                at = next(at for k, at in sources if k not in self.own_msgs)
                if at >= upto:
                    return
                if at + t1 - t0 > upto:
                    cut = upto - at
                    self._write(segments, t0, t0 + cut, sources)
                    self._todo[self._next] = (t0 + cut, t1, [(k, a + cut) for k, a in sources])
                    return
            self._write(segments, t0, t1, sources)
            self._next += 1

    def _write(self, segments: list, t0: int, t1: int, sources: list[tuple[int, int]]) -> None:
        """Tokens ``[t0, t1)``: zero, a copy of their one source's rows, or the sum of two."""
        n, dst = t1 - t0, self.out[t0:t1]
        rows = [segments[k][at:at + n] for k, at in sources]
        if not rows:
            dst.zero_()
        elif len(rows) == 1:
            dst.copy_(rows[0])
        else:
            torch.add(rows[0], rows[1], out=dst)


def _piece_cuts(num_rows: int, num_peers: int, cpu: bool) -> list[tuple[int, int]]:
    """Row ranges ``(a, b)`` a combine message of ``num_rows`` rows travels in: one, or on CPU in
    a two-peer hop (one other rank: its sum after arrival is the combine's longest step) up to
    ``_PIECES`` of at least ``_PIECE_ROWS`` rows, so that each is summed while the next travels.
    Both sides call it with the same arguments (the hop's peer count is the same on both)."""
    pieces = min(_PIECES, num_rows // _PIECE_ROWS) if cpu and num_peers == 2 else 1
    if pieces <= 1:
        return [(0, num_rows)] if num_rows else []
    cuts = [num_rows * i // pieces for i in range(pieces + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


_PIECES, _PIECE_ROWS = 4, 512


def reduce_rows(out: torch.Tensor, segments: list[torch.Tensor], index: list[torch.Tensor], biases: tuple = ()) -> None:
    """``out[t] = sum over k of segments[k][i] where index[k][i] == t`` (+ biases), in fp32.

    ``out`` is ``[T, W]``; ``segments[k]`` ``[n_k, W]`` (any float dtype) with token ids
    ``index[k]`` ascending (the wire order). Sums in list order. Works through blocks of tokens
    so the fp32 accumulator and the converted rows stay small and contiguous; a block's rows are
    a contiguous range inside every segment.
    """
    T, W = out.shape
    if out.dtype == torch.float32 and not biases and all(s.dtype == torch.float32 for s in segments):
        out.zero_()
        for seg, idx in zip(segments, index):
            out.index_add_(0, idx, seg)
        return
    block = max(1, min(T, _ACC_BYTES // max(4 * W, 1)))
    edges = torch.arange(0, T + block, block, device=out.device).clamp_(max=T)
    # Row ranges of every token block inside every segment: one searchsorted per segment.
    parts = [(seg, idx, torch.searchsorted(idx, edges).tolist())  # host sync (CUDA): slicing bounds
             for seg, idx in zip(segments, index) if idx.numel()]
    acc_buf = torch.empty(block, W, dtype=torch.float32, device=out.device)
    # A segment holds a token at most once, so a block's rows from one segment fit in `block`
    # rows; converting into this buffer instead of a fresh `.float()` saves the page faults.
    rows_buf = torch.empty(block, W, dtype=torch.float32, device=out.device)
    edges = edges.tolist()
    for b in range(len(edges) - 1):
        t0, t1 = edges[b], edges[b + 1]
        if t1 <= t0:
            continue
        acc = acc_buf[:t1 - t0]
        acc.zero_()
        for seg, idx, cut in parts:
            lo, hi = cut[b], cut[b + 1]
            if hi > lo:
                converted = rows_buf[:hi - lo]
                converted.copy_(seg[lo:hi])
                acc.index_add_(0, idx[lo:hi] - t0, converted)
        for bias in biases:
            acc.add_(bias[t0:t1])
        out[t0:t1].copy_(acc)


def _meta_format(meta: RowMeta, ids_max: int, mask_cols: int = 0) -> RowFormat:
    """Metadata rows for ``meta``: FP8 scales, top-k weights, ids up to ``ids_max``, a rank mask."""
    K = meta.topk_idx.size(1) if meta.topk_idx is not None else 0
    return RowFormat.meta(meta.scales.size(1) if meta.scales is not None else 0, K, meta.topk_weights is not None,
                          _layout.smallest_int_dtype(max(ids_max, 0)), mask_cols)


def _rows_out(like: torch.Tensor, num_recv: int, num_rows: int) -> torch.Tensor:
    """``[max(num_recv, num_rows), W]`` of ``like``'s dtype for a hop's arrivals: the first
    ``num_recv`` rows are written by the hop, the rest (DeepEP's ``num_worst_tokens`` padding) are zero."""
    out = like.new_empty(max(num_recv, num_rows), like.size(1))
    out[num_recv:].zero_()
    return out


def _place_rows(out: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """``out[idx[i]] = rows[i]``, every other row of ``out`` zero; rows move as wide words.

    On CPU ``index_copy_`` moves rows element by element while ``index_select`` copies each row
    whole, in about half the time (``python benchmarks/bench_row_copies.py``). So when ``idx``
    lists at least half of ``out``'s rows, every row of ``out`` is gathered from ``rows`` (the
    unlisted ones from row 0, then zeroed); with fewer, the unlisted rows are zeroed and the
    listed ones scattered. Both write each page of a fresh ``out`` once. Elsewhere ``out`` is
    zeroed and ``index_copy_`` scatters the rows: no host sync."""
    out_w, rows_w = _layout.wide_pair(out, rows)
    T = out.size(0)
    if not host_driven(out.device):
        out.zero_()
        out_w.index_copy_(0, idx, rows_w)
        return
    missing = torch.ones(T, dtype=torch.bool)
    missing[idx] = False
    if 2 * idx.numel() >= T and idx.numel():
        where = torch.zeros(T, dtype=torch.int64)
        where[idx] = torch.arange(idx.numel())
        torch.index_select(rows_w, 0, where, out=out_w)
    else:
        out_w.index_copy_(0, idx, rows_w)
    out.index_fill_(0, missing.nonzero().flatten(), 0)


def wait(works: list) -> None:
    """Wait for every work of a list."""
    for w in works:
        w.wait()


def _noop() -> None:
    pass
