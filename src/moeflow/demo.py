"""``moeflow demo``: train a small DeepSeek-style MoE language model expert-parallel on local ranks.

The model reads bytes (vocabulary 256): embedding, ``num_layers`` blocks of RMSNorm -> causal
attention -> RMSNorm -> :class:`moeflow.MoELayer` (fine-grained routed experts split over the
ranks, one shared expert, sigmoid router with expert bias), and a tied output head (untied for a
pipeline, where the embedding and the head sit on different stages). The text is the Python
standard library's own source, which every Python installation carries: no download.

Parallelism: a ``(dp, ep)`` device mesh over the job's ranks (``moeflow.parallel.mesh``): the
routed experts are split over the ``ep`` ranks (tokens travel to them through dispatch /
combine), and :func:`moeflow.parallelize` applies FSDP2 to the rest over every rank and to the
experts over the ``dp`` ranks of their shard. Every rank trains on its own batches. Runs on the
ranks of any process group: local Gloo ranks from ``moeflow demo``, or torchrun's (NCCL on GPUs).
``moeflow demo --pp`` (:mod:`moeflow.demo_pipeline`) trains the same model pipeline-parallel on a
``(pp, dp, ep)`` mesh with the mesh, data, optimizer and FSDP2 setting defined here.

Shape letters: B batch, S sequence, D model width, V vocabulary (256).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .comm.health import resolve_timeout
from .comm.transport import ProcessGroupTransport
from .experts import SwiGLU
from .layer import MoELayer
from .parallel.fsdp import parallelize

__all__ = ["DemoConfig", "TinyMoELM", "DEMO_FSDP", "make_mesh", "build", "load_corpus", "load_data", "sample_batch",
           "make_optimizer", "learning_rate", "count_params", "write_report", "train"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    steps: int = 300
    batch_size: int = 8            # sequences per rank per step
    seq_len: int = 128
    dim: int = 128
    num_layers: int = 3
    num_dense_layers: int = 1      # first blocks use a dense FFN, as DeepSeek-V3's first three
    num_heads: int = 4
    num_experts: int = 16          # routed experts in the whole group
    num_topk: int = 2
    ffn_hidden: int = 128          # per routed expert (fine-grained: small)
    num_shared_experts: int = 1
    bias_update_rate: float = 3e-2  # aux-loss-free balancing (DeepSeek-V3 uses 1e-3 over far more steps); 0 = off
    aux_loss_coeff: float = 1e-2   # sequence-wise aux loss (DeepSeek-V3 uses 1e-4 at scale)
    bias_decay: bool = True        # the bias rate follows the learning-rate schedule down to 0
    num_slots: Optional[int] = None  # physical expert slots (None = num_experts: no redundancy)
    dp: int = 1                    # data-parallel size of the mesh; ep = ranks / dp
    tie_embeddings: bool = True    # the head reuses the embedding; a pipeline unties it (as DeepSeek-V3)
    rebalance_every: int = 0       # re-plan and migrate experts every N steps (0 = never)
    lr: float = 3e-3
    gate_lr_scale: float = 0.1
    eval_every: int = 50
    eval_batches: int = 4
    corpus_bytes: int = 4_000_000
    seed: int = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Attention then an FFN: an expert-parallel MoE layer, or (``dense``) one SwiGLU.

    A dense first block matters here beyond following DeepSeek-V3: its input is little more
    than the byte itself, so every copy of a frequent byte (the space is ~30% of Python source)
    would pick the same experts, an imbalance no bias can split.
    """

    def __init__(self, cfg: DemoConfig, group, dense: bool):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.num_heads)
        if dense:
            self.moe = None
            self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden * (cfg.num_topk + cfg.num_shared_experts))
        else:
            self.moe = MoELayer(cfg.dim, cfg.ffn_hidden, cfg.num_experts, cfg.num_topk, cfg.num_shared_experts,
                                group, score_func="sigmoid", bias_update_rate=cfg.bias_update_rate,
                                seq_aux_loss_coeff=cfg.aux_loss_coeff, num_slots=cfg.num_slots)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + (self.moe(self.norm2(x)) if self.moe is not None else self.ffn(self.norm2(x)))


