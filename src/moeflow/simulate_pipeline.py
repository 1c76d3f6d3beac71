"""Pipeline step time from the same cost model: 1F1B vs DualPipeV, with and without overlap.

:func:`layer_costs` prices one MoE transformer layer for one micro-batch on one GPU: compute
from FLOPs at an effective rate, dispatch and combine from :func:`moeflow.simulate.simulate_dispatch_combine`
(the link model calibrated on DeepEP's published H800 figures). :func:`simulate_schedule` then
plays torch's own schedule (the per-rank action lists ``torch.distributed.pipelining`` runs, from
its ``get_schedule_ops``) on those durations: each rank runs its actions in order, a forward
waits for the previous stage's, a backward for the next stage's, plus the activation transfer
between ranks. :func:`compare_schedules` does it for DeepSeek-V3's published training shape
and puts the simulated bubbles beside the DualPipe README's formulas.

Assumptions, stated once:
- Compute: ``2 x params`` FLOPs per token for every GEMM (MLA projections, the 8 routed experts a
  token uses, the shared expert, the gate) plus causal attention scores over the sequence, at
  ``compute_TFLOPs`` effective (default 800: DeepSeek-V3's FP8 GEMMs at ~40% of an H800's
  1979 dense FP8 TFLOPS; it puts forward compute and dispatch+combine near the 1 : 1 the
  DeepSeek-V3 report gives for cross-node expert parallelism). Backward = 2 x forward, split
  into input and weight halves (W = F). Every rank's layers cost the same (routing balanced).
- Communication: dispatch (FP8 forward, BF16 backward) and combine (BF16) of ``tokens`` per
  GPU, hierarchical (DeepEP's internode kernels), node-limited to 4 nodes; forward and
  backward each move one dispatch and one combine per MoE layer. The pipeline's own transfer
  (``tokens x hidden`` BF16 activations or gradients) goes over RDMA between stages.
- Without overlap a chunk's communication adds to its compute. With overlap (DualPipe's
  ``F&B``) a forward chunk and a backward chunk of the same rank hide each other's traffic: the
  pair takes ``max(compute, communication)``, its compute slowed by ``total_sms / (total_sms
  - comm_sms)`` because communication kernels hold ``comm_sms`` SMs meanwhile (DeepSeek-V3
  gave 20 of the H800's 132 SMs to communication).
- Dense layers (DeepSeek-V3's first 3 of 61) are priced as MoE layers; embedding and head are
  ignored; optimizer and data-parallel gradient reduction are outside the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from . import simulate as sim

__all__ = ["ModelShape", "DEEPSEEK_V3", "LayerCosts", "layer_costs", "ScheduleResult", "simulate_schedule",
           "readme_bubble", "compare_schedules"]


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A DeepSeek-style MoE transformer (MLA attention, shared + routed SwiGLU experts)."""

    num_layers: int
    hidden: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    num_experts: int
    num_topk: int
    num_shared_experts: int
    ffn_hidden: int          # per expert
    seq_len: int

    def flops_per_token(self) -> float:
        """Forward FLOPs of one layer per token (GEMMs at 2 x params, attention over half the sequence)."""
        D, Hn = self.hidden, self.num_heads
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        attn_params = (D * self.q_lora_rank + self.q_lora_rank * Hn * qk                  # q down / up
                       + D * (self.kv_lora_rank + self.qk_rope_head_dim)                  # kv down (+ rope key)
                       + self.kv_lora_rank * Hn * (self.qk_nope_head_dim + self.v_head_dim)  # kv up
                       + Hn * self.v_head_dim * D)                                        # output
        scores = 2 * Hn * (qk + self.v_head_dim) * (self.seq_len / 2)                     # causal: half the keys
        expert = 3 * D * self.ffn_hidden
        moe_params = (self.num_topk + self.num_shared_experts) * expert + D * self.num_experts
        return 2 * attn_params + scores + 2 * moe_params


# DeepSeek-V3 (the technical report and its config.json): 61 layers, 4K sequences
DEEPSEEK_V3 = ModelShape(num_layers=61, hidden=7168, num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                         qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts=256, num_topk=8,
                         num_shared_experts=1, ffn_hidden=2048, seq_len=4096)


