"""Elastic expert parallelism (issue 13) on the demo's model, 4 local Gloo ranks: what a lost rank
costs, with the run that loses nothing measured in the same invocation.

Runs (each ``moeflow.demo_elastic.train_elastic``, the code ``moeflow demo --elastic`` runs):

    baseline      no fault, seeds 0, 1, 2: the run-to-run spread of the training loss
    kill          the same seeds, rank 3 killed (SIGKILL) at step --at-step, a spare replica of
                  every expert (2 x 16 slots): time from the kill to the next completed step
                  (beside MOEFLOW_TIMEOUT_S, the timeout that detects a loss, and the baseline's
                  median step time), steps lost, and the mean loss over the --window steps from
                  the kill against the baselines' spread
    no replica    16 slots (one replica each), a checkpoint every --checkpoint-every steps, rank 3
                  killed halfway between two: experts read back from the checkpoint and the steps
                  they lost
    join          the kill, then a fifth process joins after --add-at: ranks at the end, hand-over time

Prints one table per target and the load (uptime) beside it. Takes ~15 minutes on a loaded 2-core
machine with the defaults.

Run: python benchmarks/bench_elastic.py [--steps 70] [--at-step 20] [--window 50] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace

from moeflow.demo import DemoConfig
from moeflow.demo_elastic import Faults, train_elastic
from moeflow.launch import RankError, spawn

RANKS = 4


def _run(cfg: DemoConfig, faults: Faults) -> dict:
    """Rank 0's report (of the group at the end), and the wall time of the whole job."""
    procs = RANKS + (1 if faults.add_rank_at_step is not None else 0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-elastic-") as out:
        outs = spawn(train_elastic, procs, cfg, faults, out, False, timeout_s=3600, threads_per_rank=1,
                     return_failures=True)
    bad = [o for o in outs if isinstance(o, RankError) and not (o.rank == faults.kill_rank and o.exitcode == -9)]
    if bad:
        raise RuntimeError(f"bench_elastic: ranks failed: {bad}")
    report = next(o for o in outs if not isinstance(o, RankError) and o["rank"] == 0)
    report["wall_s"] = time.perf_counter() - t0
    return report


def _window_loss(report: dict, start: int, window: int) -> float:
    h = report["history"]
    vals = [loss for step, loss in zip(h["step"], h["loss"]) if start <= step < start + window]
    return sum(vals) / len(vals)


def _step_s(report: dict) -> float:
    h, cfg = report["history"], report["config"]
    return statistics.median(cfg["batch_size"] * cfg["seq_len"] * r / t for r, t in zip(h["ranks"], h["tokens_per_s"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--at-step", type=int, default=20)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--add-at", type=int, default=45)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    S, W = args.at_step, args.window
    timeout = os.environ.get("MOEFLOW_TIMEOUT_S", "30")
    base_cfg = DemoConfig(steps=args.steps, batch_size=args.batch_size, eval_every=args.steps)
    spare = dict(num_slots=2 * base_cfg.num_experts)
    kill = dict(kill_rank=3, at_step=S)
    print(f"bench_elastic: demo model, {RANKS} Gloo ranks, {args.steps} steps, batch {args.batch_size}; "
          f"MOEFLOW_TIMEOUT_S={timeout}; load {os.getloadavg()[0]:.1f} (1-min) on {os.cpu_count()} cores", flush=True)

    rows = []
    for seed in args.seeds:
        cfg = replace(base_cfg, **spare, seed=seed)
        base = _run(cfg, Faults())
        hit = _run(cfg, Faults(**kill))
        ev = next(e for e in hit["elastic"]["events"] if e["kind"] == "loss")
        rows.append(dict(seed=seed, base=_window_loss(base, S, W), hit=_window_loss(hit, S, W), step_s=_step_s(base),
                         done=ev["step_done_s"], detect=ev["detect_s"], agree=ev["agree_s"], handover=ev["handover_s"],
                         steps=len(hit["history"]["step"]), lost=ev["steps_lost"], ranks=hit["elastic"]["final_ranks"]))
        r = rows[-1]
        print(f"  seed {seed}: kill -> next step {r['done']:.1f} s (PeerFailureError after {r['detect']:.1f} s, "
              f"agreement {r['agree']:.1f} s, hand-over {r['handover']:.2f} s); loss over steps {S}..{S + W - 1}: "
              f"{r['hit']:.4f} with the kill, {r['base']:.4f} without; load {os.getloadavg()[0]:.1f}", flush=True)

    spread = (min(r["base"] for r in rows), max(r["base"] for r in rows))
    mean_done = statistics.mean(r["done"] for r in rows)
    print(f"\nKill rank 3 of {RANKS} at step {S}, a spare replica of every expert ({len(rows)} seeds)")
    print(f"  time from the kill to the next completed step: mean {mean_done:.1f} s (target <= 10 s; "
          f"detection timeout MOEFLOW_TIMEOUT_S={timeout} s; median step without the kill "
          f"{statistics.median(r['step_s'] for r in rows):.2f} s)")
    mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
    print(f"    of it: PeerFailureError {mean('detect'):.1f} s after the kill, agreement {mean('agree'):.1f} s, "
          f"hand-over {mean('handover'):.2f} s")
    print(f"  steps lost: {sum(r['lost'] for r in rows)}; steps completed {[r['steps'] for r in rows]} of "
          f"{args.steps}; ranks at the end {[r['ranks'] for r in rows]}")
    inside = [spread[0] <= r["hit"] <= spread[1] for r in rows]
    diffs = [r["hit"] - r["base"] for r in rows]
    print(f"  mean train loss over steps {S}..{S + W - 1}: with the kill {[round(r['hit'], 4) for r in rows]}; "
          f"without, the run-to-run spread over seeds is {spread[0]:.4f} .. {spread[1]:.4f} "
          f"(width {spread[1] - spread[0]:.4f}); inside it: {sum(inside)} of {len(rows)}; per seed, with minus "
          f"without: {[round(d, 4) for d in diffs]} (largest {max(map(abs, diffs)):.4f} against the spread's width)")
    print(f"  over the seeds: {mean('hit'):.4f} with the kill, {mean('base'):.4f} without")

    S2 = S + args.checkpoint_every // 2  # between two checkpoints
    cfg = replace(base_cfg, num_slots=base_cfg.num_experts)
    nore = _run(cfg, Faults(kill_rank=3, at_step=S2, checkpoint_every=args.checkpoint_every))
    ev = next(e for e in nore["elastic"]["events"] if e["kind"] == "loss")
    print(f"\nKill rank 3 at step {S2}, one replica per expert, a checkpoint every {args.checkpoint_every} steps")
    print(f"  experts read back from the checkpoint of step {ev['checkpoint_step']}: {ev['restored']}; steps lost for "
          f"them: {ev['steps_lost']} (= steps since that checkpoint); the rest of the model lost none")
    print(f"  kill -> next step {ev['step_done_s']:.1f} s (agreement {ev['agree_s']:.1f} s, hand-over incl. the "
          f"checkpoint read {ev['handover_s']:.2f} s); loss over steps {S2}..{min(S2 + W, args.steps) - 1}: "
          f"{_window_loss(nore, S2, W):.4f}")

    cfg = replace(base_cfg, **spare)
    join = _run(cfg, Faults(**kill, add_rank_at_step=args.add_at))
    ev = next(e for e in join["elastic"]["events"] if e["kind"] == "join")
    h = join["history"]
    print(f"\nKill rank 3 at step {S}, a process joins after step {args.add_at}")
    print(f"  ranks per step: {h['ranks'][S - 1]} before the kill, {h['ranks'][S]} after, {h['ranks'][-1]} at the "
          f"end; join hand-over {ev['handover_s']:.2f} s, {ev['moves']} expert slots copied or moved; "
          f"{len(h['step'])} steps completed of {args.steps}")
    print(f"\nload {os.getloadavg()[0]:.1f} (1-min) at the end")


if __name__ == "__main__":
    main()
