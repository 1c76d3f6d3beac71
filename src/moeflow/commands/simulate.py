"""``moeflow simulate``: model dispatch/combine time per layer on a cluster you don't have.

Without ``--nodes`` it prints the model beside DeepEP's published H800 figures (also with
``--compare-deepep``). With ``--nodes`` it models that cluster: expected ranks and nodes a token
reaches under the routing (uniform, ``--groups/--topk-groups``, ``--max-nodes``, or measured
``--loads``), bytes per GPU on NVLink and RDMA, and the time of dispatch and combine. With
``--pipeline`` it models a training step of DeepSeek-V3's shape on a pipeline whose every stage
is such a cluster: 1F1B against DualPipeV without and with overlap
(:mod:`moeflow.simulate_pipeline`).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .. import simulate as sim
from . import speed_words

_DEFAULTS = sim.ClusterSpec(nodes=1, gpus_per_node=8)


DESCRIPTION = """\
Models the time of one MoE layer's dispatch and combine on a GPU cluster you do not have, from
link bandwidths and latencies calibrated on DeepEP's published H800 figures. Without --nodes it
prints the model beside those published figures. With --nodes it models that cluster: how many
ranks and nodes a token reaches under the routing (uniform, group-limited --groups/--topk-groups,
node-limited --max-nodes, or measured --loads), the bytes per GPU on NVLink and RDMA, and the
time of dispatch and combine with the bottleneck named. With --pipeline it models a training
step of DeepSeek-V3's shape on a pipeline whose every stage is such a cluster: 1F1B against
DualPipeV without and with overlap, played on torch's own schedules, beside the DualPipe README's
bubble formulas. Runs in seconds; no GPU needed."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, help="nodes in the cluster (default: print the DeepEP comparison)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size")
    p.add_argument("--experts", type=int, default=256, help="routed experts")
    p.add_argument("--topk", type=int, default=8, help="experts per token")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 dispatch (H bytes + H/128 float32 scales); combine is bf16")
    p.add_argument("--hierarchical", action="store_true",
                   help="cross nodes once per destination node, forward over NVLink (DeepEP internode)")
    p.add_argument("--low-latency", action="store_true", help="one message per (token, expert), DeepEP decode kernels")
    routing = p.add_argument_group("routing (default: uniform top-k)")
    routing.add_argument("--groups", type=int, default=1,
                         help="expert groups for group-limited routing (DeepSeek-V3: 8)")
    routing.add_argument("--topk-groups", type=int,
                         help="groups each token may use (DeepSeek-V3: 4; default: all --groups)")
    routing.add_argument("--max-nodes", type=int,
                         help="node-limited routing: at most M nodes per token (default: no limit)")
    routing.add_argument("--loads", metavar="FILE",
                         help="measured per-expert loads [layers, experts] (.npy, .csv, .json) instead of "
                              "uniform routing")
    routing.add_argument("--layer", type=int, help="with --loads: model this layer only (default: every layer)")
    routing.add_argument("--samples", type=int, default=20000, help="Monte Carlo tokens")
    routing.add_argument("--seed", type=int, default=0, help="Monte Carlo seed")
    links = p.add_argument_group("links (defaults: calibrated on DeepEP's H800 figures)")
    links.add_argument("--nvlink-GBps", type=float, default=_DEFAULTS.nvlink_GBps,
                       help="NVLink bandwidth per GPU, GB/s, one direction")
    links.add_argument("--rdma-GBps", type=float, default=_DEFAULTS.rdma_GBps,
                       help="RDMA (inter-node) bandwidth per GPU, GB/s, one direction")
    links.add_argument("--nvlink-latency-us", type=float, default=_DEFAULTS.nvlink_latency_us,
                       help="fixed latency of an NVLink transfer, microseconds")
    links.add_argument("--rdma-latency-us", type=float, default=_DEFAULTS.rdma_latency_us,
                       help="fixed latency of an RDMA transfer, microseconds")
    links.add_argument("--kernel-us", type=float, default=_DEFAULTS.kernel_us,
                       help="fixed cost per call, microseconds: launch, arrival handshake, packing")
    p.add_argument("--compare-deepep", action="store_true", help="also print the model beside DeepEP's H800 figures")
    pipe = p.add_argument_group("pipeline (--pipeline: DeepSeek-V3's training step; --nodes and --gpus-per-node give "
                                "one stage's expert-parallel group, 8 x 8 without --nodes; --tokens counts a "
                                "micro-batch's tokens per GPU)")
    pipe.add_argument("--pipeline", action="store_true",
                      help="model a training step on a pipeline: 1F1B against DualPipeV without and with overlap")
    pipe.add_argument("--pp", type=int, default=16, help="pipeline ranks (DeepSeek-V3 used 16)")
    pipe.add_argument("--microbatches", type=int, default=120,
                      help="micro-batches per step (DeepSeek-V3's 15360 sequences over 128 data-parallel pipelines "
                           "are 120)")
    pipe.add_argument("--compute-tflops", type=float, default=800.0,
                      help="effective compute rate per GPU, TFLOPS (FP8 GEMMs at ~40%% of an H800's peak are 800)")
    pipe.add_argument("--comm-sms", type=int, default=20,
                      help="streaming multiprocessors (of an H800's 132) communication holds while it overlaps "
                           "compute (DeepSeek-V3: 20)")

