"""A dead or stuck rank: every other rank raises an error naming it within the timeout, never hangs.

Three ranks, rank 2 the faulty one, so that one survivor talks to the dead rank directly in the
failing step and the other may be waiting on the first survivor instead.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch
import torch.distributed as dist

from moeflow import Buffer, RankError, spawn
from moeflow.comm.health import PeerFailureError, resolve_timeout
from moeflow.layer import MoELayer

N, H, E, K = 16, 64, 6, 2
TIMEOUT = 4.0  # the Buffer's; the process group's own timeout is longer, so the Buffer's fires first
INTERVAL = min(1.0, TIMEOUT / 10)
# A survivor may wait the full timeout (peer alive but stuck, or waiting on another survivor),
# then diagnoses for three heartbeat intervals; 1.5 s for a loaded 2-core machine.
LIMIT = TIMEOUT + 3 * INTERVAL + 1.5
FAULTY = 2


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
        if rank == FAULTY:
            _die(how)
        t0 = time.monotonic()
        layer.router.update_bias()
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
]


@pytest.mark.parametrize("point,how,state", CASES, ids=[f"{p}-{h}" for p, h, _ in CASES])
def test_survivors_name_the_lost_rank_within_the_timeout(point, how, state):
    t0 = time.monotonic()
    out = spawn(_fault_rank, 3, point, how, timeout_s=50, collective_timeout_s=30, return_failures=True)
    assert time.monotonic() - t0 < 55
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
    time.sleep(30)  # a survivor that would never finish: spawn must not wait for it


# (SIGKILL and exit code 17 are checked above with return_failures.)
@pytest.mark.parametrize("code,pattern", [(-signal.SIGSEGV, r"killed by SIGSEGV \(exit code -11\)"),
                                          (0, r"exited with code 0 without reporting")])
def test_spawn_names_a_dead_rank_and_does_not_wait_for_the_others(code, pattern):
    t0 = time.monotonic()
    with pytest.raises(RankError, match=pattern) as info:
        spawn(_killed_rank, 2, code, timeout_s=60)
    assert info.value.rank == 1 and info.value.exitcode == code
    assert time.monotonic() - t0 < 25  # the survivor sleeps 30 s: spawn did not wait for it (~11 s under load)


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
