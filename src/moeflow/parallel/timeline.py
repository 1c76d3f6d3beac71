"""Where a rank's time went in one training step: compute, exposed communication, bubble.

Spans are recorded by the pipeline stages (each forward / backward action, see
:class:`moeflow.parallel.pipeline.TimedStage`) and by the hand-over points at the waits on
transfers (each transfer's issue and the part of its wait that nothing else covered, see
:mod:`moeflow.comm.interleave`). Times are host ``time.perf_counter`` seconds: on CPU that is when
the work ran; on CUDA it is when the host queued it or waited for it (use the profiler there).

Definitions (per rank, over a window such as one step):
    wall           the window's length.
    busy           the union of the action spans (some micro-batch was computing or talking).
    exposed comm   the union of the communication spans: issuing a dispatch/combine (packing,
                   the count exchange) or blocked on one with no other lane left to run. With
                   overlap, the time a lane spends handed over is *not* in it: the other lane ran.
    switching      with overlap: the union of the hand-overs' wake-up latencies (from a lane
                   passing the turn until the other lane's thread runs; the OS scheduler's).
    compute        busy - exposed comm - switching.
    bubble         wall - busy: waiting for a pipeline neighbour (activations, gradients) or idle.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Span", "Timeline", "StepTimes", "SoloLane"]

ACTIONS = ("F", "B", "W")   # forward, backward (full or input), backward weight
COMM = ("issue", "wait")
SWITCH = "switch"           # a lane's wake-up latency after the turn passed to it


@dataclass(frozen=True)
class Span:
    lane: str      # who: e.g. "s1 mb3" (stage 1, micro-batch 3)
    kind: str      # "F", "B", "W", "issue", "wait" or "switch"
    start: float
    end: float


@dataclass(frozen=True)
class StepTimes:
    """One window's accounting in seconds (see the module docstring)."""

    wall: float
    compute: float
    exposed_comm: float
    bubble: float
    switching: float = 0.0

    @property
    def comm_share(self) -> float:
        """Exposed communication over wall time."""
        return self.exposed_comm / self.wall if self.wall > 0 else 0.0

    @staticmethod
    def mean(steps: list["StepTimes"]) -> "StepTimes":
        n = max(1, len(steps))
        return StepTimes(*(sum(getattr(s, f) for s in steps) / n
                           for f in ("wall", "compute", "exposed_comm", "bubble", "switching")))


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


@dataclass
class Timeline:
    """Spans of one rank, appended from any thread (lanes run on their own threads)."""

    spans: list[Span] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, lane: str, kind: str, start: float, end: float) -> None:
        with self._lock:
            self.spans.append(Span(lane, kind, start, end))

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()

    def window(self, start: float, end: float) -> list[Span]:
        """Spans that lie inside ``[start, end]``."""
        with self._lock:
            return [s for s in self.spans if s.start >= start and s.end <= end]

    def times(self, start: float, end: float) -> StepTimes:
        spans = self.window(start, end)
        busy = _union([(s.start, s.end) for s in spans if s.kind in ACTIONS])
        comm = _union([(s.start, s.end) for s in spans if s.kind in COMM])
        switching = _union([(s.start, s.end) for s in spans if s.kind == SWITCH])
        wall = end - start
        return StepTimes(wall=wall, compute=max(0.0, busy - comm - switching), exposed_comm=comm,
                         bubble=max(0.0, wall - busy), switching=switching)


class SoloLane:
    """A lane with no partner: records communication spans, never hands over (the baseline)."""

    def __init__(self, timeline: Timeline, name: str):
        self.timeline, self.name = timeline, name
        self.issue_start: Optional[float] = None

    def hand_over(self) -> None:
        pass

    def record(self, kind: str, start: float, end: float) -> None:
        self.timeline.add(self.name, kind, start, end)


def now() -> float:
    return time.perf_counter()