def _links(args: argparse.Namespace, nodes: int, gpus_per_node: int) -> sim.ClusterSpec:
    return sim.ClusterSpec(nodes=nodes, gpus_per_node=gpus_per_node, nvlink_GBps=args.nvlink_GBps,
                           rdma_GBps=args.rdma_GBps, nvlink_latency_us=args.nvlink_latency_us,
                           rdma_latency_us=args.rdma_latency_us, kernel_us=args.kernel_us)


def print_comparison(cluster: sim.ClusterSpec) -> float:
    """Print the model beside every published row; returns the largest |relative error|."""
    print("DeepEP's published figures (H800, NVLink + CX7 400 Gb/s IB; github.com/deepseek-ai/DeepEP, "
          "docs/legacy.md) vs this model")
    print(f"links: NVLink {cluster.nvlink_GBps:g} GB/s + {cluster.nvlink_latency_us:g} us, "
          f"RDMA {cluster.rdma_GBps:g} GB/s + {cluster.rdma_latency_us:g} us, kernel {cluster.kernel_us:g} us")
    print("normal: 4096 tokens, hidden 7168, top-8 of 256, top-min(nodes,4) node groups, FP8 dispatch / bf16 combine,"
          " hierarchical; GB/s = DeepEP's bottleneck bandwidth")
    print("low-latency: 128 tokens, hidden 7168, top-8 of 256, FP8 dispatch / bf16 combine; us per call")
    print(f"{'kernels':<12}{'EP':>4}  {'phase':<9}{'published':>10}{'model':>9}{'error':>8}  "
          f"{'ranks/tok':>9}{'nodes/tok':>10}  bottleneck")
    worst = 0.0
    for c in sim.compare_deepep(cluster):
        kind = "low-latency" if c.row.low_latency else ("intranode" if c.row.num_ranks <= cluster.gpus_per_node
                                                        else "internode")
        r = c.result
        for phase, pub, model, err, cost in (("dispatch", c.row.dispatch, c.dispatch_model, c.dispatch_error, r.dispatch),
                                             ("combine", c.row.combine, c.combine_model, c.combine_error, r.combine)):
            worst = max(worst, abs(err))
            unit = c.row.unit
            print(f"{kind:<12}{c.row.num_ranks:>4}  {phase:<9}{pub:>6g} {unit:<4}{model:>8.1f}{err:>+8.1%}  "
                  f"{r.reach.num_ranks_per_token:>9.2f}{r.reach.num_nodes_per_token:>10.2f}  {cost.bottleneck}")
    print(f"largest |error|: {worst:.1%}")
    return worst


def _routing_text(args: argparse.Namespace, reach: sim.Reach) -> str:
    if args.loads:
        what = f"measured loads from {args.loads}"
    elif args.max_nodes is not None:
        what = f"node-limited to {args.max_nodes} nodes"
    elif args.groups > 1:
        what = f"group-limited, top-{args.topk_groups or args.groups} of {args.groups} groups"
    else:
        what = "uniform"
    return f"{what}, top-{reach.num_topk} of {reach.num_experts} experts ({reach.method})"


