"""Pipeline-parallel MoE models on ``torch.distributed.pipelining``.

A model is offered as :class:`ModelParts` (an embedding, a list of layers, a head); this module
cuts it into stages, places them on the pipeline ranks the way a schedule wants (one per rank
for GPipe and 1F1B, two per rank looped for interleaved 1F1B, two per rank in a V for ZBV and
DualPipeV), wraps each in a ``PipelineStage`` and builds torch's schedule. Nothing here runs a
schedule of its own: torch's engine does, including DualPipeV, whose ``OVERLAP_F_B`` actions
:func:`moeflow.parallel.overlap.overlap_f_b` fills with real overlap when ``overlap=True``.

Mesh: ranks form ``pp x dp x ep``, one ``DeviceMesh`` with those dims. The model's MoE layers
are built on it (``group=mesh``): :class:`moeflow.parallel.MoEMesh` leaves ``pp`` out, so a
stage lives on the ``dp x ep`` ranks of one pipeline position and tokens travel among the
``ep`` ranks of that stage only; FSDP2 (``fsdp=``) is :func:`moeflow.parallelize` on each stage
over the same mesh. Every rank of a stage runs the same schedule, hence the same sequence of
dispatches and combines.

Losses: the schedule computes ``loss_fn(output, target)`` per micro-batch on the last stage and
divides the gradients by the number of micro-batches (``scale_grads``). The routers' balance
losses of every stage are added to that loss without passing through the pipeline: each stage
adds its routers' losses to the backward of its output (:class:`_AddLosses`), so the gradients
equal those of ``mean over micro-batches of (loss + sum of router losses)``. For per-token and
per-sequence losses that is the unpipelined model's loss on the whole batch; the global-batch
aux loss is per micro-batch here.

Shape letters: B micro-batch, Q sequence length, H hidden size, V output size (vocabulary).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.distributed.pipelining
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._utils import generate_rank_to_stage_mapping
from torch.distributed.pipelining.schedules import BACKWARD_INPUT, BACKWARD_WEIGHT, FULL_BACKWARD, OVERLAP_F_B
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..comm import interleave
from ..routing import Router
from .mesh import PIPELINE_DIM
from .overlap import enable_overlap, overlap_f_b
from .timeline import SoloLane, Timeline, now

__all__ = ["SCHEDULES", "ModelParts", "StageModule", "TimedStage", "Pipeline", "stage_indices", "split_layers",
           "build_pipeline"]

# name -> (torch schedule class name, stages per rank, placement style)
SCHEDULES: dict[str, tuple[str, int, str]] = {
    "gpipe": ("ScheduleGPipe", 1, "loop"),
    "1f1b": ("Schedule1F1B", 1, "loop"),
    "interleaved1f1b": ("ScheduleInterleaved1F1B", 2, "loop"),
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
}
CHECKPOINT_MODES = (None, "full", "selective")


@dataclass(frozen=True)
class ModelParts:
    """A model as a pipeline sees it: ``head(layers[-1](...layers[0](embed(x))))``.

    Attributes:
        embed: the first stage's input (e.g. token ids ``[B, Q]`` int64) -> ``[B, Q, H]``.
        layers: each ``[B, Q, H]`` -> ``[B, Q, H]`` (the transformer blocks).
        head: ``[B, Q, H]`` -> ``[B, Q, V]`` (final norm and output projection).
        hidden: H; output_size: V; dtype: the activations' dtype (they travel between stages).
    """

    embed: nn.Module
    layers: tuple[nn.Module, ...]
    head: nn.Module
    hidden: int
    output_size: int
    dtype: torch.dtype = torch.float32


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one (the first stage,
    which also embeds, and the last, which also runs the head, get the smaller ones)."""
    if num_layers < num_stages:
        raise ValueError(f"split_layers: {num_layers} layers cannot fill {num_stages} stages; use more layers "
                         f"or fewer stages, got num_layers={num_layers}, num_stages={num_stages}")
    base, extra = divmod(num_layers, num_stages)
    # the extra layers go to the middle stages first
    order = sorted(range(num_stages), key=lambda s: (s in (0, num_stages - 1), s))
    sizes = [base + (1 if s in order[:extra] else 0) for s in range(num_stages)]
    bounds = [sum(sizes[:s]) for s in range(num_stages + 1)]
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def stage_indices(schedule: str, pp_rank: int, pp_size: int) -> list[int]:
    """The stages ``schedule`` places on pipeline rank ``pp_rank`` (torch's own mapping)."""
    _, per_rank, style = _schedule_entry(schedule)
    return generate_rank_to_stage_mapping(pp_size, pp_size * per_rank, style)[pp_rank]


