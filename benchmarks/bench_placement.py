"""What expert placement costs in MoELayer: forward + backward per step, and apply_placement.

Runs on local Gloo ranks (moeflow.spawn). Every rank builds the layers from the same weights and
times them on the same inputs, interleaved repetition by repetition, medians reported; ratios
are against the default layer (num_slots = E, identity placement) of the same run.

Rows:
    default              num_slots = E, identity placement (no mapping: the path before placement)
    before               only with --before REV: layer.py as of git revision REV (e.g. the commit
                         before placement) with today's Buffer, router and experts: shows whether
                         the default path slowed down
    permuted             N = E, experts permuted over ranks: one gather maps logical -> slot
    replicas             N = E + R (one extra slot per rank): spread over replicas + sync_replica_grads
    apply_placement      moving every slot's expert to another rank, with Adam state (one all-to-all)

Run: python benchmarks/bench_placement.py [--ranks 2 --tokens 4096 --hidden 512 --ffn 256
     --experts 16 --topk 4 --reps 7 --before <git rev>]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from moeflow import spawn
from moeflow.layer import MoELayer


def _load_layer_class(path: str):
    """MoELayer from another copy of layer.py, imported inside the moeflow package."""
    spec = importlib.util.spec_from_file_location("moeflow._layer_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.MoELayer


def _rank(args, before_path):
    rank, R = dist.get_rank(), dist.get_world_size()
    T, D, Fh, E, K = args.tokens, args.hidden, args.ffn, args.experts, args.topk
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(E, D, generator=g) * 0.1
    w1, w3 = (torch.randn(E, D, Fh, generator=g) * 0.05 for _ in range(2))
    w2 = torch.randn(E, Fh, D, generator=g) * 0.05
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1 + rank))

    layers = {"default": MoELayer(D, Fh, E, K)}
    if before_path:
        layers["before"] = _load_layer_class(before_path)(D, Fh, E, K)
    permuted = MoELayer(D, Fh, E, K)
    replicas = MoELayer(D, Fh, E, K, num_slots=E + R)
    for layer in [*layers.values(), permuted, replicas]:
        layer.load_global_weights(gate, w1, w2, w3)
    permuted.slots.apply_placement(torch.roll(torch.arange(E), E // R + 1))
    layers["permuted"], layers["replicas"] = permuted, replicas

    def step(layer):
        y = layer(x)
        y.square().mean().backward()
        if hasattr(layer, "slots"):
            layer.slots.sync_replica_grads()
        layer.zero_grad(set_to_none=True)

    times = {name: [] for name in layers}
    for name, layer in layers.items():
        step(layer)  # warm-up
    for _ in range(args.reps):
        for name, layer in layers.items():
            dist.barrier()
            t0 = time.perf_counter()
            step(layer)
            times[name].append(time.perf_counter() - t0)

    # apply_placement with Adam state: every slot's expert goes to another rank
    mover = MoELayer(D, Fh, E, K)
    mover.load_global_weights(gate, w1, w2, w3)
    opt = torch.optim.Adam(mover.parameters(), lr=1e-3)
    step(mover)
    mover(x).square().mean().backward()
    opt.step()
    times["apply_placement"] = []
    shift = torch.arange(E)
    for _ in range(args.reps):
        shift = torch.roll(shift, E // R)
        dist.barrier()
        t0 = time.perf_counter()
        moves = mover.slots.apply_placement(shift, optimizer=opt)
        times["apply_placement"].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}, moves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--before", default=None, help="git revision whose layer.py is timed as 'before'")
    args = p.parse_args()
    before_path = None
    if args.before:
        src = subprocess.run(["git", "show", f"{args.before}:src/moeflow/layer.py"], check=True,
                             capture_output=True, text=True).stdout
        f = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
        f.write(src)
        f.close()
        before_path = f.name
    outs = spawn(_rank, args.ranks, args, before_path, timeout_s=600)
    moves = outs[0][1]
    # the slowest rank sets the step time; the minimum is the steadier figure on a busy machine
    med = {k: max(o[0][k][0] for o in outs) for k in outs[0][0]}
    low = {k: max(o[0][k][1] for o in outs) for k in outs[0][0]}
    print(f"{args.ranks} ranks, T={args.tokens} tokens/rank, D={args.hidden}, F={args.ffn}, E={args.experts}, "
          f"K={args.topk}; {args.reps} reps, slowest rank")
    print(f"{'case':<18}{'median ms':>11}{'x default':>11}{'min ms':>10}{'x default':>11}")
    for name in med:
        extra = f"   ({moves} slots moved, weights + Adam state)" if name == "apply_placement" else ""
        print(f"{name:<18}{med[name] * 1e3:>11.2f}{med[name] / med['default']:>11.3f}"
              f"{low[name] * 1e3:>10.2f}{low[name] / low['default']:>11.3f}{extra}")


if __name__ == "__main__":
    main()
