"""Where a dispatch + combine round spends CPU on 2 Gloo ranks, at ``moeflow bench``'s shape
(4096 tokens, hidden 2048, bf16, top-8 of 64 experts), against the raw ``all_to_all_single`` of
the same bytes, rank 0's view:

- per round: wall time, CPU time of the calling thread, CPU time of every other thread of the
  process (Gloo's) (medians), and minor page faults of each block (after a first round that
  allocates: whether freed outputs come back without faulting their pages again);
- a 16 MiB row gather (``index_select`` of int64 words, what a dispatch would do before sending):
  thread CPU time with the other rank idle, with the other rank gathering too, and with an
  ``all_to_all_single`` of 32 MiB running on Gloo's threads. On a 2-core VM the gaps between the
  three show how much copies compete for memory bandwidth with each other and with the transfer.

Medians over 3 blocks of 20 rounds (ours and raw alternated), 20 gathers each.

Run: python benchmarks/bench_cpu_split.py
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
import torch.distributed as dist

import moeflow

T, H, E, K, ROUNDS, BLOCKS = 4096, 2048, 64, 8, 20, 3


def _clocks() -> tuple[float, float, float, int]:
    return (time.perf_counter(), time.thread_time(), time.process_time(),
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def _per_round(fn) -> dict:
    dist.barrier()
    w0, t0, p0, f0 = _clocks()
    for _ in range(ROUNDS):
        fn()
    dist.barrier()
    w1, t1, p1, f1 = _clocks()
    return dict(wall=(w1 - w0) / ROUNDS * 1e3, main=(t1 - t0) / ROUNDS * 1e3,
                others=((p1 - p0) - (t1 - t0)) / ROUNDS * 1e3, faults=(f1 - f0) / ROUNDS)


def _gather_ms(xw, idx, out, busy: bool, transfer=None) -> float:
    rank, times = dist.get_rank(), []
    for _ in range(20):
        dist.barrier()
        work = dist.all_to_all_single(*transfer, async_op=True) if transfer else None
        if rank == 0 or busy:
            t0 = time.thread_time()
            torch.index_select(xw, 0, idx, out=out)
            times.append(time.thread_time() - t0)
        if work is not None:
            work.wait()
    return statistics.median(times) * 1e3 if times else 0.0


def _rank() -> dict:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(T, H, generator=g).bfloat16()
    topk_weights, topk_idx = torch.rand(T, E, generator=g).topk(K, dim=1)
    buffer = moeflow.Buffer(dist.group.WORLD)

    def ours():
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                     num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                                     topk_weights=topk_weights)
        buffer.combine(recv_x, handle)
        return handle

    handle = ours()
    sends, recvs = list(handle.num_send_tokens_per_rank), list(handle.num_recv_tokens_per_rank)
    row = sum(buffer.counters.sent["dispatch"]) // max(sum(sends), 1)  # payload + metadata bytes per row
    d_send, d_recv = torch.zeros(sum(sends), row, dtype=torch.uint8), torch.empty(sum(recvs), row, dtype=torch.uint8)
    c_send = torch.zeros(sum(recvs), 2 * H, dtype=torch.uint8)
    c_recv = torch.empty(sum(sends), 2 * H, dtype=torch.uint8)

    def raw():
        dist.all_to_all_single(d_recv, d_send, recvs, sends)
        dist.all_to_all_single(c_recv, c_send, sends, recvs)

    blocks = {"moeflow": [], "raw": []}
    for _ in range(BLOCKS):
        blocks["moeflow"].append(_per_round(ours))
        blocks["raw"].append(_per_round(raw))
    idx = (torch.rand(T, generator=g) > 0.005).nonzero().flatten()
    xw, out = x.view(torch.int64), torch.empty(idx.numel(), H // 4, dtype=torch.int64)
    big = torch.zeros(2 * T, 4096, dtype=torch.uint8)
    gathers = dict(alone=_gather_ms(xw, idx, out, busy=False), both=_gather_ms(xw, idx, out, busy=True),
                   transfer=_gather_ms(xw, idx, out, busy=True, transfer=(torch.empty_like(big), big)))
    return dict(blocks=blocks, gathers=gathers)


def main() -> None:
    res = moeflow.spawn(_rank, 2)[0]
    print(f"dispatch + combine round, 2 Gloo ranks, {T} x {H} bf16, top-{K} of {E}: rank 0, per round, "
          f"median of {BLOCKS} blocks of {ROUNDS}")
    print(f"  {'':10s} {'wall':>9s} {'calling thread':>15s} {'other threads':>14s}  page faults, each block")
    for name, blocks in res["blocks"].items():
        med = {k: statistics.median(b[k] for b in blocks) for k in blocks[0]}
        faults = ", ".join(f"{b['faults']:.0f}" for b in blocks)
        print(f"  {name:10s} {med['wall']:6.1f} ms {med['main']:12.1f} ms {med['others']:11.1f} ms  {faults}")
    g = res["gathers"]
    print(f"a 16 MiB row gather (index_select, thread CPU time, median of 20): alone {g['alone']:.2f} ms, "
          f"both ranks at once {g['both']:.2f} ms, during a 32 MiB all_to_all {g['transfer']:.2f} ms")


if __name__ == "__main__":
    main()
