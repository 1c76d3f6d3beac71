"""``moeflow bench``: dispatch+combine on local ranks, against two baselines measured in the same run.

Baselines:
  raw        ``all_to_all_single`` of exactly the bytes moeflow moved (preallocated tensors, no
             packing, no layout): the floor any implementation on this transport pays.
  no-dedup   one row per token-expert pair (torchtitan-style): count exchange, gather rows by
             expert, all-to-all, then all-to-all back and a scatter-add onto tokens.

Shape letters: N tokens per rank, H hidden, E experts, K top-k, R ranks.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from ..layout import wide_rows
from . import (UsageError, add_workload_arguments, check_workload, reset_peak_rss, rss_bytes, slowest_median,
               speed_words, write_json)


DESCRIPTION = """\
Times moeflow's dispatch and combine (the DeepEP Buffer contract) on R local Gloo ranks and, in
the same run, two baselines: a raw all_to_all of exactly the bytes moeflow
moved (the floor of this transport), and a no-dedup exchange that sends one row per token-expert
pair (torchtitan-style). Prints milliseconds, bytes on the wire, how much faster or slower
moeflow is than each baseline, and the extra peak memory of the first call. Random bf16 tokens,
uniform random top-k routing; the slowest rank's median over --iters."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p, ranks=[2], tokens=4096, hidden=2048, iters=10, warmup=2)
    p.add_argument("--fp8", action="store_true", help="also run FP8 dispatch (bf16 combine)")
    p.add_argument("--ranks-per-node", type=int, default=None, metavar="P",
                   help="emulate nodes of P ranks: node-aware dispatch, inter-node bytes reported "
                        "(default: one node)")


def run(args: argparse.Namespace) -> int:
    from ..launch import spawn

    check_workload(args, fp8=args.fp8)
    P = args.ranks_per_node
    if P is not None and (P < 1 or any(R % P for R in args.ranks)):
        raise UsageError(f"--ranks-per-node {P} must divide every --ranks {args.ranks}")
    all_rows = []
    for R in args.ranks:
        modes = ["bf16"] + (["fp8"] if args.fp8 else [])
        for mode in modes:
            cfg = dict(N=args.tokens, H=args.hidden, E=args.experts, K=args.topk, fp8=mode == "fp8",
                       iters=args.iters, warmup=args.warmup, P=P or R)
            nodes = f" ({R // P} nodes of {P})" if P else ""
            print(f"== {R} ranks{nodes}, {mode}: {args.tokens} tokens/rank, hidden {args.hidden}, "
                  f"{args.experts} experts, top-{args.topk}", flush=True)
            per_rank = spawn(_bench_rank, R, cfg, timeout_s=1800, threads_per_rank=1)
            rows = _summarise(R, mode, cfg, per_rank)
            _print_table(rows)
            all_rows.append(rows)
    write_json(args.json, all_rows)
    return 0


# ----------------------------------------------------------------------------- rank side
def _no_dedup_round(x, topk_idx, E, R, group):
    """torchtitan-style exchange: every token-expert pair is a row on the wire."""
    N, H = x.shape
    K = topk_idx.size(1)
    L = E // R
    flat_expert = topk_idx.flatten()
    order = torch.argsort(flat_expert, stable=True)  # pairs grouped by expert, hence by rank
    pair_token = order // K
    num_pairs_per_expert = torch.bincount(flat_expert, minlength=E)
    send_counts = num_pairs_per_expert.view(R, L)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # per-expert counts
    send_splits = send_counts.sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    # Rows as int64 words: the same fast gather and transfer moeflow gets (see layout.wide_rows).
    send_rows = wide_rows(x).index_select(0, pair_token)
    recv_rows = torch.empty(sum(recv_splits), send_rows.size(1), dtype=send_rows.dtype)
    dist.all_to_all_single(recv_rows, send_rows, recv_splits, send_splits, group=group)
    # experts would run here; combine sends every row back
    back = torch.empty_like(send_rows)
    dist.all_to_all_single(back, recv_rows, send_splits, recv_splits, group=group)
    # Unweighted fp32 sum per token, like moeflow's combine (weights belong to the experts),
    # converting through one reused block so the baseline pays no avoidable page faults.
    out = torch.zeros(N, H, dtype=torch.float32)
    back_x = back.view(torch.uint8).view(x.dtype)
    block = torch.empty(min(4096, back_x.size(0)), H, dtype=torch.float32)
    for lo in range(0, back_x.size(0), block.size(0)):
        hi = min(lo + block.size(0), back_x.size(0))
        block[:hi - lo].copy_(back_x[lo:hi])
        out.index_add_(0, pair_token[lo:hi], block[:hi - lo])
    return out.to(x.dtype), (sum(send_splits) - send_splits[dist.get_rank(group)]) * H * x.element_size() * 2


