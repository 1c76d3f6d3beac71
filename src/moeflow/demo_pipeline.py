"""``moeflow demo --pp P``: the demo's model trained pipeline-parallel over ``pp x ep`` local ranks.

Ranks form a ``P x (R / P)`` mesh (rank ``p * E + e`` is pipeline position p, expert-parallel
rank e): each pipeline position holds some of the model's blocks (:mod:`moeflow.parallel.pipeline`
cuts them; DualPipeV and ZBV put two stages on each position, in a V), and within a position the
MoE layers' experts are split over the E ranks, whose dense weights are one data-parallel group
(FSDP2, :func:`moeflow.parallel.pipeline.shard_dense_params`). Expert-parallel rank e reads its
own batches; every pipeline position of it reads the same ones (the first stage its inputs, the
last its targets).

Each step records, per rank, where the time went (:mod:`moeflow.parallel.timeline`): compute,
exposed communication (dispatch/combine that nothing covered), bubble (waiting for a pipeline
neighbour), and with overlap the hand-overs' wake-up latency. The report holds the per-step figures and the last step's spans; the PNG draws the
loss and that step as a timeline per rank.

Shape letters: B batch, S sequence, V vocabulary (256).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .demo import (DemoConfig, build_model, learning_rate, load_data, make_optimizer, plot_loss, sample_batch,
                   write_report)
from .experts import GroupedExperts
from .parallel.pipeline import SCHEDULES, build_pipeline, shard_dense_params
from .parallel.timeline import StepTimes, Timeline, now

__all__ = ["PipelineConfig", "train"]


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    pp: int = 2                    # pipeline positions; the expert-parallel size is ranks / pp
    schedule: str = "dualpipev"    # see moeflow.parallel.pipeline.SCHEDULES
    num_microbatches: int = 8      # per step; each is batch_size / num_microbatches sequences
    overlap: bool = True           # DualPipeV: overlap each OVERLAP_F_B's forward and backward
    checkpoint: Optional[str] = None  # None, "full" or "selective" activation checkpointing


def check_config(cfg: DemoConfig, pcfg: PipelineConfig, num_ranks: int) -> None:
    """Raise ``ValueError`` naming the setting that cannot run (before any rank starts)."""
    key = pcfg.schedule.lower()
    if key not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {pcfg.schedule!r}")
    if pcfg.pp < 2 or num_ranks % pcfg.pp:
        raise ValueError(f"pp must be >= 2 and divide the {num_ranks} ranks, got pp={pcfg.pp}")
    ep = num_ranks // pcfg.pp
    if cfg.num_experts % ep:
        raise ValueError(f"experts ({cfg.num_experts}) must divide by the expert-parallel size {ep} "
                         f"(ranks {num_ranks} / pp {pcfg.pp})")
    stages = pcfg.pp * SCHEDULES[key][1]
    if cfg.num_layers < stages:
        raise ValueError(f"layers ({cfg.num_layers}) must be >= the {stages} stages of {pcfg.schedule} with pp={pcfg.pp}")
    if cfg.batch_size % pcfg.num_microbatches:
        raise ValueError(f"batch size ({cfg.batch_size}) must divide into {pcfg.num_microbatches} micro-batches")
    if key == "dualpipev" and pcfg.num_microbatches < stages:
        raise ValueError(f"DualPipeV needs micro-batches >= {stages} (2 x pp), got {pcfg.num_microbatches}")
    if key == "interleaved1f1b" and pcfg.num_microbatches % pcfg.pp:
        raise ValueError(f"interleaved 1F1B needs micro-batches divisible by pp={pcfg.pp}, got {pcfg.num_microbatches}")
    if pcfg.overlap and key != "dualpipev":
        raise ValueError(f"overlap needs the DualPipeV schedule (it has the OVERLAP_F_B actions), got {pcfg.schedule}")
    if cfg.num_replicas not in (None, cfg.num_experts) or cfg.rebalance_every:
        raise ValueError("redundant experts / rebalancing are not part of the pipelined demo")


_TIMES = ("wall", "compute", "exposed_comm", "bubble", "switching")  # StepTimes' fields, in order


def _loss(logits_BSV: torch.Tensor, target_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.size(-1)), target_BS.reshape(-1))


def train(cfg: DemoConfig, pcfg: PipelineConfig, out_dir: Optional[str] = None, show_progress: bool = True) -> dict:
    """Run on every rank (inside an initialised Gloo process group); returns the report on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, R = dist.get_rank(), dist.get_world_size()
    cfg = replace(cfg, tie_embeddings=False)
    check_config(cfg, pcfg, R)
    E = R // pcfg.pp
    mesh = init_device_mesh("cpu", (pcfg.pp, E), mesh_dim_names=("pp", "ep"))
    ep_rank = mesh["ep"].get_local_rank()
    model = build_model(cfg, mesh["ep"].get_group())
    timeline = Timeline()
    names = {id(p): n for n, p in model.named_parameters()}  # before FSDP swaps in its parameters
    stage_names: list[dict[str, str]] = []

    def wrap(module):
        stage_names.append({n: names[id(p)] for n, p in module.named_parameters()})
        return shard_dense_params(module, mesh["ep"])

    pipe = build_pipeline(model.pipeline_parts(), schedule=pcfg.schedule, pp_group=mesh["pp"].get_group(),
                          num_microbatches=pcfg.num_microbatches, microbatch_size=cfg.batch_size // pcfg.num_microbatches,
                          seq_len=cfg.seq_len, loss_fn=_loss, overlap=pcfg.overlap, checkpoint=pcfg.checkpoint,
                          timeline=timeline, wrap=wrap)
    named = [(stage_names[i][n], p) for i, m in enumerate(pipe.modules) for n, p in m.named_parameters()]
    opt = make_optimizer(named, cfg)
    experts = [p for m in pipe.modules for mod in m.modules() if isinstance(mod, GroupedExperts)
               for p in mod.parameters()]
    moe_layers = [b.moe for m in pipe.modules for b in m.modules() if getattr(b, "moe", None) is not None]
    train_data, val_data, unigram_loss = load_data(cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + ep_rank)  # one stream per expert-parallel rank

    history = dict(step=[], loss=[], val_step=[], val_loss=[], tokens_per_s=[], wall=[], compute=[],
                   exposed_comm=[], bubble=[], switching=[])
    bar = None
    if show_progress and rank == 0:
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, desc=f"training ({pcfg.schedule}, pp {pcfg.pp})", dynamic_ncols=True)
        except ImportError:
            bar = None
    t_start = time.perf_counter()
    last_spans: list = []
    for step in range(cfg.steps):
        lr = learning_rate(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x, y = sample_batch(train_data, cfg, gen)
        timeline.clear()
        dist.barrier()  # for the timeline only: every rank's step starts together
        t0 = now()
        loss = pipe.step(x, y)
        t1 = now()
        times = timeline.times(t0, t1)
        if step == cfg.steps - 1:
            last_spans = [(s.lane, s.kind, s.start - t0, s.end - t0) for s in timeline.spans]
        for p in experts:  # expert gradients sum every expert-parallel rank's tokens: the mean
            if p.grad is not None:
                p.grad /= E
        opt.step()
        opt.zero_grad(set_to_none=True)
        for layer in moe_layers:
            layer.router.bias_update_rate = cfg.bias_update_rate * (lr / cfg.lr if cfg.bias_decay else 1.0)
            layer.update_bias()
        stats = torch.tensor([float(loss) if loss is not None else 0.0, times.wall, times.compute,
                              times.exposed_comm, times.bubble, times.switching], dtype=torch.float64)
        per_rank = [torch.zeros_like(stats) for _ in range(R)]
        dist.all_gather(per_rank, stats)  # for the report only
        per_rank_t = torch.stack(per_rank)
        history["step"].append(step)
        history["loss"].append(float(per_rank_t[:, 0].sum()) / E)  # only the last stage's ranks have one
        for i, k in enumerate(_TIMES):
            history[k].append(per_rank_t[:, i + 1].tolist())
        history["tokens_per_s"].append(cfg.batch_size * cfg.seq_len * E / float(per_rank_t[:, 1].max()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history["val_step"].append(step)
            history["val_loss"].append(_evaluate(pipe, val_data, cfg, E))
        if bar is not None:
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", tok_s=f"{history['tokens_per_s'][-1]:,.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    all_spans: list = [None] * R
    dist.all_gather_object(all_spans, last_spans)  # the last step's timeline of every rank, for the PNG
    tail = max(1, cfg.steps // 10)
    steps = [StepTimes(*(sum(history[k][s][r] for r in range(R)) / R for k in _TIMES))
             for s in range(cfg.steps - tail, cfg.steps)]
    mean = StepTimes.mean(steps)
    report = dict(
        config=asdict(cfg), pipeline=asdict(pcfg), ranks=R, pp=pcfg.pp, ep=E,
        seconds=time.perf_counter() - t_start, unigram_val_loss=unigram_loss,
        final_val_loss=history["val_loss"][-1], final_train_loss=sum(history["loss"][-tail:]) / tail,
        tokens_per_s=sum(history["tokens_per_s"][-tail:]) / tail,
        step_seconds={k: getattr(mean, k) for k in _TIMES},
        last_step_spans=all_spans, history=history,
    )
    if rank == 0 and out_dir:
        _write_outputs(report, out_dir)
    return report


def _evaluate(pipe, val_data, cfg: DemoConfig, E: int) -> float:
    g = torch.Generator().manual_seed(12345 + dist.get_rank() % E)
    total = torch.zeros(1, dtype=torch.float64)
    for _ in range(cfg.eval_batches):
        x, y = sample_batch(val_data, cfg, g)
        loss = pipe.evaluate(x, y)
        if loss is not None:
            total += float(loss)
    dist.all_reduce(total)  # only the last stage's ranks contribute; for the report
    return float(total) / (cfg.eval_batches * E)


_COLORS = {"F": "#4c72b0", "B": "#55a868", "W": "#b5bd68", "issue": "#c44e52", "wait": "#f0a030", "switch": "#222222"}


def _write_outputs(report: dict, out_dir: str) -> None:
    plt = write_report(report, out_dir)
    if plt is None:
        return
    R = report["ranks"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 3 + 0.6 * R + 3.5), gridspec_kw=dict(height_ratios=[3, 1 + 0.6 * R]))
    plot_loss(ax1, report)
    p = report["pipeline"]
    ax1.set_title(f"{R} ranks: pp {report['pp']} x ep {report['ep']}, {p['schedule']}"
                  f"{' with overlap' if p['overlap'] else ''}, {p['num_microbatches']} micro-batches")
    ax1.legend()
    # the last step, one row per rank: forwards in its upper half, backwards in its lower half,
    # each action's communication drawn over it
    for r, spans in enumerate(report["last_step_spans"]):
        half = {}  # lane -> 0 (forward) or 1 (backward), from the lane's actions
        for lane, kind, start, end in spans:
            if kind in ("F", "B", "W"):
                half.setdefault(lane, []).append((start, end, 0 if kind == "F" else 1))
        for lane, kind, start, end in spans:
            if kind in ("F", "B", "W"):
                row = 0 if kind == "F" else 1
                ax2.broken_barh([(start * 1e3, (end - start) * 1e3)], (r - 0.4 + 0.4 * row, 0.38),
                                facecolors=_COLORS[kind], alpha=0.6)
            else:
                row = next((h for s0, e0, h in half.get(lane, []) if s0 <= start and end <= e0), 0)
                ax2.broken_barh([(start * 1e3, (end - start) * 1e3)], (r - 0.3 + 0.4 * row, 0.18),
                                facecolors=_COLORS[kind], zorder=3)
    s = report["step_seconds"]
    ax2.set_title(f"last step per rank; per step (last 10%): compute {s['compute'] * 1e3:.0f} ms, exposed comm "
                  f"{s['exposed_comm'] * 1e3:.0f} ms, bubble {s['bubble'] * 1e3:.0f} ms, hand-overs "
                  f"{s['switching'] * 1e3:.0f} ms", fontsize=10)
    ax2.set_yticks(range(R), [f"rank {r}" for r in range(R)])
    ax2.invert_yaxis()
    ax2.set_xlabel("ms since the step started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax2.legend(handles, ["forward", "backward", "weight grad", "comm issue", "comm wait", "hand-over"],
               loc="upper right", fontsize=8, ncol=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "training.png"), dpi=110)
    plt.close(fig)
