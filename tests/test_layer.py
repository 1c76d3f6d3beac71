"""MoELayer: same outputs and gradients as a dense one-process reference, on 1, 2 and 4 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeflow import spawn
from moeflow.layer import MoELayer

D, FF, E, K = 32, 16, 8, 2


def _global_weights():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(E, D, generator=g) * 0.3
    w1, w3 = (torch.randn(E, D, FF, generator=g) * 0.2 for _ in range(2))
    w2 = torch.randn(E, FF, D, generator=g) * 0.2
    shared = (torch.randn(D, 2 * FF, generator=g) * 0.2, torch.randn(2 * FF, D, generator=g) * 0.2,
              torch.randn(D, 2 * FF, generator=g) * 0.2)
    return gate, w1, w2, w3, shared


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 5 + rank, D, generator=g)


def _rank_fn(num_chunks, score_func, capacity_factor, wire_dtype):
    rank = dist.get_rank()
    gate, w1, w2, w3, shared = _global_weights()
    layer = MoELayer(D, FF, E, K, num_shared_experts=2, score_func=score_func, num_chunks=num_chunks,
                     capacity_factor=capacity_factor, wire_dtype=wire_dtype)
    layer.load_global_weights(gate, w1, w2, w3, shared)
    x = _inputs(rank).requires_grad_()
    y = layer(x)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    return dict(x=x.detach(), y=y.detach(), gx=x.grad, g_gate=layer.router.gate.weight.grad,
                g_w1=layer.experts.w1.grad, g_w2=layer.experts.w2.grad, g_w3=layer.experts.w3.grad,
                g_sw1=layer.shared.w1.grad)


def _reference(xs, score_func):
    """Every rank's tokens through the full, unsharded MoE in one process, as plain loops."""
    gate, w1, w2, w3, shared = (t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t
                                for t in _global_weights())
    shared = tuple(t.clone().requires_grad_() for t in shared)
    ys = []
    for x in xs:
        x = x.clone().requires_grad_()
        x_TD = x.reshape(-1, D)
        scores = (x_TD @ gate.t())
        scores = scores.softmax(-1) if score_func == "softmax" else scores.sigmoid()
        idx = scores.topk(K, dim=-1).indices
        w = scores.gather(1, idx)
        if score_func == "sigmoid":
            w = w / w.sum(-1, keepdim=True)
        rows = []
        for t in range(x_TD.size(0)):
            acc = (F.silu(x_TD[t] @ shared[0]) * (x_TD[t] @ shared[2])) @ shared[1]
            for k in range(K):
                e = int(idx[t, k])
                acc = acc + w[t, k] * ((F.silu(x_TD[t] @ w1[e]) * (x_TD[t] @ w3[e])) @ w2[e])
            rows.append(acc)
        y = torch.stack(rows).view_as(x)
        ys.append((x, y))
    loss = sum((y * torch.arange(y.numel()).view_as(y).sin()).sum() for _, y in ys)
    loss.backward()
    return [(x.grad, y.detach()) for x, y in ys], gate.grad, w1.grad, w2.grad, w3.grad, shared[0].grad


@pytest.mark.parametrize("world_size,num_chunks,score_func", [
    (1, 1, "softmax"), (2, 1, "sigmoid"), (2, 3, "softmax"), (4, 2, "sigmoid"), (4, "auto", "softmax"),
])
def test_layer_matches_dense_reference(world_size, num_chunks, score_func):
    out = spawn(_rank_fn, world_size, num_chunks, score_func, None, None, timeout_s=120)
    ref, g_gate, g_w1, g_w2, g_w3, g_sw1 = _reference([o["x"] for o in out], score_func)
    L = E // world_size
    tol = dict(rtol=1e-4, atol=1e-5)
    for rank, o in enumerate(out):
        torch.testing.assert_close(o["y"], ref[rank][1], **tol, msg=f"rank {rank} output")
        torch.testing.assert_close(o["gx"], ref[rank][0], **tol, msg=f"rank {rank} grad x")
        sl = slice(rank * L, (rank + 1) * L)
        torch.testing.assert_close(o["g_w1"], g_w1[sl], **tol, msg=f"rank {rank} grad w1")
        torch.testing.assert_close(o["g_w2"], g_w2[sl], **tol, msg=f"rank {rank} grad w2")
        torch.testing.assert_close(o["g_w3"], g_w3[sl], **tol, msg=f"rank {rank} grad w3")
    # dense weights: data parallel would sum the ranks' gradients
    torch.testing.assert_close(sum(o["g_gate"] for o in out), g_gate, **tol)
    torch.testing.assert_close(sum(o["g_sw1"] for o in out), g_sw1, **tol)


def test_bf16_wire_close_to_fp32():
    exact = spawn(_rank_fn, 2, 2, "softmax", None, None, timeout_s=120)
    wire = spawn(_rank_fn, 2, 2, "softmax", None, torch.bfloat16, timeout_s=120)
    for a, b in zip(exact, wire):
        torch.testing.assert_close(b["y"], a["y"], rtol=3e-2, atol=3e-2)


def test_capacity_factor_drops_pairs_past_capacity():
    dropless = spawn(_rank_fn, 2, 1, "softmax", None, None, timeout_s=120)
    dropped = spawn(_rank_fn, 2, 1, "softmax", 0.5, None, timeout_s=120)
    # with half the average load as capacity some pairs must go, so outputs change
    assert any(not torch.allclose(a["y"], b["y"]) for a, b in zip(dropless, dropped))


def test_capacity_keeps_earliest_pairs():
    layer = MoELayer.__new__(MoELayer)
    layer.capacity_factor, layer.num_experts = 1.0, 4
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])  # T=4, K=2 -> capacity 2 per expert
    w = torch.ones(4, 2)
    new_idx, new_w = MoELayer._drop_over_capacity(layer, idx, w)
    assert new_idx.tolist() == [[0, 1], [0, 2], [-1, 3], [-1, 1]]
    assert new_w.tolist() == [[1, 1], [1, 1], [0, 1], [0, 1]]


def _initial_weights(num_slots):
    torch.manual_seed(7)
    layer = MoELayer(D, FF, E, K, num_shared_experts=1, num_slots=num_slots)
    return dict(experts=layer.slots.local_experts(), gate=layer.router.gate.weight.detach(),
                shared=layer.shared.w1.detach(), w=[getattr(layer.experts, n).detach() for n in ("w1", "w2", "w3")])


def test_initial_weights_depend_on_the_expert_not_the_layout():
    """Expert e starts with the same weights (bitwise) on 1, 2 and 4 ranks and in every replica;
    distinct experts differ; the dense weights are the same everywhere."""
    by_expert: dict[int, list] = {}
    dense = []
    for world_size, num_slots in ((1, None), (2, None), (4, None), (2, E + 2)):
        for o in spawn(_initial_weights, world_size, num_slots, timeout_s=60):
            dense.append((o["gate"], o["shared"]))
            for row, e in enumerate(o["experts"]):
                by_expert.setdefault(e, []).append([w[row] for w in o["w"]])
    assert sorted(by_expert) == list(range(E))
    for e, copies in by_expert.items():
        assert len(copies) >= 4
        for copy in copies[1:]:
            assert all(torch.equal(a, b) for a, b in zip(copies[0], copy)), f"expert {e}"
    assert all(not torch.equal(by_expert[0][0][0], by_expert[e][0][0]) for e in range(1, E))
    assert all(torch.equal(g, dense[0][0]) and torch.equal(s, dense[0][1]) for g, s in dense)
