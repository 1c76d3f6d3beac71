"""DualPipeV with and without forward/backward overlap, same run: step time, CPU time, exposed communication.

    python3 benchmarks/bench_pipeline_overlap.py [--steps 12] [--dim 512] [--ffn 64] [--seq 128] [--batch 16]

4 Gloo ranks, pp 2 x ep 2, the demo's model with ``--layers`` MoE blocks (8 experts, top-2, one
shared expert), DualPipeV (4 stages) with ``--microbatches`` micro-batches. One pipeline; each pair of
steps runs once without overlap and once with it (order alternating), so both modes see the
same load and the same weights. Per mode it prints the median over steps of: the step's wall
time (slowest rank), the CPU time the 4 ranks used (sum), and per rank the mean exposed
communication (and within it the waits: what was left of a transfer after the hand-over),
compute, bubble, the hand-overs' wake-up latency (see moeflow.parallel.timeline), and the CPU floor: the step's CPU time
spread over every core of the machine, below which no overlap can bring the step. The model sizes are chosen
so that dispatch/combine are a large share of a step on Gloo (wide hidden size, small experts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeflow import spawn
from moeflow.commands import speed_words, target_words


def _rank(a):
    from torch.distributed.device_mesh import init_device_mesh

    from moeflow.demo import DemoConfig, TinyMoELM
    from moeflow.parallel.pipeline import build_pipeline
    from moeflow.parallel.timeline import Timeline, now

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    cfg = DemoConfig(num_layers=a.layers, num_dense_layers=0, dim=a.dim, num_heads=4, ffn_hidden=a.ffn,
                     num_experts=8, num_topk=2, seq_len=a.seq, batch_size=a.batch, tie_embeddings=False)
    torch.manual_seed(cfg.seed)
    model = TinyMoELM(cfg, mesh)
    timeline = Timeline()
    pipe = build_pipeline(model.pipeline_parts(), schedule="dualpipev", mesh=mesh,
                          num_microbatches=a.microbatches, microbatch_size=a.batch // a.microbatches, seq_len=a.seq,
                          loss_fn=lambda y, t: F.cross_entropy(y.flatten(0, 1), t.flatten()), overlap=True,
                          checkpoint=a.checkpoint, timeline=timeline)
    g = torch.Generator().manual_seed(mesh["ep"].get_local_rank())
    x = torch.randint(0, 256, (a.batch, a.seq), generator=g)
    rows = {False: [], True: []}
    for step in range(a.warmup + a.steps):
        for on in ((False, True) if step % 2 else (True, False)):
            pipe.set_overlap(on)
            timeline.clear()
            dist.barrier()
            c0, t0 = time.process_time(), now()
            pipe.step(x, x)
            t1, c1 = now(), time.process_time()
            for p in pipe.parameters():
                p.grad = None
            if step >= a.warmup:
                tt = timeline.times(t0, t1)
                spans = timeline.window(t0, t1)
                waits = sum(sp.end - sp.start for sp in spans if sp.kind == "wait")
                rows[on].append([t1 - t0, c1 - c0, tt.exposed_comm, tt.compute, tt.bubble, waits, tt.switching])
    return rows


def _rank_pp1(a):
    """No pipeline (2 ranks, ep 2): micro-batches one after the other vs F(i+1) with B(i)."""
    from moeflow.demo import DemoConfig, TinyMoELM
    from moeflow.parallel.overlap import train_micro_batches
    from moeflow.parallel.timeline import Timeline, now

    cfg = DemoConfig(num_layers=a.layers // 2, num_dense_layers=0, dim=a.dim, num_heads=4, ffn_hidden=a.ffn,
                     num_experts=8, num_topk=2, seq_len=a.seq, batch_size=a.batch)
    torch.manual_seed(cfg.seed)
    model = TinyMoELM(cfg)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randint(0, 256, (a.batch, a.seq), generator=g)
    micro = list(x.split(a.batch // a.microbatches))

    def loss_of(mb):
        return F.cross_entropy(model(mb).flatten(0, 1), mb.flatten()) / len(micro)

    timeline = Timeline()
    rows = {False: [], True: []}
    for step in range(a.warmup + a.steps):
        for on in ((False, True) if step % 2 else (True, False)):
            timeline.clear()
            dist.barrier()
            c0, t0 = time.process_time(), now()
            if on:
                train_micro_batches(loss_of, micro, timeline=timeline)
            else:
                for mb in micro:
                    loss_of(mb).backward()
            t1, c1 = now(), time.process_time()
            for p in model.parameters():
                p.grad = None
            if step >= a.warmup:
                rows[on].append([t1 - t0, c1 - c0])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="measured steps per mode")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per mode first")
    ap.add_argument("--layers", type=int, default=8, help="MoE blocks (no dense block): 2 per stage")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=64, help="per routed expert")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="sequences per expert-parallel rank per step")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--checkpoint", choices=["full", "selective"], default=None)
    ap.add_argument("--pp1", action="store_true",
                    help="no pipeline: 2 ranks (ep 2), --layers / 2 blocks, F(i+1) with B(i) against one after the other")
    a = ap.parse_args()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    if a.pp1:
        per_rank = spawn(_rank_pp1, 2, a, timeout_s=3600, threads_per_rank=1)
        print(f"no pipeline, 2 Gloo ranks (ep 2), {a.layers // 2} MoE layers, dim {a.dim}, expert ffn {a.ffn}, "
              f"{a.batch} x {a.seq} tokens per rank in {a.microbatches} micro-batches; load average before: {' '.join(load)}")
        n = len(per_rank[0][False])
        med = {}
        for on in (False, True):
            wall = statistics.median(max(r[on][i][0] for r in per_rank) for i in range(n))
            cpu = statistics.median(sum(r[on][i][1] for r in per_rank) for i in range(n))
            med[on] = (wall, cpu)
            print(f"{'F(i+1) with B(i)' if on else 'one after other':<18} step wall {wall * 1e3:7.0f} ms, CPU (2 ranks) "
                  f"{cpu * 1e3:7.0f} ms")
        print(f"F(i+1) with B(i) against one after the other: step wall {speed_words(med[True][0], med[False][0])}, "
              f"CPU {speed_words(med[True][1], med[False][1])}")
        return
    per_rank = spawn(_rank, 4, a, timeout_s=3600, threads_per_rank=1)
    print(f"DualPipeV, 4 Gloo ranks (pp 2 x ep 2), {a.layers} MoE layers, dim {a.dim}, expert ffn {a.ffn}, {a.batch} x {a.seq} tokens per "
          f"expert-parallel rank, {a.microbatches} micro-batches, checkpoint {a.checkpoint}; load average before: "
          f"{' '.join(load)}")
    print(f"{'':<14}{'step wall':>10}{'CPU (4 ranks)':>15}{'exposed comm':>14}{'(waits)':>9}{'compute':>9}"
          f"{'bubble':>8}{'hand-overs':>12}  (medians over steps; per-rank figures: mean over ranks)")
    med = {}
    for on in (False, True):
        n = len(per_rank[0][on])
        wall = statistics.median(max(r[on][i][0] for r in per_rank) for i in range(n))
        cpu = statistics.median(sum(r[on][i][1] for r in per_rank) for i in range(n))
        comm, comp, bub, waits, switch = (statistics.median(sum(r[on][i][k] for r in per_rank) / 4 for i in range(n))
                                          for k in (2, 3, 4, 5, 6))
        med[on] = (wall, cpu, comm)
        print(f"{'overlap' if on else 'no overlap':<14}{wall * 1e3:>8.0f}ms{cpu * 1e3:>13.0f}ms{comm * 1e3:>12.0f}ms"
              f"{waits * 1e3:>7.0f}ms{comp * 1e3:>7.0f}ms{bub * 1e3:>6.0f}ms{switch * 1e3:>10.0f}ms")
    base, over = med[False], med[True]
    print(f"communication share of the step without overlap: {base[2] / base[0]:.0%}")
    print(f"overlap against no overlap: step wall {speed_words(over[0], base[0])} {target_words(round(1 / 0.85, 2))}, "
          f"i.e. {over[0] / base[0]:.2f}x the step; CPU {speed_words(over[1], base[1])}; exposed communication "
          f"{over[2] / base[2]:.2f}x")
    print(f"CPU floor of a step on {os.cpu_count()} cores: {base[1] / os.cpu_count() * 1e3:.0f} ms "
          f"(the 4 ranks' CPU time spread over every core; no overlap can go below it)")


if __name__ == "__main__":
    main()
