"""Fault detection: a dead or stuck peer becomes an error naming it, within a timeout.

A collective whose peer never comes hangs until the process group's timeout (Gloo) or forever,
and the backend's error, when there is one, names a socket, not a rank. Here:

* Hot path (every Buffer call): :meth:`Watchdog.arrive` bumps an int, and every transfer is
  waited on with ``Work.wait(timeout)`` (the transport wraps each ``Work`` in a
  :class:`TimedWork`). No store traffic, no extra collective.
* Off the hot path: one daemon thread per process (:class:`_Heartbeat`) writes a small key to
  the rendezvous store every ``interval`` seconds: ``moeflow/health/<global rank>`` ->
  ``{"beat": n, "calls": {watchdog id: calls}}``.
* When a wait fails (the timeout passed, or the backend raised because a peer's connection
  closed), :meth:`Watchdog.diagnose` reads every peer's key, waits three intervals, reads them
  again and names each peer that is

  - **dead or hung**: its heartbeat did not move (process killed, crashed, or stuck holding
    the interpreter), or it never published one;
  - **stuck**: alive, but its Buffer has made fewer calls than this rank's (it stopped calling
    in: an exception it caught, a different code path, a slow step).

  and raises :class:`PeerFailureError` with those ranks. Peers that reached the call are not
  named; if every peer did, the error says the backend failed and carries its message.

  Two kinds of peer are behind without being the cause, and are not named either: a peer
  blocked inside an earlier watched transfer (it waits on the same lost rank: with pairwise
  steps one survivor can finish a call that another still waits on), and a peer that has
  itself diagnosed a failure (it may have given up and exited, so its heartbeat stops). The
  heartbeat carries both facts: ``blocked`` while any of the process's transfers is in a wait,
  and ``failed``, written at once when a diagnosis starts and left in the store as the
  process's last word. Inside :meth:`Watchdog.guard` (a block of collectives moeflow does not
  issue itself, computation in between) a process cannot tell waiting from computing, so the
  heartbeat lists the watchdogs it is inside a guard of (``guarded``): a peer behind inside an
  earlier block of the same watchdog is taken as waiting, one inside another watchdog's block is
  not (it may be stuck computing).

Watchdogs are told apart by their group's global ranks and their creation order on that group,
so Buffers must be created in the same order on every rank of a group (as DeepEP requires).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import math
import os
import threading
import time
import weakref
import zlib
from typing import Iterator, Optional

import torch.distributed as dist

__all__ = ["PeerFailureError", "Watchdog", "TimedWork", "resolve_timeout", "read_heartbeat", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 30.0  # well under a minute, far above any healthy exchange (ms to ~1 s)
_ENV = "MOEFLOW_TIMEOUT_S"
_KEY = "moeflow/health/"


class PeerFailureError(RuntimeError):
    """A transfer failed or timed out because of other ranks; names them.

    Attributes:
        rank: this rank (in the group).
        call: the Buffer call (1-based count on this Buffer) that failed.
        kind: ``"dispatch"``, ``"combine"``, ...
        dead_ranks: group ranks whose heartbeat stopped (killed, crashed or hung).
        stuck_ranks: group ranks that are alive but did not reach ``call``.
        missing_ranks: both, sorted.
    """

    def __init__(self, msg: str, rank: int, call: int, kind: str, dead_ranks: list[int], stuck_ranks: list[int]):
        super().__init__(msg)
        self.rank, self.call, self.kind = rank, call, kind
        self.dead_ranks, self.stuck_ranks = dead_ranks, stuck_ranks
        self.missing_ranks = sorted(set(dead_ranks) | set(stuck_ranks))


def resolve_timeout(timeout_s: Optional[float]) -> float:
    """``timeout_s``, else env ``MOEFLOW_TIMEOUT_S``, else :data:`DEFAULT_TIMEOUT_S`; checked > 0."""
    source = "timeout_s"
    if timeout_s is None:
        env = os.environ.get(_ENV)
        if env is None:
            return DEFAULT_TIMEOUT_S
        source = f"env {_ENV}"
        try:
            timeout_s = float(env)
        except ValueError:
            raise ValueError(f"moeflow.Buffer: {source} must be a number of seconds, got {env!r}") from None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or timeout_s <= 0:
        raise ValueError(f"moeflow.Buffer: {source} must be a positive finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


class _Heartbeat:
    """The process's heartbeat thread: publishes every live watchdog's call count to the store.

    One per process (not one per Buffer: a model has a Buffer per layer, and the store is shared
    by every rank), so this is the one module-level object in the package. The thread ends when
    the last watchdog is garbage-collected, when the store goes away (process group torn down),
    or at interpreter exit (:func:`_stop_at_exit`).
    """

    # How long the exit waits for a store write in flight (a healthy one takes a millisecond).
    EXIT_JOIN_S = 5.0

    _lock = threading.Lock()
    _instance: Optional["_Heartbeat"] = None
    _every: "weakref.WeakSet[_Heartbeat]" = weakref.WeakSet()  # a new store (elastic regroup) gets a new one

    def __init__(self, store: dist.Store, global_rank: int):
        self.store, self.global_rank = store, global_rank
        self.watchdogs: "weakref.WeakSet[Watchdog]" = weakref.WeakSet()
        self.beat = 0
        self.created: dict[int, int] = {}  # group key -> watchdogs created on it
        self.thread: Optional[threading.Thread] = None
        self.failed = False  # its latest watched transfer failed (set by diagnose, cleared by a success)
        self.stopped = threading.Event()  # set at interpreter exit: the thread ends, none starts again

    @classmethod
    def get(cls, store: dist.Store, global_rank: int) -> "_Heartbeat":
        with cls._lock:
            hb = cls._instance
            if hb is None or hb.store is not store or hb.global_rank != global_rank:
                hb = cls._instance = _Heartbeat(store, global_rank)
                cls._every.add(hb)
            return hb

    def register(self, wd: "Watchdog", group_key: int) -> str:
        with self._lock:
            k = self.created.get(group_key, 0)
            self.created[group_key] = k + 1
            self.watchdogs.add(wd)
            if (self.thread is None or not self.thread.is_alive()) and not self.stopped.is_set():
                self.thread = threading.Thread(target=self._loop, name="moeflow-heartbeat", daemon=True)
                self.thread.start()
        return f"{group_key:08x}.{k}"

    def publish(self) -> bool:
        """Write this process's key once; False when there is nothing to publish or no store."""
        with self._lock:
            wds = list(self.watchdogs)
            if not wds:
                return False
            self.beat += 1
            value = json.dumps({"beat": self.beat, "calls": {wd.id: wd.calls for wd in wds},
                                "blocked": any(wd.waiting for wd in wds),
                                "guarded": [wd.id for wd in wds if wd.guarding], "failed": self.failed})
        try:
            self.store.set(_KEY + str(self.global_rank), value)
        except Exception:  # noqa: BLE001 - the store is gone: the group was torn down
            return False
        return True

    def interval(self) -> float:
        wds = list(self.watchdogs)
        return min((wd.interval for wd in wds), default=1.0)

    def _loop(self) -> None:
        while True:
            with self._lock:
                # Checked under the lock register() takes, so a watchdog registered now either
                # is seen here or finds no thread and starts one.
                if not self.watchdogs or self.stopped.is_set():
                    self.thread = None
                    return
            if not self.publish():
                with self._lock:
                    self.thread = None
                return
            self.stopped.wait(self.interval())

    def stop(self, timeout_s: float) -> None:
        """End the thread and wait (up to ``timeout_s``) for a store write in flight to return."""
        self.stopped.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)


