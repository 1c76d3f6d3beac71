"""GroupedExperts forward + backward against the ceiling of this CPU: one dense matmul chain of
the same FLOPs, timed in the same run.

For each shape, one rank's share of a routed batch is built the way the MoE layer sees it: R * T
tokens routed top-K over E experts, this rank's L = E / R experts, the M rows that reach it and
their P token-expert pairs. Timed forward + backward (gradients of the rows, the pair weights and
the three weight banks), one thread, interleaved rounds, medians:

    dense        the ceiling: one SwiGLU (x @ w1, x @ w3, silu * up, @ w2) over P rows with one
                 expert's weights: the experts' FLOPs with no permutation and one big GEMM each
    module       GroupedExperts.forward as the layer calls it (permute, experts, unpermute)
    loop         forward_sorted's per-expert path on the sorted rows (no permutation)
    padded_bmm   forward_sorted's padded path (rows scattered into [L, max rows, D], 3 bmm)
    grouped_mm   torch._grouped_mm on CPU (PyTorch's own fallback), for reference

Ratios are ceiling / candidate in CPU seconds of this process (steadier than wall time on a
shared machine; both are printed), so 1.0 means as fast as one dense GEMM chain.

Shape letters: T tokens per rank, D hidden, F expert intermediate size, E experts, K top-k,
R ranks, L local experts, M rows received, P pairs.

Run: python benchmarks/bench_experts.py [--shapes demo layer-top2-r2 ...] [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from moeflow.experts import GroupedExperts, permute

# name -> (T, D, F, E, K, R): moeflow demo's MoE layers (8 x 128 tokens per rank, 4 ranks) and
# moeflow bench-layer's defaults at top-2 and top-6 on 2 and 4 ranks
SHAPES = {
    "demo": (1024, 128, 128, 16, 2, 4),
    "layer-top2-r2": (4096, 512, 256, 32, 2, 2),
    "layer-top2-r4": (4096, 512, 256, 32, 2, 4),
    "layer-top6-r2": (4096, 512, 256, 32, 6, 2),
    "layer-top6-r4": (4096, 512, 256, 32, 6, 4),
}


def rank_share(T: int, D: int, Fh: int, E: int, K: int, R: int, seed: int = 0):
    """Rank 0's rows ``[M, D]``, local ids ``[M, K]`` (-1 elsewhere) and weights ``[M, K]``."""
    g = torch.Generator().manual_seed(seed)
    L = E // R
    topk_idx = torch.randn(R * T, E, generator=g).topk(K, dim=-1).indices
    here = (topk_idx < L).any(1)
    local_idx = torch.where(topk_idx[here] < L, topk_idx[here], -1)
    M = int(here.sum())
    return torch.randn(M, D, generator=g), local_idx, torch.rand(M, K, generator=g), L


def _time(fns: dict, reps: int) -> dict:
    """Median (wall, CPU) seconds of each function, in rounds running every function once."""
    for fn in fns.values():
        fn()  # warm-up
    walls: dict = {k: [] for k in fns}
    cpus: dict = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in fns}


def bench_shape(T: int, D: int, Fh: int, E: int, K: int, R: int, reps: int) -> dict:
    x, idx, w, L = rank_share(T, D, Fh, E, K, R)
    experts = GroupedExperts(L, D, Fh)
    x_sorted, info = permute(x, idx, L, topk_weights=w)
    counts, P = info.num_tokens_per_expert, sum(info.num_tokens_per_expert)
    grad_y = torch.randn(x.shape)
    grad_sorted = torch.randn(P, D)
    dense = [t[0].detach().clone().requires_grad_() for t in (experts.w1, experts.w2, experts.w3)]
    rows = torch.randn(P, D).requires_grad_()
    x_req, w_req, xs_req = x.clone().requires_grad_(), w.clone().requires_grad_(), x_sorted.clone().requires_grad_()

    def clear(*tensors):
        for t in (*tensors, *experts.parameters()):
            t.grad = None

    def run_dense():
        clear(rows, *dense)
        ((F.silu(rows @ dense[0]) * (rows @ dense[2])) @ dense[1]).backward(grad_sorted)

    def run_module():
        clear(x_req, w_req)
        # the counts come with dispatch (num_recv_tokens_per_expert_list), as in the layer
        experts(x_req, idx, w_req, num_tokens_per_expert=counts).backward(grad_y)

    def run_loop():
        clear(xs_req)
        experts._loop(xs_req, counts, info.weights).backward(grad_sorted)

    def run_padded():
        clear(xs_req)
        experts._padded_bmm(xs_req, counts, max(counts), info.weights).backward(grad_sorted)

    def run_grouped_mm():
        clear(xs_req)
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(xs_req, experts.w1, offs=offs)) * torch._grouped_mm(xs_req, experts.w3, offs=offs)
        torch._grouped_mm(h * info.weights.unsqueeze(1), experts.w2, offs=offs).backward(grad_sorted)

    fns = dict(dense=run_dense, module=run_module, loop=run_loop, padded_bmm=run_padded)
    try:
        run_grouped_mm()
        fns["grouped_mm"] = run_grouped_mm
    except (RuntimeError, NotImplementedError):
        pass
    t = _time(fns, reps)
    return dict(M=x.size(0), P=P, L=L, rows=(min(counts), max(counts)), times=t,
                ratio={k: t["dense"][1] / v[1] for k, v in t.items()},
                wall_ratio={k: t["dense"][0] / v[0] for k, v in t.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as each rank of moeflow demo / bench-layer runs
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, 1 thread, fp32, load average {load:.1f} on {os.cpu_count()} cores")
    print(f"{'shape':<15}{'M':>6}{'P':>7}{'L':>4}  {'rows/expert':>11}   ceiling / candidate, CPU time (wall)")
    for name in args.shapes:
        r = bench_shape(*SHAPES[name], reps=args.reps)
        cols = "  ".join(f"{k} {r['ratio'][k]:.2f} ({r['wall_ratio'][k]:.2f})" for k in r["times"] if k != "dense")
        print(f"{name:<15}{r['M']:>6}{r['P']:>7}{r['L']:>4}  {r['rows'][0]:>5}-{r['rows'][1]:<5}   {cols}   "
              f"[dense {r['times']['dense'][1] * 1e3:.0f} ms CPU]", flush=True)


if __name__ == "__main__":
    main()
