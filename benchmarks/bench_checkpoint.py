"""What atomic, verified checkpoints cost: moeflow.checkpoint.save / load against the same DCP
save / load without the temporary directory, the checksums, the manifest and the renames, in the
same run.

The model is the demo's (FSDP2 on a (1, R) mesh, fused AdamW after one training step), made
larger so the checkpoint means something: by default dim 256, 4 blocks (1 dense), 16 experts of
ffn_hidden 384: ~16 M parameters, ~200 MB with AdamW's two moments. Each repetition runs, in turn:

    save_plain    DCP save of what moeflow.checkpoint.save writes, over the same directory (the
                  save before checkpoints were atomic)
    save_atomic   moeflow.checkpoint.save with its CRC-32s replaced by a constant (temporary
                  directory, fsyncs, manifest, renames, removal of the old checkpoint): the
                  checksums' cost is save - save_atomic
    save          moeflow.checkpoint.save, replacing the previous checkpoint
    load_plain    moeflow.checkpoint.load's reading of that checkpoint, without verifying it
    load          moeflow.checkpoint.load (every file checked against the manifest first)
    crc           the CRC-32s of each rank's own files alone (what save computes), for reference

and, in this process, one core's throughput of the hashes a checkpoint could carry.

Every rank starts each operation together (barrier); an operation's time is the slowest rank's;
medians over repetitions; CPU time (user + system, the rank's threads included) beside wall time,
as it moves less on a shared machine. Files go to --dir (default: a temporary directory; the disk
matters: every file is fsynced). The page cache is warm in both variants.

Run: python benchmarks/bench_checkpoint.py [--ranks 2] [--reps 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
import warnings
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moeflow
import moeflow.checkpoint as checkpoint
from moeflow.demo import DemoConfig, build


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn`` on this rank; all ranks start together, and the wall time
    ends when the slowest one is done."""
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    c1 = time.process_time()
    dist.barrier()
    return time.perf_counter() - t0, c1 - c0


def _without_crcs(fn) -> None:
    real = checkpoint._crcs
    checkpoint._crcs = lambda jobs: ["00000000"] * len(jobs)
    try:
        fn()
    finally:
        checkpoint._crcs = real


def _rank(cfg: DemoConfig, root: str, reps: int) -> dict:
    rank = dist.get_rank()
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")  # save_plain overwrites, as intended
    model, _ = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)  # as the demo
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(0, 256, (cfg.batch_size, cfg.seq_len + 1), generator=g)
    loss = F.cross_entropy(model(data[:, :-1]).reshape(-1, 256), data[:, 1:].reshape(-1))
    loss.backward()
    opt.step()  # AdamW's moments exist
    layers = checkpoint._moe_layers(model, "bench")
    plain, atomic, target = (os.path.join(root, name) for name in ("plain", "atomic", "ckpt"))
    mine = f"__{rank}_"
    ops = dict(save_plain=lambda: checkpoint._write(model, opt, layers, plain, None),
               save_atomic=lambda: _without_crcs(lambda: checkpoint.save(model, atomic, optimizer=opt)),
               save=lambda: checkpoint.save(model, target, optimizer=opt),
               load_plain=lambda: checkpoint._read(model, opt, layers, target, None, None),
               load=lambda: checkpoint.load(model, target, optimizer=opt))
    times: dict = {k: [] for k in (*ops, "crc")}
    for rep in range(reps):
        # the order turns each repetition: what runs right after a save may find its deletions pending
        saves = ["save_plain", "save_atomic", "save"]
        saves = saves[rep % 3:] + saves[:rep % 3]
        for op in saves + (["load_plain", "load"] if rep % 2 == 0 else ["load", "load_plain"]):
            times[op].append(_timed(ops[op]))
        files = [f for f in os.listdir(target) if f.startswith(mine) or (rank == 0 and f == ".metadata")]
        times["crc"].append(_timed(lambda: checkpoint._checksum(target, files)))
    size = sum(os.path.getsize(os.path.join(target, f)) for f in os.listdir(target))
    return dict(times=times, bytes=size)


def _hash_rates(nbytes: int = 128 << 20) -> dict:
    """GB/s of one core for each hash over ``nbytes`` in memory (best of 3)."""
    data = os.urandom(nbytes)
    rates = {}
    for name, fn in (("crc32 (zlib)", zlib.crc32), ("sha256", lambda b: hashlib.sha256(b).digest()),
                     ("blake2b", lambda b: hashlib.blake2b(b).digest())):
        best = min(_seconds(fn, data) for _ in range(3))
        rates[name] = nbytes / best / 1e9
    return rates


def _seconds(fn, data) -> float:
    t0 = time.perf_counter()
    fn(data)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn-hidden", type=int, default=384)
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    args = ap.parse_args()
    cfg = DemoConfig(dim=args.dim, ffn_hidden=args.ffn_hidden, num_layers=4, num_dense_layers=1, num_experts=16,
                     batch_size=2, seq_len=64)
    root = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir)
    try:
        load0 = os.getloadavg()[0]
        out = moeflow.spawn(_rank, args.ranks, cfg, root, args.reps, timeout_s=3600)
        load1 = os.getloadavg()[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # per repetition the slowest rank (wall: every rank measures the same span; CPU: the largest)
    wall = {k: statistics.median(max(w for w, _ in reps) for reps in zip(*(o["times"][k] for o in out)))
            for k in out[0]["times"]}
    cpu = {k: statistics.median(max(c for _, c in reps) for reps in zip(*(o["times"][k] for o in out)))
           for k in out[0]["times"]}
    mb = out[0]["bytes"] / 1e6
    print(f"moeflow.checkpoint, {args.ranks} Gloo ranks, {mb:.0f} MB checkpoint (model + AdamW) in {root}, "
          f"median of {args.reps}, load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores")
    for op in ("save_plain", "save_atomic", "save", "load_plain", "load", "crc"):
        base = "load_plain" if op.startswith("load") else "save_plain"
        print(f"  {op:<12} {wall[op] * 1e3:7.0f} ms wall {cpu[op] * 1e3:6.0f} ms CPU   / {base}: "
              f"{wall[op] / wall[base]:.3f} wall {cpu[op] / cpu[base]:.3f} CPU")

    def share(t, full, without):
        return (t[full] - t[without]) / t[full]

    print(f"  checksums' share of the save, (save - save_atomic) / save: {share(wall, 'save', 'save_atomic'):.3f} "
          f"wall, {share(cpu, 'save', 'save_atomic'):.3f} CPU (target <= 0.10);")
    print(f"  of the load, (load - load_plain) / load: {share(wall, 'load', 'load_plain'):.3f} wall, "
          f"{share(cpu, 'load', 'load_plain'):.3f} CPU")
    print("  one core, in memory: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in _hash_rates().items()))


if __name__ == "__main__":
    main()
