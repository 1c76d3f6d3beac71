"""Differentiable dispatch and combine: gradients of x and topk_weights against a one-process reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import moeflow.autograd as ag
from moeflow import Buffer, spawn

H, K = 16, 3


def _rank_grads(E, dtype, async_finish=False):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(50 + rank)
    N = 6 + 3 * rank
    x = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    idx[torch.rand(N, K, generator=g) < 0.2] = -1
    w = torch.rand(N, K, generator=g).requires_grad_()
    G = torch.randn(N, H, generator=g)
    buffer = Buffer()
    out = ag.dispatch(buffer, x, idx, w, E, async_finish=async_finish)
    if async_finish:
        assert isinstance(out, ag.Pending)
        out = out.wait()
    # "experts": a row-wise function that uses both the token and its local weights
    rows = out.recv_x * (1.0 + out.recv_topk_weights.sum(1, keepdim=True)).to(dtype)
    combined = ag.combine(buffer, rows, out.handle, async_finish=async_finish)
    if async_finish:
        combined = combined.wait()
    (combined.float() * G).sum().backward()
    return x.detach(), idx, w.detach(), G, x.grad, w.grad, combined.detach()


def _reference(results, E):
    R = len(results)
    L = E // R
    losses = []
    grads = []
    for x, idx, w, G, *_ in results:
        x = x.float().clone().requires_grad_()
        w = w.clone().requires_grad_()
        rows = []
        for t in range(x.size(0)):
            acc = torch.zeros(H)
            for d in range(R):
                mine = [(k, int(e)) for k, e in enumerate(idx[t]) if e >= 0 and int(e) // L == d]
                if mine:
                    acc = acc + x[t] * (1.0 + sum(w[t, k] for k, _ in mine))
            rows.append(acc)
        combined = torch.stack(rows)
        losses.append((combined * G).sum())
        grads.append((x, w, combined))
    torch.stack(losses).sum().backward()
    return [(x.grad, w.grad, c.detach()) for x, w, c in grads]


@pytest.mark.parametrize("world_size,E,async_finish", [(1, 4, False), (2, 8, False), (3, 6, False), (4, 8, False),
                                                      (3, 6, True)])
def test_gradients_match_reference(world_size, E, async_finish):
    """Sync, and in flight (``Pending.wait()``, what MoELayer runs): the same gradients."""
    results = spawn(_rank_grads, world_size, E, torch.float32, async_finish, timeout_s=120)
    ref = _reference(results, E)
    for rank, (got, exp) in enumerate(zip(results, ref)):
        torch.testing.assert_close(got[6], exp[2], rtol=1e-5, atol=1e-5, msg=f"rank {rank} forward")
        torch.testing.assert_close(got[4], exp[0], rtol=1e-5, atol=1e-5, msg=f"rank {rank} grad x")
        torch.testing.assert_close(got[5], exp[1], rtol=1e-5, atol=1e-5, msg=f"rank {rank} grad topk_weights")
        # weights of -1 slots take no part, so their gradient is exactly 0
        assert torch.all(got[5][got[1] < 0] == 0)


def test_bf16_gradients_close_to_reference():
    results = spawn(_rank_grads, 2, 8, torch.bfloat16, timeout_s=120)
    ref = _reference(results, 8)
    for got, exp in zip(results, ref):
        assert got[4].dtype == torch.bfloat16
        torch.testing.assert_close(got[4].float(), exp[0], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got[5], exp[1], rtol=2e-2, atol=5e-2)
