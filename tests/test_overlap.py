"""Lanes that take turns at the MoE layer's waits, and what they give without a pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moeflow import EventOverlap, spawn
from moeflow.comm import interleave
from moeflow.parallel.overlap import forward_two_halves, run_lanes, train_micro_batches
from moeflow.parallel.timeline import StepTimes, Timeline


class _Work:
    """A transfer's work stand-in that notes when it is waited on."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait(self):
        self.log.append(f"{self.name} waited")


def _event(log, name):
    """An in-flight transfer as the Buffer and the Transport return it."""
    return EventOverlap([_Work(log, name)])


def test_lanes_take_turns_at_each_wait_and_the_longer_one_runs_on():
    log = []

    def lane(name, waits):
        def run():
            for i in range(waits):
                log.append(f"{name}{i} issued")
                _event(log, f"{name}{i}").current_stream_wait()
            return name
        return run

    timeline = Timeline()
    assert run_lanes([lane("a", 3), lane("b", 1)], names=["a", "b"], timeline=timeline) == ["a", "b"]
    # a issues, hands over; b issues, hands back; a waits (its transfer was covered by b's work) ...
    assert log == ["a0 issued", "b0 issued", "a0 waited", "a1 issued", "b0 waited",
                   "a1 waited", "a2 issued", "a2 waited"]  # b is done: a runs on without handing over
    # each lane's waits, and its wake-ups after the turn came back (b's start included)
    assert sorted({(s.lane, s.kind) for s in timeline.spans}) == [("a", "switch"), ("a", "wait"), ("b", "switch"),
                                                                   ("b", "wait")]
    assert sum(s.kind == "switch" for s in timeline.spans) == 4  # a: twice; b: at its start and once
    assert interleave.current_lane() is None  # nothing left behind on the calling thread


def test_an_event_hands_over_at_its_first_wait_only():
    log = []

    def a():
        event = _event(log, "a")
        event.current_stream_wait()
        event.current_stream_wait()  # already waited: no transfer left, no second hand-over
        log.append("a done")

    def b():
        log.append("b ran")
        _event(log, "b").current_stream_wait()
        log.append("b done")

    run_lanes([a, b])
    assert log == ["b ran", "a waited", "a done", "b waited", "b done"]


def test_a_failing_lane_lets_the_others_finish_then_raises():
    done = []

    def bad():
        _event([], "x").current_stream_wait()
        raise KeyError("boom")

    def good():
        for _ in range(3):
            _event([], "y").current_stream_wait()
        done.append(True)

    with pytest.raises(RuntimeError, match="lane 'bad' failed: 'boom'"):
        run_lanes([bad, good], names=["bad", "good"])
    assert done == [True]


def test_lanes_keep_the_callers_grad_mode_and_autocast():
    def state():
        return torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        states = run_lanes([state, state])
    assert states == [(False, True, torch.float16)] * 2
    assert run_lanes([state, state]) == [state()] * 2


def test_checkpoint_recompute_counts_no_routed_token_twice():
    from torch.utils.checkpoint import checkpoint

    from moeflow.routing import Router

    torch.manual_seed(0)
    plain, ckpt = Router(16, 8, 2, bias_update_rate=0.1), Router(16, 8, 2, bias_update_rate=0.1)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 6, 16, requires_grad=True)
    plain(x).topk_weights.sum().backward()
    checkpoint(lambda t: ckpt(t).topk_weights, x, use_reentrant=False).sum().backward()
    assert plain.num_tokens_per_expert_since_update.sum() == 4 * 6 * 2
    assert torch.equal(plain.num_tokens_per_expert_since_update, ckpt.num_tokens_per_expert_since_update)
    assert not interleave.in_backward()


def test_timeline_accounting():
    t = Timeline()
    t.add("a", "F", 0.0, 4.0)
    t.add("b", "B", 3.0, 6.0)       # overlaps the forward: busy 0-6
    t.add("a", "issue", 1.0, 1.5)
    t.add("b", "wait", 5.0, 6.0)
    t.add("b", "switch", 3.0, 3.5)  # b's wake-up after a passed the turn
    t.add("a", "F", 20.0, 30.0)     # outside the window
    times = t.times(0.0, 10.0)
    assert times == StepTimes(wall=10.0, compute=4.0, exposed_comm=1.5, bubble=4.0, switching=0.5)
    assert times.comm_share == pytest.approx(0.15)


# ------------------------------------------------------------------------ two ranks, pp = 1
def _two_micro_batch_rank():
    from torch.utils.checkpoint import checkpoint

    from moeflow import MoELayer

    rank = dist.get_rank()
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self, ckpt):
            super().__init__()
            self.ckpt = ckpt
            self.layers = torch.nn.ModuleList(MoELayer(32, 16, 8, 2, 1, bias_update_rate=0.1, seq_aux_loss_coeff=0.01)
                                              for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = x + (checkpoint(layer, x, use_reentrant=False) if self.ckpt else layer(x))
            return x

    plain, ckpt = Net(False), Net(True)
    ckpt.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(4, 8, 32, generator=g)
    out = {}
    with torch.no_grad():
        plain.eval()
        out["forward"] = float((forward_two_halves(plain, x) - plain(x)).abs().max())
        plain.train()
    micro = list(x.split(1))

    def loss_of(net):
        def fn(mb):
            y = net(mb)
            aux = sum(layer.last_router_output.loss for layer in net.layers)
            return ((y ** 2).mean() + aux) / len(micro)
        return fn

    for mb in micro:  # the reference: one micro-batch after the other
        loss_of(plain)(mb).backward()
    timeline = Timeline()
    losses = train_micro_batches(loss_of(ckpt), micro, timeline=timeline)
    out["losses"] = len(losses)
    out["grad"] = max(float((a.grad - b.grad).norm() / b.grad.norm())
                      for a, b in zip(ckpt.parameters(), plain.parameters()) if b.grad is not None)
    out["loads"] = all(torch.equal(a.router.num_tokens_per_expert_since_update, b.router.num_tokens_per_expert_since_update)
                       for a, b in zip(ckpt.layers, plain.layers))
    out["lanes"] = sorted({s.lane for s in timeline.spans})
    return out


def test_two_micro_batch_overlap_without_a_pipeline():
    for rank, out in enumerate(spawn(_two_micro_batch_rank, 2, timeout_s=120)):
        assert out["forward"] < 1e-6, (rank, out)       # two-batch overlap for inference: same outputs
        assert out["losses"] == 4
        assert out["grad"] < 1e-5, (rank, out)          # F(i+1) with B(i), checkpointed: same gradients
        assert out["loads"], (rank, out)                # and the same counted loads
        # every overlapped pair appears as a forward lane and a backward lane
        assert out["lanes"] == ["B mb0", "B mb1", "B mb2", "F mb1", "F mb2", "F mb3"], (rank, out)
