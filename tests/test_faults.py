"""A dead or stuck rank: every other rank raises an error naming it within the timeout, never hangs.

Three ranks, rank 2 the faulty one, so that one survivor talks to the dead rank directly in the
failing step and the other may be waiting on the first survivor instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import moeflow.slots
from moeflow import Buffer, RankError, Router, spawn
from moeflow.comm.health import PeerFailureError, resolve_timeout
from moeflow.layer import MoELayer

N, H, E, K = 16, 64, 6, 2
TIMEOUT = 4.0  # the Buffer's; the process group's own timeout is longer, so the Buffer's fires first
INTERVAL = min(1.0, TIMEOUT / 10)
# A survivor may wait the full timeout (peer alive but stuck, or waiting on another survivor),
# then diagnoses for three heartbeat intervals; 3 s for a loaded 2-core machine. The process
# group's own timeout (30 s) is far above LIMIT, so a survivor that waited on it still fails.
LIMIT = TIMEOUT + 3 * INTERVAL + 3.0
FAULTY = 2
pytestmark = pytest.mark.faults


def _die(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(17)
    elif how == "raise":
        raise RuntimeError("user code failed on rank 2")
    elif how == "stuck":
        # Alive (the heartbeat goes on) but never calls in again; outlives the survivors' timeout.
        time.sleep(TIMEOUT + 6)
    else:
        raise AssertionError(how)


def _inputs(rank):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    return x, idx, torch.rand(N, K, generator=g)


def _fault_rank(point: str, how: str):
    """Run dispatch/combine (or a layer) with rank 2 failing at ``point``; survivors report what they saw."""
    rank = dist.get_rank()
    t0 = time.monotonic()
    try:
        if point.startswith("layer"):
            return _layer_fault(point, how, rank)
        if point == "router_update":
            return _router_fault(how, rank)
        buffer = Buffer(timeout_s=TIMEOUT)
        x, idx, w = _inputs(rank)
        if point == "before_layout" and rank == FAULTY:
            _die(how)
            return "stuck rank done"
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
        t0 = time.monotonic()
        recv_x, _, _, _, handle, event = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx, topk_weights=w, async_finish=point == "async_dispatch")
        if point == "async_dispatch" and rank == FAULTY:
            _die(how)  # dies with its dispatch posted, before waiting on it
            return "stuck rank done"
        event.current_stream_wait()
        if point == "between" and rank == FAULTY:
            _die(how)
            return "stuck rank done"
        t0 = time.monotonic()
        buffer.combine(recv_x, handle)
        return ("no error", "", time.monotonic() - t0, [], [], [])
    except PeerFailureError as e:
        return (type(e).__name__, str(e), time.monotonic() - t0, e.missing_ranks, e.dead_ranks, e.stuck_ranks)


def _layer_fault(point: str, how: str, rank: int):
    """``layer_async``: rank 2 fails inside the layer's async pipeline, while chunk 1's dispatch
    is in flight and its experts work on chunk 0, so the survivors are waiting on async
    transfers. ``layer_update``: rank 2 fails after a good step, before the per-step load
    all-reduce of ``update_bias`` (the layer's own collectives are watched too)."""
    torch.manual_seed(0)
    layer = MoELayer(H, 32, E, K, num_chunks=2, buffer=Buffer(timeout_s=TIMEOUT), num_slots=2 * E)
    if rank == FAULTY and point == "layer_async":
        layer.experts.register_forward_pre_hook(lambda *_: _die(how))
    x = torch.randn(2 * N, H)
    t0 = time.monotonic()
    try:
        layer(x).sum().backward()
        if point == "layer_migrate":  # rank 2 fails as the expert weights are about to move
            if rank == FAULTY:
                moeflow.slots.exchange_rows = lambda *args, **kwargs: _die(how)
            t0 = time.monotonic()
            layer.slots.apply_placement(layer.slots.phy2log.roll(1))  # every slot's expert moves to the next slot
            return ("no error", "", time.monotonic() - t0, [], [], [])
        if rank == FAULTY:
            _die(how)
        t0 = time.monotonic()
        layer.router.update_bias()
        return ("no error", "", time.monotonic() - t0, [], [], [])
    except PeerFailureError as e:
        return (type(e).__name__, str(e), time.monotonic() - t0, e.missing_ranks, e.dead_ranks, e.stuck_ranks)


def _router_fault(how: str, rank: int):
    """A Router on its own (no layer, no Buffer): rank 2 fails before the load sums of
    ``update_bias``, which go through the watched transport the Router makes at its first sum."""
    os.environ["MOEFLOW_TIMEOUT_S"] = str(TIMEOUT)
    torch.manual_seed(0)
    router = Router(H, E, K, bias_update_rate=1e-3)
    router(torch.randn(N, H))
    if rank == FAULTY:
        _die(how)
        return "stuck rank done"
    t0 = time.monotonic()
    try:
        router.update_bias()
        return ("no error", "", time.monotonic() - t0, [], [], [])
    except PeerFailureError as e:
        return (type(e).__name__, str(e), time.monotonic() - t0, e.missing_ranks, e.dead_ranks, e.stuck_ranks)


CASES = [
    ("before_layout", "kill", "dead"),
    ("before_layout", "raise", "dead"),
    ("between", "exit", "dead"),
    ("between", "stuck", "stuck"),
    ("async_dispatch", "kill", "dead"),
    ("layer_async", "kill", "dead"),
    ("layer_update", "kill", "dead"),
    ("layer_migrate", "kill", "dead"),
    ("router_update", "kill", "dead"),
]


@pytest.mark.parametrize("point,how,state", CASES, ids=[f"{p}-{h}" for p, h, _ in CASES])
def test_survivors_name_the_lost_rank_within_the_timeout(point, how, state):
    t0 = time.monotonic()
    out = spawn(_fault_rank, 3, point, how, timeout_s=110, collective_timeout_s=30, return_failures=True)
    assert time.monotonic() - t0 < 120  # no hang: ~15 s on an idle machine
    faulty = out[FAULTY]
    if how == "kill":
        assert isinstance(faulty, RankError) and faulty.exitcode == -signal.SIGKILL
        assert "killed by SIGKILL" in str(faulty)
    elif how == "exit":
        assert isinstance(faulty, RankError) and faulty.exitcode == 17
        assert "exited with code 17 without reporting" in str(faulty)
    elif how == "raise":
        assert isinstance(faulty, RankError) and "user code failed on rank 2" in faulty.traceback
    else:
        assert faulty == "stuck rank done"
    for rank in (0, 1):
        name, msg, elapsed, missing, dead, stuck = out[rank]
        assert name == "PeerFailureError", (rank, name, msg)
        assert missing == [FAULTY], (rank, msg)
        assert (dead, stuck) == (([FAULTY], []) if state == "dead" else ([], [FAULTY])), (rank, msg)
        pattern = r"rank 2 is dead or hung" if state == "dead" else r"rank 2 is alive but stopped calling in"
        assert re.search(pattern, msg), msg
        assert re.search(rf"on rank {rank} \(call \d+ on this Buffer\)", msg), msg
        assert elapsed < LIMIT, f"rank {rank} took {elapsed:.1f} s to name the lost rank: {msg}"


def _killed_rank(code):
    if dist.get_rank() == 1:
        if code < 0:
            os.kill(os.getpid(), -code)
        os._exit(code)
    time.sleep(60)  # a survivor that would never finish: spawn must not wait for it


# (SIGKILL and exit code 17 are checked above with return_failures.)
@pytest.mark.parametrize("code,pattern", [(-signal.SIGSEGV, r"killed by SIGSEGV \(exit code -11\)"),
                                          (0, r"exited with code 0 without reporting")])
def test_spawn_names_a_dead_rank_and_does_not_wait_for_the_others(code, pattern):
    t0 = time.monotonic()
    with pytest.raises(RankError, match=pattern) as info:
        spawn(_killed_rank, 2, code, timeout_s=120)
    assert info.value.rank == 1 and info.value.exitcode == code
    assert time.monotonic() - t0 < 45  # the survivor sleeps 60 s: spawn did not wait for it (~11 s under load)


def test_timeout_comes_from_argument_then_env(monkeypatch):
    monkeypatch.delenv("MOEFLOW_TIMEOUT_S", raising=False)
    assert resolve_timeout(None) == 30.0
    assert resolve_timeout(2) == 2.0
    monkeypatch.setenv("MOEFLOW_TIMEOUT_S", "7.5")
    assert resolve_timeout(None) == 7.5
    monkeypatch.setenv("MOEFLOW_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match=r"env MOEFLOW_TIMEOUT_S must be a number of seconds, got 'soon'"):
        resolve_timeout(None)
    for bad in (0, -1.0, float("inf"), "5", True):
        with pytest.raises(ValueError, match=r"timeout_s must be a positive finite number"):
            resolve_timeout(bad)


class _Work:
    """A stand-in for a backend ``Work``: completes, or raises after ``after_s`` seconds."""

    def __init__(self, after_s: float | None = None, error: str = ""):
        self.after_s, self.error = after_s, error

    def wait(self, timeout=None):
        if self.after_s is None:
            return True
        time.sleep(self.after_s)
        raise RuntimeError(self.error)


def _behind_but_not_the_cause(case: str):
    """Rank 2 dies after call 1. ``blocked``: rank 1 finished call 1 and fails at once in call 2,
    while rank 0 still waits in call 1 (behind rank 1, but waiting on rank 2 too). ``witness``:
    rank 0 fails in call 1 at once and returns (its heartbeat stops) while rank 1, which fails a
    second later, is still looking: rank 0 gave up, it is not the cause."""
    from moeflow.comm.health import Watchdog

    rank = dist.get_rank()
    wd = Watchdog(None, TIMEOUT)
    wd.arrive("dispatch")
    if rank == FAULTY:
        wd.wait(_Work(), wd.calls, "dispatch")
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.6)  # rank 2 is gone
    try:
        if rank == 0:
            wd.wait(_Work(2.0 if case == "blocked" else 0.0, "Connection closed by peer"), wd.calls, "dispatch")
        else:
            wd.wait(_Work(), wd.calls, "dispatch")
            wd.arrive("combine")
            time.sleep(1.0 if case == "witness" else 0.2)  # blocked: rank 0 is in its wait by now
            wd.wait(_Work(0.0, "Connection closed by peer"), wd.calls, "combine")
    except PeerFailureError as e:
        return e.dead_ranks, e.stuck_ranks, str(e)
    return None


@pytest.mark.parametrize("case", ["blocked", "witness"])
def test_a_survivor_behind_or_gone_is_not_named(case):
    out = spawn(_behind_but_not_the_cause, 3, case, timeout_s=110, return_failures=True)
    assert isinstance(out[FAULTY], RankError) and out[FAULTY].exitcode == -signal.SIGKILL
    for rank in (0, 1):
        dead, stuck, msg = out[rank]
        assert (dead, stuck) == ([FAULTY], []), (rank, msg)
    note = "blocked in an earlier transfer (call 1" if case == "blocked" else "rank 0 failed as well"
    assert note in out[1][2], out[1][2]


def _guarded_steps(how: str):
    """Two steps of plain all-reduces (collectives moeflow does not issue, like FSDP2's) inside
    ``Watchdog.guard``; rank 2 dies or stops before the second."""
    from moeflow.comm.health import Watchdog

    rank = dist.get_rank()
    wd = Watchdog(None, TIMEOUT, name="training loop")
    t = torch.ones(8)
    for step in range(2):
        if step == 1 and rank == FAULTY:
            _die(how)
            return "stuck rank done"
        t0 = time.monotonic()
        try:
            with wd.guard("step"):
                dist.all_reduce(t)
        except PeerFailureError as e:
            return e.dead_ranks, e.stuck_ranks, str(e), time.monotonic() - t0
    return "no error"


@pytest.mark.parametrize("how,state", [("kill", "dead"), ("stuck", "stuck")])
def test_guard_names_the_lost_rank_in_collectives_moeflow_does_not_issue(how, state):
    # The group's own timeout bounds a plain all-reduce: give it moeflow's, as the guard asks.
    out = spawn(_guarded_steps, 3, how, timeout_s=110, collective_timeout_s=TIMEOUT, return_failures=True)
    for rank in (0, 1):
        dead, stuck, msg, elapsed = out[rank]
        assert (dead, stuck) == (([FAULTY], []) if state == "dead" else ([], [FAULTY])), (rank, msg)
        assert re.search(rf"training loop\.step on rank {rank} \(call 2 on this training loop\)", msg), msg
        assert elapsed < LIMIT, f"rank {rank} took {elapsed:.1f} s: {msg}"


def _guard_keeps_other_errors():
    from moeflow.comm.health import Watchdog

    wd = Watchdog(None, TIMEOUT, name="training loop")
    with wd.guard("step"):
        dist.all_reduce(torch.ones(2))
    try:
        with wd.guard("step"):
            raise RuntimeError("a bug in the step, not a peer")
    except PeerFailureError as e:
        return "blamed a peer: " + str(e)
    except RuntimeError as e:
        return str(e)


def test_guard_reraises_errors_no_peer_caused():
    assert spawn(_guard_keeps_other_errors, 2, timeout_s=60) == ["a bug in the step, not a peer"] * 2


def _stuck_inside_a_guard():
    """Rank 2 computes (sleeps) inside a guarded block of the training loop while the others
    wait on it in a Buffer's dispatch inside the same block."""
    from moeflow.comm.health import Watchdog

    rank = dist.get_rank()
    loop = Watchdog(None, TIMEOUT, name="training loop")
    buffer = Buffer(timeout_s=TIMEOUT)
    x, idx, w = _inputs(rank)
    t0 = time.monotonic()
    try:
        with loop.guard("forward"):
            if rank == FAULTY:
                time.sleep(TIMEOUT + 6)
                return "stuck rank done"
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                            topk_idx=idx, topk_weights=w)
        return "no error"
    except PeerFailureError as e:
        return e.kind, e.dead_ranks, e.stuck_ranks, str(e), time.monotonic() - t0