def _print_result(res: sim.SimResult, args: argparse.Namespace, label: str = "") -> None:
    c, reach = res.cluster, res.reach
    N = c.nodes
    remote = reach.num_nodes_per_token - float(reach.prob_token_in_node.mean())
    print(f"{label}reach per token: {reach.num_ranks_per_token:.3f} of {c.num_ranks} ranks, "
          f"{reach.num_nodes_per_token:.3f} of {N} nodes ({remote:.3f} remote); "
          f"{reach.num_topk} selections")
    print(f"{'':<10}{'time':>11}  {'NVLink/GPU':>11}  {'RDMA/GPU':>10}  {'bottleneck':<10}  DeepEP-style bandwidth")
    kind = "all selections" if res.low_latency else ("NVLink" if N == 1 else "RDMA")
    for name, cost in (("dispatch", res.dispatch), ("combine", res.combine)):
        print(f"{name:<10}{cost.time_us:>8.1f} us  {cost.nvlink_bytes / 1e6:>8.2f} MB  {cost.rdma_bytes / 1e6:>7.2f} MB  "
              f"{cost.bottleneck:<10}  {cost.deepep_GBps:.1f} GB/s ({kind})")


def run_pipeline(args: argparse.Namespace) -> int:
    """``--pipeline``: 1F1B vs DualPipeV at DeepSeek-V3's shape; see moeflow.simulate_pipeline."""
    from .. import simulate_pipeline as sp

    try:
        for name in ("pp", "microbatches", "tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.microbatches < 2 * args.pp:
            raise ValueError(f"DualPipeV needs --microbatches >= 2 x --pp = {2 * args.pp}, got {args.microbatches}")
        cluster = _links(args, args.nodes or 8, args.gpus_per_node)
        costs, results = sp.compare_schedules(sp.DEEPSEEK_V3, cluster, num_ranks=args.pp,
                                              num_microbatches=args.microbatches, tokens=args.tokens,
                                              compute_TFLOPs=args.compute_tflops, comm_sms=args.comm_sms)
    except (ValueError, TypeError) as e:
        print(f"moeflow simulate: error: {e}", file=sys.stderr)
        return 2
    m = sp.DEEPSEEK_V3
    ms = 1e-3
    print(f"DeepSeek-V3 shape: {m.num_layers} layers, hidden {m.hidden}, top-{m.num_topk} of {m.num_experts} experts "
          f"+ {m.num_shared_experts} shared (ffn {m.ffn_hidden}), MLA, {m.seq_len}-token sequences")
    print(f"pipeline of {args.pp} ranks, each stage an EP{cluster.num_ranks} group on {cluster.nodes} nodes x "
          f"{cluster.gpus_per_node} GPUs; {args.microbatches} micro-batches of {args.tokens} tokens per GPU; compute "
          f"{args.compute_tflops:g} TFLOPS effective; communication holds {args.comm_sms} of 132 SMs while overlapped")
    print(f"per layer and micro-batch on one GPU: forward compute {costs.compute_f * ms:.2f} ms, dispatch+combine "
          f"{costs.comm_f * ms:.2f} ms (compute : communication = 1 : {costs.comm_f / costs.compute_f:.2f}; the "
          f"DeepSeek-V3 report: about 1 : 1); backward compute {costs.compute_b * ms:.2f} ms, dispatch+combine "
          f"{costs.comm_b * ms:.2f} ms; stage-to-stage transfer {costs.pp_transfer * ms:.2f} ms")
    print(f"{'schedule':<24}{'stages':>7}{'F':>8}{'B':>8}{'W':>8}{'F&B':>8}{'step':>9}{'bubble':>9}"
          f"{'README bubble':>15}{'exposed comm':>14}   (chunk times in ms, step figures in s)")
    for r in results:
        label = f"{r.schedule}{', overlap' if r.overlap else (', no overlap' if r.schedule == 'DualPipeV' else '')}"
        c = r.chunk
        readme = sp.readme_bubble(r.schedule, c, r.num_stages)
        print(f"{label:<24}{r.num_stages:>7}{c.F * ms:>8.1f}{c.B * ms:>8.1f}{c.W * ms:>8.1f}{c.FB * ms:>8.1f}"
              f"{r.step_us * 1e-6:>9.2f}{r.bubble_us * 1e-6:>9.2f}{readme * 1e-6:>15.2f}{r.exposed_comm_us * 1e-6:>14.2f}")
    base, best = results[0], results[-1]
    print(f"expected DualPipeV (overlap) gain over 1F1B: a step {speed_words(best.step_us, base.step_us)} "
          f"({base.step_us * 1e-6:.2f} -> {best.step_us * 1e-6:.2f} s); bubble {base.bubble_us * 1e-6:.2f} -> "
          f"{best.bubble_us * 1e-6:.2f} s, exposed communication {base.exposed_comm_us * 1e-6:.2f} -> "
          f"{best.exposed_comm_us * 1e-6:.2f} s per rank")
    print("bubble: the idlest rank's idle time, from torch's own action lists; README bubble: the DualPipe README's "
          "formula, (PP-1)(F+B) for 1F1B and (PP/2-1)(F&B+B-3W) for DualPipeV, which leaves out the stage-to-stage "
          "transfers the simulation includes")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.pipeline:
        return run_pipeline(args)
    try:
        if args.nodes is None:
            print_comparison(_links(args, 1, args.gpus_per_node))
            return 0
        cluster = _links(args, args.nodes, args.gpus_per_node)
        if args.layer is not None and not args.loads:
            raise ValueError(f"--layer needs --loads, got --layer {args.layer}")
        loads_per_layer: list[np.ndarray | None] = [None]
        if args.loads:
            from .plan import read_loads

            loads = read_loads(args.loads)
            if loads.ndim != 2:
                raise ValueError(f"--loads must hold [layers, experts], got shape {loads.shape}")
            if args.layer is not None and not 0 <= args.layer < loads.shape[0]:
                raise ValueError(f"--layer must be in [0, {loads.shape[0]}), got --layer {args.layer}")
            loads_per_layer = [loads[args.layer]] if args.layer is not None else list(loads)
        results = []
        for expert_loads in loads_per_layer:
            reach = sim.expected_reach(args.experts, args.topk, cluster.num_ranks, cluster.gpus_per_node,
                                       num_groups=args.groups, num_topk_groups=args.topk_groups,
                                       max_nodes=args.max_nodes, expert_loads=expert_loads,
                                       num_samples=args.samples, seed=args.seed)
            results.append(sim.simulate_dispatch_combine(cluster, reach, num_tokens=args.tokens, hidden=args.hidden,
                                                         fp8=args.fp8, hierarchical=args.hierarchical,
                                                         low_latency=args.low_latency))
    except (OSError, ValueError, TypeError) as e:
        print(f"moeflow simulate: error: {e}", file=sys.stderr)
        return 2

    first = results[0]
    mode = "low-latency" if args.low_latency else ("hierarchical" if first.hierarchical else "flat")
    print(f"cluster: {cluster.nodes} nodes x {cluster.gpus_per_node} GPUs (EP{cluster.num_ranks}); "
          f"NVLink {cluster.nvlink_GBps:g} GB/s + {cluster.nvlink_latency_us:g} us, "
          f"RDMA {cluster.rdma_GBps:g} GB/s + {cluster.rdma_latency_us:g} us, kernel {cluster.kernel_us:g} us")
    print(f"routing: {_routing_text(args, first.reach)}")
    print(f"{args.tokens} tokens per rank, hidden {args.hidden}, {mode}; bytes per token copy: "
          f"dispatch {first.dispatch_bytes_per_token} ({'FP8' if args.fp8 else 'bf16'}"
          f"{' + 16 B header' if args.low_latency else ''}), combine {first.combine_bytes_per_token} (bf16)")
    if len(results) == 1:
        _print_result(first, args)
    else:
        times = np.array([r.dispatch.time_us + r.combine.time_us for r in results])
        worst = int(times.argmax())
        print(f"{len(results)} layers: dispatch+combine mean {times.mean():.1f} us, worst layer {worst} "
              f"{times[worst]:.1f} us (--layer L shows one)")
        _print_result(results[worst], args, label=f"layer {worst}: ")
    if args.compare_deepep:
        print()
        print_comparison(_links(args, 1, args.gpus_per_node))
    return 0
