"""Elastic expert parallelism (issue 13): any expert count on any rank count with slots,
re-planning when GPUs leave or join, and (fault tests) training that survives a lost rank in the
same processes, restores experts without a replica from a checkpoint, and takes a rank back."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from moeflow import spawn
from moeflow.balance import Placement, plan, replan_after_join, replan_after_loss, single_copy_experts
from moeflow.balance.replicas import default_phy2log
from moeflow.layer import MoELayer

from test_layer import D, E, FF, K, _global_weights, _inputs, _reference

TOL = dict(rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ any expert count, any rank count
def _rank_uneven(num_slots):
    rank, R = dist.get_rank(), dist.get_world_size()
    out = dict(rank=rank)
    with pytest.raises(ValueError, match=rf"`num_experts` \({E}\) must divide by the group size {R} \(rank "
                                         rf"{rank}\), or give `num_slots` >= {E} divisible by {R}"):
        MoELayer(D, FF, E, K, num_shared_experts=2)
    gate, w1, w2, w3, shared = _global_weights()
    layer = MoELayer(D, FF, E, K, num_shared_experts=2, num_slots=num_slots)
    layer.load_global_weights(gate, w1, w2, w3, shared)
    out["phy2log"] = layer.slots.phy2log.clone()
    x = _inputs(rank).requires_grad_()
    y = layer(x)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    out.update(x=x.detach(), y=y.detach(), gx=x.grad,
               grads=[g.clone() for g in (layer.experts.w1.grad, layer.experts.w2.grad, layer.experts.w3.grad)])
    # a placement planned for these slots (skewed load: replicas move) routes the same
    placement = plan(torch.arange(1.0, E + 1), num_slots, 1, 1, R)
    out["moves"] = layer.slots.apply_placement(placement)
    with torch.no_grad():
        out["y_moved"] = layer(x.detach())
    return out


@pytest.mark.parametrize("world_size,num_slots", [(3, 9), (3, 12)])
def test_any_expert_count_on_any_rank_count(world_size, num_slots):
    """8 experts on 3 ranks as 9 (or 12) slots: the dense reference's outputs and gradients."""
    outs = spawn(_rank_uneven, world_size, num_slots, timeout_s=120)
    ref, _, g_w1, g_w2, g_w3, _ = _reference([o["x"] for o in outs], "softmax")
    phy = outs[0]["phy2log"]
    assert phy.tolist() == default_phy2log(E, num_slots).tolist() and phy.numel() == num_slots
    for o in outs:
        r = o["rank"]
        torch.testing.assert_close(o["y"], ref[r][1], **TOL, msg=f"rank {r} output")
        torch.testing.assert_close(o["gx"], ref[r][0], **TOL, msg=f"rank {r} grad x")
        torch.testing.assert_close(o["y_moved"], o["y"], **TOL, msg=f"rank {r} after apply_placement")
    assert outs[0]["moves"] > 0
    # each replica's gradient holds its own tokens' share: summed per expert, the reference's
    for j, g_ref in enumerate((g_w1, g_w2, g_w3)):
        raw = torch.cat([o["grads"][j] for o in outs])              # [S, ...] slot by slot
        torch.testing.assert_close(torch.zeros_like(g_ref).index_add_(0, phy, raw), g_ref, **TOL)


def test_replan_for_uneven_counts_and_joins():
    # 8 experts on 4 GPUs without spares: 3 survivors need 3 slots each; the lost experts get them
    prev = Placement.from_phy2log(default_phy2log(E, E)[None], E, 4)
    with pytest.raises(ValueError, match=re.escape("3 surviving GPUs x 2 slots = 6 slots cannot hold the 8")):
        replan_after_loss(prev, [2])
    rec = replan_after_loss(prev, [2], num_slots_per_gpu=3)
    new = rec.placement.phy2log[0]
    assert (rec.placement.num_gpus, rec.placement.num_replicas) == (3, 9)
    assert rec.orphaned[0].nonzero().flatten().tolist() == [4, 5]
    assert sorted(set(new.tolist())) == list(range(E))
    for gpu, old in zip(range(3), ([0, 1], [2, 3], [6, 7])):  # every survivor keeps its experts in place
        assert new[3 * gpu:3 * gpu + 2].tolist() == old
    assert rec.placement.moves == 3
    # a spare replica of every expert (16 slots on 4): any one loss orphans nothing
    prev = Placement.from_phy2log(default_phy2log(E, 2 * E)[None], E, 4)
    assert single_copy_experts(prev) == [[]]
    for lost in range(4):
        rec = replan_after_loss(prev, [lost])
        assert not rec.orphaned.any() and rec.placement.num_replicas == 12
    assert single_copy_experts(rec.placement) != [[]]  # 12 slots: a second loss may need a checkpoint
    # a GPU joins: the old GPUs keep every slot, the new one takes copies, balance is even again
    joined = replan_after_join(rec.placement, 1)
    assert (joined.num_gpus, joined.num_replicas) == (4, 16)
    assert joined.phy2log[0, :12].tolist() == rec.placement.phy2log[0].tolist()
    assert joined.moves == 4 and joined.logcnt[0].tolist() == [2] * E
    with pytest.raises(ValueError, match="num_new_gpus must be an int >= 1, got 0"):
        replan_after_join(prev, 0)
