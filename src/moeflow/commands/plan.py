"""``moeflow plan``: plan expert placement (replicas, GPUs, nodes) from per-expert loads.

Reads loads [layers, experts] from .npy, .csv (one layer per row) or .json (a nested list, or an
object with a "loads" field), prints the placement and the per-GPU max/mean load before (no
replication, contiguous split) and after, and writes the placement (.json, .npz or .pt) in a form
``--previous`` reads back.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


DESCRIPTION = """\
Plans where each MoE layer's experts live, from measured per-expert loads (LOADS, one row per
layer): how many physical slots each expert gets (--replicas: redundant copies of busy experts),
and which GPU (and node) holds each slot, so that the busiest GPU carries as little as possible.
Prints the busiest GPU's load over the mean before (one copy each, contiguous split) and after.
With --previous, starts from the placement in use and moves only the experts that buy balance;
no layer ends worse than keeping that placement. Writes the placement with --out."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("loads", metavar="LOADS", help="per-expert loads [layers, experts]: .npy, .csv or .json")
    p.add_argument("--replicas", type=int, required=True,
                   help="physical expert slots per layer (>= experts; divisible by --gpus)")
    p.add_argument("--groups", type=int, default=1, help="expert groups (DeepSeek-V3: 8)")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes the GPUs are on (each expert group stays on one node when --groups is a multiple of --nodes)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p.add_argument("--previous", metavar="FILE",
                   help="placement in use (.json/.npz/.pt): move as few experts as balance allows")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="with --previous: allowed GPU max-load excess over a plan from scratch")
    p.add_argument("--affinity", metavar="FILE", help="co-activation counts [layers-1, experts, experts] (.npy)")
    p.add_argument("--out", metavar="FILE", help="write the placement here (.json, .npz or .pt)")
    p.add_argument("--layers", type=int, default=4, help="layers whose placement is printed in full")


def read_loads(path: str) -> np.ndarray:
    """[layers, experts] float64 from .npy, .csv or .json."""
    if path.endswith(".npy"):
        return np.load(path).astype(np.float64)
    if path.endswith(".csv"):
        return np.atleast_2d(np.loadtxt(path, delimiter=",", dtype=np.float64))
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict):
            if "loads" not in data:
                raise ValueError(f"{path}: a JSON object must have a 'loads' field")
            data = data["loads"]
        return np.atleast_2d(np.asarray(data, dtype=np.float64))
    raise ValueError(f"LOADS must end in .npy, .csv or .json, got {path!r}")


def run(args: argparse.Namespace) -> int:
    from ..balance import Placement, imbalance, plan

    try:
        loads = read_loads(args.loads)
        previous = Placement.load(args.previous) if args.previous else None
        affinity = np.load(args.affinity) if args.affinity else None
        result = plan(loads, args.replicas, args.groups, args.nodes, args.gpus, previous,
                      tolerance=args.tolerance, affinity=affinity)
    except (OSError, ValueError, TypeError) as e:
        print(f"moeflow plan: error: {e}", file=sys.stderr)
        return 2

    L, E = result.num_layers, result.num_logical_experts
    S, P = result.num_replicas_per_gpu, result.num_gpus
    before = imbalance(Placement.identity(L, E, P, args.nodes), loads).numpy() if E % P == 0 else None
    after = imbalance(result, loads).numpy()
    print(f"{L} layers x {E} experts -> {result.num_replicas} slots on {P} GPUs / {args.nodes} nodes "
          f"({S} per GPU), groups={args.groups}")
    for layer in range(min(L, args.layers)):
        print(f"layer {layer}:")
        phy = result.phy2log[layer].view(P, S).tolist()
        for gpu in range(P):
            print(f"  gpu {gpu:3d}: {' '.join(f'{e:4d}' for e in phy[gpu])}")
    if L > args.layers:
        print(f"(layers {args.layers}..{L - 1} not shown; --layers N shows more)")
    print("per-GPU max/mean load   mean over layers   worst layer")
    if before is not None:
        print(f"  before (no replicas)   {before.mean():16.4f}   {before.max():11.4f}")
    else:
        print(f"  before (no replicas)   n/a ({E} experts do not split evenly over {P} GPUs)")
    print(f"  after                  {after.mean():16.4f}   {after.max():11.4f}")
    if previous is not None:
        print(f"  previous               {imbalance(previous, loads).numpy().mean():16.4f}")
        print(f"moves (expert weights copied from --previous): {result.moves} of {L * result.num_replicas} slots")
    if args.out:
        try:
            result.save(args.out)
        except (OSError, ValueError) as e:
            print(f"moeflow plan: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0