class TinyMoELM(nn.Module):
    def __init__(self, cfg: DemoConfig, group=None):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.dim))
        self.embed = nn.Embedding(256, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, group, dense=i < cfg.num_dense_layers)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.head = None
        if not cfg.tie_embeddings:
            self.head = nn.Linear(cfg.dim, 256, bias=False)
            with torch.no_grad():
                self.head.weight.copy_(self.embed.weight)  # starts as the tied model does

    def embed_tokens(self, idx_BS):
        return self.embed(idx_BS) + self.pos[:idx_BS.size(1)]

    def logits(self, x_BSD):
        x = self.norm(x_BSD)
        return x @ self.embed.weight.t() if self.head is None else self.head(x)  # [B, S, V]

    def forward(self, idx_BS):
        x = self.embed_tokens(idx_BS)
        for block in self.blocks:
            x = block(x)
        return self.logits(x)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def pipeline_parts(self):
        """The model as :class:`moeflow.parallel.pipeline.ModelParts` (needs ``tie_embeddings=False``:
        the embedding and the head live on different stages)."""
        from .parallel.pipeline import ModelParts

        if self.head is None:
            raise ValueError("TinyMoELM.pipeline_parts: build with DemoConfig(tie_embeddings=False) to pipeline "
                             "the model (the tied head would be on another stage than the embedding)")
        return ModelParts(embed=_Embedding(self), layers=tuple(self.blocks), head=_Logits(self),
                          hidden=self.embed.embedding_dim, output_size=256)


class _Embedding(nn.Module):
    """The model's input end as a module of its own (a pipeline's first stage holds it)."""

    def __init__(self, model: TinyMoELM):
        super().__init__()
        self.embed, self.pos = model.embed, model.pos

    forward = TinyMoELM.embed_tokens


class _Logits(nn.Module):
    """The model's output end (final norm and untied head) as a module of its own (last stage)."""

    def __init__(self, model: TinyMoELM):
        super().__init__()
        self.norm, self.head = model.norm, model.head

    forward = TinyMoELM.logits


def load_corpus(max_bytes: int) -> bytes:
    """The standard library's ``.py`` files, in a fixed order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 100_000:
        raise RuntimeError(f"moeflow demo: found only {total} bytes of Python source under {root}")
    return b"".join(out)[:max_bytes]


def _is_expert_param(name: str) -> bool:
    return ".moe.experts." in name


# A 2M-parameter model: one FSDP2 unit for every non-expert weight, kept gathered from forward
# to backward, is one all-gather and one reduce-scatter per step (an all-reduce's collectives);
# per-block units resharded after forward (parallelize's defaults, for models that need the
# memory) cost 1.3-1.5x the step here (benchmarks/bench_fsdp.py).
DEMO_FSDP = dict(blocks=[], reshard_after_forward=False)


def make_mesh(cfg: DemoConfig, pp: int = 1) -> tuple[DeviceMesh, torch.device]:
    """This job's ``(dp, ep)`` mesh, or ``(pp, dp, ep)`` for a pipeline (``pp > 1``), and its
    device (CUDA device ``LOCAL_RANK`` under NCCL, else the CPU). Every rank of the job calls it."""
    W = dist.get_world_size()
    if pp < 1 or cfg.dp < 1 or W % (pp * cfg.dp) or (cfg.num_slots or cfg.num_experts) % (W // (pp * cfg.dp)):
        raise ValueError(f"moeflow demo: pp={pp} x dp={cfg.dp} must divide the {W} ranks, and num_slots="
                         f"{cfg.num_slots} (or num_experts={cfg.num_experts}) the ep = ranks / (pp x dp) ranks "
                         f"(rank {dist.get_rank()})")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    shape, names = (cfg.dp, W // (pp * cfg.dp)), ("dp", "ep")
    if pp > 1:
        shape, names = (pp, *shape), ("pp", *names)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    _follow_moeflow_timeout(mesh)
    return mesh, device


def build(cfg: DemoConfig) -> tuple[TinyMoELM, torch.device]:
    """The model on this job's ``(dp, ep)`` mesh with FSDP2 applied, and its device."""
    mesh, device = make_mesh(cfg)
    torch.manual_seed(cfg.seed)  # the same global weights for any number of ranks (see MoELayer)
    with device:
        model = TinyMoELM(cfg, mesh)
    return parallelize(model, mesh, **DEMO_FSDP), device


