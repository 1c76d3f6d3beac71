"""MoELayer composes with activation checkpointing and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import moeflow
from moeflow import spawn

from _train import build, global_params, train


class _Checkpointed(nn.Module):
    """A block whose activations are recomputed in backward (torch.utils.checkpoint)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def _ac_run(use_ac):
    def wrap(model):
        model.blocks = nn.ModuleList(_Checkpointed(b) for b in model.blocks)
    model, opt = build(2, 2, before_fsdp=wrap if use_ac else None)
    losses = train(model, opt, range(3))
    counted = [layer.router.expert_load() for layer in model.moe_layers()]  # a recompute must not count twice
    return dict(losses=losses, params=global_params(model), counted=counted)


def test_activation_checkpointing_changes_nothing():
    """FSDP2 on 2 dp x 2 ep with every block checkpointed: the same training as without (the
    recomputed dispatch and combine run on every rank in the same order; the router counts once)."""
    plain, ac = (spawn(_ac_run, 4, use_ac, timeout_s=180) for use_ac in (False, True))
    for a, b in zip(plain, ac):
        assert a["losses"] == b["losses"]
        assert all(torch.equal(x, y) for x, y in zip(a["counted"], b["counted"]))
        wrapped = {k.replace(".block.", ".") if isinstance(k, str) else k: v for k, v in b["params"].items()}
        assert wrapped.keys() == a["params"].keys()
        for key, value in a["params"].items():
            torch.testing.assert_close(wrapped[key], value, rtol=1e-6, atol=1e-7, msg=str(key))


def _checkpointed_chunks(num_chunks):
    """A chunked layer under checkpoint() against an unchunked one without, gradients each step.
    torch stops a recompute as soon as it has the tensors it saves (early stop), which cut the
    chunk pipeline with transfers in flight and hung the next one; "auto" must also recompute
    a trial forward with that trial's chunk count, not the next trial's."""
    from moeflow.chunking import CANDIDATES, TRIALS

    layers = []
    for chunks in (num_chunks, 1):
        torch.manual_seed(0)
        layers.append(moeflow.MoELayer(32, 16, 8, 2, num_chunks=chunks))
    x = torch.randn(1024, 32, generator=torch.Generator().manual_seed(dist.get_rank()))
    worst = 0.0
    for _ in range(len(CANDIDATES) * TRIALS + 2):  # "auto": every trial, the choice, one step after
        grads = []
        for layer, ac in zip(layers, (True, False)):
            xx = x.clone().requires_grad_()
            y = checkpoint(layer, xx, use_reentrant=False) if ac else layer(xx)
            layer.zero_grad()
            y.square().sum().backward()
            grads.append(torch.cat([xx.grad.flatten(), layer.experts.w1.grad.flatten()]))
        worst = max(worst, float((grads[0] - grads[1]).abs().max() / grads[1].abs().max()))
    return worst


@pytest.mark.parametrize("num_chunks", [2, "auto"])
def test_a_chunked_layer_recomputed_under_activation_checkpointing(num_chunks):
    for worst in spawn(_checkpointed_chunks, 2, num_chunks, timeout_s=120, collective_timeout_s=60):
        assert worst < 1e-5, worst


def _compiled():
    torch.manual_seed(0)
    layer = moeflow.MoELayer(16, 8, 4, 2, num_shared_experts=1, seq_aux_loss_coeff=0.1)
    # aot_eager: dynamo and AOT autograd without inductor's C++ build, to keep the test short
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    out = []
    for fn in (layer, compiled):
        xx = x.clone().requires_grad_()
        y = fn(xx)
        (y.square().sum() + layer.last_router_output.loss).backward()
        out.append([y.detach(), xx.grad, layer.router.gate.weight.grad.clone(), layer.experts.w1.grad.clone()])
        layer.zero_grad()
    return out, layer.router.num_tokens_per_expert_since_update.sum().item()


def test_torch_compile_runs_the_layer():
    for (eager, compiled), counted in spawn(_compiled, 2, timeout_s=300):
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert counted == 2 * 2 * 5 * 2  # two training forwards of 10 tokens x top-2
