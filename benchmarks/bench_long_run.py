"""Long run on a larger size: resident memory and live tensors over many iterations.

    python3 benchmarks/bench_long_run.py [--ranks 2] [--iters 1000] [--tokens 256] [--hidden 512]

Runs ``--iters`` iterations of dispatch/combine (bf16, async every other call) and then of
MoELayer forward+backward+SGD step (2 chunks, shared expert), and prints, per rank, resident
memory and live tensors after warm-up (``--iters / 10``), halfway and at the end, with the
end/warm-up ratio (target: RSS within 5%, live tensors equal). The rank functions are those of
``tests/test_long_run.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moeflow import Buffer, spawn  # noqa: E402
from moeflow.layer import MoELayer  # noqa: E402
from test_long_run import dispatch_combine_step, layer_step, live_tensors, rss_bytes  # noqa: E402

E, K, FF = 16, 4, 512


def _run(iters: int, N: int, H: int):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    marks = (iters // 10, iters // 2, iters)
    buffer = Buffer()
    xs = [torch.randn(N - 3 * (i % 5), H, generator=g).bfloat16() for i in range(7)]
    idxs = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(x.size(0))]) for x in xs]
    ws = [torch.rand(x.size(0), K, generator=g) for x in xs]
    out = {"dispatch/combine": {}, "layer fwd+bwd": {}}
    t0 = time.perf_counter()
    for i in range(1, iters + 1):
        dispatch_combine_step(buffer, xs[i % 7], idxs[i % 7], ws[i % 7], E, i % 2 == 0)
        if i in marks:
            out["dispatch/combine"][i] = (rss_bytes(), live_tensors())
    out["dispatch/combine"]["s"] = time.perf_counter() - t0
    torch.manual_seed(0)
    layer = MoELayer(H, FF, E, K, num_shared_experts=1, num_chunks=2, buffer=buffer)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-4)
    fx = [x.float() for x in xs]
    t0 = time.perf_counter()
    for i in range(1, iters + 1):
        layer_step(layer, opt, fx[i % 7])
        if i in marks:
            out["layer fwd+bwd"][i] = (rss_bytes(), live_tensors())
    out["layer fwd+bwd"]["s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    a = ap.parse_args()
    res = spawn(_run, a.ranks, a.iters, a.tokens, a.hidden, timeout_s=7200)
    print(f"{a.ranks} ranks, N~{a.tokens} H={a.hidden} E={E} K={K} FF={FF}, {a.iters} iterations")
    print(f"{'run':18s} {'rank':>4s} " + " ".join(f"{'RSS@' + str(m):>10s}" for m in res[0]["dispatch/combine"]
                                               if m != "s") + f" {'end/warm':>9s} {'tensors':>9s} {'s':>6s}")
    for name in ("dispatch/combine", "layer fwd+bwd"):
        for rank, r in enumerate(res):
            row = r[name]
            marks = [m for m in row if m != "s"]
            rss = [row[m][0] for m in marks]
            tensors = [row[m][1] for m in marks]
            print(f"{name:18s} {rank:4d} " + " ".join(f"{v / 2**20:8.1f}Mi" for v in rss)
                  + f" {rss[-1] / rss[0]:9.4f} {tensors[0]:>4d}->{tensors[-1]:<4d} {row['s']:6.1f}")


if __name__ == "__main__":
    main()
