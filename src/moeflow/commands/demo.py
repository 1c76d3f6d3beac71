"""``moeflow demo``: train a small DeepSeek-style MoE LM on local ranks (see :mod:`moeflow.demo`)."""

from __future__ import annotations

import argparse
import os

from . import UsageError, check_at_least, check_writable_dir, demo_elastic

DESCRIPTION = """\
Trains a small DeepSeek-style MoE language model (bytes in, 3 layers, 16 fine-grained routed
experts top-2 plus a shared expert, sigmoid router with expert bias) on R local Gloo ranks:
each rank holds the dense weights and 1/R of the experts, and tokens travel to their experts
through moeflow's dispatch and combine. The text is this Python's own standard library, so
nothing is downloaded. Prints the validation loss beside a unigram baseline, throughput, the
expert load balance and, with --rebalance-every, what each live re-placement of experts did;
writes report.json and training.png (loss, expert load over time, balance) to --out.
About 2 minutes with the defaults on an idle 2-core machine. With --pp P the ranks form a
(pp, dp, ep) mesh and the model trains pipeline-parallel on torch's schedules (DualPipeV with
one micro-batch's expert traffic overlapped with another's compute, by default); it prints and
draws where each rank's step went: compute, exposed communication, pipeline bubble. With
--elastic --kill-rank R --at-step S, rank R dies mid-run and the others go on in the same
processes (--add-rank-at-step S2 takes a rank back); the report and plot mark both."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..demo import DemoConfig
    from ..parallel.pipeline import SCHEDULES

    d = DemoConfig()
    p.add_argument("--ranks", type=int, default=4,
                   help="local Gloo ranks (processes); under torchrun, its ranks are used instead")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel size of the (dp, ep) mesh; the experts are split over ranks / dp "
                        "(ranks / (pp x dp) with --pp)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps")
    p.add_argument("--out", default="out/demo", help="directory for report.json and training.png")
    p.add_argument("--no-bias", action="store_true",
                   help="turn the expert bias (aux-loss-free balancing) off, to see the imbalance it removes")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per rank per step")
    p.add_argument("--layers", type=int, default=d.num_layers, help="transformer blocks (the first is dense)")
    p.add_argument("--experts", type=int, default=d.num_experts, help="routed experts per MoE layer, over all ranks")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and the batches")
    p.add_argument("--rebalance-every", type=int, default=0, metavar="N",
                   help="every N steps, re-plan expert placement from the measured loads and migrate "
                        "expert weights and optimizer state (0: never)")
    p.add_argument("--replicas", type=int, default=None,
                   help="physical expert slots (default: experts, rounded up to a multiple of the "
                        "expert-parallel ranks, + one spare slot per rank with --rebalance-every for a "
                        "replica of a busy expert)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    pipe = p.add_argument_group("pipeline parallelism (--pp P: the ranks form a (pp, dp, ep) mesh; "
                                "see moeflow.demo_pipeline)")
    pipe.add_argument("--pp", type=int, default=1,
                      help="pipeline positions: the blocks are cut into stages over P groups of ranks (1: no pipeline)")
    pipe.add_argument("--schedule", default="dualpipev", choices=sorted(SCHEDULES),
                      help="torch.distributed.pipelining schedule; dualpipev and zbv put two stages on each position "
                           "in a V, interleaved1f1b two looped")
    pipe.add_argument("--microbatches", type=int, default=None,
                      help="micro-batches per step (default: twice the stages, at least 4); --batch-size is rounded "
                           "down to a multiple of it")
    pipe.add_argument("--no-overlap", action="store_true",
                      help="with dualpipev: run each overlapped pair's forward and backward one after the other "
                           "(the overlap's baseline)")
    pipe.add_argument("--checkpoint", choices=["full", "selective"], default=None,
                      help="activation checkpointing of every block: full keeps only its input, selective also its "
                           "matmul and attention outputs (default: none)")

    demo_elastic.add_arguments(p)


def flags_text(args: argparse.Namespace) -> str:
    """The flags of this run that differ from the defaults, as typed (for the figure's title)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    base = vars(defaults.parse_args([]))
    out = []
    for action in defaults._actions:  # argparse keeps no public list of (flag, dest)
        if not action.option_strings or action.dest in ("help", "out", "quiet"):
            continue
        value = getattr(args, action.dest, base[action.dest])
        if value == base[action.dest]:
            continue
        flag = max(action.option_strings, key=len)
        out.append(flag if isinstance(value, bool) else f"{flag} {value}")
    return " ".join(out)


def check_arguments(args: argparse.Namespace) -> tuple[int, float]:
    """Every flag, before any rank starts (:class:`UsageError` naming the flag); returns the
    number of physical expert slots (``--replicas`` or its default) and moeflow's timeout."""
    from ..comm.health import resolve_timeout
    from ..demo import DemoConfig

    try:
        timeout_s = resolve_timeout(None)
    except ValueError as e:
        raise UsageError(str(e).replace("moeflow.Buffer: ", "")) from None
    check_at_least(args, 1, "ranks", "dp", "steps", "batch_size", "experts")
    check_at_least(args, 0, "rebalance_every")
    # the pipeline group's flags mean nothing without a pipeline: refused, not silently ignored
    given = [flag for flag, value, default in (("--schedule", args.schedule, "dualpipev"),
                                                ("--microbatches", args.microbatches, None),
                                                ("--no-overlap", args.no_overlap, False),
                                                ("--checkpoint", args.checkpoint, None)) if value != default]
    if given:
        raise UsageError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --pp P with P > 1 "
                         "(the pipelined demo; without one they change nothing)")
    if args.layers < 2:
        raise UsageError(f"--layers must be >= 2 (the first block is dense, so {args.layers} block(s) hold no MoE "
                         f"layer), got {args.layers}")
    if args.ranks % args.dp:
        raise UsageError(f"--dp {args.dp} must divide the {args.ranks} ranks")
    ep = args.ranks // args.dp
    if args.experts < DemoConfig().num_topk:
        raise UsageError(f"--experts must be >= {DemoConfig().num_topk}, the experts each token picks, "
                         f"got {args.experts}")
    demo_elastic.check(args, ep)  # --elastic's flags; its default --replicas (two per expert)
    replicas = args.replicas
    if replicas is None:  # experts that do not divide by the ranks: as many slots as the next multiple
        replicas = -(-args.experts // ep) * ep + (ep if args.rebalance_every else 0)
    if replicas < args.experts or replicas % ep:
        raise UsageError(f"--replicas {replicas} must be >= --experts {args.experts} "
                         f"and divide by the {ep} expert-parallel ranks")
    check_writable_dir(args.out, "--out")
    return replicas, timeout_s


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, train
    from ..parallel.launch import run as run_ranks, under_launcher

    if under_launcher():  # torchrun's ranks, not --ranks local ones
        args.ranks = int(os.environ["WORLD_SIZE"])
    if args.pp != 1:
        return _run_pipeline(args)
    replicas, timeout_s = check_arguments(args)
    ep = args.ranks // args.dp
    cfg = DemoConfig(steps=args.steps, batch_size=args.batch_size, num_layers=args.layers,
                     num_experts=args.experts, seed=args.seed,
                     bias_update_rate=0.0 if args.no_bias else DemoConfig().bias_update_rate,
                     eval_every=max(1, min(DemoConfig().eval_every, args.steps)),
                     num_slots=replicas, rebalance_every=args.rebalance_every, dp=args.dp)
    if args.elastic:
        return demo_elastic.run(args, cfg)
    first = int(os.environ.get("RANK", "0")) == 0
    if first:
        print(f"moeflow demo: {args.ranks} ranks ({args.dp} data parallel x {ep} expert parallel), "
              f"{cfg.num_layers} layers, {cfg.num_experts} routed experts (top-{cfg.num_topk}) + "
              f"{cfg.num_shared_experts} shared, {cfg.steps} steps", flush=True)
    # timeout_s bounds the whole run; one collective waits at most moeflow's timeout (env
    # MOEFLOW_TIMEOUT_S), after which the loop's guards name the rank that stopped
    report = run_ranks(train, args.ranks, cfg, args.out, not args.quiet, timeout_s=3600,
                       collective_timeout_s=timeout_s, threads_per_rank=1)[0]
    if report["rank"] != 0:
        return 0
    print(f"validation loss {report['final_val_loss']:.3f} nats/byte "
          f"(unigram baseline {report['unigram_val_loss']:.3f})")
    print(f"throughput {report['tokens_per_s']:,.0f} tokens/s; "
          f"{report['bytes_per_step'] / 2**20:.2f} MiB moved per step per rank")
    print(f"expert load max/mean (expert bias {'off' if args.no_bias else 'on'}, last 10% of steps): "
          f"{report['max_over_mean_expert_last']:.3f} over experts per step, "
          f"{report['max_over_mean_expert_window']:.3f} over experts summed over those steps, "
          f"{report['max_over_mean_rank_last']:.3f} over ranks per step")
    for r in report["rebalance"]:
        print(f"rebalance after step {r['step'] + 1}: {r['moves']} expert moves; rank max/mean "
              f"{r['max_over_mean_rank_before']:.3f} over the {args.rebalance_every} steps before, "
              f"{r['max_over_mean_rank_after']:.3f} over the steps after "
              f"(planned from the load average: {r['predicted_max_over_mean_rank']:.3f})")
    png = _plot(report, args)
    print(f"wrote {args.out}/report.json{' and ' + png if png else ''} in {report['seconds']:.0f} s")
    return 0


def _plot(report: dict, args: argparse.Namespace) -> str:
    from ..demo_plot import plot_pipeline, plot_training

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("moeflow demo: matplotlib is not installed, so no training.png; from the repository: "
              "pip install -e '.[demo]'")
        return ""
    plot = plot_pipeline if args.pp != 1 else plot_training
    return plot(report, os.path.join(args.out, "training.png"), flags=flags_text(args))


def _run_pipeline(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig
    from ..demo_pipeline import PipelineConfig, check_config, num_stages, train
    from ..parallel.launch import run as run_ranks

    if args.rebalance_every or args.replicas:
        raise UsageError("--rebalance-every / --replicas are not part of the pipelined demo (--pp)")
    check_at_least(args, 1, "ranks", "dp", "pp", "steps", "batch_size", "experts")
    check_writable_dir(args.out, "--out")
    overlap = args.schedule == "dualpipev" and not args.no_overlap
    stages = num_stages(PipelineConfig(pp=args.pp, schedule=args.schedule))
    micro = args.microbatches or max(4, 2 * stages)
    batch = args.batch_size if args.batch_size % micro == 0 else micro * max(1, args.batch_size // micro)
    cfg = DemoConfig(steps=args.steps, batch_size=batch, num_layers=max(args.layers, stages), num_experts=args.experts,
                     seed=args.seed, bias_update_rate=0.0 if args.no_bias else DemoConfig().bias_update_rate,
                     eval_every=max(1, min(DemoConfig().eval_every, args.steps)), dp=args.dp)
    pcfg = PipelineConfig(pp=args.pp, schedule=args.schedule, num_microbatches=micro, overlap=overlap,
                          checkpoint=args.checkpoint)
    try:
        check_config(cfg, pcfg, args.ranks)
    except ValueError as e:
        raise UsageError(str(e).replace("moeflow demo: ", "")) from None
    if int(os.environ.get("RANK", "0")) == 0:
        ep = args.ranks // (args.pp * args.dp)
        print(f"moeflow demo: {args.ranks} ranks ({args.pp} pipeline x {args.dp} data parallel x {ep} expert "
              f"parallel), {pcfg.schedule}{' with overlap' if overlap else ''}, {micro} micro-batches of "
              f"{batch // micro} sequences, {cfg.num_layers} layers in {stages} stages, {cfg.num_experts} routed "
              f"experts (top-{cfg.num_topk}) + {cfg.num_shared_experts} shared, {cfg.steps} steps", flush=True)
    report = run_ranks(train, args.ranks, cfg, pcfg, args.out, not args.quiet, timeout_s=3600, threads_per_rank=1)[0]
    if report["rank"] != 0:
        return 0
    s = report["step_seconds"]
    print(f"validation loss {report['final_val_loss']:.3f} nats/byte "
          f"(unigram baseline {report['unigram_val_loss']:.3f})")
    print(f"throughput {report['tokens_per_s']:,.0f} tokens/s; per step and rank (mean of the last 10% of steps): "
          f"{s['wall'] * 1e3:.0f} ms = compute {s['compute'] * 1e3:.0f} ms + exposed communication "
          f"{s['exposed_comm'] * 1e3:.0f} ms + bubble {s['bubble'] * 1e3:.0f} ms + hand-over latency "
          f"{s['switching'] * 1e3:.0f} ms")
    png = _plot(report, args)
    print(f"wrote {args.out}/report.json{' and ' + png if png else ''} in {report['seconds']:.0f} s")
    return 0
