"""Hand-over points: where a micro-batch about to wait on its own transfer lets another one compute.

When two micro-batches run on one rank as *lanes* that take turns
(:mod:`moeflow.parallel.overlap` runs them), the lane about to block on a transfer hands the rank
to the other lane first, which computes (attention, expert GEMMs, backward) until it reaches a
wait of its own and hands back; by then the first lane's bytes have usually arrived.

The hand-over points are the Transport's waits: every :class:`~moeflow.comm.transport.EventOverlap`
hands over when it is first waited on (:func:`waiting`), so every dispatch and combine, forward
and backward, async or not (autograd.py's ``Pending.wait`` and its synchronous backward calls
alike), and the count exchange of a fresh dispatch (which sizes the payload, so the dispatch
call itself waits for it). The layer knows nothing of lanes or schedules. This module holds only
what those points call:

- :func:`waiting`: around a blocking wait: hand over if a lane is running, then time the rest of
  the wait as *exposed* communication;
- :func:`issuing`: around a call that starts transfers (packing, the count exchange): timed as
  communication on the current lane, minus the waits inside it;
- :func:`in_backward`: whether autograd is running a backward on this thread, i.e. a forward
  seen now is an activation-checkpoint recompute (its side effects, such as the router's load
  counts and the layer's ``last_router_output``, must not happen twice).

Without a lane on the thread these are a plain wait and no-ops: nothing changes.

Which lane is current is thread-local: each lane runs on its own thread, and on CPU autograd
runs a backward on the thread that called it. On CUDA autograd runs backward nodes on its
per-device thread instead; there the lane registered as the backward lane (at most one at a
time, see :func:`set_backward_lane`) is the one found.

Every rank of a group waits on the same events in the same order (the same code runs on every
rank), so the lanes of every rank hand over at the same points and issue their collectives in
the same order, which the backends require.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Protocol

import torch

__all__ = ["Lane", "waiting", "issuing", "in_backward", "current_lane", "use_lane", "set_backward_lane"]


class Lane(Protocol):
    """What a lane offers the hand-over points (implemented in :mod:`moeflow.parallel.overlap`).

    ``issue_start``: where the open ``"issue"`` span began (None: none open); a wait inside it
    (the count exchange of a fresh dispatch) closes it before handing over and reopens it after.
    """

    issue_start: Optional[float]

    def hand_over(self) -> None:
        """Let the other lanes run until it is this lane's turn again."""

    def record(self, kind: str, start: float, end: float) -> None:
        """Note that ``[start, end]`` (``time.perf_counter`` seconds) was spent on ``kind``:
        ``"issue"`` (starting a transfer) or ``"wait"`` (blocked on one)."""


_local = threading.local()
_backward_lane: Optional[Lane] = None  # the lane whose backward runs on autograd's device threads


def in_backward() -> bool:
    """True while autograd runs a backward on this thread (a forward now is a checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


def current_lane() -> Optional[Lane]:
    """This thread's lane (None: no lanes run here)."""
    lane = getattr(_local, "lane", None)
    if lane is None and _backward_lane is not None and in_backward():
        return _backward_lane
    return lane


@contextmanager
def use_lane(lane: Optional[Lane]) -> Iterator[None]:
    """Make ``lane`` this thread's lane for the duration (None: no lane)."""
    previous = getattr(_local, "lane", None)
    _local.lane = lane
    try:
        yield
    finally:
        _local.lane = previous


def set_backward_lane(lane: Optional[Lane]) -> None:
    """Register the lane whose backward autograd may run on another thread (CUDA device threads)."""
    global _backward_lane
    _backward_lane = lane


@contextmanager
def issuing() -> Iterator[None]:
    """Around a call that starts a transfer: timed as communication on the current lane."""
    lane = current_lane()
    if lane is None:
        yield
        return
    lane.issue_start = time.perf_counter()
    try:
        yield
    finally:
        lane.record("issue", lane.issue_start, time.perf_counter())
        lane.issue_start = None


@contextmanager
def waiting() -> Iterator[None]:
    """Around a blocking wait for a transfer: hand the rank to the other lanes first (if a lane
    runs here); what is left of the wait afterwards is recorded as ``"wait"``."""
    lane = current_lane()
    if lane is None:
        yield
        return
    if lane.issue_start is not None:  # the time handed over is not this transfer's issue
        lane.record("issue", lane.issue_start, time.perf_counter())
    lane.hand_over()
    start = time.perf_counter()
    try:
        yield
    finally:
        end = time.perf_counter()
        lane.record("wait", start, end)
        if lane.issue_start is not None:
            lane.issue_start = end
