"""Where torch.compile breaks the MoELayer's graph, and why (``torch._dynamo.explain``).

Run: python benchmarks/compile_report.py [--ranks 2] [--chunks 1] [--shared 1] [--placement]

Spawns local Gloo ranks, builds one MoELayer (training mode, sequence-wise aux loss on), and
prints rank 0's graph count, break count and each break's reason and source line. Then it runs
forward + backward eager and compiled (``--backend``, default aot_eager; inductor needs a C++
compiler and minutes on 2 cores) on the same input and prints the largest output difference.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import moeflow


def _rank(chunks: int, shared: int, placement: bool, backend: str) -> dict:
    torch.manual_seed(0)
    E = 8
    layer = moeflow.MoELayer(64, 32, E, 2, num_shared_experts=shared, num_chunks=chunks, seq_aux_loss_coeff=0.1,
                             num_slots=E + dist.get_world_size() if placement else None)
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(dist.get_rank()))
    t0 = time.perf_counter()
    explained = torch._dynamo.explain(layer)(x)
    breaks = []
    for b in explained.break_reasons:
        frame = b.user_stack[-1] if b.user_stack else None
        where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: {frame.line.strip()}" if frame else "?"
        breaks.append(f"{b.reason.splitlines()[0][:160]}  [{where}]")
    explain_s = time.perf_counter() - t0
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend)
    outs = []
    for fn in (layer, compiled):
        y = fn(x.clone().requires_grad_())
        y.square().mean().backward()
        outs.append(y.detach())
    return dict(graphs=explained.graph_count, breaks=explained.graph_break_count, reasons=breaks,
                explain_s=explain_s, diff=float((outs[0] - outs[1]).abs().max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--placement", action="store_true", help="E + ranks slots (replicas): the mapping runs")
    ap.add_argument("--backend", default="aot_eager")
    args = ap.parse_args()
    r = moeflow.spawn(_rank, args.ranks, args.chunks, args.shared, args.placement, args.backend, timeout_s=1800)[0]
    print(f"torch {torch.__version__}, {args.ranks} ranks, chunks={args.chunks}, placement={args.placement}: "
          f"{r['graphs']} graphs, {r['breaks']} graph breaks (explain took {r['explain_s']:.1f} s)")
    for reason in r["reasons"]:
        print(f"  - {reason}")
    print(f"compiled ({args.backend}) vs eager, max |output difference|: {r['diff']:.2e}")


if __name__ == "__main__":
    main()
