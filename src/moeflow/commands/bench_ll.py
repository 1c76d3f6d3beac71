"""``moeflow bench-ll``: low-latency dispatch+combine on local ranks, against baselines from the same run.

Baselines:
  raw      the same equal-split ``all_to_all_single`` calls on preallocated buffers of exactly the
           low-latency mode's static sizes (dispatch slots, combine weights, combine rows): what
           the transport costs with no packing, scattering or weighting at all.
  normal   the normal-mode Buffer (layout + FP8 dispatch + combine) on the same tokens: its time,
           and its wire bytes against the static bytes of the low-latency mode.

Shape letters: N tokens per rank (= T, the static capacity), H hidden, E experts, K top-k, R ranks.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from . import add_workload_arguments, check_workload, slowest_median, speed_words, write_json


DESCRIPTION = """\
Times the low-latency (decode) mode of dispatch and combine on R local Gloo ranks: static
buffers sized for --tokens per rank, no host synchronisation on counts, each token's expert
outputs weighted and summed on its source rank. Beside it, in the same run: raw all_to_alls of
exactly its static buffers (the transport's floor) and the normal mode on the same tokens. Prints
milliseconds, wire bytes and how much faster or slower the low-latency mode is than each."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p, ranks=[4], tokens=128, hidden=7168, iters=20, warmup=3,
                           tokens_help="tokens per rank, also the static capacity T")
    p.add_argument("--bf16", action="store_true", help="dispatch bf16 instead of FP8")


def run(args: argparse.Namespace) -> int:
    from ..launch import spawn

    check_workload(args, fp8=not args.bf16)
    rows = []
    for R in args.ranks:
        cfg = dict(N=args.tokens, H=args.hidden, E=args.experts, K=args.topk, fp8=not args.bf16,
                   iters=args.iters, warmup=args.warmup)
        print(f"== {R} ranks, low-latency {'fp8' if cfg['fp8'] else 'bf16'}: {args.tokens} tokens/rank "
              f"(= capacity), hidden {args.hidden}, {args.experts} experts, top-{args.topk}", flush=True)
        per_rank = spawn(_bench_rank, R, cfg, timeout_s=1800, threads_per_rank=1)
        row = _summarise(R, cfg, per_rank)
        _print(row)
        rows.append(row)
    write_json(args.json, rows)
    return 0


