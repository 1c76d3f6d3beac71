"""``moeflow bench-layer``: MoE layer forward+backward tokens/s on local ranks, against baselines
measured in the same run.

Columns (same sizes, same router math, same weights, same routing, fp32 compute, no shared
experts; each iteration runs every column once, interleaved and in a rotated order, so drift on a
shared machine and the column before hit them alike; per iteration the slowest rank decides, then
the median over iterations):

  moeflow     :class:`moeflow.MoELayer`, dropless, with ``wire_dtype`` None (fp32 on the wire,
              like the baselines: the like-for-like column) and bf16 (reported beside it);
              also with ``num_chunks="auto"`` (after its timed trials, run before the
              measurement), against the fastest fixed chunk count of ``--chunks``.
  no-dedup    :class:`NoDedupMoE` below, torchtitan-style: one row per token-expert pair through
              ``all_to_all_single`` with uneven splits after a count all-to-all, permuted by local
              expert on arrival, the same :class:`~moeflow.experts.GroupedExperts` compute, the
              reverse all-to-all and a weighted sum on the source rank. Only the communication
              strategy differs from moeflow.
  deepspeed   ``deepspeed.moe.layer.MoE`` (dropless: ``drop_tokens=False``), experts = one
              :class:`~moeflow.experts.SwiGLU` of the same size each, ``ep_size`` = ranks.
              Skipped with a message when deepspeed is not importable.

Overlap (MoELayer, per chunk count C): layer time / max(communication, compute), where
communication is the same pipeline with the experts replaced by a row scaling (dispatch+combine
and their backward, same routing, no router) and compute is the router and the experts on the
rows each chunk's dispatch delivered (no communication). 1.0 would be perfect overlap.

Shape letters: T tokens per rank, D hidden, F expert intermediate size, E experts, K top-k,
R ranks, L = E / R local experts, S token-expert pairs sent, M rows received.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import (add_workload_arguments, check_at_least, check_workload, slowest_median, speed_words, target_words,
               write_json)

# Targets of issue 3, item 6: moeflow / baseline tokens/s, and overlap at the best chunk count.
TARGET_VS_NO_DEDUP = 1.5
TARGET_VS_DEEPSPEED = 1.2
TARGET_OVERLAP = 1.2
# issue 11: num_chunks="auto" within 3% of the fastest fixed chunk count
TARGET_AUTO = 0.97


DESCRIPTION = """\
Times one MoE layer's forward and backward (router, dispatch, experts, combine) on R local Gloo
ranks: moeflow's MoELayer against, in the same run with the same weights and routing, a
no-dedup layer (one row per token-expert pair on the wire, torchtitan-style) and DeepSpeed-MoE
(dropless) when deepspeed is installed. Prints milliseconds and tokens/s per layer, how much
faster or slower moeflow is than each (wall and CPU time), communication alone, and how well
communication overlaps compute at each --chunks count. Targets are printed as context."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p, ranks=[2, 4], tokens=4096, hidden=512, experts=32, topk=6, iters=5, warmup=1,
                           tokens_help="tokens per rank (T)")
    p.add_argument("--ffn", type=int, default=256, help="intermediate size of one expert (F)")
    p.add_argument("--chunks", type=int, nargs="*", default=[1, 2, 4],
                   help="MoELayer chunk counts for the overlap figure (give none to skip it)")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed-MoE column")


def run(args: argparse.Namespace) -> int:
    from ..launch import spawn

    check_workload(args, fp8=False)
    check_at_least(args, 1, "ffn", "chunks")
    deepspeed_note = None if args.no_deepspeed else _deepspeed_missing()
    if deepspeed_note:
        print(f"deepspeed column skipped: {deepspeed_note}", flush=True)
    use_deepspeed = not args.no_deepspeed and deepspeed_note is None
    rows = []
    for R in args.ranks:
        cfg = dict(T=args.tokens, D=args.hidden, F=args.ffn, E=args.experts, K=args.topk,
                   chunks=sorted(set(args.chunks)), deepspeed=use_deepspeed, iters=args.iters,
                   warmup=args.warmup)
        print(f"== {R} ranks: {args.tokens} tokens/rank, hidden {args.hidden}, ffn {args.ffn}/expert, "
              f"{args.experts} experts, top-{args.topk}, fp32 compute, forward+backward", flush=True)
        per_rank = spawn(_bench_rank, R, cfg, timeout_s=3600, threads_per_rank=1)
        row = _summarise(R, cfg, per_rank)
        _print(row)
        rows.append(row)
    write_json(args.json, rows)
    return 0


