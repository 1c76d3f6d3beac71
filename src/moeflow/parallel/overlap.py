"""Overlap one micro-batch's expert traffic with another's compute, in a pipeline or without one.

Two micro-batches run on one rank as *lanes* that take turns: exactly one lane runs at a time,
and a lane hands the rank over at each wait on a transfer (:mod:`moeflow.comm.interleave`),
right after it issued a dispatch or combine. While its bytes travel (a Gloo / NCCL background
transfer), the other lane computes until its own next wait, then hands back::

    lane F (forward, mb i)     attn+router | issue dispatch ··wait··> experts | issue combine ··wait··> ...
    lane B (backward, mb j)                  (runs)  experts' grad | issue dispatch ··> (runs) attn grad ...

Turn-taking, not free-running threads: the order in which a rank issues its collectives is then
the same on every rank of the expert-parallel group (the lanes' code paths are the same, so
are their hand-over points), which collectives require; and the lanes never compete for the
CPU. The lanes need not have the same number of waits (a checkpoint recompute adds some, a
stage may have more layers): when one lane finishes, the other runs to its end.

Three uses:

- :func:`run_lanes`: the primitive; any callables.
- :func:`overlap_f_b`: the ``OVERLAP_F_B`` action of ``torch.distributed.pipelining``'s
  DualPipeV schedule (register it with :func:`enable_overlap`): the forward of one stage's
  micro-batch and the backward of another stage's, as two lanes.
- :func:`forward_two_halves` (inference, "two-batch overlap") and :func:`train_micro_batches`
  (training without a pipeline: the forward of micro-batch i+1 with the backward of i).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, Callable, Optional, Sequence

import torch

from ..comm import interleave
from .timeline import Timeline, now

__all__ = ["run_lanes", "overlap_f_b", "enable_overlap", "forward_two_halves", "train_micro_batches"]


# Lane threads are kept and reused: a fresh thread's first autograd pass costs ~10 ms of CPU
# here (per-thread state torch sets up lazily), which an OVERLAP_F_B per micro-batch would pay
# every time. Lanes wait for their turn, so each running lane needs a thread of its own.
_MAX_LANE_THREADS = 4
_executor: Optional[ThreadPoolExecutor] = None
_executor_lock = threading.Lock()


def _lane_threads() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_MAX_LANE_THREADS, thread_name_prefix="moeflow-lane")
        return _executor


class _Turns:
    """Whose turn it is among n lanes; a lane that finished is skipped."""

    def __init__(self, n: int):
        self.cond = threading.Condition()
        self.turn = 0
        self.alive = [True] * n
        self.passed_at = now()  # when the turn last changed hands (the woken lane's start is later)

    def _next(self, i: int) -> Optional[int]:
        n = len(self.alive)
        for k in range(1, n):
            j = (i + k) % n
            if self.alive[j]:
                return j
        return None

    def wait_turn(self, i: int) -> float:
        """Block until it is lane i's turn; returns when the turn was passed to it."""
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)
            return self.passed_at

    def hand_over(self, i: int) -> Optional[float]:
        """Pass the turn on and wait for it to come back (None: nobody else left, keep running)."""
        with self.cond:
            j = self._next(i)
            if j is None:
                return None
            self._pass(j)
            self.cond.wait_for(lambda: self.turn == i)
            return self.passed_at

    def finish(self, i: int) -> None:
        with self.cond:
            self.alive[i] = False
            j = self._next(i)
            if j is not None:
                self._pass(j)

    def _pass(self, j: int) -> None:
        self.turn, self.passed_at = j, now()
        self.cond.notify_all()


class _Lane:
    """One lane: hands over through the shared turns, records its spans into the timeline."""

    def __init__(self, turns: _Turns, index: int, name: str, timeline: Optional[Timeline]):
        self.turns, self.index, self.name, self.timeline = turns, index, name, timeline
        self.issue_start: Optional[float] = None

    def hand_over(self) -> None:
        self.resumed(self.turns.hand_over(self.index))

    def resumed(self, passed_at: Optional[float]) -> None:
        """Note the lane's wake-up latency: from the turn passing to it until it runs."""
        if passed_at is not None:
            self.record("switch", passed_at, now())

    def record(self, kind: str, start: float, end: float) -> None:
        if self.timeline is not None:
            self.timeline.add(self.name, kind, start, end)