def _bench_rank(cfg: dict) -> dict:
    from ..comm.buffer import Buffer
    from ..comm.transport import ProcessGroupTransport

    rank, R = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    N, H, E, K, fp8 = cfg["N"], cfg["H"], cfg["E"], cfg["K"], cfg["fp8"]
    L = E // R
    g = torch.Generator().manual_seed(4321 + rank)
    x = torch.randn(N, H, generator=g).bfloat16()
    topk_weights, topk_idx = torch.rand(N, E, generator=g).topk(K, dim=1)
    buffer = Buffer(group, low_latency_mode=True)
    loop = ProcessGroupTransport(group, name="benchmark")  # barriers and the raw baseline, watched
    y = torch.randn(L, R * N, H, generator=g).bfloat16()  # the experts' outputs (not timed)

    def ll_round():
        t0 = time.perf_counter()
        _, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, N, E, use_fp8=fp8)
        t1 = time.perf_counter()
        buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
        return t1 - t0, time.perf_counter() - t1

    # Static sizes, read off the counters of one round.
    buffer.counters.reset()
    ll_round()
    c = buffer.counters
    d_bytes, c_bytes = sum(c.sent["dispatch"]), sum(c.sent["combine"])
    w_bytes = R * N * K * 4
    raw_d_send, raw_d_recv = torch.zeros(R, d_bytes // R, dtype=torch.uint8), torch.empty(R, d_bytes // R, dtype=torch.uint8)
    raw_w_send, raw_w_recv = torch.zeros(R, N * K), torch.empty(R, N * K)
    raw_c_send, raw_c_recv = torch.zeros(R, N * H * 2 // 8, dtype=torch.int64), torch.empty(R, N * H * 2 // 8, dtype=torch.int64)
    assert c_bytes == w_bytes + R * N * H * 2
    ll_wire_d, ll_wire_c = c.wire_bytes("dispatch"), c.wire_bytes("combine")

    def raw_round():
        t0 = time.perf_counter()
        dist.all_to_all_single(raw_d_recv, raw_d_send, group=group)  # the dispatch slots
        t1 = time.perf_counter()
        dist.all_to_all_single(raw_w_recv, raw_w_send, group=group)  # combine: the weights
        dist.all_to_all_single(raw_c_recv, raw_c_send, group=group)  # combine: one row per slot
        return t1 - t0, time.perf_counter() - t1

    normal = Buffer(group)

    def normal_round():
        from ..quant import per_token_cast_to_fp8

        t0 = time.perf_counter()
        per_rank, _, per_expert, in_rank, _ = normal.get_dispatch_layout(topk_idx, E)
        x_in = per_token_cast_to_fp8(x) if fp8 else x
        recv_x, _, recv_w, _, handle, _ = normal.dispatch(
            x_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=topk_idx, topk_weights=topk_weights)
        rows = torch.empty(handle.num_recv_tokens, H, dtype=torch.bfloat16)
        normal.combine(rows, handle)
        return time.perf_counter() - t0

    normal.counters.reset()
    normal_round()
    nc = normal.counters
    normal_wire = nc.wire_bytes("layout") + nc.wire_bytes("dispatch") + nc.wire_bytes("combine")

    times = {"ll_dispatch": [], "ll_combine": [], "raw_dispatch": [], "raw_combine": [], "normal": []}
    for it in range(cfg["warmup"] + cfg["iters"]):
        # Interleaved, so that drift on a shared machine hits all three alike.
        loop.barrier()
        d, cb = ll_round()
        loop.barrier()
        with loop.guard("raw"):  # outside the timed region
            rd, rc = raw_round()
        loop.barrier()
        nt = normal_round()
        if it >= cfg["warmup"]:
            for k, v in (("ll_dispatch", d), ("ll_combine", cb), ("raw_dispatch", rd), ("raw_combine", rc),
                         ("normal", nt)):
                times[k].append(v)
    return dict(times=times, ll_wire=ll_wire_d + ll_wire_c, normal_wire=normal_wire,
                ll_dispatch_wire=ll_wire_d, ll_combine_wire=ll_wire_c)


def _summarise(R: int, cfg: dict, per_rank: list[dict]) -> dict:
    t = {k: slowest_median(per_rank, k) for k in per_rank[0]["times"]}
    ll = t["ll_dispatch"] + t["ll_combine"]
    raw = t["raw_dispatch"] + t["raw_combine"]
    ll_wire = sum(r["ll_wire"] for r in per_rank)
    normal_wire = sum(r["normal_wire"] for r in per_rank)
    return dict(ranks=R, tokens=cfg["N"], hidden=cfg["H"], experts=cfg["E"], topk=cfg["K"], fp8=cfg["fp8"],
                ll_dispatch_ms=t["ll_dispatch"] * 1e3, ll_combine_ms=t["ll_combine"] * 1e3,
                raw_dispatch_ms=t["raw_dispatch"] * 1e3, raw_combine_ms=t["raw_combine"] * 1e3,
                normal_ms=t["normal"] * 1e3, ll_vs_raw=ll / raw, ll_vs_normal_time=ll / t["normal"],
                ll_wire_bytes=ll_wire, normal_wire_bytes=normal_wire, ll_vs_normal_bytes=ll_wire / normal_wire,
                ll_dispatch_wire_bytes=sum(r["ll_dispatch_wire"] for r in per_rank),
                ll_combine_wire_bytes=sum(r["ll_combine_wire"] for r in per_rank))


def _print(s: dict) -> None:
    mb = 1 / 2**20
    print(f"  low-latency dispatch            {s['ll_dispatch_ms']:8.2f} ms {s['ll_dispatch_wire_bytes'] * mb:9.1f} MiB")
    print(f"  low-latency combine             {s['ll_combine_ms']:8.2f} ms {s['ll_combine_wire_bytes'] * mb:9.1f} MiB")
    ll, raw = s["ll_dispatch_ms"] + s["ll_combine_ms"], s["raw_dispatch_ms"] + s["raw_combine_ms"]
    print(f"  raw all_to_all, static buffers  {raw:8.2f} ms{'':14s}low-latency is {speed_words(ll, raw)}")
    print(f"  normal mode (layout+dispatch+combine) {s['normal_ms']:8.2f} ms {s['normal_wire_bytes'] * mb:9.1f} MiB"
          f"   low-latency is {speed_words(ll, s['normal_ms'])}, with {s['ll_vs_normal_bytes']:.2f}x the wire bytes")
    print(flush=True)
