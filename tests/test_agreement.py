"""Ranks that disagree on what must be the same everywhere: a ValueError on every rank naming the
ranks and their values, never an abort (Gloo's ``EnforceNotMet ... 96 vs 80``), a timeout blamed
on a slow transfer, or silently wrong results; and the group still works afterwards.

Checked once: the Buffer's options, an MoE layer's sizes and options, the weights at
``expert_parallelize``. On every fresh dispatch: hidden size, dtype, experts, top-k (the count
exchange) and that the layout counts belong to ``topk_idx``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from moeflow import Buffer, MoELayer, spawn

pytestmark = pytest.mark.faults

N, H, K = 12, 16, 2


def _dispatch(buffer: Buffer, E: int, seed: int = 0):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed * 10 + rank)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
    out = buffer.dispatch(torch.randn(N, H, generator=g), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                          num_tokens_per_expert=per_expert, topk_idx=idx)
    return out[3], idx, per_expert


def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _experts_differ():
    """num_experts 96 on rank 0, 80 on rank 1: on the first dispatch, after dispatches that agreed
    on 96, and with every rank moving to 80 together (which is fine)."""
    rank = dist.get_rank()
    buffer = Buffer(timeout_s=20)
    first = _error(lambda: _dispatch(buffer, 96 if rank == 0 else 80))
    counts, *_ = _dispatch(buffer, 96)  # the group still works
    later = _error(lambda: _dispatch(buffer, 96 if rank == 0 else 80))
    together, idx, _ = _dispatch(buffer, 80, seed=1)
    return first, later, len(counts), len(together), sum(together)


def test_ranks_with_different_num_experts_all_raise_and_go_on():
    out = spawn(_experts_differ, 2, timeout_s=120, collective_timeout_s=30)
    for rank, (first, later, L96, L80, pairs) in enumerate(out):
        for msg in (first, later):
            assert re.search(r"Buffer\.dispatch: ranks disagree on num_experts \(rank 0: 96, rank 1: 80\)", msg), msg
        assert (L96, L80) == (48, 40)
    # every pair of the 80-expert dispatch arrived where its expert lives: K pairs per token in all
    assert out[0][4] + out[1][4] == 2 * N * K


def _stale_layout():
    """Rank 0 passes the layout of its previous batch (same shape) with a new topk_idx."""
    rank = dist.get_rank()
    buffer = Buffer(timeout_s=20)
    _, _, old_per_expert = _dispatch(buffer, 8, seed=0)
    g = torch.Generator().manual_seed(99 + rank)
    idx = torch.stack([torch.randperm(8, generator=g)[:K] for _ in range(N)])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 8)
    stale = old_per_expert if rank == 0 else per_expert
    msg = _error(lambda: buffer.dispatch(torch.randn(N, H), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                         num_tokens_per_expert=stale, topk_idx=idx))
    assert not torch.equal(old_per_expert, per_expert) or rank == 1, "the two batches happen to count alike"
    _dispatch(buffer, 8, seed=2)  # the group still works
    return msg


def test_layout_counts_of_another_batch_are_refused_on_every_rank():
    out = spawn(_stale_layout, 2, timeout_s=120, collective_timeout_s=30)
    assert re.search(r"`num_tokens_per_expert` on rank 0 does not count `topk_idx`: expert \d+ has \d+ pairs in it, "
                     r"\d+ in topk_idx \(\d+ experts differ\)", out[0]), out[0]
    assert "rank(s) [0] passed invalid input" in out[1], out[1]


def _layer_differs(what: str):
    rank = dist.get_rank()
    kwargs = dict(num_chunks=2 if rank == 1 else 1) if what == "num_chunks" else {}
    E = 6 if what == "num_experts" and rank == 1 else 4
    msg = _error(lambda: MoELayer(H, 8, E, K, **kwargs))
    layer = MoELayer(H, 8, 4, K)  # the group still works
    layer(torch.randn(N, H)).sum().backward()
    return msg


@pytest.mark.parametrize("what,shown", [("num_chunks", "num_chunks (rank 0: 1, rank 1: 2)"),
                                        ("num_experts", "num_experts (rank 0: 4, rank 1: 6)")])
def test_moe_layers_built_differently_raise_at_construction(what, shown):
    """Before: a different chunk count waited 30 s and blamed a slow transfer."""
    for rank, msg in enumerate(spawn(_layer_differs, 2, what, timeout_s=120, collective_timeout_s=30)):
        assert msg.startswith(f"MoELayer: ranks disagree on {shown}"), msg
        assert f"(this is rank {rank})" in msg, msg


def _buffer_topology_differs():
    rank = dist.get_rank()
    msg = _error(lambda: Buffer(ranks_per_node=2 if rank < 2 else 4))
    _dispatch(Buffer(), 8)  # the group still works
    return msg


def test_buffers_with_different_options_raise_at_construction():
    for msg in spawn(_buffer_topology_differs, 4, timeout_s=120, collective_timeout_s=30):
        assert re.search(r"moeflow.Buffer: ranks disagree on ranks_per_node \(ranks 0, 1: 2; ranks 2, 3: 4\)", msg), msg


def _weights_differ():
    """The same random model on both ranks (seed 3), then one drawn from another seed on rank 1."""
    from moeflow.integrations.hf import expert_parallelize
    from moeflow.integrations.hf_random import random_model

    msgs = []
    for seeds in ([3, 3], [0, 1]):
        model = random_model("qwen3_moe", seed=seeds[dist.get_rank()], num_experts=4)
        msgs.append(_error(lambda: expert_parallelize(model)))
    return msgs


def test_expert_parallelize_refuses_ranks_with_different_weights():
    """Before: it ran, each rank's experts from its own model, and gave wrong logits."""
    pytest.importorskip("transformers")
    for rank, (same, different) in enumerate(spawn(_weights_differ, 2, timeout_s=180, collective_timeout_s=60)):
        assert same == "no error", same
        assert re.search(r"expert_parallelize: the ranks hold different weights in \d+ of \d+ tensors "
                         r"\(model\.embed_tokens\.weight; ", different), different
        assert re.search(r"model\.embed_tokens\.weight's hash: rank 0: 0x[0-9a-f]+, rank 1: 0x[0-9a-f]+ "
                         rf"\(this is rank {rank}\)", different), different
