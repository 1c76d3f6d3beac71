"""Determinism: 20 reruns of dispatch/combine, autograd and MoELayer fwd+bwd, bitwise compared.

    python3 benchmarks/bench_determinism.py [--reruns 20] [--spawns 2] [--tokens 512] [--hidden 1024]

Runs the checks of ``tests/test_determinism.py`` (the same rank function) on world sizes 1, 2
and 4, splitting the reruns over ``--spawns`` separate launches so that fresh processes are
compared as well, and prints how many reruns matched the first, per world size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from moeflow import spawn  # noqa: E402
from test_determinism import _reruns, check_reruns  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reruns", type=int, default=20)
    ap.add_argument("--spawns", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024, help="a multiple of 128 (the FP8 case)")
    a = ap.parse_args()
    per_spawn = -(-a.reruns // a.spawns)
    for world_size in (1, 2, 4):
        t0 = time.perf_counter()
        outs = [spawn(_reruns, world_size, per_spawn, a.tokens, a.hidden, timeout_s=1200) for _ in range(a.spawns)]
        # Across spawns: every launch's first rerun must equal the first launch's.
        for rank in range(world_size):
            first = outs[0][rank][0][0]
            for out in outs[1:]:
                diff = [k for k in first if out[rank][0][0][k] != first[k]]
                assert not diff, f"world {world_size} rank {rank}: launches differ in {diff}"
        matched = sum(sum(check_reruns(out).values()) for out in outs) // world_size
        print(f"world size {world_size}: {matched}/{per_spawn * a.spawns} reruns bitwise identical on every rank "
              f"(N={a.tokens} H={a.hidden}, {a.spawns} launches, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
