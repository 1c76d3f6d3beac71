"""A rank of the demo's training loop lost in the middle of a step or an evaluation: the others
raise PeerFailureError naming it within the timeout, wherever they were waiting (FSDP2's
all-gather or reduce-scatter inside the loop's guards, the loop's own all-reduce), never a raw
Gloo error or a wait as long as the process group's old 3,600 s timeout.

Three ranks, rank 2 the faulty one; a tiny model so that a run takes seconds.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch.distributed as dist

from moeflow import RankError, spawn
from moeflow.comm.health import PeerFailureError

TIMEOUT = 6.0  # MOEFLOW_TIMEOUT_S: the Buffers', the loop's and the process groups' timeout
# a survivor may wait the whole timeout (a stopped peer), then diagnoses for three heartbeat
# intervals; 4 s more for a loaded 2-core machine
LIMIT = TIMEOUT + 3 * min(1.0, TIMEOUT / 10) + 4.0
FAULTY = 2


def _config():
    from moeflow.demo import DemoConfig

    return DemoConfig(steps=3, batch_size=2, seq_len=32, dim=32, num_layers=2, num_heads=2, num_experts=6,
                      ffn_hidden=32, eval_every=2, eval_batches=2, corpus_bytes=200_000)


def _fail(how: str) -> None:
    store = dist.distributed_c10d._get_default_store()
    store.set("test/failed_at", repr(time.time()))
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(TIMEOUT + 4)  # "stop": alive until the survivors timed out and diagnosed, never calls in again
    os._exit(0)


def _arm(model, point: str, how: str) -> None:
    """Make rank 2 fail at ``point`` of the loop (see the cases below)."""
    calls = {"train": 0, "eval": 0}

    def before(module, args):  # runs before FSDP2's own pre-forward (its all-gather)
        mode = "train" if module.training else "eval"
        calls[mode] += 1
        if (point, mode, calls[mode]) in (("forward", "train", 2), ("eval", "eval", 1)):
            _fail(how)

    def after(module, args, out):
        if point == "eval_sum" and not module.training and calls["eval"] == 2:
            _fail(how)  # after the last evaluation batch, before the loop's all-reduce of the sums

    def embedded(module, args, emb):
        if point == "backward" and model.training and calls["train"] == 2:
            # fails once every block's backward ran: the survivors go on to FSDP2's reduce-scatter
            emb.register_hook(lambda grad: _fail(how))

    model.register_forward_pre_hook(before, prepend=True)
    model.register_forward_hook(after)
    model.embed.register_forward_hook(embedded)
    if point == "eval_stop":  # stops before the evaluation's guard: the others wait in its all-gather
        model.eval = lambda: _fail(how)


def _run_demo(point: str, how: str):
    import moeflow.demo as demo

    rank = dist.get_rank()
    build = demo.build

    def faulty_build(cfg):
        model, device = build(cfg)
        if rank == FAULTY:
            _arm(model, point, how)
        return model, device

    demo.build = faulty_build
    try:
        demo.train(_config(), None, False)
        return "no error"
    except PeerFailureError as e:
        failed_at = float(dist.distributed_c10d._get_default_store().get("test/failed_at"))
        return e.dead_ranks, e.stuck_ranks, str(e), time.time() - failed_at


CASES = [("forward", "kill", "forward"), ("backward", "kill", "backward"), ("eval", "kill", "eval"),
         ("eval_sum", "kill", "eval"), ("eval_stop", "stop", "eval")]


@pytest.mark.faults
@pytest.mark.parametrize("point,how,block", CASES, ids=[f"{p}-{h}" for p, h, _ in CASES])
def test_demo_survivors_name_the_lost_rank(point, how, block, monkeypatch):
    monkeypatch.setenv("MOEFLOW_TIMEOUT_S", str(TIMEOUT))
    out = spawn(_run_demo, 3, point, how, timeout_s=120, collective_timeout_s=TIMEOUT, threads_per_rank=1,
                return_failures=True)
    if how == "kill":
        assert isinstance(out[FAULTY], RankError) and out[FAULTY].exitcode == -signal.SIGKILL, out[FAULTY]
    for rank in (0, 1):
        assert isinstance(out[rank], tuple), (rank, out[rank])
        dead, stuck, msg, elapsed = out[rank]
        assert (dead, stuck) == (([FAULTY], []) if how == "kill" else ([], [FAULTY])), (rank, msg)
        assert re.search(rf"training loop\.{block} on rank {rank} \(call \d+ on this training loop\)", msg), msg
        assert elapsed < LIMIT, f"rank {rank} named the lost rank {elapsed:.1f} s after it failed: {msg}"