def run_lanes(fns: Sequence[Callable[[], Any]], names: Optional[Sequence[str]] = None,
              timeline: Optional[Timeline] = None, backward_lane: Optional[int] = None) -> list:
    """Run ``fns`` as lanes that take turns at their waits on transfers (:mod:`moeflow.comm.interleave`);
    returns their results.

    Lane 0 runs on the calling thread and starts; the others on threads of their own (kept for
    the next call). Every lane runs with the caller's grad and inference mode, autocast and
    current CUDA stream.

    Args:
        fns: callables without arguments.
        names: one per lane, for the timeline (default ``lane0``, ``lane1``, ...).
        timeline: receives each lane's communication spans (:mod:`moeflow.parallel.timeline`).
        backward_lane: the index of the lane that runs an autograd backward, if any (on CUDA
            autograd runs it on its device thread; that lane is found there by this index).

    Raises:
        the first exception a lane raised (the other lanes still run to their end first, so a
        rank never leaves its peers waiting in a collective it skipped).
    """
    n = len(fns)
    names = list(names) if names is not None else [f"lane{i}" for i in range(n)]
    turns = _Turns(n)
    lanes = [_Lane(turns, i, names[i], timeline) for i in range(n)]
    results: list = [None] * n
    errors: list = [None] * n
    context = _caller_context()

    def body(i: int) -> None:
        try:
            passed_at = turns.wait_turn(i)
            if i:
                lanes[i].resumed(passed_at)
            with interleave.use_lane(lanes[i]), context():
                results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread below
            errors[i] = e
        finally:
            turns.finish(i)

    if n - 1 > _MAX_LANE_THREADS:
        raise ValueError(f"run_lanes: at most {_MAX_LANE_THREADS + 1} lanes, got {n}")
    if backward_lane is not None:
        interleave.set_backward_lane(lanes[backward_lane])
    try:
        others = [_lane_threads().submit(body, i) for i in range(1, n)]
        body(0)
        for f in others:
            f.result()
    finally:
        if backward_lane is not None:
            interleave.set_backward_lane(None)
    for i, e in enumerate(errors):
        if e is not None:
            raise RuntimeError(f"moeflow overlap: lane {names[i]!r} failed: {e}") from e
    return results


