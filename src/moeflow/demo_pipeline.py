"""``moeflow demo --pp P``: the demo's model trained pipeline-parallel on a ``(pp, dp, ep)`` mesh.

The mesh is :func:`moeflow.demo.make_mesh`'s with a ``pp`` dim first (rank ``p * (dp * ep) + i``
is pipeline position p). Each pipeline position holds some of the model's blocks
(:mod:`moeflow.parallel.pipeline` cuts them; DualPipeV and ZBV put two stages on each position,
in a V); within a position the MoE layers' experts are split over the ``ep`` ranks, and
:func:`moeflow.parallelize` shards each stage over the ``dp x ep`` ranks as the unpipelined demo
shards its whole model (one FSDP2 unit, kept gathered: :data:`moeflow.demo.DEMO_FSDP`). Each
``dp x ep`` coordinate reads its own batches; every pipeline position of it reads the same ones
(the first stage its inputs, the last its targets).

Each step records, per rank, where the time went (:mod:`moeflow.parallel.timeline`): compute,
exposed communication (dispatch/combine that nothing covered), bubble (waiting for a pipeline
neighbour), and with overlap the hand-overs' wake-up latency. The report holds the per-step
figures and the last step's spans; :func:`moeflow.demo_plot.plot_pipeline` draws the loss and
that step as a timeline per rank.

Shape letters: B batch, S sequence, V vocabulary (256).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .demo import (DEMO_FSDP, DemoConfig, TinyMoELM, count_params, learning_rate, load_data, make_mesh,
                   make_optimizer, sample_batch, write_report)
from .comm.transport import ProcessGroupTransport
from .layer import MoELayer
from .parallel.pipeline import SCHEDULES, build_pipeline
from .parallel.timeline import StepTimes, Timeline, now

__all__ = ["PipelineConfig", "check_config", "train"]


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    pp: int = 2                    # pipeline positions; dp x ep = ranks / pp
    schedule: str = "dualpipev"    # see moeflow.parallel.pipeline.SCHEDULES
    num_microbatches: int = 8      # per step; each is batch_size / num_microbatches sequences
    overlap: bool = True           # DualPipeV: overlap each OVERLAP_F_B's forward and backward
    checkpoint: Optional[str] = None  # None, "full" or "selective" activation checkpointing


def num_stages(pcfg: PipelineConfig) -> int:
    """Stages of the schedule over ``pcfg.pp`` positions (two per position for the V and looped ones)."""
    return pcfg.pp * SCHEDULES[pcfg.schedule.lower()][1]


def check_config(cfg: DemoConfig, pcfg: PipelineConfig, num_ranks: int) -> None:
    """Raise ``ValueError`` naming the setting that cannot run (before any rank starts)."""
    key = pcfg.schedule.lower()
    if key not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {pcfg.schedule!r}")
    if pcfg.pp < 2 or num_ranks % pcfg.pp:
        raise ValueError(f"pp must be >= 2 and divide the {num_ranks} ranks, got pp={pcfg.pp}")
    if cfg.dp < 1 or (num_ranks // pcfg.pp) % cfg.dp:
        raise ValueError(f"dp ({cfg.dp}) must divide the {num_ranks // pcfg.pp} ranks of a pipeline position "
                         f"(ranks {num_ranks} / pp {pcfg.pp})")
    ep = num_ranks // (pcfg.pp * cfg.dp)
    if cfg.num_experts % ep:
        raise ValueError(f"experts ({cfg.num_experts}) must divide by the expert-parallel size {ep} "
                         f"(ranks {num_ranks} / (pp {pcfg.pp} x dp {cfg.dp}))")
    stages = num_stages(pcfg)
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
    if cfg.num_slots not in (None, cfg.num_experts) or cfg.rebalance_every:
        raise ValueError("redundant experts / rebalancing are not part of the pipelined demo")


_TIMES = ("wall", "compute", "exposed_comm", "bubble", "switching")  # StepTimes' fields, in order


def _loss(logits_BSV: torch.Tensor, target_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.size(-1)), target_BS.reshape(-1))


def train(cfg: DemoConfig, pcfg: PipelineConfig, out_dir: Optional[str] = None, show_progress: bool = True) -> dict:
    """Run on every rank (inside an initialised process group); returns the report on every rank.
    The loop's own collectives and the schedule's (stage sends, FSDP2) run inside ``loop``'s
    guards: a lost rank is a ``PeerFailureError`` naming it within ``MOEFLOW_TIMEOUT_S``."""
    rank, W = dist.get_rank(), dist.get_world_size()
    loop = ProcessGroupTransport(None, name="pipeline loop")
    cfg = replace(cfg, tie_embeddings=False)  # the embedding and the head sit on different stages
    check_config(cfg, pcfg, W)
    mesh, device = make_mesh(cfg, pcfg.pp)
    per_position = W // pcfg.pp  # dp x ep: the ranks of one pipeline position, each its own batches
    torch.manual_seed(cfg.seed)  # the same global weights for any layout (see MoELayer)
    with device:
        model = TinyMoELM(cfg, mesh)
    timeline = Timeline()
    pipe = build_pipeline(model.pipeline_parts(), schedule=pcfg.schedule, mesh=mesh,
                          num_microbatches=pcfg.num_microbatches,
                          microbatch_size=cfg.batch_size // pcfg.num_microbatches, seq_len=cfg.seq_len, loss_fn=_loss,
                          overlap=pcfg.overlap, checkpoint=pcfg.checkpoint, fsdp=DEMO_FSDP, device=device,
                          timeline=timeline)
    opt = make_optimizer([(n, p) for m in pipe.modules for n, p in m.named_parameters()], cfg)
    moe_layers = [layer for m in pipe.modules for layer in m.modules() if isinstance(layer, MoELayer)]
    train_data, val_data, unigram_loss = load_data(cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank % per_position)

    history = dict(step=[], loss=[], val_step=[], val_loss=[], tokens_per_s=[], **{k: [] for k in _TIMES})
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
        x, y = sample_batch(train_data, cfg, gen, device)
        timeline.clear()
        with loop.guard("step"):
            dist.barrier()  # for the timeline only: every rank's step starts together
            t0 = now()
            loss = pipe.step(x, y)  # FSDP2 averages the gradients over dp x ep (see parallelize)
            t1 = now()
            times = timeline.times(t0, t1)
            if step == cfg.steps - 1:
                last_spans = [(s.lane, s.kind, s.start - t0, s.end - t0) for s in timeline.spans]
            opt.step()
            opt.zero_grad(set_to_none=True)
            for layer in moe_layers:
                layer.router.bias_update_rate = cfg.bias_update_rate * (lr / cfg.lr if cfg.bias_decay else 1.0)
                layer.router.update_bias()
            stats = torch.tensor([float(loss) if loss is not None else 0.0, *(getattr(times, k) for k in _TIMES)],
                                 dtype=torch.float64, device=device)
            per_rank = [torch.zeros_like(stats) for _ in range(W)]
            dist.all_gather(per_rank, stats)  # for the report only
        per_rank_t = torch.stack(per_rank).cpu()
        history["step"].append(step)
        history["loss"].append(float(per_rank_t[:, 0].sum()) / per_position)  # only the last stage's ranks have one
        for i, k in enumerate(_TIMES):
            history[k].append(per_rank_t[:, i + 1].tolist())
        history["tokens_per_s"].append(cfg.batch_size * cfg.seq_len * per_position / float(per_rank_t[:, 1].max()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history["val_step"].append(step)
            history["val_loss"].append(_evaluate(pipe, val_data, cfg, per_position, device, loop))
        if bar is not None:
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", tok_s=f"{history['tokens_per_s'][-1]:,.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    all_spans: list = [None] * W
    with loop.guard("report"):
        dist.all_gather_object(all_spans, last_spans)  # the last step's timeline of every rank, for the PNG
    tail = max(1, cfg.steps // 10)
    steps = [StepTimes(*(sum(history[k][s]) / W for k in _TIMES)) for s in range(cfg.steps - tail, cfg.steps)]
    mean = StepTimes.mean(steps)
    report = dict(
        config=asdict(cfg), pipeline=asdict(pcfg), ranks=W, rank=rank, pp=pcfg.pp, dp=cfg.dp,
        ep=per_position // cfg.dp, seconds=time.perf_counter() - t_start, unigram_val_loss=unigram_loss,
        final_val_loss=history["val_loss"][-1], final_train_loss=sum(history["loss"][-tail:]) / tail,
        tokens_per_s=sum(history["tokens_per_s"][-tail:]) / tail,
        step_seconds={k: getattr(mean, k) for k in _TIMES}, num_params=count_params(model, cfg),
        last_step_spans=all_spans, history=history,
    )
    if rank == 0 and out_dir:
        write_report(report, out_dir)
    return report


def _evaluate(pipe, val_data, cfg: DemoConfig, per_position: int, device: torch.device,
              loop: ProcessGroupTransport) -> float:
    g = torch.Generator().manual_seed(12345 + dist.get_rank() % per_position)
    total = torch.zeros(1, dtype=torch.float64, device=device)
    with loop.guard("eval"):
        for _ in range(cfg.eval_batches):
            x, y = sample_batch(val_data, cfg, g, device)
            loss = pipe.evaluate(x, y)
            if loss is not None:
                total += float(loss)
    loop.all_reduce(total, kind="eval")  # only the last stage's ranks contribute; for the report
    return float(total) / (cfg.eval_batches * per_position)