def _schedule_entry(schedule: str) -> tuple[str, int, str]:
    key = schedule.lower().replace("-", "").replace("_", "")
    if key not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[key]


# ------------------------------------------------------------------------------ stage modules
_collecting = threading.local()  # the router losses of the stage forward running on this thread


def _collect_router_loss(router: Router, args, out) -> None:
    losses = getattr(_collecting, "losses", None)
    if losses is not None and out.loss.requires_grad:
        losses.append(out.loss)


class _AddLosses(torch.autograd.Function):
    """Identity on ``x``; in backward, each loss gets gradient 1, as if added to the final loss."""

    @staticmethod
    def forward(ctx, x, *losses):
        ctx.loss_dtypes = [l.dtype for l in losses]
        # an alias, not a view: the pipeline detaches stage outputs in place, which views forbid
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.ones((), dtype=d, device=grad.device) for d in ctx.loss_dtypes))


def _selective_policy(ctx, op, *args, **kwargs):
    """Op-level selective checkpointing: keep matmul and attention outputs, recompute the rest
    (norms, activations, routing math; a recompute also repeats the layer's dispatch/combine)."""
    name = str(op)
    keep = name.startswith(("aten.mm", "aten.bmm", "aten.addmm", "aten._grouped_mm", "aten._scaled_dot_product"))
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


class _Checkpointed(nn.Module):
    """A layer under activation checkpointing: ``"full"`` keeps only its input, ``"selective"``
    also keeps its matmul and attention outputs (op-level selective checkpointing)."""

    def __init__(self, layer: nn.Module, mode: str):
        super().__init__()
        self.layer, self.mode = layer, mode

    def forward(self, x):
        kwargs = {}
        if self.mode == "selective":
            kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
        return checkpoint(self.layer, x, use_reentrant=False, **kwargs)


class StageModule(nn.Module):
    """One pipeline stage: the embedding (first stage), some layers, the head (last stage).

    Adds the routers' losses of its own layers to the backward (see the module docstring).
    The parts are the model's own modules (parameters shared, not copied).
    """

    def __init__(self, embed: Optional[nn.Module], layers: Sequence[nn.Module], head: Optional[nn.Module],
                 checkpoint: Optional[str] = None):
        super().__init__()
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"StageModule: `checkpoint` must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
        self.embed, self.head = embed, head
        self.layers = nn.ModuleList(_Checkpointed(l, checkpoint) if checkpoint else l for l in layers)
        self._hooks = [m.register_forward_hook(_collect_router_loss) for m in self.modules() if isinstance(m, Router)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outer = getattr(_collecting, "losses", None)
        _collecting.losses = losses = []
        try:
            if self.embed is not None:
                x = self.embed(x)
            for layer in self.layers:
                x = layer(x)
            if self.head is not None:
                x = self.head(x)
        finally:
            _collecting.losses = outer
        return _AddLosses.apply(x, *losses) if losses else x


# ------------------------------------------------------------------------------ timed stages
class TimedStage(PipelineStage):
    """A ``PipelineStage`` that records its forward / backward spans into ``self.timeline``
    (None: nothing recorded) and, outside overlap lanes, the MoE layers' communication spans."""

    timeline: Optional[Timeline] = None

    @contextmanager
    def _span(self, kind: str, mb: int) -> Iterator[None]:
        if self.timeline is None:
            yield
            return
        lane = interleave.current_lane()
        name = getattr(lane, "name", None) or f"s{self.stage_index} mb{mb}"
        start = now()
        with interleave.use_lane(SoloLane(self.timeline, name)) if lane is None else nullcontext():
            yield
        self.timeline.add(name, kind, start, now())

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        with self._span("F", fwd_chunk_id):
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        with self._span("B", bwd_chunk_id):
            return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                              last_backward=last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        with self._span("W", bwd_chunk_id):
            return super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)


