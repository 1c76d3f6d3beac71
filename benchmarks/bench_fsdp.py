"""moeflow demo's training step with FSDP2 (moeflow.parallelize) against the hand-written gradient
all-reduce it replaced, in the same run.

Both train the demo's model (same config, same initial weights, same batches on each rank) with
the demo's fused AdamW on R local Gloo ranks, one thread each:

    allreduce      the demo before FSDP2: every rank holds every dense weight; after backward,
                   one flat all-reduce of all dense gradients (divided by R) and the expert
                   gradients divided by R
    fsdp_blocks    moeflow.parallelize's defaults on a (1, R) mesh: one FSDP2 unit per block and
                   the root, each sharded over the R ranks, all-gathered before forward and again
                   before backward, reduce-scattered after; the experts over their one-rank
                   data-parallel mesh
    fsdp_demo      what moeflow demo runs (demo.DEMO_FSDP): one unit for all the non-expert
                   weights, kept gathered from forward to backward (one all-gather and one
                   reduce-scatter per step: the collectives of one all-reduce)

Steps are interleaved (one of each per round), each rank starts each step together (barrier),
and a step's time is the slowest rank's; medians over rounds. CPU time (the rank process's, Gloo
threads included) is printed beside wall time: on a shared machine it moves less.

Run: python benchmarks/bench_fsdp.py [--ranks 4] [--steps 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import moeflow
from moeflow.demo import DEMO_FSDP, DemoConfig, TinyMoELM


def _allreduce_step(model, opt, x, y, R):
    loss = F.cross_entropy(model(x).view(-1, 256), y.reshape(-1))
    aux = sum(layer.last_router_output.loss for layer in model.moe_layers())
    opt.zero_grad(set_to_none=True)
    (loss + aux).backward()
    dense = [p for n, p in model.named_parameters() if ".experts." not in n]
    flat = torch.cat([p.grad.flatten() for p in dense])
    dist.all_reduce(flat)  # one all-reduce for all dense gradients, as the demo did
    flat /= R
    off = 0
    for p in dense:
        p.grad.copy_(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    for n, p in model.named_parameters():
        if ".experts." in n and p.grad is not None:
            p.grad /= R
    opt.step()
    for layer in model.moe_layers():
        layer.router.update_bias()


def _fsdp_step(model, opt, x, y, R):
    loss = F.cross_entropy(model(x).view(-1, 256), y.reshape(-1))
    aux = sum(layer.last_router_output.loss for layer in model.moe_layers())
    opt.zero_grad(set_to_none=True)
    (loss + aux).backward()
    opt.step()
    for layer in model.moe_layers():
        layer.router.update_bias()


def _rank(steps: int, warmup: int) -> dict:
    rank, R = dist.get_rank(), dist.get_world_size()
    cfg = DemoConfig()
    mesh = init_device_mesh("cpu", (1, R), mesh_dim_names=("dp", "ep"))
    variants = {}
    for name in ("allreduce", "fsdp_blocks", "fsdp_demo"):
        torch.manual_seed(cfg.seed)
        model = TinyMoELM(cfg, None if name == "allreduce" else mesh)
        if name == "fsdp_blocks":
            moeflow.parallelize(model, mesh)
        elif name == "fsdp_demo":
            moeflow.parallelize(model, mesh, **DEMO_FSDP)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)  # as the demo
        variants[name] = (model, opt, _allreduce_step if name == "allreduce" else _fsdp_step)
    g = torch.Generator().manual_seed(rank)
    wall: dict = {k: [] for k in variants}
    cpu: dict = {k: [] for k in variants}
    for it in range(warmup + steps):
        data = torch.randint(0, 256, (cfg.batch_size, cfg.seq_len + 1), generator=g)
        x, y = data[:, :-1], data[:, 1:]
        for name, (model, opt, step) in variants.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, opt, x, y, R)
            if it >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return dict(wall=wall, cpu=cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    per_rank = moeflow.spawn(_rank, args.ranks, args.steps, args.warmup, timeout_s=3600, threads_per_rank=1)
    load1 = os.getloadavg()[0]
    names = list(per_rank[0]["wall"])
    # per step, the slowest rank's time; then the median over steps
    wall = {n: statistics.median(max(r["wall"][n][i] for r in per_rank) for i in range(args.steps)) for n in names}
    cpu = {n: statistics.median(max(r["cpu"][n][i] for r in per_rank) for i in range(args.steps)) for n in names}
    print(f"moeflow demo step, {args.ranks} Gloo ranks x 1 thread, {args.steps} steps after {args.warmup} warm-up, "
          f"load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores")
    for n in names:
        print(f"  {n:<10} {wall[n] * 1e3:8.1f} ms wall  {cpu[n] * 1e3:8.1f} ms CPU   "
              f"/ allreduce: {wall[n] / wall['allreduce']:.2f} wall, {cpu[n] / cpu['allreduce']:.2f} CPU")
    print("  target: fsdp_demo / allreduce <= 1.1")


if __name__ == "__main__":
    main()