def test_a_rank_stuck_inside_a_guarded_block_is_named_by_the_buffer():
    """Being inside a guard is not waiting: the Buffer names the rank that computes there, and
    its PeerFailureError leaves the guard as it is (one diagnosis, not two)."""
    out = spawn(_stuck_inside_a_guard, 3, timeout_s=110, collective_timeout_s=30, return_failures=True)
    assert out[FAULTY] == "stuck rank done"
    for rank in (0, 1):
        kind, dead, stuck, msg, elapsed = out[rank]
        assert (kind, dead, stuck) == ("dispatch", [], [FAULTY]), (rank, msg)
        assert re.search(r"rank 2 is alive but stopped calling in", msg), msg
        assert elapsed < LIMIT, f"rank {rank} took {elapsed:.1f} s: {msg}"


_EXIT_SCRIPT = """
import time
import torch.distributed as dist
from moeflow.comm.health import Watchdog
store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
wd = Watchdog(None, timeout_s=1e-4)  # heartbeat every 10 us: its thread is nearly always inside store.set
time.sleep(0.3)
"""


def test_a_process_with_a_heartbeat_exits_cleanly():
    # A daemon thread still inside store.set when the interpreter finalizes aborted the process
    # (SIGABRT, "terminate called without an active exception"): a finished torchrun worker was
    # reported as failed. Without the exit hook this script aborted 7 times in 10.
    procs = [subprocess.Popen([sys.executable, "-c", _EXIT_SCRIPT], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "terminate called" not in err, (p.returncode, err[-2000:])
