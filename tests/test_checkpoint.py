"""Placement under faults and expert-sharded checkpoints.

``balance.replan_after_loss`` gives the surviving GPUs a placement that keeps every logical expert
(or says why it cannot); ``moeflow.checkpoint`` saves MoELayer experts with DCP and loads them
into another number of ranks or another placement, with the same outputs.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import moeflow.checkpoint as checkpoint
from moeflow import spawn
from moeflow.balance import Placement, plan, replan_after_loss
from moeflow.layer import MoELayer

from _reference import random_layer_weights

D, FF, E, K, T = 32, 16, 8, 2, 24


# --------------------------------------------------------------------------- re-planning

def _slots_by_gpu(p: Placement, layer: int):
    S = p.num_replicas_per_gpu
    return [p.phy2log[layer, g * S:(g + 1) * S].tolist() for g in range(p.num_gpus)]


@pytest.mark.parametrize("num_nodes,lost", [(1, [2, 5]), (2, [1, 6]), (2, [0, 1])])
def test_replan_keeps_every_expert_on_the_survivors(num_nodes, lost):
    loads = torch.rand(3, 16, generator=torch.Generator().manual_seed(0)) * 100
    prev = plan(loads, 24, 4, num_nodes, 8)  # 8 GPUs x 3 slots, 16 experts
    rec = replan_after_loss(prev, lost, loads, num_groups=4)
    new = rec.placement
    assert rec.survivors == [g for g in range(8) if g not in lost]
    assert (new.num_gpus, new.num_replicas) == (8 - len(lost), 3 * (8 - len(lost)))
    # the node structure is kept only when every node keeps as many GPUs
    assert new.num_nodes == (num_nodes if lost != [0, 1] else 1)
    assert (new.logcnt >= 1).all(), "a logical expert lost its last replica"
    for layer in range(3):
        for slots in _slots_by_gpu(new, layer):
            assert len(set(slots)) == len(slots), "two replicas of one expert on one GPU"
        old = _slots_by_gpu(prev, layer)
        had = {e for g in rec.survivors for e in old[g]}
        assert rec.orphaned[layer].tolist() == [e not in had for e in range(16)]
        # replicas on survivors stay where they were unless balance needs the slot
        kept = sum(len(set(old[g]) & set(slots)) for g, slots in zip(rec.survivors, _slots_by_gpu(new, layer)))
        assert kept >= 0.5 * 3 * len(rec.survivors), (layer, kept)


def test_replan_errors_name_the_problem():
    prev = plan(torch.ones(16), 24, 1, 1, 8)
    with pytest.raises(ValueError, match=re.escape("3 surviving GPUs x 3 slots = 9 slots cannot hold the 16 "
                                                   "logical experts (lost_gpus=[0, 1, 2, 3, 4]); at least 6 GPUs")):
        replan_after_loss(prev, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"lost_gpus must be GPU ids in \[0, 8\), got \[8\]"):
        replan_after_loss(prev, [8])
    with pytest.raises(ValueError, match=r"leaves no GPU of 8"):
        replan_after_loss(prev, range(8))
    with pytest.raises(TypeError, match=r"lost_gpus must be a collection of GPU ids, got 3"):
        replan_after_loss(prev, 3)
    with pytest.raises(TypeError, match=r"previous must be a Placement, got list"):
        replan_after_loss([0, 1], [0])


# --------------------------------------------------------------------------- checkpoints

def _global_weights():
    return random_layer_weights(E, D, FF)


def _tokens():
    return torch.randn(T, D, generator=torch.Generator().manual_seed(5))


def _my_tokens():
    rank, R = dist.get_rank(), dist.get_world_size()
    return _tokens()[rank * T // R:(rank + 1) * T // R]


def _layer(num_replicas=None):
    torch.manual_seed(100 + dist.get_rank())  # random weights, different on every rank: must be overwritten
    return MoELayer(D, FF, E, K, num_shared_experts=1, num_slots=num_replicas)


def _save(path, num_replicas):
    layer = _layer(num_replicas)
    layer.load_global_weights(*_global_weights())
    model = torch.nn.ModuleDict({"block": layer})
    checkpoint.save(model, path)
    return layer(_my_tokens()).detach()


def _load(path, num_replicas, replan_lost):
    layer = _layer(num_replicas)
    model = torch.nn.ModuleDict({"block": layer})
    before = layer(_my_tokens()).detach()
    placements = None
    if replan_lost is not None:
        # a placement planned for these ranks after losing others of a larger run
        R = dist.get_world_size()
        prev = plan(torch.arange(1.0, E + 1), num_replicas * (R + len(replan_lost)) // R, 1, 1, R + len(replan_lost))
        new = replan_after_loss(prev, replan_lost, torch.arange(1.0, E + 1)).placement
        assert new.num_replicas == num_replicas
        placements = {"block": new.phy2log[0]}
    checkpoint.load(model, path, placements=placements)
    if placements is not None:
        assert torch.equal(layer.slots.phy2log, placements["block"])
    return before, layer(_my_tokens()).detach(), layer.slots.phy2log.clone()


def _check(ys, out):
    y_saved = torch.cat(ys)
    y_before = torch.cat([o[0] for o in out])
    y_loaded = torch.cat([o[1] for o in out])
    assert not torch.allclose(y_before, y_saved, atol=1e-3), "the fresh layer already matched: the test proves nothing"
    torch.testing.assert_close(y_loaded, y_saved, rtol=1e-5, atol=1e-6)


def test_checkpoint_saved_on_4_ranks_loads_on_2(tmp_path):
    path = str(tmp_path / "ckpt")
    _check(spawn(_save, 4, path, None, timeout_s=120), spawn(_load, 2, path, None, None, timeout_s=120))


def test_checkpoint_with_replicas_loads_on_4_ranks_and_into_a_replanned_placement(tmp_path):
    path = str(tmp_path / "ckpt")
    ys = spawn(_save, 2, path, 12, timeout_s=120)  # 2 ranks x 6 slots: 4 experts have 2 replicas
    _check(ys, spawn(_load, 4, path, None, None, timeout_s=120))
    # a 3-rank run with 4 slots per rank lost rank 1: the 2 survivors take the re-planned placement
    out = spawn(_load, 2, path, 8, [1], timeout_s=120)
    _check(ys, out)
    assert not torch.equal(out[0][2], torch.arange(E)), "the re-planned placement should differ from the default"


def _bad_load(path):
    layer = _layer()
    errors = []
    for model, placements in ((torch.nn.Linear(2, 2), None), (layer, {"nope": torch.arange(E)}),
                              (layer, {"": torch.arange(E - 1)})):
        try:
            checkpoint.load(model, path, placements=placements)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    return errors


def test_checkpoint_errors_name_the_argument(tmp_path):
    errors = spawn(_bad_load, 1, str(tmp_path / "none"))[0]
    assert re.search(r"`model` \(Linear\) holds no MoELayer", errors[0])
    assert re.search(r"`placements` names layer 'nope', but the model's MoELayers are \[''\]", errors[1])
    assert re.search(r"`placements\[''\]` must be a \[8\] tensor", errors[2])