def _bench_rank(cfg: dict) -> dict:
    from ..comm.buffer import Buffer
    from ..comm.transport import ProcessGroupTransport
    from ..quant import per_token_cast_to_fp8

    rank, R = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    N, H, E, K = cfg["N"], cfg["H"], cfg["E"], cfg["K"]
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(N, H, generator=g).bfloat16()
    scores = torch.rand(N, E, generator=g)
    topk_weights, topk_idx = scores.topk(K, dim=1)
    x_in = per_token_cast_to_fp8(x.float()) if cfg["fp8"] else x
    buffer = Buffer(group, ranks_per_node=cfg["P"])
    # the benchmark's own collectives (barriers, the baselines' all-to-alls) watched like moeflow's:
    # a lost rank is named, not waited on (the guards sit outside the timed regions)
    loop = ProcessGroupTransport(group, name="benchmark")

    def moeflow_round():
        t0, c0 = time.perf_counter(), time.process_time()
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
            x_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=topk_idx, topk_weights=topk_weights)
        t1 = time.perf_counter()
        y = recv_x if not isinstance(recv_x, tuple) else torch.empty(recv_x[0].shape, dtype=torch.bfloat16)
        combined, _, _ = buffer.combine(y, handle)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, handle, recv_x, combined, time.process_time() - c0

    # Extra peak memory of the first dispatch+combine, before any allocator reuse can hide it.
    loop.barrier()
    peak_ok = reset_peak_rss()
    rss0 = rss_bytes("VmRSS")
    _, _, handle, recv_x, combined, _ = moeflow_round()
    peak_extra = rss_bytes("VmHWM") - rss0 if peak_ok else -1
    recv_payload = handle.num_recv_tokens * H * x.element_size()
    # What the caller holds afterwards (recv_x, its metadata, the combined tokens) is output,
    # not overhead; the rest of the peak is moeflow's transient memory.
    recv_parts = recv_x if isinstance(recv_x, tuple) else (recv_x,)
    outputs = sum(t.numel() * t.element_size() for t in (*recv_parts, combined))
    outputs += handle.num_recv_tokens * K * (8 + 4)  # recv_topk_idx, recv_topk_weights
    del recv_x, combined

    # Raw all-to-all of the same bytes, preallocated.
    send_splits = list(handle.num_send_tokens_per_rank)
    recv_splits = list(handle.num_recv_tokens_per_rank)
    S, M = sum(send_splits), sum(recv_splits)
    row_bytes = torch.tensor([sum(buffer.counters.sent["dispatch"]) // max(S, 1)])
    # Node-aware dispatch moves rows in two phases, so bytes per row differ by rank: the raw
    # baseline uses the largest, the same on every rank (flat: already the same everywhere).
    loop.all_reduce(row_bytes, op=dist.ReduceOp.MAX)
    row_bytes = int(row_bytes)
    comb_bytes = H * 2
    raw_send_d = torch.zeros(S, row_bytes, dtype=torch.uint8)
    raw_recv_d = torch.empty(M, row_bytes, dtype=torch.uint8)
    raw_send_c = torch.zeros(M, comb_bytes, dtype=torch.uint8)
    raw_recv_c = torch.empty(S, comb_bytes, dtype=torch.uint8)

    def raw_round():
        t0, c0 = time.perf_counter(), time.process_time()
        dist.all_to_all_single(raw_recv_d, raw_send_d, recv_splits, send_splits, group=group)
        t1 = time.perf_counter()
        dist.all_to_all_single(raw_recv_c, raw_send_c, send_splits, recv_splits, group=group)
        return t1 - t0, time.perf_counter() - t1, time.process_time() - c0

    def no_dedup_round():
        t0 = time.perf_counter()
        _no_dedup_round(x, topk_idx, E, R, group)
        return time.perf_counter() - t0

    buffer.counters.reset()
    times = {"dispatch": [], "combine": [], "raw_dispatch": [], "raw_combine": [], "no_dedup": []}
    cpu_times = {"ours": [], "raw": []}  # process CPU time (every thread, Gloo's too): steadier under load
    show = rank == 0
    total = cfg["warmup"] + cfg["iters"]
    bar = _progress(total, show)
    for it in range(total):
        # Interleave the three so that drift on a shared machine hits them alike.
        loop.barrier()
        d, c, *_, cpu = moeflow_round()
        loop.barrier()
        with loop.guard("raw"):
            rd, rc, raw_cpu = raw_round()
        loop.barrier()
        with loop.guard("no_dedup"):
            nd = no_dedup_round()
        if it >= cfg["warmup"]:
            for k, v in (("dispatch", d), ("combine", c), ("raw_dispatch", rd), ("raw_combine", rc),
                         ("no_dedup", nd)):
                times[k].append(v)
            cpu_times["ours"].append(cpu)
            cpu_times["raw"].append(raw_cpu)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rounds = total
    c = buffer.counters
    with loop.guard("no_dedup"):
        _, nd_bytes = _no_dedup_round(x, topk_idx, E, R, group)
    # The minimum any implementation moves: one token per (token, other rank), or per (token,
    # other node) across nodes. An FP8 token is its FP8 payload *and* its per-128-channel fp32
    # scales (DeepEP's FP8 token format): both are payload, the rest is metadata.
    token_bytes = H + 4 * (H // 128) if cfg["fp8"] else H * x.element_size()
    P = cfg["P"]
    in_rank = handle.is_token_in_rank
    others = torch.ones(R, dtype=torch.bool)
    others[rank] = False
    other_nodes = torch.ones(R // P, dtype=torch.bool)
    other_nodes[rank // P] = False
    in_node = in_rank.view(N, R // P, P).any(2)
    return dict(times=times, cpu_times=cpu_times, wire_dispatch=c.wire_bytes("dispatch") // rounds,
                wire_combine=c.wire_bytes("combine") // rounds, wire_layout=c.wire_bytes("layout") // rounds,
                inter_dispatch=(c.wire_bytes("dispatch", scope="inter_node") + c.wire_bytes("layout", scope="inter_node"))
                // rounds,
                min_dispatch_bytes=int(in_rank[:, others].sum()) * token_bytes,
                min_inter_dispatch_bytes=int(in_node[:, other_nodes].sum()) * token_bytes, no_dedup_bytes=nd_bytes,
                recv_payload=recv_payload, peak_extra=peak_extra, outputs=outputs, row_bytes=row_bytes,
                total_sent=sum(c.sent["dispatch"]) // rounds)


def _progress(total: int, show: bool):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="iterations", leave=False)


# ----------------------------------------------------------------------------- parent side
def _summarise(R: int, mode: str, cfg: dict, per_rank: list[dict]) -> dict:
    t = {k: slowest_median(per_rank, k) for k in per_rank[0]["times"]}
    cpu = {k: slowest_median(per_rank, k, "cpu_times") for k in per_rank[0]["cpu_times"]}
    wire_d = sum(r["wire_dispatch"] for r in per_rank)
    wire_c = sum(r["wire_combine"] for r in per_rank)
    wire_l = sum(r["wire_layout"] for r in per_rank)
    min_d = sum(r["min_dispatch_bytes"] for r in per_rank)
    min_inter = sum(r["min_inter_dispatch_bytes"] for r in per_rank)
    inter = sum(r["inter_dispatch"] for r in per_rank)
    nd = sum(r["no_dedup_bytes"] for r in per_rank)
    ours = t["dispatch"] + t["combine"]
    raw = t["raw_dispatch"] + t["raw_combine"]
    payload = max(r["recv_payload"] for r in per_rank)
    peak = max(r["peak_extra"] for r in per_rank)
    peak_ratio = max(r["peak_extra"] / r["recv_payload"] for r in per_rank if r["recv_payload"])
    transient_ratio = max((r["peak_extra"] - r["outputs"]) / r["recv_payload"] for r in per_rank if r["recv_payload"])
    fp8 = mode == "fp8"
    return dict(
        ranks=R, mode=mode, tokens=cfg["N"], hidden=cfg["H"], experts=cfg["E"], topk=cfg["K"],
        dispatch_ms=t["dispatch"] * 1e3, combine_ms=t["combine"] * 1e3,
        raw_dispatch_ms=t["raw_dispatch"] * 1e3, raw_combine_ms=t["raw_combine"] * 1e3,
        no_dedup_ms=t["no_dedup"] * 1e3,
        dispatch_wire_bytes=wire_d, combine_wire_bytes=wire_c, layout_wire_bytes=wire_l,
        dispatch_GBps=wire_d / R / t["dispatch"] / 1e9, combine_GBps=wire_c / R / t["combine"] / 1e9,
        min_dispatch_bytes=min_d, no_dedup_wire_bytes=nd,
        metadata_overhead=(wire_d + wire_l) / min_d - 1 if min_d else 0.0,
        ranks_per_node=cfg["P"], inter_node_dispatch_bytes=inter, min_inter_node_dispatch_bytes=min_inter,
        inter_node_metadata_overhead=inter / min_inter - 1 if min_inter else None,
        fp8_vs_no_dedup_dispatch=(wire_d + wire_l) / (nd / 2) if fp8 and nd else None,
        fp8_vs_no_dedup_total=(wire_d + wire_c + wire_l) / nd if fp8 and nd else None,
        ours_vs_raw=ours / raw, speedup_vs_no_dedup=t["no_dedup"] / ours,
        ours_cpu_ms=cpu["ours"] * 1e3, raw_cpu_ms=cpu["raw"] * 1e3, ours_vs_raw_cpu=cpu["ours"] / cpu["raw"],
        peak_extra_bytes=peak, recv_payload_bytes=payload, peak_vs_payload=peak_ratio,
        transient_vs_payload=transient_ratio,
    )


def _print_table(s: dict) -> None:
    mb = 1 / 2**20
    ours, raw = s["dispatch_ms"] + s["combine_ms"], s["raw_dispatch_ms"] + s["raw_combine_ms"]
    lines = [
        ("dispatch (layout+dispatch)", f"{s['dispatch_ms']:8.2f} ms", f"{s['dispatch_wire_bytes'] * mb:9.1f} MiB", f"{s['dispatch_GBps']:6.2f} GB/s/rank"),
        ("combine", f"{s['combine_ms']:8.2f} ms", f"{s['combine_wire_bytes'] * mb:9.1f} MiB", f"{s['combine_GBps']:6.2f} GB/s/rank"),
        ("raw all_to_all, same bytes", f"{raw:8.2f} ms", "", f"moeflow is {speed_words(ours, raw)}"),
        ("  CPU time, moeflow vs raw", f"{s['ours_cpu_ms']:8.2f} ms", f"{s['raw_cpu_ms']:9.2f} ms",
         f"moeflow is {speed_words(s['ours_cpu_ms'], s['raw_cpu_ms'])}"),
        ("no-dedup exchange (torchtitan)", f"{s['no_dedup_ms']:8.2f} ms", f"{s['no_dedup_wire_bytes'] * mb:9.1f} MiB",
         f"moeflow is {speed_words(ours, s['no_dedup_ms'])}"),
    ]
    for name, a, b, c in lines:
        print(f"  {name:32s}{a}{b:>14s}   {c}")
    what = "payload and FP8 scales" if s["mode"] == "fp8" else "payload"
    if s["inter_node_metadata_overhead"] is None:  # flat: every row crosses once
        print(f"  dispatch wire bytes vs per-rank-dedup minimum: +{s['metadata_overhead'] * 100:.2f}% "
              f"(minimum {s['min_dispatch_bytes'] * mb:.1f} MiB of {what}; the rest is metadata and count exchange)")
    else:  # node-aware: rows forwarded inside a node cross twice by design; the slow link is the measure
        print(f"  inter-node dispatch bytes vs per-node-dedup minimum: "
              f"+{s['inter_node_metadata_overhead'] * 100:.2f}% ({s['inter_node_dispatch_bytes'] * mb:.1f} MiB "
              f"against {s['min_inter_node_dispatch_bytes'] * mb:.1f} MiB of {what})")
    if s["fp8_vs_no_dedup_dispatch"] is not None:
        print(f"  FP8 dispatch bytes / no-dedup bf16 dispatch bytes: {s['fp8_vs_no_dedup_dispatch']:.3f}x; "
              f"dispatch+combine: {s['fp8_vs_no_dedup_total']:.3f}x")
    if s["peak_vs_payload"] is not None and s["peak_extra_bytes"] >= 0:
        print(f"  extra peak RSS, first dispatch+combine: {s['peak_extra_bytes'] * mb:.1f} MiB = "
              f"{s['peak_vs_payload']:.2f}x the received payload ({s['recv_payload_bytes'] * mb:.1f} MiB); "
              f"without the returned tensors: {s['transient_vs_payload']:.2f}x")
    print(flush=True)
