"""``moeflow demo --elastic``: flags, checks and the printed account (see :mod:`moeflow.demo_elastic`)."""

from __future__ import annotations

import argparse

from . import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("elastic (--elastic)")
    g.add_argument("--elastic", action="store_true",
                   help="train with moeflow.elastic: a lost rank is survived in the same processes, a rank may "
                        "be added back; dense weights replicated by DDP, by default two slots per expert")
    g.add_argument("--kill-rank", type=int, default=None, metavar="R",
                   help="with --elastic: rank R kills itself (SIGKILL) at the start of --at-step (default: no rank "
                        "is killed)")
    g.add_argument("--at-step", type=int, default=None, metavar="S",
                   help="the step --kill-rank dies at (default: none; given with --kill-rank)")
    g.add_argument("--add-rank-at-step", type=int, default=None, metavar="S",
                   help="with --elastic: one more process (started idle) joins after step S (default: none joins)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="with --elastic: a DCP checkpoint every N steps, for experts that lose every replica "
                        "(needed when some expert has a single replica: --replicas below 2 x --experts)")


def check(args: argparse.Namespace, ep: int) -> None:
    """:class:`UsageError` naming the flag, before any rank starts."""
    elastic_flags = ("kill_rank", "at_step", "add_rank_at_step")
    if not args.elastic:
        if any(getattr(args, f) is not None for f in elastic_flags) or args.checkpoint_every:
            raise UsageError("--kill-rank, --at-step, --add-rank-at-step and --checkpoint-every need "
                             "--elastic")
        return
    from ..parallel.launch import under_launcher

    if under_launcher():
        raise UsageError("--elastic starts its own local ranks (it kills one); run it without torchrun "
                         "(docs/elastic.md says how moeflow.elastic composes with torchrun)")
    if args.dp != 1 or args.rebalance_every:
        raise UsageError(f"--elastic works over one expert-parallel group and keeps its placement "
                         f"between changes (--dp 1, no --rebalance-every), got --dp {args.dp}, --rebalance-every "
                         f"{args.rebalance_every}")
    if (args.kill_rank is None) != (args.at_step is None):
        raise UsageError("--kill-rank and --at-step go together")
    if args.kill_rank is not None and not 0 <= args.kill_rank < args.ranks:
        raise UsageError(f"--kill-rank must be a rank in [0, {args.ranks}), got {args.kill_rank}")
    if args.at_step is not None and not 0 <= args.at_step < args.steps:
        raise UsageError(f"--at-step must lie in [0, --steps {args.steps}), got {args.at_step}")
    if args.kill_rank is not None and args.ranks < 2:
        raise UsageError("--kill-rank needs --ranks >= 2 (someone must survive)")
    if args.add_rank_at_step is not None and not 2 <= args.add_rank_at_step < args.steps:
        raise UsageError(f"--add-rank-at-step must lie in [2, --steps {args.steps}), got "
                         f"{args.add_rank_at_step}")
    if args.add_rank_at_step is not None and args.at_step is not None and args.add_rank_at_step <= args.at_step:
        raise UsageError(f"--add-rank-at-step ({args.add_rank_at_step}) must come after --at-step "
                         f"({args.at_step})")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.replicas is None:
        args.replicas = 2 * args.experts if 2 * args.experts % ep == 0 else -(-2 * args.experts // ep) * ep
    single = args.replicas < 2 * args.experts
    if args.kill_rank is not None and single and not args.checkpoint_every:
        raise UsageError(f"with --replicas {args.replicas} some experts have one replica, which "
                         "--kill-rank may take along: give --checkpoint-every N to read them back")


def run(args: argparse.Namespace, cfg) -> int:
    import os

    from ..demo_elastic import Faults, train_elastic
    from ..launch import RankError, spawn

    faults = Faults(kill_rank=args.kill_rank, at_step=args.at_step, add_rank_at_step=args.add_rank_at_step,
                    checkpoint_every=args.checkpoint_every)
    procs = args.ranks + (1 if args.add_rank_at_step is not None else 0)
    timeout = os.environ.get("MOEFLOW_TIMEOUT_S", "30")
    print(f"moeflow demo --elastic: {args.ranks} ranks{' + 1 idle until it joins' if procs > args.ranks else ''}, "
          f"{cfg.num_experts} experts in {cfg.num_slots} slots, {cfg.steps} steps; a lost rank is detected within "
          f"MOEFLOW_TIMEOUT_S={timeout} s", flush=True)
    outs = spawn(train_elastic, procs, cfg, faults, args.out, not args.quiet, timeout_s=3600, threads_per_rank=1,
                 return_failures=True)
    reports = [o for o in outs if not isinstance(o, RankError)]
    failed = [o for o in outs if isinstance(o, RankError)]
    unexpected = [f for f in failed if f.rank != args.kill_rank or f.exitcode != -9]
    if unexpected or not reports:
        raise SystemExit("moeflow demo --elastic: ranks failed:\n" + "\n".join(str(f) for f in unexpected or failed))
    report = next(r for r in reports if r["rank"] == 0)
    print(f"validation loss {report['final_val_loss']:.3f} nats/byte (unigram baseline "
          f"{report['unigram_val_loss']:.3f}); {report['elastic']['final_ranks']} ranks at the end")
    for line in describe(report):
        print(line)
    png = _plot(report, args)
    print(f"wrote {args.out}/report.json{' and ' + png if png else ''} in {report['seconds']:.0f} s")
    return 0


def describe(report: dict) -> list[str]:
    """One sentence per recovery or join of an elastic demo report."""
    out = []
    el = report["elastic"]
    for e in el["events"]:
        if e["kind"] == "loss":
            lost = ", ".join(e["lost"])
            timing = (f"PeerFailureError {e['detect_s']:.1f} s after the kill, survivors agreed in "
                      f"{e['agree_s']:.1f} s, handed over in {e['handover_s']:.2f} s; step {e['step']} completed on "
                      f"{len(e['members'])} "
                      f"ranks {e['step_done_s']:.1f} s after the kill" if e.get("step_done_s") is not None
                      else f"agreed in {e['agree_s']:.1f} s, handed over in {e['handover_s']:.2f} s")
            restored = ("; no step lost" if not e["restored"] else
                        f"; experts {e['restored']} read back from the checkpoint of step {e['checkpoint_step']}: "
                        f"{e['steps_lost']} steps lost for them")
            out.append(f"{lost} lost at step {e['step']}: {timing} (detection timeout {el['timeout_s']:g} s); "
                       f"{e['moves']} expert slots re-placed{restored}")
        else:
            out.append(f"{', '.join(e['joined'])} joined after step {e['step']}: {len(e['members'])} ranks, "
                       f"{e['moves']} expert slots copied to it or moved, hand-over {e['handover_s']:.2f} s")
    return out


def _plot(report: dict, args: argparse.Namespace) -> str:
    from .demo import _plot as plot

    return plot(report, args)