@contextlib.contextmanager
def _silenced():
    """Send what a third-party library prints while it sets up to /dev/null, at the file
    descriptors (C-level writes and logging handlers bound to the streams included): DeepSpeed
    logs its accelerator, op builds and groups from every rank, which would land in our table.
    Errors still arrive as exceptions."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _deepspeed_missing() -> Optional[str]:
    try:
        with _silenced():
            import deepspeed.moe.layer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no column, said why
        return (f"deepspeed is not importable ({type(e).__name__}: {e}); from the repository: "
                f"pip install -e '.[bench]'")
    return None


# ----------------------------------------------------------------------------- no-dedup baseline
class _AllToAllV(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven splits: backward sends the gradients
    back along the same pairs (splits swapped)."""

    @staticmethod
    def forward(ctx, x, recv_splits: list[int], send_splits: list[int], group):
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)  # the rows
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(sum(ctx.send_splits), *grad.shape[1:])
        # the gradients of the rows, back to where the rows came from
        dist.all_to_all_single(out, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return out, None, None, None


class NoDedupMoE(nn.Module):
    """The torchtitan-style expert-parallel MoE layer: every token-expert pair is a row on the wire.

    Same router (:class:`~moeflow.routing.Router`) and experts
    (:class:`~moeflow.experts.GroupedExperts`) as :class:`~moeflow.MoELayer`; only the
    communication differs: a token with k experts on another rank travels there k times.

    Args:
        hidden, ffn_hidden, num_experts, num_topk: D, F, E, K.
        group: the expert-parallel process group; E divides by its size.
        norm_topk_prob: passed to the router.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, num_topk: int,
                 group: Optional[dist.ProcessGroup] = None, *, norm_topk_prob: bool = True) -> None:
        super().__init__()
        from ..experts import GroupedExperts
        from ..routing import Router

        self.group = group
        self.num_ranks, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.num_ranks:
            raise ValueError(f"NoDedupMoE: `num_experts` ({num_experts}) must divide by the group size "
                             f"{self.num_ranks}")
        self.num_experts, self.num_local_experts = num_experts, num_experts // self.num_ranks
        self.router = Router(hidden, num_experts, num_topk, norm_topk_prob=norm_topk_prob, group=group)
        self.experts = GroupedExperts(self.num_local_experts, hidden, ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[T, D]``; returns ``[T, D]``."""
        route = self.router(x)
        return self.routed(x, route.topk_idx, route.topk_weights)

    def routed(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Everything after the router: ``x`` ``[T, D]``, ``topk_idx`` ``[T, K]`` int64 global expert
        ids, ``topk_weights`` ``[T, K]`` float32 -> ``[T, D]``."""
        T, D = x.shape
        R, L, E = self.num_ranks, self.num_local_experts, self.num_experts
        K = topk_idx.size(1)
        flat_expert = topk_idx.flatten()                                       # [T * K]
        order = torch.argsort(flat_expert, stable=True)                        # pairs by expert, so by rank
        pair_token = order // K                                                # [S]
        pair_weight = topk_weights.flatten().index_select(0, order)            # [S] fp32
        send_counts = torch.bincount(flat_expert, minlength=E).view(R, L)      # [R, L] pairs per expert
        recv_counts = torch.empty_like(send_counts)
        # per-expert counts: the receiver sizes its rows and its permutation from them
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()  # host sync
        recv_x = _AllToAllV.apply(x.index_select(0, pair_token), recv_splits, send_splits, self.group)
        # Arrived grouped by (source rank, local expert); the grouped GEMM wants (expert, source).
        segment = torch.repeat_interleave(torch.arange(R * L), recv_counts.flatten(), output_size=recv_x.size(0))
        by_expert = torch.argsort((segment % L) * R + segment // L, stable=True)   # [M]
        h_sorted = self.experts.forward_sorted(recv_x.index_select(0, by_expert), recv_counts.sum(0).tolist())
        h = h_sorted.index_select(0, torch.argsort(by_expert))                 # back to arrival order
        back = _AllToAllV.apply(h, send_splits, recv_splits, self.group)       # [S, D]
        return x.new_zeros(T, D).index_add(0, pair_token, back * pair_weight.unsqueeze(1))


# ----------------------------------------------------------------------------- overlap helpers
class _RowScale(nn.Module):
    """Stands in for the experts when timing communication alone: each received row times the
    sum of its weights (so the weights' gradients travel back as they do with real experts)."""

    def forward(self, x, topk_idx, topk_weights, num_tokens_per_expert=None):
        return x * topk_weights.sum(1, keepdim=True).to(x.dtype)


class _SortedIdentity(nn.Module):
    """Stands in for the no-dedup layer's experts when timing its communication alone (its
    weights are applied on the source rank, so their gradients need nothing here)."""

    def forward_sorted(self, x_sorted, num_tokens_per_expert):
        return x_sorted


# ----------------------------------------------------------------------------- rank side
def _global_weights(E: int, D: int, F: int):
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(E, D, generator=g) * D ** -0.5
    w1, w3 = (torch.randn(E, D, F, generator=g) * D ** -0.5 for _ in range(2))
    w2 = torch.randn(E, F, D, generator=g) * F ** -0.5
    return gate, w1, w2, w3


@torch.no_grad()
def _load(layer: nn.Module, weights, rank: int, R: int) -> None:
    gate, w1, w2, w3 = weights
    layer.router.gate.weight.copy_(gate)
    layer.experts.load_shard(w1, w2, w3, rank, R)


def _make_deepspeed(weights, D: int, F: int, E: int, K: int, rank: int, R: int) -> nn.Module:
    import logging

    import deepspeed
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import logger

    from ..experts import SwiGLU

    logger.setLevel(logging.WARNING)
    # Wraps the process group spawn() already set up; MoE then builds its expert-parallel
    # group (ep_size = R, so one group of all ranks) in set_deepspeed_parallelism().
    deepspeed.init_distributed(dist_backend="gloo")
    moe = MoE(D, SwiGLU(D, F), num_experts=E, ep_size=R, k=K, drop_tokens=False, use_rts=False,
              top2_2nd_expert_sampling=False)  # no noise in the second choice: same routing as ours
    moe.set_deepspeed_parallelism()
    gate, w1, w2, w3 = weights
    L = E // R
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(gate)
        for l, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            e = rank * L + l  # DeepSpeed's all-to-all splits the [E, C, D] block evenly: contiguous experts
            expert.w1.copy_(w1[e])
            expert.w2.copy_(w2[e])
            expert.w3.copy_(w3[e])
    return moe


def _bench_rank(cfg: dict) -> dict:
    from ..chunking import TRIALS, ChunkTuner
    from ..comm.buffer import Buffer
    from ..comm.transport import ProcessGroupTransport
    from ..layer import MoELayer

    rank, R = dist.get_rank(), dist.get_world_size()
    # the baselines' collectives (no-dedup's all-to-alls, DeepSpeed's) and the barriers, watched
    # like moeflow's: a lost rank is named, not waited on (the guards sit outside the timed regions)
    loop = ProcessGroupTransport(None, name="benchmark")
    T, D, F, E, K = cfg["T"], cfg["D"], cfg["F"], cfg["E"], cfg["K"]
    weights = _global_weights(E, D, F)
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(T, D, generator=g).requires_grad_()
    grad_y = torch.randn(T, D, generator=g)
    buffer = Buffer()  # one buffer for every MoELayer here: they run one at a time

    def moe_layer(num_chunks: int, wire_dtype) -> MoELayer:
        layer = MoELayer(D, F, E, K, norm_topk_prob=True, num_chunks=num_chunks, wire_dtype=wire_dtype,
                         buffer=buffer)
        _load(layer, weights, rank, R)
        return layer

    layers: dict[str, nn.Module] = {"moeflow": moe_layer(1, None), "moeflow_bf16": moe_layer(1, torch.bfloat16)}
    no_dedup = NoDedupMoE(D, F, E, K)
    _load(no_dedup, weights, rank, R)
    layers["no_dedup"] = no_dedup
    if cfg["deepspeed"]:
        with _silenced():
            layers["deepspeed"] = _make_deepspeed(weights, D, F, E, K, rank, R)
    for C in cfg["chunks"]:
        if C != 1:
            layers[f"moeflow_C{C}"] = moe_layer(C, None)
    layers["moeflow_auto"] = moe_layer("auto", None)

    def step(name: str) -> torch.Tensor:
        layer = layers[name]
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        y = layer(x)
        y = y[0] if isinstance(y, tuple) else y  # DeepSpeed returns (output, l_aux, exp_counts)
        y.backward(grad_y)
        return y

    # Sanity, once: every column computes the same function (same weights, same routing).
    ref_y = step("moeflow").detach()
    ref_gx = x.grad.clone()
    diffs = {}
    for name in layers:
        if name != "moeflow":
            with loop.guard(name):
                y = step(name).detach()
            diffs[name] = dict(y=float((y - ref_y).abs().max()), grad_x=float((x.grad - ref_gx).abs().max()))

    # Overlap set-up: the routing and, per chunk count, what each chunk's dispatch delivers.
    comm_layer = moe_layer(1, None)
    comm_layer.experts = _RowScale()
    no_dedup_comm = NoDedupMoE(D, F, E, K)
    no_dedup_comm.experts = _SortedIdentity()
    with torch.no_grad():
        route = layers["moeflow"].router(x)
    topk_idx = route.topk_idx
    topk_weights = route.topk_weights.detach().requires_grad_()
    received = {}
    for C in cfg["chunks"]:
        bounds = [T * c // C for c in range(C + 1)]
        chunks = []
        for c in range(C):
            lo, hi = bounds[c], bounds[c + 1]
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx[lo:hi], E)
            recv_x, recv_idx, recv_w, counts, _, _ = buffer.dispatch(
                x.detach()[lo:hi], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=topk_idx[lo:hi], topk_weights=topk_weights.detach()[lo:hi])
            g_c = torch.randn(recv_x.shape, generator=g)
            chunks.append((recv_x.requires_grad_(), recv_idx, recv_w.requires_grad_(), counts, g_c))
        received[C] = chunks
    grad_w = torch.randn(topk_weights.shape, generator=g)

    def comm_step(C: int) -> None:
        comm_layer.num_chunks = C
        x.grad = topk_weights.grad = None
        comm_layer._routed(x, topk_idx, topk_weights).backward(grad_y)

    def no_dedup_comm_step() -> None:
        x.grad = topk_weights.grad = None
        no_dedup_comm.routed(x, topk_idx, topk_weights).backward(grad_y)

    def compute_step(C: int) -> None:
        layer = layers["moeflow"]
        for p in layer.parameters():
            p.grad = None
        outs, grads = [layer.router(x).topk_weights], [grad_w]
        for recv_x, recv_idx, recv_w, counts, g_c in received[C]:
            outs.append(layer.experts(recv_x, recv_idx, recv_w, num_tokens_per_expert=counts))
            grads.append(g_c)
        torch.autograd.backward(outs, grads)

    for _ in range(len(ChunkTuner.candidates(T)) * TRIALS + 1):
        step("moeflow_auto")  # its timed trials, then the step that agrees on the choice: from here on it runs that
    auto_chunks = layers["moeflow_auto"]._chunk_tuner.chosen.get(1 << max(T - 1, 0).bit_length(), 1)
    runs = {name: (lambda n=name: step(n)) for name in layers}
    runs["comm_no_dedup"] = no_dedup_comm_step
    for C in cfg["chunks"]:
        runs[f"comm_C{C}"] = lambda C=C: comm_step(C)
        runs[f"compute_C{C}"] = lambda C=C: compute_step(C)
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for it in range(cfg["warmup"] + cfg["iters"]):
        # Rotated each iteration: a column's time depends on the one before it (its caches, the
        # allocator, the other ranks' lag; seen as 10% on one column), so none always follows the same.
        for name in names[it % len(names):] + names[:it % len(names)]:
            fn = runs[name]
            # every rank starts each column together, so the slowest rank's time is the column's
            loop.barrier()
            with loop.guard(name):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if it >= cfg["warmup"]:
                times[name].append(dt)
                cpu_times[name].append(dc)
    return dict(times=times, cpu_times=cpu_times, diffs=diffs, auto_chunks=auto_chunks)


# ----------------------------------------------------------------------------- parent side
def _summarise(R: int, cfg: dict, per_rank: list[dict]) -> dict:
    t = {k: slowest_median(per_rank, k) for k in per_rank[0]["times"]}
    # CPU seconds of the rank process (all its threads, Gloo's included): what the work costs,
    # much less sensitive than wall time to other processes on a shared machine.
    cpu = {k: slowest_median(per_rank, k, "cpu_times") for k in per_rank[0]["cpu_times"]}
    tokens = R * cfg["T"]
    columns = {k: dict(ms=v * 1e3, tokens_per_s=tokens / v, cpu_ms=cpu[k] * 1e3) for k, v in t.items()
               if not k.startswith(("comm_", "compute_"))}
    comm_ms = {k: v * 1e3 for k, v in t.items() if k.startswith("comm_")}
    diffs = {name: dict(y=max(r["diffs"][name]["y"] for r in per_rank),
                        grad_x=max(r["diffs"][name]["grad_x"] for r in per_rank))
             for name in per_rank[0]["diffs"]}
    ratios = dict(vs_no_dedup=t["no_dedup"] / t["moeflow"],
                  bf16_vs_no_dedup=t["no_dedup"] / t["moeflow_bf16"],
                  cpu_vs_no_dedup=cpu["no_dedup"] / cpu["moeflow"])
    if "deepspeed" in t:
        ratios["cpu_vs_deepspeed"] = cpu["deepspeed"] / cpu["moeflow"]
        ratios["vs_deepspeed"] = t["deepspeed"] / t["moeflow"]
        ratios["bf16_vs_deepspeed"] = t["deepspeed"] / t["moeflow_bf16"]
    # Communication alone (same routing, no router, no experts): what deduplication changes.
    ratios["comm_vs_no_dedup"] = t["comm_no_dedup"] / t["comm_C1"] if "comm_C1" in t else None
    # moeflow cannot beat its own compute: with free communication it would reach this.
    computes = [t[k] for k in t if k.startswith("compute_")]
    ratios["ceiling_vs_no_dedup"] = t["no_dedup"] / min(computes) if computes else None
    overlap = []
    for C in cfg["chunks"]:
        layer = t["moeflow"] if C == 1 else t[f"moeflow_C{C}"]
        comm, compute = t[f"comm_C{C}"], t[f"compute_C{C}"]
        overlap.append(dict(chunks=C, layer_ms=layer * 1e3, comm_ms=comm * 1e3, compute_ms=compute * 1e3,
                            ratio=layer / max(comm, compute)))
    best = min(overlap, key=lambda o: o["layer_ms"]) if overlap else None
    ratios["auto_vs_best_chunks"] = (best["layer_ms"] / 1e3) / t["moeflow_auto"] if best else None
    if best:
        best_col = "moeflow" if best["chunks"] == 1 else f"moeflow_C{best['chunks']}"
        ratios["cpu_auto_vs_best_chunks"] = cpu[best_col] / cpu["moeflow_auto"]
    if best:
        ratios["best_chunks_vs_no_dedup"] = t["no_dedup"] / (best["layer_ms"] / 1e3)
        if "deepspeed" in t:
            ratios["best_chunks_vs_deepspeed"] = t["deepspeed"] / (best["layer_ms"] / 1e3)
    return dict(ranks=R, tokens_per_rank=cfg["T"], hidden=cfg["D"], ffn=cfg["F"], experts=cfg["E"],
                topk=cfg["K"], iters=cfg["iters"], columns=columns, comm_ms=comm_ms, ratios=ratios, max_abs_diff=diffs,
                overlap=overlap, best_chunks=best["chunks"] if best else None,
                auto_chunks=per_rank[0]["auto_chunks"],
                targets=dict(vs_no_dedup=TARGET_VS_NO_DEDUP, vs_deepspeed=TARGET_VS_DEEPSPEED,
                             overlap=TARGET_OVERLAP, auto_vs_best_chunks=TARGET_AUTO))


_LABELS = {"moeflow": "moeflow MoELayer, fp32 wire", "moeflow_bf16": "moeflow MoELayer, bf16 wire",
           "no_dedup": "no-dedup (torchtitan-style)", "deepspeed": "DeepSpeed-MoE, dropless",
           "moeflow_auto": "moeflow MoELayer, chunks auto"}


def _vs(ratio: float) -> str:
    """A baseline-time / moeflow-time ratio in words (speed_words takes the two times)."""
    return speed_words(1.0, ratio)


def _print(s: dict) -> None:
    cols = s["columns"]
    for name in ("moeflow", "moeflow_bf16", "moeflow_auto", "no_dedup", "deepspeed"):
        if name in cols:
            diff = s["max_abs_diff"].get(name)
            note = f"   max |dy| {diff['y']:.1e}, |dgrad_x| {diff['grad_x']:.1e} vs moeflow" if diff else ""
            print(f"  {_LABELS[name]:30s}{cols[name]['ms']:9.1f} ms {cols[name]['tokens_per_s']:11,.0f} tokens/s{note}")
    r = s["ratios"]
    print(f"  moeflow vs no-dedup (fp32 wire both): {_vs(r['vs_no_dedup'])} {target_words(TARGET_VS_NO_DEDUP)}; "
          f"bf16 wire: {_vs(r['bf16_vs_no_dedup'])}")
    cpu_line = ", ".join(f"{label} {cols[name]['cpu_ms']:.0f} ms" for name, label in
                         (("moeflow", "moeflow"), ("no_dedup", "no-dedup"), ("deepspeed", "DeepSpeed")) if name in cols)
    print(f"  CPU time per rank (less sensitive to load): {cpu_line}; moeflow {_vs(r['cpu_vs_no_dedup'])} than "
          f"no-dedup" + (f", {_vs(r['cpu_vs_deepspeed'])} than DeepSpeed" if "cpu_vs_deepspeed" in r else ""))
    if r.get("best_chunks_vs_no_dedup") is not None:
        print(f"  moeflow at its fastest chunk count (C={s['best_chunks']}): {_vs(r['best_chunks_vs_no_dedup'])} "
              f"than no-dedup"
              + (f", {_vs(r['best_chunks_vs_deepspeed'])} than DeepSpeed-MoE" if "best_chunks_vs_deepspeed" in r else ""))
    if r["comm_vs_no_dedup"] is not None:
        print(f"  communication alone (fwd+bwd, no router/experts): no-dedup {s['comm_ms']['comm_no_dedup']:.1f} ms, "
              f"moeflow {s['comm_ms']['comm_C1']:.1f} ms: moeflow {_vs(r['comm_vs_no_dedup'])}")
    if r["ceiling_vs_no_dedup"] is not None:
        print(f"  ceiling here: moeflow's compute alone is {_vs(r['ceiling_vs_no_dedup'])} than the no-dedup layer "
              f"(what free communication would give)")
    if "vs_deepspeed" in r:
        print(f"  moeflow vs DeepSpeed-MoE (fp32 wire both): {_vs(r['vs_deepspeed'])} "
              f"{target_words(TARGET_VS_DEEPSPEED)}; bf16 wire: {_vs(r['bf16_vs_deepspeed'])}")
    for o in s["overlap"]:
        print(f"  overlap C={o['chunks']}: layer {o['layer_ms']:8.1f} ms, comm {o['comm_ms']:7.1f} ms, "
              f"compute {o['compute_ms']:8.1f} ms: the layer takes {o['ratio']:.2f}x the longer of the two")
    if r.get("auto_vs_best_chunks") is not None:
        print(f"  num_chunks='auto' chose C={s['auto_chunks']}: {_vs(r['auto_vs_best_chunks'])} than the fastest "
              f"fixed C={s['best_chunks']} (target: at most {1 / TARGET_AUTO - 1:.0%} slower); CPU time per rank: "
              f"{_vs(r['cpu_auto_vs_best_chunks'])} (C=" + ", C=".join(
                  f"{c} {cols['moeflow' if c == 1 else f'moeflow_C{c}']['cpu_ms']:.0f} ms" for c in
                  [o["chunks"] for o in s["overlap"]]) + f", auto {cols['moeflow_auto']['cpu_ms']:.0f} ms)")
    if s["overlap"]:
        best = next(o for o in s["overlap"] if o["chunks"] == s["best_chunks"])
        print(f"  overlap at the fastest chunk count (C={best['chunks']}): {best['ratio']:.2f}x the longer of "
              f"communication and compute (1.00 = perfect overlap; target: at most {TARGET_OVERLAP:g}x)")
    print(flush=True)