@dataclass(frozen=True)
class LayerCosts:
    """One layer, one micro-batch, one GPU, in microseconds.

    compute_f: forward compute; compute_b: full backward (input + weight halves); compute_w: the
    weight half. comm_f / comm_b: dispatch + combine in the forward / the backward.
    pp_transfer: one stage-to-stage activation (or gradient) transfer.
    """

    compute_f: float
    compute_b: float
    compute_w: float
    comm_f: float
    comm_b: float
    pp_transfer: float
    overlap_slowdown: float


def layer_costs(shape: ModelShape, cluster: sim.ClusterSpec, *, tokens: int, compute_TFLOPs: float = 800.0,
                max_nodes: Optional[int] = 4, comm_sms: int = 20, total_sms: int = 132) -> LayerCosts:
    """Price one layer (see the module docstring for the assumptions)."""
    if not (compute_TFLOPs > 0 and math.isfinite(compute_TFLOPs)):
        raise ValueError(f"compute_TFLOPs must be a positive number, got {compute_TFLOPs!r}")
    if not 0 <= comm_sms < total_sms:
        raise ValueError(f"comm_sms must lie in [0, total_sms={total_sms}), got {comm_sms!r}")
    compute_f = shape.flops_per_token() * tokens / (compute_TFLOPs * 1e6)  # FLOPs / (TFLOP/s) in us
    limit = max_nodes if max_nodes is not None and cluster.nodes > max_nodes else None
    reach = sim.expected_reach(shape.num_experts, shape.num_topk, cluster.num_ranks, cluster.gpus_per_node,
                               max_nodes=limit)
    fwd = sim.simulate_dispatch_combine(cluster, reach, num_tokens=tokens, hidden=shape.hidden, fp8=True,
                                        hierarchical=True)
    bwd = sim.simulate_dispatch_combine(cluster, reach, num_tokens=tokens, hidden=shape.hidden, fp8=False,
                                        hierarchical=True)
    pp_bytes = tokens * shape.hidden * 2
    pp_transfer = cluster.rdma_latency_us + pp_bytes / (cluster.rdma_GBps * 1e3)
    return LayerCosts(compute_f=compute_f, compute_b=2 * compute_f, compute_w=compute_f,
                      comm_f=fwd.dispatch.time_us + fwd.combine.time_us,
                      comm_b=bwd.dispatch.time_us + bwd.combine.time_us, pp_transfer=pp_transfer,
                      overlap_slowdown=total_sms / (total_sms - comm_sms))


@dataclass(frozen=True)
class ChunkTimes:
    """One stage's chunk (``layers`` layers) for one micro-batch, in microseconds."""

    F: float          # forward, communication exposed
    B: float          # full backward, communication exposed
    I: float          # input half of the backward (carries the backward's communication)
    W: float          # weight half
    FB: float         # a forward and a backward chunk overlapped (DualPipe's F&B)

    @classmethod
    def of(cls, costs: LayerCosts, layers: float, overlap: bool) -> "ChunkTimes":
        c = costs
        F = layers * (c.compute_f + c.comm_f)
        B = layers * (c.compute_b + c.comm_b)
        if overlap:
            FB = layers * max((c.compute_f + c.compute_b) * c.overlap_slowdown, c.comm_f + c.comm_b)
        else:
            FB = F + B
        return cls(F=F, B=B, I=layers * (c.compute_b - c.compute_w + c.comm_b), W=layers * c.compute_w, FB=FB)


@dataclass(frozen=True)
class ScheduleResult:
    """One simulated step (times in microseconds)."""

    schedule: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    overlap: bool
    chunk: ChunkTimes
    step_us: float
    work_per_rank_us: tuple[float, ...]          # each rank's own actions, back to back
    exposed_comm_per_rank_us: tuple[float, ...]  # communication in them that nothing hid

    @property
    def bubble_us(self) -> float:
        """The idlest rank's idle time (step minus its work): what the README's formulas give."""
        return self.step_us - min(self.work_per_rank_us)

    @property
    def exposed_comm_us(self) -> float:
        """Exposed communication, averaged over the ranks."""
        return sum(self.exposed_comm_per_rank_us) / self.num_ranks