def _follow_moeflow_timeout(mesh) -> None:
    """Give the mesh's process groups moeflow's timeout (``MOEFLOW_TIMEOUT_S``). It bounds
    FSDP2's waits, and so how long a stopped peer can hold the loop's guards; torch makes
    sub-groups with its own default (30 minutes; 10 on NCCL, whose watchdog then ends the
    process instead of raising), and a launcher's world group may have any."""
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # private, since torch 2.3
    if set_timeout is None:
        return
    timeout = datetime.timedelta(seconds=resolve_timeout(None))
    for group in mesh.get_all_groups():
        if dist.get_world_size(group) > 1:
            set_timeout(timeout, group)


def load_data(cfg: DemoConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(train bytes, validation bytes, the unigram model's validation loss)``: 90% / 10% of the corpus."""
    corpus = torch.frombuffer(bytearray(load_corpus(cfg.corpus_bytes)), dtype=torch.uint8).long()
    split = int(len(corpus) * 0.9)
    train_data, val_data = corpus[:split], corpus[split:]
    unigram = torch.bincount(train_data, minlength=256).float() + 1
    unigram_loss = float(-(unigram / unigram.sum()).log().mul(
        torch.bincount(val_data, minlength=256).float() / len(val_data)).sum())
    return train_data, val_data, unigram_loss


def sample_batch(data: torch.Tensor, cfg: DemoConfig, g: torch.Generator,
                 device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.batch_size`` random windows of ``data``: inputs ``[B, S]`` and next-byte targets ``[B, S]``."""
    starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    chunk = torch.stack([data[s:s + cfg.seq_len + 1] for s in starts.tolist()]).to(device)
    return chunk[:, :-1], chunk[:, 1:]


def make_optimizer(named_params, cfg: DemoConfig) -> torch.optim.Optimizer:
    """AdamW; each group's ``lr_scale`` multiplies :func:`learning_rate`."""
    named = list(named_params)
    gates = [p for n, p in named if n.endswith("router.gate.weight")]
    rest = [p for n, p in named if not n.endswith("router.gate.weight")]
    # The gates learn 10x slower: with Adam at the full rate their logits outrun the expert
    # bias (a fixed step per update) and the routing collapses onto a few experts early on.
    # fused: one kernel per parameter group; the per-tensor loop's every op goes through
    # DTensor's Python dispatch under FSDP2 and took 6x as long (benchmarks/bench_fsdp.py)
    return torch.optim.AdamW([dict(params=rest, lr_scale=1.0), dict(params=gates, lr_scale=cfg.gate_lr_scale)],
                             lr=cfg.lr, weight_decay=0.0, fused=True)


def learning_rate(cfg: DemoConfig, step: int) -> float:
    """Linear warm-up over 20 steps, then cosine down to 0 at ``cfg.steps``."""
    return cfg.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


def train(cfg: DemoConfig, out_dir: Optional[str] = None, show_progress: bool = True) -> dict:
    """Run on every rank (inside an initialised process group); returns the report on every rank.

    Every collective is watched: moeflow's own (dispatch, combine, the routers' load sums,
    migration) by their transports, the loop's all-reduces through ``loop``, and FSDP2's inside
    ``loop.guard(...)``: a lost rank is a ``PeerFailureError`` naming it on the others within
    ``MOEFLOW_TIMEOUT_S`` (the process groups' timeout too, which bounds FSDP2's waits).
    """
    rank, W = dist.get_rank(), dist.get_world_size()
    model, device = build(cfg)
    loop = ProcessGroupTransport(None, name="training loop")
    train_data, val_data, unigram_loss = load_data(cfg)
    opt = make_optimizer(model.named_parameters(), cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # each rank its own batches

    def batch(data, g):
        return sample_batch(data, cfg, g, device)

    history = dict(step=[], loss=[], val_step=[], val_loss=[], tokens_per_s=[], expert_load=[],
                   expert_load_per_layer=[],
                   max_over_mean_expert=[], max_over_mean_expert_per_layer=[], max_over_mean_rank=[],
                   bytes_per_step=[], rebalance=[])
    bar = None
    if show_progress and rank == 0:
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, desc="training", dynamic_ncols=True)
        except ImportError:
            bar = None
    t_start = time.perf_counter()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for layer in model.moe_layers():
            layer.buffer.counters.reset()
        lr = learning_rate(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x, y = batch(train_data, gen)
        with loop.guard("forward"):  # FSDP2's all-gathers
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, 256), y.reshape(-1))
            aux = sum(layer.last_router_output.loss for layer in model.moe_layers())  # balance losses
        opt.zero_grad(set_to_none=True)
        with loop.guard("backward"):  # FSDP2's reduce-scatters
            (loss + aux).backward()  # FSDP2 averages the gradients over the ranks (see parallelize)
        with loop.guard("optimizer"):  # on DTensors
            for layer in model.moe_layers():
                layer.slots.sync_replica_grads()  # replicas of one expert take one step (no-op without replicas)
            opt.step()
        for layer in model.moe_layers():
            # DeepSeek-V3 stops the bias updates for its last tokens; decaying the rate with the
            # learning rate lets the bias settle instead of flipping by a fixed step every update
            layer.router.bias_update_rate = cfg.bias_update_rate * (lr / cfg.lr if cfg.bias_decay else 1.0)
        loads = [layer.router.update_bias() for layer in model.moe_layers()]  # also the load averages
        load = torch.stack(loads).float()  # [layers, E], global counts this step
        # [layers, R]: pairs each rank's expert slots computed (replicas share their expert's load)
        per_rank = torch.stack([layer.slots.rank_load(l) for layer, l in zip(model.moe_layers(), loads)])
        loss_avg = loop.all_reduce(loss.detach().reshape(1), kind="loss")  # for the report only
        dt = time.perf_counter() - t0
        tokens = cfg.batch_size * cfg.seq_len * W
        sent = sum(layer.buffer.counters.wire_bytes() for layer in model.moe_layers())
        history["step"].append(step)
        history["loss"].append(loss_avg.item() / W)
        history["tokens_per_s"].append(tokens / dt)
        history["expert_load"].append(load.sum(0).tolist())
        history["expert_load_per_layer"].append(load.tolist())
        per_layer = load.max(1).values / load.mean(1).clamp(min=1e-9)
        history["max_over_mean_expert"].append(float(per_layer.mean()))
        history["max_over_mean_expert_per_layer"].append(per_layer.tolist())
        history["max_over_mean_rank"].append(float((per_rank.max(1).values / per_rank.mean(1)).mean()))
        history["bytes_per_step"].append(sent)
        if cfg.rebalance_every and (step + 1) % cfg.rebalance_every == 0 and step + 1 < cfg.steps:
            predicted, moves = [], 0
            for layer in model.moe_layers():
                moves += layer.slots.apply_placement(layer.slots.plan_placement(), optimizer=opt)
                rank_load = layer.slots.rank_load()  # the plan's prediction from the load average
                predicted.append(float(rank_load.max() / rank_load.mean()))
            history["rebalance"].append(dict(step=step, moves=moves,
                                             predicted_max_over_mean_rank=sum(predicted) / len(predicted)))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history["val_step"].append(step)
            history["val_loss"].append(_evaluate(model, val_data, cfg, batch, device, loop))
        if bar is not None:
            # expert_load: this step's max/mean over experts (the report's "over experts per step")
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", tok_s=f"{tokens / dt:,.0f}",
                            expert_load=f"{history['max_over_mean_expert'][-1]:.2f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    tail = max(1, cfg.steps // 10)
    report = dict(
        config=asdict(cfg), ranks=W, rank=rank, seconds=time.perf_counter() - t_start,
        unigram_val_loss=unigram_loss, final_val_loss=history["val_loss"][-1],
        final_train_loss=sum(history["loss"][-tail:]) / tail,
        tokens_per_s=sum(history["tokens_per_s"][-tail:]) / tail,
        max_over_mean_expert_last=sum(history["max_over_mean_expert"][-tail:]) / tail,
        max_over_mean_rank_last=sum(history["max_over_mean_rank"][-tail:]) / tail,
        # the same over the load summed across the last 10% of steps: what the bias can balance,
        # without one batch's sampling noise (a step routes only B * S * R tokens)
        max_over_mean_expert_window=_max_over_mean(torch.tensor(history["expert_load_per_layer"][-tail:]).sum(0)),
        bytes_per_step=sum(history["bytes_per_step"][-tail:]) / tail,
        rebalance=_rebalance_effect(history, cfg.rebalance_every),
        num_params=count_params(model, cfg),
        history=history,
    )
    if rank == 0 and out_dir:
        write_report(report, out_dir)
    return report


def _rebalance_effect(history: dict, every: int) -> list[dict]:
    """Per rebalance: the per-rank max/mean averaged over the ``every`` steps before it and the
    ``every`` steps after it (the steps after include the model's own drift)."""
    per_step = history["max_over_mean_rank"]
    out = []
    for event in history["rebalance"]:
        s = event["step"]
        before, after = per_step[max(0, s + 1 - every):s + 1], per_step[s + 1:s + 1 + every]
        out.append(dict(event, max_over_mean_rank_before=sum(before) / len(before),
                        max_over_mean_rank_after=sum(after) / max(1, len(after))))
    return out


def _max_over_mean(load_LE: torch.Tensor) -> float:
    """Busiest expert over the mean, per layer, averaged over layers."""
    return float((load_LE.max(-1).values / load_LE.mean(-1).clamp(min=1e-9)).mean())


@torch.no_grad()
def _evaluate(model, val_data, cfg, batch, device, loop: Optional[ProcessGroupTransport]) -> float:
    """Mean validation loss over the ranks; ``loop`` watches its collectives (None: the caller
    runs it inside a guard of its own, as the elastic demo does)."""
    g = torch.Generator().manual_seed(12345 + dist.get_rank())
    total = torch.zeros(1, device=device)
    model.eval()  # the routers must not count validation tokens into the expert-bias update
    with loop.guard("eval") if loop is not None else contextlib.nullcontext():  # FSDP2's all-gathers
        for _ in range(cfg.eval_batches):
            x, y = batch(val_data, g)
            total += F.cross_entropy(model(x).view(-1, 256), y.reshape(-1))
    model.train()
    if loop is not None:
        loop.all_reduce(total, kind="eval")  # mean over ranks, for the report
    else:
        dist.all_reduce(total)
    return total.item() / (cfg.eval_batches * dist.get_world_size())


def count_params(model: TinyMoELM, cfg: DemoConfig) -> int:
    """The model's logical parameters (a DTensor's numel is the global one; replica slots hold
    copies, counted once)."""
    return (sum(p.numel() for n, p in model.named_parameters() if not _is_expert_param(n))
            + len(model.moe_layers()) * cfg.num_experts * 3 * cfg.dim * cfg.ffn_hidden)


def write_report(report: dict, out_dir: str) -> None:
    """report.json (the PNG is drawn from it by :mod:`moeflow.demo_plot`)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
