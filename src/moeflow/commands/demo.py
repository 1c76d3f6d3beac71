"""``moeflow demo``: train a small DeepSeek-style MoE LM on local ranks (see :mod:`moeflow.demo`)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--ranks", type=int, default=4, help="local Gloo ranks (default: 4)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--out", default="out/demo", help="directory for report.json and training.png")
    p.add_argument("--no-bias", action="store_true", help="turn the expert bias (aux-loss-free balancing) off")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per rank per step")
    p.add_argument("--layers", type=int, default=d.num_layers)
    p.add_argument("--experts", type=int, default=d.num_experts)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rebalance-every", type=int, default=0, metavar="N",
                   help="every N steps, re-plan expert placement from the measured loads and migrate "
                        "expert weights and optimizer state (default: never)")
    p.add_argument("--replicas", type=int, default=None,
                   help="physical expert slots (default: experts + ranks with --rebalance-every, "
                        "i.e. one spare slot per rank for a replica of a busy expert; else experts)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    pipe = p.add_argument_group("pipeline parallelism (--pp P: ranks form pp x ep; see moeflow.demo_pipeline)")
    pipe.add_argument("--pp", type=int, default=1, help="pipeline positions (default 1: no pipeline)")
    pipe.add_argument("--schedule", default="dualpipev",
                      choices=["gpipe", "1f1b", "interleaved1f1b", "zbv", "dualpipev"], help="default: dualpipev")
    pipe.add_argument("--microbatches", type=int, default=None,
                      help="per step (default: 2 x stages, at least 4); must divide --batch-size")
    pipe.add_argument("--no-overlap", action="store_true",
                      help="DualPipeV: run each overlapped pair's forward and backward one after the other")
    pipe.add_argument("--checkpoint", choices=["full", "selective"], default=None, help="activation checkpointing")


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, train
    from ..launch import spawn

    if args.pp != 1:
        return _run_pipeline(args)
    if args.ranks < 1 or args.experts % args.ranks:
        raise SystemExit(f"moeflow demo: --experts {args.experts} must divide by --ranks {args.ranks}")
    if args.steps < 1:
        raise SystemExit(f"moeflow demo: --steps must be >= 1, got {args.steps}")
    if args.rebalance_every < 0:
        raise SystemExit(f"moeflow demo: --rebalance-every must be >= 0, got {args.rebalance_every}")
    replicas = args.replicas
    if replicas is None:
        replicas = args.experts + args.ranks if args.rebalance_every else args.experts
    if replicas < args.experts or replicas % args.ranks:
        raise SystemExit(f"moeflow demo: --replicas {replicas} must be >= --experts {args.experts} "
                         f"and divide by --ranks {args.ranks}")
    cfg = DemoConfig(steps=args.steps, batch_size=args.batch_size, num_layers=args.layers,
                     num_experts=args.experts, seed=args.seed,
                     bias_update_rate=0.0 if args.no_bias else DemoConfig().bias_update_rate,
                     eval_every=max(1, min(DemoConfig().eval_every, args.steps)),
                     num_replicas=replicas, rebalance_every=args.rebalance_every)
    print(f"moeflow demo: {args.ranks} ranks, {cfg.num_layers} layers, {cfg.num_experts} routed experts "
          f"(top-{cfg.top_k}) + {cfg.num_shared_experts} shared, {cfg.steps} steps", flush=True)
    report = spawn(train, args.ranks, cfg, args.out, not args.quiet, timeout_s=3600, threads_per_rank=1)[0]
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
    print(f"wrote {args.out}/report.json and {args.out}/training.png in {report['seconds']:.0f} s")
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig
    from ..demo_pipeline import PipelineConfig, check_config, train
    from ..launch import spawn

    if args.rebalance_every or args.replicas:
        raise SystemExit("moeflow demo: --rebalance-every / --replicas are not part of the pipelined demo (--pp)")
    stages = args.pp * (2 if args.schedule in ("interleaved1f1b", "zbv", "dualpipev") else 1)
    micro = args.microbatches or max(4, 2 * stages)
    batch = args.batch_size if args.batch_size % micro == 0 else micro * max(1, args.batch_size // micro)
    layers = max(args.layers, stages)
    cfg = DemoConfig(steps=args.steps, batch_size=batch, num_layers=layers, num_experts=args.experts, seed=args.seed,
                     bias_update_rate=0.0 if args.no_bias else DemoConfig().bias_update_rate,
                     eval_every=max(1, min(DemoConfig().eval_every, args.steps)))
    pcfg = PipelineConfig(pp=args.pp, schedule=args.schedule, num_microbatches=micro,
                          overlap=args.schedule == "dualpipev" and not args.no_overlap, checkpoint=args.checkpoint)
    if args.steps < 1:
        raise SystemExit(f"moeflow demo: --steps must be >= 1, got {args.steps}")
    try:
        check_config(cfg, pcfg, args.ranks)
    except ValueError as e:
        raise SystemExit(f"moeflow demo: {e}") from None
    ep = args.ranks // args.pp
    print(f"moeflow demo: {args.ranks} ranks as pp {args.pp} x ep {ep}, {pcfg.schedule}"
          f"{' with overlap' if pcfg.overlap else ''}, {micro} micro-batches of {batch // micro} sequences, "
          f"{layers} layers, {cfg.num_experts} routed experts (top-{cfg.top_k}) + {cfg.num_shared_experts} shared, "
          f"{cfg.steps} steps", flush=True)
    report = spawn(train, args.ranks, cfg, pcfg, args.out, not args.quiet, timeout_s=3600, threads_per_rank=1)[0]
    s = report["step_seconds"]
    print(f"validation loss {report['final_val_loss']:.3f} nats/byte (unigram baseline {report['unigram_val_loss']:.3f})")
    print(f"throughput {report['tokens_per_s']:,.0f} tokens/s; per step and rank (mean of the last 10% of steps): "
          f"{s['wall'] * 1e3:.0f} ms = compute {s['compute'] * 1e3:.0f} ms + exposed communication "
          f"{s['exposed_comm'] * 1e3:.0f} ms + bubble {s['bubble'] * 1e3:.0f} ms + hand-over latency "
          f"{s['switching'] * 1e3:.0f} ms")
    print(f"wrote {args.out}/report.json and {args.out}/training.png in {report['seconds']:.0f} s")
    return 0