# torch's names for the schedules simulated here: (class name, stages per rank)
_TORCH = {"1f1b": ("1F1B", 1), "gpipe": ("GPipe", 1), "interleaved1f1b": ("Interleaved1F1B", 2),
          "zbv": ("ZBVZeroBubble", 2), "dualpipev": ("DualPipeV", 2)}


def simulate_schedule(schedule: str, costs: LayerCosts, *, num_ranks: int, num_layers: int, num_microbatches: int,
                      overlap: bool = False) -> ScheduleResult:
    """Play torch's action lists for ``schedule`` on ``num_ranks`` pipeline ranks with ``costs``.

    Each rank runs its actions in order; an action starts when its rank is free and its inputs
    are there (a forward: the previous stage's forward of the micro-batch; a backward: the next
    stage's backward, or the last stage's own forward; a weight step: the input step),
    ``costs.pp_transfer`` later when they come from another rank. Stages get
    ``num_layers / stages`` layers each. ``overlap`` prices DualPipeV's ``OVERLAP_F_B`` actions
    as F&B; without it they run as F then B.
    """
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    from torch.distributed.pipelining.schedules import (BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, FULL_BACKWARD,
                                                        OVERLAP_F_B)

    key = schedule.lower()
    if key not in _TORCH:
        raise ValueError(f"simulate_schedule: unknown schedule {schedule!r}; choose one of {sorted(_TORCH)}")
    name, per_rank = _TORCH[key]
    S = num_ranks * per_rank
    if overlap and key != "dualpipev":
        raise ValueError(f"simulate_schedule: overlap needs 'dualpipev', got {schedule!r}")
    chunk = ChunkTimes.of(costs, num_layers / S, overlap)
    comm_in = {FORWARD: chunk.F - num_layers / S * costs.compute_f, FULL_BACKWARD: chunk.B - num_layers / S * costs.compute_b,
               BACKWARD_INPUT: num_layers / S * costs.comm_b, BACKWARD_WEIGHT: 0.0}
    if per_rank == 1:
        # one stage per rank: the textbook order (torch's get_schedule_ops mocks every rank as
        # rank 0 for these, which shifts their micro-batch numbers)
        ops = [_single_stage_ops(key, r, num_ranks, num_microbatches) for r in range(num_ranks)]
    else:
        ops = get_schedule_ops(name, num_ranks, num_microbatches)
    compute = (FORWARD, FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, OVERLAP_F_B)  # not REDUCE_GRAD etc.
    queues = [[a for a in rank_ops if a is not None and a.computation_type in compute] for rank_ops in ops]
    stage_rank = {a.stage_index if a.sub_actions is None else sub.stage_index: r
                  for r, q in enumerate(queues) for a in q for sub in (a.sub_actions or (a,))}
    done: dict = {}  # (stage, type, mb) -> finish time
    free = [0.0] * num_ranks
    work = [0.0] * num_ranks
    exposed = [0.0] * num_ranks
    pos = [0] * num_ranks
    duration = {FORWARD: chunk.F, FULL_BACKWARD: chunk.B, BACKWARD_INPUT: chunk.I, BACKWARD_WEIGHT: chunk.W}

    def ready(a, rank) -> Optional[float]:
        s, t, mb = a.stage_index, a.computation_type, a.microbatch_index
        if t == FORWARD:
            need = [(s - 1, "F")] if s > 0 else []
        elif t in (FULL_BACKWARD, BACKWARD_INPUT):
            need = [(s + 1, "B")] if s < S - 1 else [(s, "F")]
        else:
            need = [(s, "B")]
        start = 0.0
        for ns, kind in need:
            key2 = (ns, kind, mb)
            if key2 not in done:
                return None
            hop = costs.pp_transfer if stage_rank[ns] != rank and ns != s else 0.0
            start = max(start, done[key2] + hop)
        return start

    def finish(a, end) -> None:
        kind = "F" if a.computation_type == FORWARD else ("B" if a.computation_type in (FULL_BACKWARD, BACKWARD_INPUT)
                                                          else "W")
        done[(a.stage_index, kind, a.microbatch_index)] = end

    remaining = sum(len(q) for q in queues)
    while remaining:
        progressed = False
        for r in range(num_ranks):
            while pos[r] < len(queues[r]):
                a = queues[r][pos[r]]
                subs = a.sub_actions if a.computation_type == OVERLAP_F_B else (a,)
                starts = [ready(sub, r) for sub in subs]
                if any(s is None for s in starts):
                    break
                begin = max([free[r], *starts])
                if a.computation_type == OVERLAP_F_B:
                    took = chunk.FB
                    hidden = overlap
                    comm = sum(comm_in[sub.computation_type] for sub in subs)
                    exposed[r] += 0.0 if hidden else comm
                else:
                    took = duration[a.computation_type]
                    exposed[r] += comm_in[a.computation_type]
                end = begin + took
                free[r], work[r] = end, work[r] + took
                for sub in subs:
                    finish(sub, end)
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"simulate_schedule: {schedule} deadlocked (a dependency was never produced)")
    return ScheduleResult(schedule=name, num_ranks=num_ranks, num_stages=S, num_microbatches=num_microbatches,
                          overlap=overlap, chunk=chunk, step_us=max(free), work_per_rank_us=tuple(work),
                          exposed_comm_per_rank_us=tuple(exposed))


