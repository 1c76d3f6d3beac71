"""A tiny 2-layer MoE language model and its training loop, for the mesh, FSDP2 and checkpoint tests.

Every step trains on one global batch of ``GLOBAL_BATCH`` sequences; a run on W ranks gives each
rank ``GLOBAL_BATCH / W`` of them (in rank order), so runs on any number of ranks train on the
same data and, with the mean loss per rank averaged over ranks, have the same gradients.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import moeflow
from moeflow.demo import DemoConfig, TinyMoELM

CFG = DemoConfig(batch_size=1, seq_len=16, dim=32, num_layers=2, num_dense_layers=0, num_heads=2, num_experts=8,
                 num_topk=2, ffn_hidden=16, num_shared_experts=1, bias_update_rate=1e-2, aux_loss_coeff=1e-2)
GLOBAL_BATCH = 4


def build(dp: int, ep: int, num_slots=None, before_fsdp=None):
    """The model on a (dp, ep) mesh (one process: no mesh) with FSDP2, and its AdamW;
    ``before_fsdp(model)`` may change the model first (e.g. wrap its blocks)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, num_slots=num_slots)
    mesh = None if dist.get_world_size() == 1 else init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))
    model = TinyMoELM(cfg, mesh)
    if before_fsdp is not None:
        before_fsdp(model)
    if mesh is not None:
        moeflow.parallelize(model, mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)


def my_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step ``step``'s global batch: ``([B, S], [B, S])`` input and target bytes."""
    g = torch.Generator().manual_seed(1000 + step)
    # counting sequences from a random start (the next byte is the last one + 1): learnt in a few steps
    data = (torch.randint(0, 256, (GLOBAL_BATCH, 1), generator=g) + torch.arange(CFG.seq_len + 1)) % 256
    rank, W = dist.get_rank(), dist.get_world_size()
    mine = data[rank * GLOBAL_BATCH // W:(rank + 1) * GLOBAL_BATCH // W]
    return mine[:, :-1], mine[:, 1:]


def train(model, opt, steps: range) -> list[float]:
    """Train for ``steps``; returns the global mean loss of each step (the same on every rank)."""
    losses = []
    for step in steps:
        x, y = my_batch(step)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        aux = sum(layer.last_router_output.loss for layer in model.moe_layers())
        opt.zero_grad()
        (loss + aux).backward()
        for layer in model.moe_layers():
            layer.slots.sync_replica_grads()  # nothing without replicas
        opt.step()
        for layer in model.moe_layers():
            layer.router.update_bias()
        total = loss.detach().clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(total)  # for the record only
        losses.append(total.item() / dist.get_world_size())
    return losses


def global_params(model) -> dict:
    """Every parameter as the one-process model holds it: dense ones whole, routed experts by
    ``(layer, weight, logical expert)`` (this rank's slots only), and each layer's expert bias."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()  # DTensor: gathered
        if ".experts." not in name:
            out[name] = full.detach().clone()
    for i, layer in enumerate(model.moe_layers()):
        for w in ("w1", "w2", "w3"):
            p = getattr(layer.experts, w)
            full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            for row, e in enumerate(layer.slots.local_experts()):
                out[(i, w, e)] = full[row].detach().clone()
        out[(i, "expert_bias")] = layer.router.expert_bias.clone()
    return out


def assert_close_normwise(got: dict, want: dict, rtol: float, what: str) -> None:
    """Every tensor of ``got`` within ``rtol * max|want|`` of ``want`` (elementwise relative error
    is meaningless for entries near zero)."""
    for key, g in got.items():
        w = want[key]
        err = float((g - w).abs().max() / w.abs().max().clamp(min=1e-30))
        assert err <= rtol, f"{what}: {key} differs by {err:.2e} (relative to its largest entry)"


@torch.no_grad()
def eval_loss(model, step: int) -> float:
    """The global mean loss on step ``step``'s batch, in eval mode (nothing counted or trained)."""
    model.eval()
    x, y = my_batch(step)
    loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).reshape(1)
    model.train()
    if dist.get_world_size() > 1:
        dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()