def _caller_context() -> Callable[[], ExitStack]:
    """The calling thread's thread-local torch state, to enter on a lane thread: grad and
    inference mode, autocast (CPU and CUDA), and the current CUDA stream (a lane's kernels go
    where the caller's would)."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    stream = torch.cuda.current_stream() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def enter() -> ExitStack:
        stack = ExitStack()
        stack.enter_context(torch.inference_mode(inference))
        stack.enter_context(torch.set_grad_enabled(grad))
        for device, dtype in autocast:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        if stream is not None:
            stack.enter_context(torch.cuda.stream(stream))
        return stack

    return enter


# ------------------------------------------------------------------------------ in a pipeline
def overlap_f_b(action, ctx) -> None:
    """Run an ``OVERLAP_F_B`` action (a forward and a backward sub-action) as two lanes.

    The signature of ``_PipelineScheduleRuntime.register_custom_function``'s functions. Does
    what the runtime does for each sub-action on its own (wait for the pipeline receives, run
    the stage, compute the loss on the last stage, hand outputs to a neighbouring stage on this
    rank), except that the forward and the backward take turns at their waits on transfers.
    Loss functions that need ``loss_kwargs`` are not supported here (the runtime does not pass
    them to custom functions).
    """
    from torch.distributed.pipelining.schedules import (BACKWARD_INPUT, FORWARD, FULL_BACKWARD,
                                                        _wait_batch_p2p)

    schedule = ctx.schedule_ref
    stages = {s.stage_index: s for s in schedule._stages}
    fwd, bwd = action.sub_actions
    if fwd.computation_type != FORWARD or bwd.computation_type not in (FULL_BACKWARD, BACKWARD_INPUT):
        raise ValueError(f"overlap_f_b: expected (FORWARD, FULL_BACKWARD or BACKWARD_INPUT) sub-actions, got {action}")
    f_idx, f_mb = fwd.stage_index, fwd.microbatch_index
    b_idx, b_mb = bwd.stage_index, bwd.microbatch_index
    f_stage, b_stage = stages[f_idx], stages[b_idx]
    # Pipeline inputs first (the same receives the runtime waits for before each sub-action);
    # a neighbour on this rank hands its tensors over directly, with no receive.
    if not f_stage.is_first and f_idx - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((f_idx, f_mb)))
    if not b_stage.is_last and b_idx + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((b_idx, b_mb)))
    schedule._assert_unsharded(f_stage)
    schedule._assert_unsharded(b_stage)
    full = bwd.computation_type == FULL_BACKWARD
    has_backward = b_stage.has_backward  # False under schedule.eval(): the forward alone

    def forward() -> None:
        out = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb])
        schedule._maybe_compute_loss(f_stage, out, ctx.target_mbs, f_mb)
        if f_idx + 1 in stages:
            stages[f_idx + 1].set_local_fwd_input(out, f_mb)

    def backward() -> None:
        loss = schedule._maybe_get_loss(b_stage, b_mb)
        last = False
        if full:
            schedule.backward_counter[b_idx] += 1
            last = schedule.backward_counter[b_idx] == schedule._n_microbatches
        b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=full, last_backward=last)
        if b_idx - 1 in stages:
            stages[b_idx - 1].set_local_bwd_input(b_stage.get_local_bwd_output(b_mb), b_mb)

    timeline = getattr(f_stage, "timeline", None)
    if not has_backward:
        forward()
        return
    run_lanes([forward, backward], names=[f"s{f_idx} mb{f_mb}", f"s{b_idx} mb{b_mb}"], timeline=timeline,
              backward_lane=1)


def enable_overlap(schedule) -> None:
    """Register :func:`overlap_f_b` for the schedule's ``OVERLAP_F_B`` actions (DualPipeV).

    Raises ``ValueError`` for a schedule that has no such actions (GPipe, 1F1B, interleaved
    1F1B, ZBV): there is nothing to overlap there.
    """
    from torch.distributed.pipelining.schedules import OVERLAP_F_B, _PipelineScheduleRuntime

    if not isinstance(schedule, _PipelineScheduleRuntime) or not any(
            a is not None and a.computation_type == OVERLAP_F_B
            for actions in schedule.pipeline_order.values() for a in actions):
        raise ValueError(f"enable_overlap: {type(schedule).__name__} has no OVERLAP_F_B actions; "
                         "use ScheduleDualPipeV (or train_micro_batches without a pipeline)")
    schedule.register_custom_function(OVERLAP_F_B, overlap_f_b)


# ---------------------------------------------------------------------------- without a pipeline
def forward_two_halves(module: torch.nn.Module, x: torch.Tensor, dim: int = 0,
                       timeline: Optional[Timeline] = None) -> torch.Tensor:
    """``module(x)`` with ``x`` split in two along ``dim`` and the halves run as two lanes.

    Two-batch overlap for inference (and any forward): one half's dispatch and combine travel
    while the other half computes. Every rank of the expert-parallel group must call it (with
    its own ``x``; an odd size puts the extra row in the first half). Returns the halves'
    outputs concatenated along ``dim``. The module must treat rows independently (a language
    model's batch: yes; a layer with batch statistics: no).
    """
    n = x.size(dim)
    first, second = x.narrow(dim, 0, (n + 1) // 2), x.narrow(dim, (n + 1) // 2, n // 2)
    outs = run_lanes([lambda: module(first), lambda: module(second)], names=["half0", "half1"], timeline=timeline)
    return torch.cat(outs, dim)


def train_micro_batches(forward: Callable[[Any], torch.Tensor], micro_batches: Sequence[Any],
                        timeline: Optional[Timeline] = None) -> list[torch.Tensor]:
    """Forward and backward over ``micro_batches``, the forward of each overlapped with the
    backward of the one before (gradient accumulation without a pipeline, pp = 1)::

        F0 | F1 + B0 | F2 + B1 | ... | B(n-1)

    Args:
        forward: ``forward(micro_batch)`` returns the micro-batch's scalar loss (with the router
            losses added, e.g. from the layers' ``last_router_output``: a backward lane's
            checkpoint recompute does not overwrite it). The gradients of ``loss`` accumulate
            into ``.grad``; scale the loss (e.g. by ``1 / len(micro_batches)``) for a mean.
        micro_batches: what ``forward`` takes, one per micro-batch; every rank of the
            expert-parallel group must pass the same number.

    Returns:
        the detached losses, in order.
    """
    losses: list[torch.Tensor] = []
    pending: Optional[torch.Tensor] = None
    for i, mb in enumerate(micro_batches):
        if pending is None:
            loss = forward(mb)
        else:
            prev = pending
            loss, _ = run_lanes([lambda: forward(mb), prev.backward], names=[f"F mb{i}", f"B mb{i - 1}"],
                                timeline=timeline, backward_lane=1)
        losses.append(loss.detach())
        pending = loss
    if pending is not None:
        pending.backward()
    return losses
