"""Long runs: 1,000 iterations of dispatch/combine and of MoELayer forward+backward on 2 ranks with
no growth of resident memory or of live tensors past warm-up.

Resident memory (``/proc/self/statm``) after 1,000 iterations must be within 5% of after 100, and
the count of live tensors (found through ``gc``) must not grow at all. ``benchmarks/bench_long_run.py``
does the same on a larger size.

Live tensors are counted as the fewest seen over the last ``WINDOW`` iterations before each mark,
not at one instant: a tensor of a finished transfer can outlive its step by a moment (the
backend's completion thread drops its reference after ``wait`` returns; seen here as one or two
router-weight tensors of an earlier step, at random). A leak of even one tensor per step shows in
every sample of the later window; a moment's retention does not show in all of them.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist

from moeflow import Buffer, spawn
from moeflow.layer import MoELayer

N, H, E, K, FF = 24, 64, 8, 2, 16
ITERS, WARMUP, WINDOW = 1000, 100, 10


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def dispatch_combine_step(buffer: Buffer, x, idx, w, num_experts: int, async_finish: bool) -> None:
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    recv_x, _, recv_w, _, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx, topk_weights=w, async_finish=async_finish)
    event.current_stream_wait()
    _, _, event = buffer.combine(recv_x, handle, topk_weights=recv_w, async_finish=async_finish)
    event.current_stream_wait()


def layer_step(layer: MoELayer, opt: torch.optim.Optimizer, x) -> None:
    opt.zero_grad(set_to_none=True)
    layer(x).square().mean().backward()
    opt.step()


def measure(step, iters: int, warmup: int) -> dict:
    """Run ``step(i)`` ``iters`` times; at ``warmup`` and at ``iters``: RSS, and the fewest live
    tensors over the ``WINDOW`` iterations up to that mark."""
    out, start = {}, 1
    for mark in (warmup, iters):
        counts = []
        for i in range(start, mark + 1):
            step(i)
            if i > mark - WINDOW:
                counts.append(live_tensors())
        out[mark] = (rss_bytes(), min(counts))
        start = mark + 1
    return out


def _long_run():
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    buffer = Buffer()
    # Inputs change every iteration (shapes too), as in training: a cache keyed on shapes would show.
    xs = [torch.randn(N - (i % 5), H, generator=g).bfloat16() for i in range(7)]
    idxs = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(x.size(0))]) for x in xs]
    ws = [torch.rand(x.size(0), K, generator=g) for x in xs]
    comm = measure(lambda i: dispatch_combine_step(buffer, xs[i % 7], idxs[i % 7], ws[i % 7], E, i % 2 == 0),
                   ITERS, WARMUP)
    torch.manual_seed(0)
    layer = MoELayer(H, FF, E, K, num_shared_experts=1, num_chunks=2, buffer=buffer)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    fx = [x.float() for x in xs]
    lay = measure(lambda i: layer_step(layer, opt, fx[i % 7]), ITERS, WARMUP)
    return comm, lay


@pytest.mark.timeout(900)
def test_no_memory_or_tensor_growth_over_1000_iterations():
    # ~40 s on an idle machine; several minutes when other jobs share the two cores.
    out = spawn(_long_run, 2, timeout_s=800, threads_per_rank=1)
    for rank, results in enumerate(out):
        for name, res in zip(("dispatch/combine", "layer fwd+bwd"), results):
            (rss_w, live_w), (rss_end, live_end) = res[WARMUP], res[ITERS]
            assert rss_end <= rss_w * 1.05, (f"rank {rank} {name}: RSS grew from {rss_w >> 20} MiB after "
                                             f"{WARMUP} to {rss_end >> 20} MiB after {ITERS} iterations")
            assert live_end <= live_w, f"rank {rank} {name}: live tensors grew from {live_w} to {live_end}"


def test_rss_measure_sees_growth():
    """The probe itself: holding ~64 MiB more must show up in rss_bytes."""
    before = rss_bytes()
    held = torch.ones(16 << 20)  # 64 MiB, touched
    assert rss_bytes() - before > 48 << 20
    del held