def _single_stage_ops(schedule: str, rank: int, num_ranks: int, num_microbatches: int) -> list:
    """GPipe (all forwards, then all backwards) or 1F1B (``num_ranks - 1 - rank`` forwards of
    warm-up, then one forward and one backward in turn, then the remaining backwards) on ``rank``."""
    from torch.distributed.pipelining.schedules import FORWARD, FULL_BACKWARD, _Action

    m = num_microbatches
    F = [_Action(rank, FORWARD, i) for i in range(m)]
    B = [_Action(rank, FULL_BACKWARD, i) for i in range(m)]
    if schedule == "gpipe":
        return F + B
    warmup = min(m, num_ranks - 1 - rank)
    ops = F[:warmup]
    for i in range(m - warmup):
        ops += [F[warmup + i], B[i]]
    return ops + B[m - warmup:]


def readme_bubble(schedule: str, chunk: ChunkTimes, num_stages: int) -> float:
    """The DualPipe README's bubble for ``num_stages`` pipeline stages (PP in its table), in us:
    1F1B ``(PP - 1)(F + B)``; DualPipeV ``(PP/2 - 1)(F&B + B - 3W)``."""
    if schedule.lower() == "1f1b":
        return (num_stages - 1) * (chunk.F + chunk.B)
    if schedule.lower() == "dualpipev":
        return (num_stages / 2 - 1) * (chunk.FB + chunk.B - 3 * chunk.W)
    raise ValueError(f"readme_bubble: the README gives 1F1B and DualPipe(V) only, got {schedule!r}")


def compare_schedules(shape: ModelShape = DEEPSEEK_V3, cluster: Optional[sim.ClusterSpec] = None, *,
                      num_ranks: int = 16, num_microbatches: int = 120, tokens: int = 4096,
                      compute_TFLOPs: float = 800.0, comm_sms: int = 20) -> tuple[LayerCosts, list[ScheduleResult]]:
    """1F1B, DualPipeV without overlap and DualPipeV with overlap, on one cost model.

    Defaults: DeepSeek-V3's training shape: a 16-way pipeline whose every stage is a 64-way
    expert-parallel group over 8 nodes of 8 H800s; 4096 tokens (one sequence) per micro-batch
    per GPU; 120 micro-batches (the 15360-sequence batch over 2048 / 16 = 128 data-parallel
    pipelines).
    """
    cluster = cluster or sim.ClusterSpec(nodes=8, gpus_per_node=8)
    costs = layer_costs(shape, cluster, tokens=tokens, compute_TFLOPs=compute_TFLOPs, comm_sms=comm_sms)
    runs = [("1f1b", False), ("dualpipev", False), ("dualpipev", True)]
    return costs, [simulate_schedule(s, costs, num_ranks=num_ranks, num_layers=shape.num_layers,
                                     num_microbatches=num_microbatches, overlap=o) for s, o in runs]
