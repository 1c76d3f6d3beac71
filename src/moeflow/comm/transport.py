"""The Transport: the one place where moeflow calls ``torch.distributed``, watched and counted.

Every collective and point-to-point message of the library goes through a :class:`Transport`:
**watched** (waited on with the :class:`~moeflow.comm.health.Watchdog`'s timeout, so a lost
peer is named, not waited on forever) and **counted** (:class:`ByteCounters`). On CUDA only the
waits whose result the host reads anyway are timed: ``Work.wait(timeout)`` on NCCL spins the
host until the transfer is done, which would serialise it with every dispatch and break
CUDA-graph capture. docs/architecture.md ("The Transport") has the why of each choice.

Shape letters (docs/architecture.md): R ranks in the group; a row is one token copy, W its width.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import interleave
from .health import Watchdog, resolve_timeout

__all__ = ["ByteCounters", "EventOverlap", "Transport", "ProcessGroupTransport", "Workspace", "make_transport",
           "host_device", "host_driven", "rows_view"]

# A message of a row exchange: (peer, rows). On the sending side the rows may be a callable that
# builds them when their turn comes (see ProcessGroupTransport.exchange).
Rows = Union[torch.Tensor, Callable[[], torch.Tensor]]


class EventOverlap:
    """DeepEP's event contract: what an ``async_finish=True`` call returns last.

    ``current_stream_wait()`` waits for the transfer (on CUDA: makes the current stream wait;
    on CPU: blocks until the bytes arrived) and then fills the tensors the call returned. It is
    idempotent, and also runs on leaving a ``with event:`` block. Its first call is a hand-over
    point (:mod:`moeflow.comm.interleave`): when micro-batches run as lanes, another one computes
    while this one waits.
    """

    def __init__(self, works: Sequence = (), finalizers: Sequence[Callable[[], None]] = ()):
        self._works = [w for w in works if w is not None]
        self._finalizers = list(finalizers)
        self._waited = False

    def current_stream_wait(self) -> None:
        if self._waited:
            return
        self._waited = True
        works, self._works = self._works, []
        finalizers, self._finalizers = self._finalizers, []
        with interleave.waiting():
            for w in works:
                w.wait()
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
    :meth:`wire_bytes` for what crossed a link). ``calls[kind]`` counts calls, all-reduces
    included (their bytes per peer depend on the backend's algorithm and are not counted).
    ``ranks_per_node`` (default: all ranks on one node) says which peers share this rank's
    node: rank ``r`` lives on node ``r // ranks_per_node``.
    """

    rank: int
    num_ranks: int
    ranks_per_node: Optional[int] = None
    sent: dict[str, list[int]] = field(default_factory=dict)
    recv: dict[str, list[int]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, sent_per_rank: Sequence[int], recv_per_rank: Sequence[int],
               new_call: bool = True) -> None:
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
            kind: ``"layout"``, ``"dispatch"``, ``"combine"``, ``"migration"``, ... or None for all.
            direction: ``"sent"`` or ``"recv"``.
            scope: ``"all"`` (every other rank), ``"inter_node"`` (ranks on other nodes) or
                ``"intra_node"`` (other ranks on this rank's node).
            ranks_per_node: for the node split (default: the counters' own, else one node).
        """
        if direction not in ("sent", "recv"):
            raise ValueError(f"ByteCounters.wire_bytes: `direction` must be 'sent' or 'recv', got {direction!r}")
        if scope not in ("all", "inter_node", "intra_node"):
            raise ValueError(f"ByteCounters.wire_bytes: `scope` must be 'all', 'inter_node' or 'intra_node', "
                             f"got {scope!r}")
        per_node = ranks_per_node or self.ranks_per_node or self.num_ranks
        if per_node < 1 or self.num_ranks % per_node:
            raise ValueError(f"ByteCounters.wire_bytes: `ranks_per_node` must divide {self.num_ranks}, got {per_node}")
        node = self.rank // per_node
        peers = [i for i in range(self.num_ranks) if i != self.rank
                 and (scope == "all" or (i // per_node != node) == (scope == "inter_node"))]
        table = self.sent if direction == "sent" else self.recv
        kinds = [kind] if kind is not None else list(table)
        return sum(table[k][i] for k in kinds if k in table for i in peers)

    def reset(self) -> None:
        self.sent.clear()
        self.recv.clear()
        self.calls.clear()


class Transport:
    """What moeflow asks of a communication backend; every method is watched and counted.

    Attributes:
        group: the process group (None: the world). rank, num_ranks: this rank, R.
        counters: :class:`ByteCounters`.
        watchdog: the :class:`Watchdog` of this transport's waits (None with one rank).
    """

    group: Optional[dist.ProcessGroup]
    rank: int
    num_ranks: int
    counters: ByteCounters
    watchdog: Optional[Watchdog]

    def arrive(self, kind: str) -> None:
        """Count one call (a dispatch, ...) for the watchdog: every rank makes the same calls."""
        if self.watchdog is not None:
            self.watchdog.arrive(kind)

    def exchange_counts(self, table: torch.Tensor, kind: str = "layout") -> torch.Tensor:
        """Row r of ``table`` (int64, one row per rank) to rank r; returns the rows from each rank."""
        raise NotImplementedError

    def exchange(self, sends: Sequence[tuple[int, Rows]], recvs: Sequence[tuple[int, torch.Tensor]],
                 kind: str, *, device: torch.device, new_call: bool = True,
                 on_first_step: Optional[Callable[[], None]] = None, own_bytes: int = 0) -> list:
        """Point-to-point row messages; returns the works to wait on (see the implementation)."""
        raise NotImplementedError

    def all_to_all(self, recv: torch.Tensor, send: torch.Tensor, recv_splits: Optional[list[int]] = None,
                   send_splits: Optional[list[int]] = None, *, kind: str, async_op: bool = False,
                   new_call: bool = True, host: bool = False):
        """``all_to_all_single`` of rows (even splits when None); the Work when ``async_op``."""
        raise NotImplementedError

    def exchange_slots(self, send: torch.Tensor, recv: torch.Tensor, num_valid_per_rank: Optional[torch.Tensor],
                       kind: str, *, new_call: bool = True) -> tuple:
        """Static slots ``[R * T_max, W]``: block ``d`` of ``send`` goes to rank ``d``, block ``s``
        of ``recv`` comes from rank ``s``. With ``num_valid_per_rank`` (``[R]`` on the device: only
        the first rows of each block are used) an implementation may move the used rows only.
        Returns ``(work or None, recv_valid [R * T_max] bool or None)``: None when all moved."""
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, kind: str = "all_reduce") -> torch.Tensor:
        """``tensor`` reduced over the group in place; counted as one call."""
        raise NotImplementedError

    def barrier(self, kind: str = "barrier") -> None:
        """Wait until every rank of the group got here; counted as one call."""
        raise NotImplementedError

    def guard(self, kind: str) -> ContextManager[None]:
        """Watch collectives issued outside the transport (FSDP2's inside a forward or backward)
        over this transport's ranks: see :meth:`Watchdog.guard`. A no-op with one rank."""
        return self.watchdog.guard(kind) if self.watchdog is not None else contextlib.nullcontext()

    def broadcast(self, tensor: torch.Tensor, src: int, kind: str = "broadcast") -> torch.Tensor:
        """``tensor`` of group rank ``src`` copied into ``tensor`` on every rank; counted as one call."""
        raise NotImplementedError

    def destroy(self) -> None:
        """Free what the transport keeps between calls (it comes back on the next call)."""


class ProcessGroupTransport(Transport):
    """A :class:`Transport` over any ``torch.distributed`` process group (Gloo, NCCL, ...).

    Args:
        group: the process group (None: the world).
        timeout_s: seconds any one wait may take (default: env ``MOEFLOW_TIMEOUT_S``, else 30).
        ranks_per_node: for the node split of :attr:`counters` (default: one node).
        name: what its calls are made on, for the watchdog's messages (e.g. "training loop").
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, *, timeout_s: Optional[float] = None,
                 ranks_per_node: Optional[int] = None, name: str = "Buffer"):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.timeout_s = resolve_timeout(timeout_s)
        self.counters = ByteCounters(self.rank, self.num_ranks, ranks_per_node)
        # One rank has no peer to lose: no watchdog, no heartbeat thread.
        self.watchdog = Watchdog(group, self.timeout_s, name=name) if self.num_ranks > 1 else None
        # group rank -> global rank, for point-to-point ops (which take global ranks)
        world = group is None or group is dist.group.WORLD
        self._global = list(range(self.num_ranks)) if world else dist.get_process_group_ranks(group)
        self.host_device = host_device(group)

    def _reachable(self, t: torch.Tensor) -> torch.Tensor:
        """``t``, or a copy on :attr:`host_device` when ``t`` is on the CPU and the group has no
        CPU backend (count tables, agreement rows and load sums are built on the host)."""
        moved = t.device.type == "cpu" and self.host_device.type != "cpu"
        return t.to(self.host_device) if moved else t

    def _issue(self, collective: Callable, *args, **kwargs):
        """Start a collective; a backend that cannot even start it (a peer's connection is gone)
        is diagnosed like a failed wait, naming the lost peer."""
        try:
            return collective(*args, **kwargs)
        except RuntimeError as cause:  # DistBackendError included; bad arguments raise others
            wd = self.watchdog
            if wd is None:
                raise
            raise wd.diagnose(wd.calls, wd.kind, cause, 0.0) from cause

    def _watch(self, works: list, host: bool) -> list:
        """Works whose ``wait()`` is bounded by the timeout: all of them where the host waits
        anyway (CPU tensors, or ``host``), else the stream-ordered works as they are."""
        wd = self.watchdog
        return works if wd is None or not host else [wd.wrap(w) for w in works]

    def exchange_counts(self, table: torch.Tensor, kind: str = "layout") -> torch.Tensor:
        """Synchronous, timed on any device: the host needs the numbers to size what follows.
        Waited on through an :class:`EventOverlap`, so the wait is a hand-over point too."""
        table = self._reachable(table)
        recv = torch.empty_like(table)
        EventOverlap([self.all_to_all(recv, table, kind=kind, host=True, async_op=True)]).current_stream_wait()
        return recv

    def all_to_all(self, recv: torch.Tensor, send: torch.Tensor, recv_splits: Optional[list[int]] = None,
                   send_splits: Optional[list[int]] = None, *, kind: str, async_op: bool = False,
                   new_call: bool = True, host: bool = False):
        """``host``: the host reads the result, so the wait is timed on any device."""
        R = self.num_ranks
        row = math.prod(send.shape[1:]) * send.element_size()  # bytes of one row (dim 0 is split)
        num_send = send_splits if send_splits is not None else [send.size(0) // R] * R
        num_recv = recv_splits if recv_splits is not None else [recv.size(0) // R] * R
        self.counters.record(kind, [n * row for n in num_send], [n * row for n in num_recv], new_call)
        if R == 1:
            recv.copy_(send)  # no peer: skip the collective, same output semantics
            return None
        # Always issued async, so that a synchronous exchange is waited on with the timeout too.
        work = self._issue(dist.all_to_all_single, recv, send, recv_splits, send_splits, group=self.group,
                           async_op=True)
        (work,) = self._watch([work], host or send.device.type == "cpu")
        if async_op:
            return work
        work.wait()
        return None

    def exchange(self, sends: Sequence[tuple[int, Rows]], recvs: Sequence[tuple[int, torch.Tensor]],
                 kind: str, *, device: torch.device, new_call: bool = True,
                 on_first_step: Optional[Callable[[], None]] = None, own_bytes: int = 0) -> list:
        """Point-to-point messages: ``(peer, rows)`` to send and ``(peer, tensor)`` to receive into.

        Messages to or from this rank itself are the caller's (a local copy of ``own_bytes``,
        counted as sent to and received from itself); empty ones are skipped. The k-th message from rank a to rank b pairs with the k-th message b expects
        from a (tagged k: Gloo matches tags, NCCL matches posting order, both agree).

        Per backend (docs/architecture.md, "Why pairwise steps on Gloo"):
          CPU (Gloo): R-1 pairwise steps, at step i everything to rank+i and from rank-i, one
              batch each. A callable's rows are built when its step comes, so building the next
              peer's rows overlaps the transfer of the previous ones (Gloo sends on its own
              threads); ``on_first_step`` runs while the first step is in flight.
          CUDA (NCCL): every message in one batch, i.e. one NCCL group, as ``all_to_all_single``
              is; gathers are kernels on the stream and overlap by themselves, and R-1 separate
              groups would serialise R-1 launches.

        Returns:
            the works to wait on.
        """
        R, rank = self.num_ranks, self.rank
        sent, recvd = [0] * R, [0] * R
        by_dst: dict[int, list] = {}
        by_src: dict[int, list] = {}
        for peer, rows in sends:
            if peer != rank:
                by_dst.setdefault(peer, []).append(rows)
        for peer, t in recvs:
            if peer != rank:
                by_src.setdefault(peer, []).append(t)
        cpu = host_driven(device)
        steps = [(rank + i) % R for i in range(1, R)]
        ops, works = [], []
        for i, dst in enumerate(steps):
            src = (rank - i - 1) % R
            for tag, rows in enumerate(by_dst.get(dst, ())):
                t = rows() if callable(rows) else rows
                if t.numel():
                    ops.append(dist.P2POp(dist.isend, t, self._global[dst], self.group, tag))
                    sent[dst] += t.numel() * t.element_size()
            for tag, t in enumerate(by_src.get(src, ())):
                if t.numel():
                    ops.append(dist.P2POp(dist.irecv, t, self._global[src], self.group, tag))
                    recvd[src] += t.numel() * t.element_size()
            if cpu and ops:  # Gloo: this step goes now; the next peer's rows are built meanwhile
                works += self._watch(self._issue(dist.batch_isend_irecv, ops), True)
                ops = []
            if i == 0 and on_first_step is not None:
                on_first_step()
                on_first_step = None
        if ops:  # NCCL: the whole exchange as one group
            works += self._watch(self._issue(dist.batch_isend_irecv, ops), False)
        if on_first_step is not None:
            on_first_step()
        sent[rank] += own_bytes
        recvd[rank] += own_bytes
        self.counters.record(kind, sent, recvd, new_call)
        return works

    def exchange_slots(self, send: torch.Tensor, recv: torch.Tensor, num_valid_per_rank: Optional[torch.Tensor],
                       kind: str, *, new_call: bool = True) -> tuple:
        # The static slots move whole: equal splits, so no rank needs to know the others' counts.
        R = self.num_ranks
        work = self.all_to_all(recv.view(R, -1), send.view(R, -1), kind=kind, async_op=True, new_call=new_call)
        return work, None

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, kind: str = "all_reduce") -> torch.Tensor:
        moved = self._reachable(tensor)
        self._host_collective(kind, dist.all_reduce, moved, op=op)
        return tensor if moved is tensor else tensor.copy_(moved)

    def barrier(self, kind: str = "barrier") -> None:
        self._host_collective(kind, dist.barrier)

    def broadcast(self, tensor: torch.Tensor, src: int, kind: str = "broadcast") -> torch.Tensor:
        moved = self._reachable(tensor)
        self._host_collective(kind, dist.broadcast, moved, group_src=src)
        return tensor if moved is tensor else tensor.copy_(moved)

    def _host_collective(self, kind: str, collective: Callable, *args, **kwargs) -> None:
        """A small collective the host waits for, timed on any device and counted as one call
        (its bytes per peer depend on the backend's algorithm and are not counted)."""
        if self.num_ranks == 1:
            return
        self.arrive(kind)
        self.counters.record(kind, [0] * self.num_ranks, [0] * self.num_ranks)
        work = self._issue(collective, *args, group=self.group, async_op=True, **kwargs)
        self._watch([work], True)[0].wait()


def host_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where ``group`` takes the host's small tensors: the CPU when it has a CPU backend (Gloo, or
    ``"cpu:gloo,cuda:nccl"``), else its device (plain NCCL: the current CUDA device), as torch's
    own object collectives choose."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    types = [d.type for d in getattr(pg, "_device_types", ())]
    return torch.device("cpu" if not types or "cpu" in types else types[0])


def host_driven(device: torch.device) -> bool:
    """Whether the calling thread itself does the copies for tensors on ``device`` (CPU): the
    data path then orders them around the transfers (pairwise steps, combine pieces, span sums,
    the row-gather trick). False on accelerators, where copies are kernels queued on a stream.
    The one place that choice is made; tests patch it to run the accelerator's choices over
    Gloo (tests/test_buffer.py)."""
    return device.type == "cpu"


def make_transport(group: Optional[dist.ProcessGroup] = None, **kwargs) -> Transport:
    """The transport for ``group``: ``SymmMemTransport`` (:mod:`moeflow.comm.gpu`) for NCCL groups
    whose process has NVSHMEM symmetric memory set up (:func:`~moeflow.comm.gpu.symm_mem_unavailable`
    says what it takes; env ``MOEFLOW_SYMM_MEM=0`` declines it), else
    :class:`ProcessGroupTransport`. ``kwargs``: ``timeout_s``, ``ranks_per_node`` as there."""
    from .gpu import SymmMemTransport, symm_mem_available  # imports no CUDA code unless usable

    wanted = os.environ.get("MOEFLOW_SYMM_MEM", "1") != "0"
    cls = SymmMemTransport if wanted and symm_mem_available(group) else ProcessGroupTransport
    return cls(group, **kwargs)


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
