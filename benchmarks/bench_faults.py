"""Fault detection: its cost on the hot path, and how long survivors take to name a lost rank.

    python3 benchmarks/bench_faults.py [--ranks 2] [--tokens 2048] [--hidden 1024] [--reps 30] [--timeout 5]

1. Hot path: dispatch + combine through a Buffer with the watchdog (timed waits, call counting)
   against the same Buffer kind with the watchdog removed, interleaved in one run, medians.
2. Detection: three ranks, rank 2 killed (SIGKILL) or stuck (alive, not calling) between dispatch
   and combine; prints how long each survivor's combine took to raise, and what it said.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time

import torch
import torch.distributed as dist

from moeflow import Buffer, spawn
from moeflow.comm.health import PeerFailureError

E, K = 32, 4


def _overhead(N: int, H: int, reps: int):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N, H, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g)
    buffer = Buffer()
    watchdog = buffer.transport.watchdog

    def step(on: bool):
        # One Buffer, the watchdog switched on and off: nothing else differs between the two.
        buffer.transport.watchdog = watchdog if on else None
        dist.barrier()  # start together: the timing covers the exchange, not a peer's lateness
        t0 = time.perf_counter()
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                          num_tokens_per_expert=per_expert, topk_idx=idx,
                                                          topk_weights=w)
        buffer.combine(recv_x, handle)
        return time.perf_counter() - t0

    for _ in range(3):
        step(True), step(False)
    t_with, t_without = [], []
    for i in range(reps):  # ABBA order: neither kind always runs first
        if i % 2:
            t_without.append(step(False))
            t_with.append(step(True))
        else:
            t_with.append(step(True))
            t_without.append(step(False))
    return statistics.median(t_with), statistics.median(t_without)


def _wait_cost(reps: int):
    """Median µs of a tiny all_to_all waited on plainly, with a timeout, and through TimedWork."""
    buffer = Buffer()
    t, out = torch.zeros(16), torch.empty(16)
    times: dict[str, list[float]] = {"plain wait()": [], "TimedWork.wait()": []}
    for i in range(reps):
        for kind in (list(times) if i % 2 else list(times)[::-1]):
            t0 = time.perf_counter()
            work = dist.all_to_all_single(out, t, async_op=True)
            if kind == "plain wait()":
                work.wait()
            else:
                buffer.transport.watchdog.wrap(work).wait()
            times[kind].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def _detect(how: str, timeout_s: float):
    rank = dist.get_rank()
    buffer = Buffer(timeout_s=timeout_s)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(64, 128, generator=g)
    idx = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(64)])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 6)
    recv_x, *_, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                            num_tokens_per_expert=per_expert, topk_idx=idx)
    if rank == 2:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(timeout_s + 10)
        return None
    t0 = time.monotonic()
    try:
        buffer.combine(recv_x, handle)
        return time.monotonic() - t0, "no error"
    except PeerFailureError as e:
        return time.monotonic() - t0, str(e).split(". Backend said")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--timeout", type=float, default=5.0, help="Buffer timeout_s for the detection runs")
    a = ap.parse_args()

    waits = spawn(_wait_cost, a.ranks, 20 * a.reps, timeout_s=600)
    print(f"one 16-float all_to_all on {a.ranks} ranks, median of {20 * a.reps} (slowest rank):")
    for kind in waits[0]:
        print(f"  {kind:18s} {max(w[kind] for w in waits):8.1f} us")
    print(f"hot path, {a.ranks} ranks, bf16 E={E} K={K}, median of {a.reps} (slowest rank):")
    for N, H in ((a.tokens, a.hidden), (128, 256)):
        out = spawn(_overhead, a.ranks, N, H, a.reps, timeout_s=600)
        t_with = max(o[0] for o in out)
        t_without = max(o[1] for o in out)
        print(f"  N={N:5d} H={H:5d}  with watchdog {t_with * 1e3:8.3f} ms   without {t_without * 1e3:8.3f} ms   "
              f"ratio {t_with / t_without:.3f}")
    print(f"\ndetection, 3 ranks, rank 2 lost between dispatch and combine, timeout_s={a.timeout:g}:")
    for how in ("kill", "stuck"):
        res = spawn(_detect, 3, how, a.timeout, timeout_s=a.timeout + 60, collective_timeout_s=a.timeout + 30,
                    return_failures=True)
        for rank in (0, 1):
            elapsed, msg = res[rank]
            print(f"  {how:5s} rank {rank}: {elapsed:5.2f} s  {msg}")


if __name__ == "__main__":
    main()
