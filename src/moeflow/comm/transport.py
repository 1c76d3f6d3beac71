"""How bytes move between ranks, and how many moved.

The Buffer packs everything it sends into byte tensors (``uint8``, rows of a fixed width) and
hands them here. Sending bytes rather than typed tensors keeps one code path for every dtype,
FP8 included (Gloo has no FP8 type), and lets metadata ride in the same message as the payload.

Shape letters: R ranks, P ranks per node; rows and widths are in the caller's units (one row
per token copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist

from .. import interleave

if TYPE_CHECKING:
    from .health import Watchdog

__all__ = ["ByteCounters", "EventOverlap", "FlatTransport", "RowFormat", "Workspace", "rows_view"]

_ALIGN = 8  # bytes; every field of a packed metadata row starts on this boundary so it can be viewed in place


class EventOverlap:
    """DeepEP's event contract: what an ``async_finish=True`` call returns last.

    ``current_stream_wait()`` waits for the transfer (on CUDA: makes the current stream wait;
    on CPU: blocks until the bytes arrived) and then fills the tensors the call returned. It is
    idempotent, and also runs on leaving a ``with event:`` block.
    """

    def __init__(self, works: tuple = (), finalizers: tuple[Callable[[], None], ...] = ()):
        self._works = [w for w in works if w is not None]
        self._finalizers = list(finalizers)

    def current_stream_wait(self) -> None:
        works, self._works = self._works, []
        for w in works:
            w.wait()
        finalizers, self._finalizers = self._finalizers, []
        for f in finalizers:
            f()

    def is_pending(self) -> bool:
        """True until :meth:`current_stream_wait` has run."""
        return bool(self._works or self._finalizers)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()


@dataclass
class ByteCounters:
    """Bytes sent to and received from each peer, per kind of exchange, since the last reset.

    ``sent[kind][r]`` is what this rank sent to rank ``r``; the entry for this rank itself is the
    copy that never leaves the process (kept so totals match the tensors moved; use
    :meth:`wire_bytes` for what crossed a link). ``ranks_per_node`` (P, default: all ranks on
    one node) says which peers share this rank's node: rank ``r`` lives on node ``r // P``.
    """

    rank: int
    num_ranks: int
    ranks_per_node: Optional[int] = None
    sent: dict[str, list[int]] = field(default_factory=dict)
    recv: dict[str, list[int]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, sent_per_rank: list[int], recv_per_rank: list[int], new_call: bool = True) -> None:
        """Add one exchange's bytes; ``new_call=False`` for a companion message of the same call."""
        s = self.sent.setdefault(kind, [0] * self.num_ranks)
        r = self.recv.setdefault(kind, [0] * self.num_ranks)
        for i in range(self.num_ranks):
            s[i] += sent_per_rank[i]
            r[i] += recv_per_rank[i]
        if new_call:
            self.calls[kind] = self.calls.get(kind, 0) + 1

    def wire_bytes(self, kind: str | None = None, direction: str = "sent", scope: str = "all",
                   ranks_per_node: Optional[int] = None) -> int:
        """Bytes that crossed to other ranks (self excluded), for one kind or all kinds.

        Args:
            kind: ``"layout"``, ``"dispatch"``, ``"combine"``, ... or None for all kinds.
            direction: ``"sent"`` or ``"recv"``.
            scope: ``"all"`` (every other rank), ``"inter_node"`` (ranks on other nodes) or
                ``"intra_node"`` (other ranks on this rank's node).
            ranks_per_node: P for the node split (default: the counters' own, else one node).
        """
        if direction not in ("sent", "recv"):
            raise ValueError(f"ByteCounters.wire_bytes: `direction` must be 'sent' or 'recv', got {direction!r}")
        if scope not in ("all", "inter_node", "intra_node"):
            raise ValueError(f"ByteCounters.wire_bytes: `scope` must be 'all', 'inter_node' or 'intra_node', "
                             f"got {scope!r}")
        P = ranks_per_node or self.ranks_per_node or self.num_ranks
        if P < 1 or self.num_ranks % P:
            raise ValueError(f"ByteCounters.wire_bytes: `ranks_per_node` must divide {self.num_ranks}, got {P}")
        node = self.rank // P
        peers = [i for i in range(self.num_ranks) if i != self.rank
                 and (scope == "all" or (i // P != node) == (scope == "inter_node"))]
        table = self.sent if direction == "sent" else self.recv
        kinds = [kind] if kind is not None else list(table)
        return sum(table[k][i] for k in kinds if k in table for i in peers)

    def reset(self) -> None:
        self.sent.clear()
        self.recv.clear()
        self.calls.clear()




def unpack_topk_meta(fmt: "RowFormat", recv_meta, recv_scales, recv_topk_idx, recv_topk_weights,
                     ids_dtype: torch.dtype, has_weights: bool) -> None:
    """Copy the received metadata rows (FP8 scales, local top-k ids, weights) into their outputs."""
    if recv_scales is not None:
        recv_scales.copy_(fmt.view(recv_meta, "scales", torch.float32))
    if recv_topk_idx is not None:
        recv_topk_idx.copy_(fmt.view(recv_meta, "ids", ids_dtype))
        if has_weights:
            recv_topk_weights.copy_(fmt.view(recv_meta, "weights", torch.float32))


@dataclass(frozen=True)
class RowFormat:
    """Byte layout of a packed metadata row: named fields, each starting on an 8-byte boundary.

    ``fields`` is ``((name, nbytes), ...)`` in wire order; zero-byte fields take no room.
    """

    fields: tuple[tuple[str, int], ...]

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


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class FlatTransport:
    """One ``all_to_all_single`` per exchange, every rank talking to every rank directly."""

    def __init__(self, group: dist.ProcessGroup | None, ranks_per_node: Optional[int] = None,
                 watchdog: Optional["Watchdog"] = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.counters = ByteCounters(self.rank, self.num_ranks, ranks_per_node)
        # Every Work this transport hands out is waited on with the watchdog's timeout, so a dead
        # or stuck peer becomes an error naming it (see moeflow.comm.health).
        self.watchdog = watchdog

    def _timed(self, works: list) -> list:
        wd = self.watchdog
        return works if wd is None else [wd.wrap(w) for w in works]

    def all_to_all_rows(self, recv_rows: torch.Tensor, send_rows: torch.Tensor,
                        num_recv_rows_per_rank: list[int], num_send_rows_per_rank: list[int],
                        kind: str, async_op: bool = False, new_call: bool = True):
        """Exchange rows of a 2-D tensor: rank r gets ``num_send_rows_per_rank[r]`` rows from us.

        Args:
            recv_rows: ``[sum(num_recv_rows_per_rank), W]``, written in source-rank order.
            send_rows: ``[sum(num_send_rows_per_rank), W]``, grouped by destination rank.

        Returns:
            the collective's ``Work`` when ``async_op``, else None.
        """
        width = send_rows.size(1) * send_rows.element_size() if send_rows.dim() == 2 else send_rows.element_size()
        self.counters.record(kind, [n * width for n in num_send_rows_per_rank],
                             [n * width for n in num_recv_rows_per_rank], new_call)
        if self.num_ranks == 1:
            # Nothing to exchange: the single "peer" is this rank. Skip the collective's
            # overhead; a copy keeps the output buffer semantics identical.
            recv_rows.copy_(send_rows)
            return None
        if self.watchdog is None:
            return dist.all_to_all_single(recv_rows, send_rows, num_recv_rows_per_rank,
                                          num_send_rows_per_rank, group=self.group, async_op=async_op)
        # Always issued async so that even a synchronous exchange waits with the timeout.
        work = self.watchdog.wrap(dist.all_to_all_single(recv_rows, send_rows, num_recv_rows_per_rank,
                                                         num_send_rows_per_rank, group=self.group, async_op=True))
        if async_op:
            return work
        work.wait()
        return None

    def exchange_pairwise(self, recv_by_rank: list[Optional[torch.Tensor]],
                          send_for: Callable[[int], torch.Tensor], kind: str,
                          on_first_step: Optional[Callable[[], None]] = None) -> list:
        """Row exchange as R-1 pairwise steps: at step i send to rank+i, receive from rank-i.

        Used for the payload instead of one ``all_to_all_single`` because it lets the caller
        (1) build each peer's rows just before they are sent, so building the next peer's rows
        overlaps the previous transfer, (2) handle its own rows with no send buffer and no
        loopback copy (``on_first_step`` runs while the first transfer is in flight), and
        (3) receive each peer's rows into any contiguous tensor. Measured on loopback Gloo it
        moves bytes as fast as the all-to-all. Every rank walks the steps in the same order,
        each step one batched send/recv pair, so no backend can deadlock on it.

        Args:
            recv_by_rank: for each source rank, the contiguous tensor its rows land in (None or
                empty: nothing comes from it; this rank's own entry is ignored).
            send_for: ``send_for(dst)`` returns the contiguous rows for rank ``dst`` (empty:
                nothing to send). Called once per peer, in step order.

        Returns:
            the works to wait on.
        """
        R, rank = self.num_ranks, self.rank
        sent, recvd = [0] * R, [0] * R
        works: list = []
        for i in range(1, R):
            dst, src = (rank + i) % R, (rank - i) % R
            ops = []
            rows = send_for(dst)
            if rows.numel():
                ops.append(dist.P2POp(dist.isend, rows, self._global(dst), self.group))
                sent[dst] = rows.numel() * rows.element_size()
            target = recv_by_rank[src]
            if target is not None and target.numel():
                ops.append(dist.P2POp(dist.irecv, target, self._global(src), self.group))
                recvd[src] = target.numel() * target.element_size()
            if ops:
                works += self._timed(dist.batch_isend_irecv(ops))
            if i == 1 and on_first_step is not None:
                on_first_step()
        if R == 1 and on_first_step is not None:
            on_first_step()
        own = recv_by_rank[rank]
        if own is not None:
            sent[rank] = recvd[rank] = own.numel() * own.element_size()
        self.counters.record(kind, sent, recvd)
        return works

    def exchange_segments(self, sends: list[tuple[int, int, torch.Tensor]],
                          recvs: list[tuple[int, int, torch.Tensor]], kind: str,
                          new_call: bool = False) -> list:
        """Post point-to-point messages, one per ``(peer, tag, tensor)``, as one batch.

        Lets a message land straight in a slice of a larger tensor (the hierarchical transport
        places each source rank's rows at their place in ``recv_x`` with no staging copy).
        Messages between one pair of ranks are told apart by ``tag``; every rank posts its
        sends and receives in the same call, so no backend can deadlock on it. Empty tensors
        and this rank itself are skipped (the caller copies its own rows).

        Returns:
            the works to wait on.
        """
        R = self.num_ranks
        sent, recvd = [0] * R, [0] * R
        ops = []
        for peer, tag, t in sends:
            if peer != self.rank and t.numel():
                ops.append(dist.P2POp(dist.isend, t, self._global(peer), self.group, tag))
                sent[peer] += t.numel() * t.element_size()
        for peer, tag, t in recvs:
            if peer != self.rank and t.numel():
                ops.append(dist.P2POp(dist.irecv, t, self._global(peer), self.group, tag))
                recvd[peer] += t.numel() * t.element_size()
        self.counters.record(kind, sent, recvd, new_call)
        # The exchange itself: every message of the step in one batch (see the docstring).
        return self._timed(dist.batch_isend_irecv(ops)) if ops else []

    def _global(self, group_rank: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def exchange_counts(self, send_counts: torch.Tensor, kind: str = "layout") -> torch.Tensor:
        """All-to-all of a small int64 table: row r of ``send_counts`` [R, C] goes to rank r.

        Returns ``[R, C]`` int64, row r from rank r. Synchronous: the caller needs the numbers
        on the host to size the next exchange.
        """
        recv_counts = torch.empty_like(send_counts)
        work = self.all_to_all_rows(recv_counts, send_counts, [1] * self.num_ranks, [1] * self.num_ranks, kind,
                                    async_op=True)
        # a hand-over point: another micro-batch's lane may compute while the counts travel
        interleave.wait(EventOverlap((work,)))
        return recv_counts


class Workspace:
    """Send-side byte buffers kept between calls.

    A 30 MiB buffer allocated fresh costs ~6 ms of page faults here on every call, as much as
    packing it; internal buffers (never returned to the caller) are therefore reused. A buffer
    is taken for the life of one exchange and given back when its transfer is done, so async
    calls in flight never share one.
    """

    _KEEP = 2  # free buffers kept; more would only hold memory

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        fits = [i for i, b in enumerate(self._free) if b.device == device and b.numel() >= nbytes]
        if fits:
            return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)

    def give(self, buf: torch.Tensor) -> None:
        self._free.append(buf)
        if len(self._free) > self._KEEP:
            self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))

    def clear(self) -> None:
        self._free.clear()


def rows_view(buf: torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
    """The first ``rows`` rows of ``like``'s row width inside byte buffer ``buf``, viewed as ``like``'s dtype."""
    width = like.size(1) * like.element_size()
    return buf[:rows * width].view(rows, width).view(like.dtype)