@atexit.register
def _stop_at_exit() -> None:
    """Stop the heartbeat before the interpreter finalizes. A daemon thread that returns from a
    C++ call which released the GIL (``store.set``) after finalization began is ended with
    ``pthread_exit``, whose unwinding through the binding's GIL guard calls ``std::terminate``:
    the process aborts ("terminate called without an active exception", SIGABRT) although its
    work is done, and torchrun reports the job as failed. atexit handlers run after the main
    thread's work and before finalization, so the thread ends cleanly here."""
    for hb in list(_Heartbeat._every):
        hb.stop(_Heartbeat.EXIT_JOIN_S)


def read_heartbeat(store: dist.Store, global_rank: int) -> Optional[dict]:
    """The latest heartbeat of ``global_rank`` in ``store`` (a default group's store), or None:
    ``{"beat": n, "calls": {...}, "blocked": bool, "failed": bool}``; a beat that stops moving
    means the process is dead or hung (see the module docstring)."""
    key = _KEY + str(global_rank)
    try:
        if not store.check([key]):  # non-blocking: get() would wait for a key that never comes
            return None
        return json.loads(store.get(key))
    except Exception:  # noqa: BLE001 - an unreadable key says as much as a missing one
        return None


class Watchdog:
    """Timeouts and diagnosis for one Buffer's transfers (see the module docstring).

    Args:
        group: the Buffer's process group (None: the world).
        timeout_s: seconds a single wait may take before the peers are diagnosed.
        store: where heartbeats live (default: the default process group's store).
        name: what the calls are made on, for messages ("Buffer", or e.g. "training loop").
    """

    def __init__(self, group: Optional[dist.ProcessGroup], timeout_s: float, store: Optional[dist.Store] = None,
                 name: str = "Buffer"):
        self.group, self.name = group, name
        self.rank = dist.get_rank(group)
        self.timeout_s = timeout_s
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # Heartbeats often enough that three of them fit well inside the timeout.
        self.interval = min(1.0, timeout_s / 10)
        self.global_ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        self.calls = 0
        self.kind = ""
        self.waiting = False  # inside work.wait(): published by the heartbeat as "blocked"
        self.guarding = False  # inside guard(): published by the heartbeat in "guarded"
        if store is None:
            try:
                store = dist.distributed_c10d._get_default_store()
            except (RuntimeError, ValueError):
                store = None
        self.store = store
        self.id = "no-store"
        if store is not None:
            group_key = zlib.crc32(",".join(map(str, self.global_ranks)).encode())
            self._heartbeat = _Heartbeat.get(store, dist.get_rank())
            self.id = self._heartbeat.register(self, group_key)
            self._heartbeat.publish()  # now, not one interval later: a rank may die right after this

    def arrive(self, kind: str) -> None:
        """Count one Buffer call (every rank of the group makes the same calls in the same order)."""
        self.calls += 1
        self.kind = kind

    def wrap(self, work) -> "TimedWork":
        return TimedWork(work, self, self.calls, self.kind)

    def wait(self, work, call: int, kind: str) -> None:
        """``work.wait`` bounded by the timeout; a failure becomes a :class:`PeerFailureError`."""
        t0 = time.monotonic()
        self.waiting = True
        try:
            work.wait(self.timeout)
        except Exception as cause:  # noqa: BLE001 - any backend failure is diagnosed the same way
            raise self.diagnose(call, kind, cause, time.monotonic() - t0) from cause
        finally:
            self.waiting = False
        if self.store is not None:
            self._heartbeat.failed = False  # a transfer went through: whatever failed before is over

    @contextlib.contextmanager
    def guard(self, kind: str) -> Iterator[None]:
        """Watch a block of collectives that moeflow does not issue itself (FSDP2's, a training
        loop's own all-reduces): a backend error inside it (a peer's connection closed, or the
        process group's timeout passed) becomes a :class:`PeerFailureError` naming the lost ranks.

        The block counts as one call, so a peer that never enters it is named as stuck; a peer
        inside an earlier block of this watchdog is taken as waiting on the lost rank too (the
        heartbeat's ``guarded``). The wait itself is bounded by the process group's timeout, not
        by ``timeout_s``: give the group moeflow's timeout (``init_process_group(timeout=...)``).
        A :class:`PeerFailureError` from a watched transfer inside the block (a Buffer's) passes
        through as it is. An error with no dead or stuck peer behind it (a bug in the block, say)
        is re-raised unchanged, after the diagnosis.
        """
        self.arrive(kind)
        call, t0 = self.calls, time.monotonic()
        self.guarding = True
        try:
            yield
        except PeerFailureError:
            raise  # diagnosed already, by the watchdog of the transfer that failed
        except RuntimeError as cause:  # torch.distributed's errors are RuntimeErrors (DistError too)
            self.guarding = False
            err = self.diagnose(call, kind, cause, time.monotonic() - t0)
            if err.missing_ranks:
                raise err from cause
            raise
        finally:
            self.guarding = False

    def diagnose(self, call: int, kind: str, cause: BaseException, waited_s: float) -> PeerFailureError:
        """Find which peers are dead or stuck (takes about three heartbeat intervals)."""
        dead: list[int] = []
        stuck: list[int] = []
        notes: list[str] = []
        if self.store is not None:
            # Written now, not at the next beat: a peer diagnosing this same failure must see that
            # this rank is a witness (it may give up and exit before its next beat).
            self._heartbeat.failed = True
            self._heartbeat.publish()
            peers = [r for r in range(len(self.global_ranks)) if r != self.rank]
            first = {r: read_heartbeat(self.store, self.global_ranks[r]) for r in peers}
            time.sleep(3 * self.interval)
            for r in peers:
                verdict, note = self._judge(r, first[r], read_heartbeat(self.store, self.global_ranks[r]), call)
                if verdict == "dead":
                    dead.append(r)
                elif verdict == "stuck":
                    stuck.append(r)
                if note:
                    notes.append(note)
        where = (f"{self.name}.{kind} on rank {self.rank} (call {call} on this {self.name}) failed after "
                 f"{waited_s:.1f} s")
        said = f"Backend said: {_first_line(cause)}"
        if dead or stuck:
            msg = f"{where}: " + "; ".join(notes) + f". {said}"
        elif self.store is None:
            msg = f"{where}; no store to read peer heartbeats from, so the missing rank cannot be named. {said}"
        else:
            others = f" ({'; '.join(notes)})" if notes else ""
            msg = (f"{where}, yet no peer is dead or stopped calling in{others}: the transfer itself failed "
                   f"or is slower than timeout_s={self.timeout_s:g}. {said}")
        return PeerFailureError(msg, self.rank, call, kind, dead, stuck)

    def _judge(self, r: int, first: Optional[dict], now: Optional[dict], call: int) -> tuple[str, str]:
        """One peer's verdict from two heartbeat reads three intervals apart: (verdict, note)."""
        if now is None:
            return "dead", f"rank {r} is dead or hung (no heartbeat: it died or never created this {self.name})"
        calls = int(now.get("calls", {}).get(self.id, 0))
        if now.get("failed"):
            # A witness: it saw a failure too (maybe this one, from its side) and may have exited.
            return "witness", (f"rank {r} failed as well and is not the cause (its last heartbeat showed "
                               f"{calls} calls on this {self.name})") if calls < call else ""
        if first is not None and now.get("beat") == first.get("beat"):
            return "dead", (f"rank {r} is dead or hung (heartbeat stopped; its last one showed {calls} "
                            f"calls on this {self.name})")
        if calls >= call:
            return "reached", ""
        if now.get("blocked"):
            return "blocked", (f"rank {r} is alive and blocked in an earlier transfer (call {calls} on this "
                               f"{self.name}), waiting on a lost rank as well")
        if self.id in now.get("guarded", ()):
            return "blocked", (f"rank {r} is alive and inside an earlier block of this {self.name} (call {calls}), "
                               "waiting on a lost rank as well or still computing")
        return "stuck", (f"rank {r} is alive but stopped calling in (it has made {calls} calls on this "
                         f"{self.name}, this rank is at call {call})")


class TimedWork:
    """A backend ``Work`` whose ``wait()`` is bounded by the watchdog's timeout."""

    __slots__ = ("work", "watchdog", "call", "kind")

    def __init__(self, work, watchdog: Watchdog, call: int, kind: str):
        self.work, self.watchdog, self.call, self.kind = work, watchdog, call, kind

    def wait(self, timeout=None) -> bool:
        self.watchdog.wait(self.work, self.call, self.kind)
        return True

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def __getattr__(self, name):
        return getattr(self.work, name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