@dataclass
class Pipeline:
    """This rank's part of a pipelined model and the schedule that runs it.

    Attributes:
        schedule: the torch schedule (``step`` runs one training step).
        stages: this rank's ``PipelineStage`` objects; modules: their :class:`StageModule`.
        stage_ids: the stage indices on this rank.
        timeline: where stage and communication spans are recorded (None: not recorded).
    """

    schedule: object
    stages: list
    modules: list[StageModule]
    stage_ids: list[int]
    num_stages: int
    timeline: Optional[Timeline] = None
    overlap: bool = False

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules:
            yield from m.parameters()

    def step(self, inputs: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """One forward + backward over the whole batch (split into the micro-batches); gradients
        accumulate into ``.grad``. ``inputs`` is needed on the rank with the first stage,
        ``target`` on the one with the last. Returns the mean loss over micro-batches on the
        rank with the last stage (without the router losses), else None."""
        losses: list = []
        self.schedule.step(*(() if not self.has_first else (inputs,)), target=target if self.has_last else None,
                           losses=losses if self.has_last else None, return_outputs=False)
        return torch.stack([l.detach() for l in losses]).mean() if self.has_last else None

    def set_overlap(self, on: bool) -> None:
        """Turn DualPipeV's forward/backward overlap on or off between steps (same stages,
        same schedule: only how its ``OVERLAP_F_B`` actions run changes)."""
        if on and not self.overlap:
            enable_overlap(self.schedule)
        elif not on:
            self.schedule._comp_type_to_function_map.pop(OVERLAP_F_B, None)
        self.overlap = on

    @torch.no_grad()
    def evaluate(self, inputs: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None
                 ) -> Optional[torch.Tensor]:
        """Forward only, in eval mode (the routers count nothing); the mean loss as in :meth:`step`."""
        for m in self.modules:
            m.eval()
        losses: list = []
        custom = getattr(self.schedule, "_comp_type_to_function_map", None)
        saved = dict(custom) if custom is not None else None
        if custom is not None:
            # torch's runtime still hands a V schedule's backward outputs between the two stages
            # of a rank when there is no backward (it fails there): skip every backward action
            custom.update({t: _skip_backward for t in (FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)})
            custom[OVERLAP_F_B] = overlap_f_b  # runs the forward alone without a backward
        try:
            self.schedule.eval(*(() if not self.has_first else (inputs,)), target=target if self.has_last else None,
                               losses=losses if self.has_last else None, return_outputs=False)
        finally:
            if custom is not None:
                custom.clear()
                custom.update(saved)
            for m in self.modules:
                m.train()
        return torch.stack(losses).mean() if self.has_last else None


def _nothing() -> None:
    pass


def _skip_backward(action, ctx) -> None:
    # the runtime posted this backward's (empty) receive; it must be consumed like a real one
    ctx.schedule_ref.bwd_recv_ops.pop((action.stage_index, action.microbatch_index), None)


def build_pipeline(parts: ModelParts, *, schedule: str, mesh: Union[DeviceMesh, dist.ProcessGroup, None],
                   num_microbatches: int, microbatch_size: int, seq_len: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], overlap: bool = False,
                   checkpoint: Optional[str] = None, fsdp: Optional[dict] = None,
                   input_dtype: torch.dtype = torch.int64, device: Optional[torch.device] = None,
                   timeline: Optional[Timeline] = None) -> Pipeline:
    """Cut ``parts`` into stages for ``schedule`` and build this rank's stages and schedule.

    Args:
        parts: the model (see :class:`ModelParts`), built on every rank with its MoE layers on
            ``mesh`` (``group=mesh``). Only this rank's stages are kept in use.
        schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved1f1b"``, ``"zbv"`` or ``"dualpipev"``.
        mesh: a ``DeviceMesh`` with a ``"pp"`` dim, the stages' pipeline; its ``"ep"`` dim is the
            MoE layers' expert parallelism and its other dims data parallel
            (:class:`moeflow.parallel.MoEMesh`). Or the pipeline's process group itself (None:
            the world), the layers then built on their own groups.
        num_microbatches: micro-batches per step (DualPipeV needs at least 2 x pipeline size,
            interleaved 1F1B a multiple of it).
        microbatch_size, seq_len: B and Q of one micro-batch (static stage shapes).
        loss_fn: ``loss_fn(output [B, Q, V], target)`` -> scalar, the mean over the micro-batch.
        overlap: DualPipeV only: run each ``OVERLAP_F_B`` action's forward and backward as
            overlapping lanes (:func:`moeflow.parallel.overlap.overlap_f_b`).
        checkpoint: None, ``"full"`` or ``"selective"`` activation checkpointing of each layer.
        fsdp: None (no FSDP2), or keyword arguments of :func:`moeflow.parallelize` (``{}``: its
            defaults), which then shards each stage over ``mesh`` (a ``DeviceMesh``) as it
            shards a whole model: experts over the data-parallel ranks of their shard, the rest
            over data x expert parallel. Each stage is an FSDP root: torch's schedule gathers
            and reduces it.
        input_dtype: dtype of the first stage's input (token ids: int64).
        device: where the stages compute (default: CPU, or the current CUDA device under NCCL).
        timeline: record each stage action and communication span here (see
            :mod:`moeflow.parallel.timeline`).

    Returns:
        :class:`Pipeline`.
    """
    if isinstance(mesh, DeviceMesh):
        if PIPELINE_DIM not in (mesh.mesh_dim_names or ()):
            raise ValueError(f"build_pipeline: `mesh` has dims {list(mesh.mesh_dim_names or ())}, none named "
                             f"{PIPELINE_DIM!r} (rank {dist.get_rank()})")
        pp_group = mesh[PIPELINE_DIM].get_group()
    elif fsdp is not None:
        raise ValueError(f"build_pipeline: `fsdp` needs `mesh` to be a DeviceMesh, got {type(mesh).__name__} "
                         f"(rank {dist.get_rank()})")
    else:
        pp_group = mesh
    cls_name, per_rank, _ = _schedule_entry(schedule)
    pp_size = dist.get_world_size(pp_group)
    pp_rank = dist.get_rank(pp_group)
    num_stages = pp_size * per_rank
    if overlap and cls_name != "ScheduleDualPipeV":
        raise ValueError(f"build_pipeline: overlap=True needs schedule='dualpipev' (the schedule with OVERLAP_F_B "
                         f"actions), got schedule={schedule!r}")
    if checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"build_pipeline: `checkpoint` must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
    if cls_name == "ScheduleDualPipeV" and num_microbatches < num_stages:
        raise ValueError(f"build_pipeline: DualPipeV needs num_microbatches >= {num_stages} (2 x pipeline size), "
                         f"got {num_microbatches}")
    if cls_name == "ScheduleInterleaved1F1B" and num_microbatches % pp_size:
        raise ValueError(f"build_pipeline: interleaved 1F1B needs num_microbatches divisible by the pipeline size "
                         f"{pp_size}, got {num_microbatches}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(pp_group) == "nccl" \
            else torch.device("cpu")
    ranges = split_layers(len(parts.layers), num_stages)
    ids = stage_indices(schedule, pp_rank, pp_size)
    B, Q, H, V = microbatch_size, seq_len, parts.hidden, parts.output_size
    # Zero-bubble schedules (ZBV, DualPipeV) split a backward into its input part and, later, its
    # weight part. Under activation checkpointing each part would recompute the layer (forward,
    # dispatch and combine again), and selective checkpointing allows one backward per region
    # only; so there the input step runs the whole backward and the weight step has nothing left.
    dw_builder = (lambda: _nothing) if checkpoint else None
    modules, stages = [], []
    for s in ids:
        first, last = s == 0, s == num_stages - 1
        module = StageModule(parts.embed if first else None, [parts.layers[i] for i in ranges[s]],
                             parts.head if last else None, checkpoint)
        modules.append(module)
        inp = (torch.empty(B, Q, dtype=input_dtype, device="meta") if first
               else torch.empty(B, Q, H, dtype=parts.dtype, device="meta", requires_grad=True))
        out = torch.empty(B, Q, V if last else H, dtype=parts.dtype, device="meta", requires_grad=True)
        if fsdp is not None:
            from .fsdp import parallelize  # imported here: FSDP takes seconds to import

            parallelize(module, mesh, **fsdp)
        stage = TimedStage(module, s, num_stages, device, input_args=inp, output_args=out, group=pp_group,
                           dw_builder=dw_builder)
        stage.timeline = timeline
        stages.append(stage)
    cls = getattr(torch.distributed.pipelining, cls_name)
    sched = cls(stages if per_rank > 1 else stages[0], num_microbatches, loss_fn=loss_fn)
    if overlap:
        enable_overlap(sched)
    return Pipeline(sched, stages, modules, ids, num_stages, timeline, overlap)
