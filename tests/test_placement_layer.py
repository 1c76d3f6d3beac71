"""Expert placement in MoELayer: replicas give the single-replica layer's outputs, apply_placement
moves weights and optimizer state without changing outputs, replicas stay equal under
sync_replica_grads, load statistics, rebalancing, and input errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from moeflow import spawn
from moeflow.balance import Placement
from moeflow.balance.replicas import check_phy2log, plan_migration, replica_tables, slot_states, spread_over_replicas
from moeflow.comm import ProcessGroupTransport
from moeflow.comm.rows import exchange_rows
from moeflow.layer import MoELayer

from _reference import random_layer_weights

D, FF, E, K = 16, 8, 8, 2
TOL = dict(rtol=1e-4, atol=1e-5)


def _global_weights():
    return random_layer_weights(E, D, FF)


def _inputs(rank, step=0):
    g = torch.Generator().manual_seed(100 + 10 * rank + step)
    return torch.randn(4, 16, D, generator=g)


def _build(num_slots=None, **kw):
    layer = MoELayer(D, FF, E, K, num_shared_experts=1, num_slots=num_slots, **kw)
    layer.load_global_weights(*_global_weights())
    return layer


def _new_phy2log(N, R, seed):
    """A valid phy2log of N slots that puts every expert on a different rank than the default and
    replicates some: the same on every rank (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, E, (N - E,), generator=g)
    p = torch.cat([torch.roll(torch.arange(E), E // R + 1), extra])
    return p[torch.randperm(N, generator=g)]


def _local_experts(layer):
    S, rank = layer.slots.num_local_experts, dist.get_rank()
    return dict(phy2log=layer.slots.phy2log[rank * S:(rank + 1) * S].clone(), w1=layer.experts.w1.detach().clone(),
                w2=layer.experts.w2.detach().clone(), w3=layer.experts.w3.detach().clone())


def _grads(layer):
    return [layer.experts.w1.grad.clone(), layer.experts.w2.grad.clone(), layer.experts.w3.grad.clone()]


def _loss(y):
    return (y * torch.arange(y.numel()).view_as(y).sin()).sum()


# ------------------------------------------------------------------------------- pure helpers
def test_spread_over_replicas_balances_each_experts_pairs():
    phy2log = torch.tensor([0, 1, 2, 3, 4, 5, 0, 0, 3, 5])      # expert 0: 3 replicas, 3 and 5: 2
    log2phy, logcnt = replica_tables(phy2log, 6)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 6, (97, 3), generator=g)
    idx[5, 1] = idx[40, 0] = -1
    for offset in (0, 1, 2):
        slots = spread_over_replicas(idx, log2phy, logcnt, offset)
        assert slots.shape == idx.shape and slots.dtype == torch.int64
        assert (slots[idx < 0] == -1).all()
        assert torch.equal(phy2log[slots[idx >= 0]], idx[idx >= 0])  # each pair lands on its expert
        for e in range(6):
            reps = log2phy[e, :logcnt[e]]
            n = torch.stack([(slots == s).sum() for s in reps])
            assert int(n.max() - n.min()) <= 1, (e, n.tolist())
            if logcnt[e] > 1 and int(n.sum()) % int(logcnt[e]):
                # the remainder goes to the replica the offset starts on
                assert int(n[offset % int(logcnt[e])]) == int(n.max())


def test_plan_migration_delivers_every_slot_its_expert():
    R = 4
    old = torch.arange(12) % 8                       # default placement of 12 slots
    new = torch.tensor([3, 0, 5, 6, 0, 1, 7, 0, 2, 4, 5, 3, 0, 1, 6, 2])  # 16 slots, replicas, moves
    plans = [plan_migration(old, new, R, r) for r in range(R)]
    S_old, S_new = 3, 4
    for r, p in enumerate(plans):
        got = torch.full((S_new,), -1)
        keep = p.local_src >= 0
        got[keep] = old[r * S_old + p.local_src[keep]]
        for src in range(R):
            sent = plans[src].send_slots[r]                 # what src sends to r, in order
            assert sent.numel() == p.recv_slots[src].numel()
            got[p.recv_slots[src]] = old[src * S_old + sent]
            assert src != r or sent.numel() == 0
        assert torch.equal(got, new[r * S_new:(r + 1) * S_new]), r
        assert p.moves == plans[0].moves and p.copies == plans[0].copies
    assert plans[0].moves == sum(int((p.local_src < 0).sum()) for p in plans)
    # nothing changes: nothing moves
    same = plan_migration(old, old, R, 1)
    assert same.moves == 0 and same.copies == 0 and torch.equal(same.local_src, torch.arange(3))


@pytest.mark.parametrize("phy2log,exc,pattern", [
    ([0, 1, 2, 2], ValueError, r"no slot to logical expert\(s\) \[3\]"),
    ([0, 1, 2, 4], ValueError, r"phy2log\[3\]=4"),
    ([0, 1, -1, 3], ValueError, r"phy2log\[2\]=-1"),
    ([[0, 1, 2, 3]], ValueError, r"shape \[num_replicas\] = \[4\]"),
    ([0.0, 1.0, 2.0, 3.0], TypeError, r"must hold integers"),
])
def test_check_phy2log_names_the_problem(phy2log, exc, pattern):
    with pytest.raises(exc, match=pattern):
        check_phy2log(phy2log, 4, 4, "where", rank=3)


def test_slot_states_picks_per_slot_state_and_refuses_other_shapes():
    w = torch.nn.Parameter(torch.randn(3, 4, 2))
    opt = torch.optim.Adam([w])
    w.grad = torch.ones_like(w)
    opt.step()
    found = slot_states(opt, {"experts.w1": w}, "where")
    assert [k for _, k, _ in found] == ["exp_avg", "exp_avg_sq"]       # not the scalar step
    opt.state[w]["row_factor"] = torch.zeros(3, 4)                    # factored state: not by slot
    with pytest.raises(TypeError, match=r"state 'row_factor' of experts.w1 has shape \[3, 4\]"):
        slot_states(opt, {"experts.w1": w}, "where")
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        slot_states("adam", {"experts.w1": w}, "where")


def _rank_exchange_rows():
    rank = dist.get_rank()
    # rows of three dtypes and odd byte widths: typed views of the received bytes may be misaligned
    tensors = [torch.arange(15, dtype=torch.float32).view(5, 3) + 100 * rank,
               (torch.arange(5, dtype=torch.bfloat16).view(5, 1) + 10 * rank),
               torch.arange(5, dtype=torch.int64) + 1000 * rank]
    send = [torch.tensor([], dtype=torch.int64), torch.tensor([4, 1, 2])] if rank == 0 else \
           [torch.tensor([0]), torch.tensor([], dtype=torch.int64)]
    recv = exchange_rows(ProcessGroupTransport(), tensors, send, [0, 1] if rank == 0 else [3, 0])
    return [[t.clone() for t in r] for r in recv]


def test_exchange_rows_moves_chosen_rows_of_mixed_dtypes():
    out = spawn(_rank_exchange_rows, 2, timeout_s=60)
    got0, got1 = out[0][1], out[1][0]                 # rank 0 from rank 1, rank 1 from rank 0
    assert got0[0].tolist() == [[100.0, 101.0, 102.0]] and got0[1].tolist() == [[10.0]] and got0[2].tolist() == [1000]
    assert got1[0].tolist() == [[12.0, 13.0, 14.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    assert got1[1].dtype == torch.bfloat16 and got1[1].flatten().tolist() == [4.0, 1.0, 2.0]
    assert got1[2].tolist() == [4, 1, 2]
    assert all(x.numel() == 0 for x in out[0][0] + out[1][1])   # nothing from oneself


# ------------------------------------------------------------------------------- in the layer
def _rank_apply(opt_name):
    rank, R = dist.get_rank(), dist.get_world_size()
    ref = _build()                       # one replica per expert, experts split contiguously
    lay = _build(num_slots=E + R)     # default placement: slot s holds expert s % E
    make = ((lambda ps: torch.optim.Adam(ps, lr=1e-2)) if opt_name == "adam"
            else (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)))
    opt_ref, opt = make(ref.parameters()), make(lay.parameters())
    out = dict(rank=rank, ref=[], lay=[])

    def step(layer, optimizer, x, log):
        y = layer(x)
        optimizer.zero_grad()
        _loss(y).backward()
        log.append(dict(y=y.detach(), grads=_grads(layer)))
        layer.slots.sync_replica_grads()
        log[-1]["synced"] = _grads(layer)
        optimizer.step()

    step(ref, opt_ref, _inputs(rank, 0), out["ref"])
    step(lay, opt, _inputs(rank, 0), out["lay"])
    out["before"] = _local_experts(lay)
    # move experts across ranks and grow to 2E slots (a resize), then one more step on both
    out["moves"] = lay.slots.apply_placement(_new_phy2log(2 * E, R, seed=7), optimizer=opt)
    assert all(p.grad is None for p in (lay.experts.w1, lay.experts.w2, lay.experts.w3))
    out["after"] = _local_experts(lay)
    with torch.no_grad():
        out["y_after"], out["y_ref_after"] = lay(_inputs(rank, 1)), ref(_inputs(rank, 1))
    step(ref, opt_ref, _inputs(rank, 2), out["ref"])
    step(lay, opt, _inputs(rank, 2), out["lay"])
    out["stepped"] = _local_experts(lay)
    out["ref_stepped"] = _local_experts(ref)
    # a placement with the same N (in place), from a Placement object
    placement = Placement.from_phy2log(_new_phy2log(2 * E, R, seed=8)[None], E, num_gpus=R)
    w1_param = lay.experts.w1
    out["moves2"] = lay.slots.apply_placement(placement, optimizer=opt)
    assert lay.experts.w1 is w1_param
    with torch.no_grad():
        out["y3"], out["y3_ref"] = lay(_inputs(rank, 3)), ref(_inputs(rank, 3))
    # the placement is saved with the weights: a fresh layer loading them routes the same
    fresh = MoELayer(D, FF, E, K, num_shared_experts=1, num_slots=2 * E)
    fresh.load_state_dict(lay.state_dict())
    with torch.no_grad():
        out["y3_loaded"] = fresh(_inputs(rank, 3))
    return out


def _by_expert(outs, key):
    """{logical expert: [(w1, w2, w3) of each replica in the group]} from every rank's slots."""
    held: dict[int, list] = {}
    for o in outs:
        d = o[key]
        for i, e in enumerate(d["phy2log"].tolist()):
            held.setdefault(e, []).append((d["w1"][i], d["w2"][i], d["w3"][i]))
    return held


@pytest.mark.parametrize("world_size,opt_name", [(2, "adam"), (4, "sgd")])
def test_apply_placement_keeps_outputs_and_training(world_size, opt_name):
    outs = spawn(_rank_apply, world_size, opt_name, timeout_s=120)
    _, w1, w2, w3, _ = _global_weights()
    for o in outs:
        r = o["rank"]
        # replicas (default placement) and after each placement: the single-replica layer's outputs
        torch.testing.assert_close(o["lay"][0]["y"], o["ref"][0]["y"], **TOL, msg=f"rank {r} replicas")
        torch.testing.assert_close(o["y_after"], o["y_ref_after"], **TOL, msg=f"rank {r} after placement")
        torch.testing.assert_close(o["lay"][1]["y"], o["ref"][1]["y"], **TOL, msg=f"rank {r} trained")
        torch.testing.assert_close(o["y3"], o["y3_ref"], **TOL, msg=f"rank {r} second placement")
        assert torch.equal(o["y3_loaded"], o["y3"]), f"rank {r} state_dict round trip"
    assert outs[0]["moves"] > 0 and outs[0]["moves2"] > 0
    assert len({o["moves"] for o in outs}) == 1
    # every slot holds its expert's weights; replicas are identical (before and after a step)
    for key in ("before", "after", "stepped"):
        held = _by_expert(outs, key)
        assert sorted(held) == list(range(E))
        for e, reps in held.items():
            for rep in reps[1:]:
                for a, b in zip(reps[0], rep):
                    assert torch.equal(a, b), f"{key}: replicas of expert {e} differ"
    assert any(len(r) > 1 for r in _by_expert(outs, "after").values())
    # after placement + a step with moved optimizer state, every expert equals the reference's
    ref_held = _by_expert(outs, "ref_stepped")
    for e, reps in _by_expert(outs, "stepped").items():
        for a, b in zip(reps[0], ref_held[e][0]):
            torch.testing.assert_close(a, b, **TOL, msg=f"expert {e} after the step")
    # gradients: each replica got its own tokens' share (all nonzero); their sum is the reference's,
    # and after sync_replica_grads every replica holds that sum
    phy = torch.cat([o["after"]["phy2log"] for o in outs])            # [N], rank by rank
    S = phy.numel() // world_size
    for j in range(3):
        raw = torch.cat([o["lay"][1]["grads"][j] for o in outs])
        synced = torch.cat([o["lay"][1]["synced"][j] for o in outs])
        ref = torch.cat([o["ref"][1]["grads"][j] for o in outs])
        assert (raw.flatten(1).abs().sum(1) > 0).all(), "a replica got no gradient"
        summed = torch.zeros_like(ref).index_add_(0, phy, raw)
        torch.testing.assert_close(summed, ref, **TOL)
        torch.testing.assert_close(synced, ref[phy], **TOL)
    assert S == 2 * E // world_size


def _rank_stats():
    rank, R = dist.get_rank(), dist.get_world_size()
    lay = _build(num_slots=E + 2 * R, load_ema_decay=0.5)
    with torch.no_grad():
        lay.router.gate.weight[5] *= 4.0  # expert 5 is hot; by default only rank 0 holds it
    lay.train()
    out = dict(counts=[], load_E=[], load_N=[], rank_load=[])
    with torch.no_grad():
        for step in range(4):
            if step == 2:  # rebalance from the first two steps' statistics
                out["planned"] = lay.slots.plan_placement()
                out["moves"] = lay.slots.apply_placement(out["planned"])
            for micro in range(2):
                lay(_inputs(rank, 10 * step + micro))
                out["counts"].append(lay.last_router_output.num_tokens_per_expert.clone())
            out["load_E"].append(lay.router.update_bias())
            out["load_N"].append(lay.slots.replica_load(out["load_E"][-1]))
            out["rank_load"].append(lay.slots.rank_load())
            out.setdefault("phy2log", []).append(lay.slots.phy2log.clone())
    out["expert_load"], out["replica_load"] = lay.router.expert_load(), lay.slots.replica_load()
    # replicas initialised apart (a per-rank seed) are made equal to each expert's first replica
    torch.manual_seed(rank)
    lay.experts.reset_parameters()
    out["apart"] = _local_experts(lay)
    lay.slots.sync_replica_weights()
    out["synced"] = _local_experts(lay)
    return out


def test_load_statistics_and_rebalancing():
    R = 2
    outs = spawn(_rank_stats, R, timeout_s=120)
    o = outs[0]
    ema = None
    for step in range(4):
        load_E = sum(x["counts"][2 * step] + x["counts"][2 * step + 1] for x in outs)   # [E] over the group
        for x in outs:
            assert torch.equal(x["load_E"][step], load_E)
            assert torch.equal(x["load_N"][step], o["load_N"][step])
        # slot loads add up to the expert loads, replicas of an expert sharing its pairs evenly
        # (how to_slots spreads them: test_spread_over_replicas_balances_each_experts_pairs)
        phy, load_N = o["phy2log"][step], o["load_N"][step]
        torch.testing.assert_close(torch.zeros(E).index_add_(0, phy, load_N), load_E.float())
        for e in range(E):
            assert torch.equal(load_N[phy == e], load_N[phy == e][:1].expand(int((phy == e).sum())))
        ema = load_E.float() if ema is None else 0.5 * ema + 0.5 * load_E.float()
        torch.testing.assert_close(o["rank_load"][step].sum(), ema.sum())
    torch.testing.assert_close(o["expert_load"], ema)
    torch.testing.assert_close(o["replica_load"].view(R, -1).sum(1), o["rank_load"][-1])
    # the plan gave the hot expert more replicas, and the busiest rank's share went down
    planned = o["planned"]
    assert planned.logcnt[0, 5] > 1 and o["moves"] > 0
    imbalance = [float(x.view(R, -1).sum(1).max() / x.view(R, -1).sum(1).float().mean()) for x in o["load_N"]]
    assert max(imbalance[2:]) < min(imbalance[:2]), imbalance
    apart, synced = _by_expert(outs, "apart"), _by_expert(outs, "synced")
    for e in range(E):
        for j in range(3):
            assert all(torch.equal(rep[j], apart[e][0][j]) for rep in synced[e]), f"expert {e}"
    assert any(len(reps) > 1 and not torch.equal(reps[0][0], reps[1][0]) for reps in apart.values())


def _rank_errors():
    rank, R = dist.get_rank(), dist.get_world_size()
    errors = {}

    def grab(name, fn):
        try:
            fn()
        except (TypeError, ValueError) as e:
            errors[name] = f"{type(e).__name__}: {e}"

    grab("not_divisible", lambda: MoELayer(D, FF, E, K, num_slots=E + 1))
    grab("too_few", lambda: MoELayer(D, FF, E, K, num_slots=E - R))
    grab("decay", lambda: MoELayer(D, FF, E, K, load_ema_decay=1.0))
    lay = _build(num_slots=2 * E)
    grab("no_stats", lambda: lay.slots.plan_placement())
    grab("2d", lambda: lay.slots.apply_placement(torch.arange(2 * E)[None] % E))
    grab("missing", lambda: lay.slots.apply_placement(torch.zeros(2 * E, dtype=torch.int64)))
    out_of_range = torch.arange(2 * E) % E
    out_of_range[3] = E + 3
    grab("range", lambda: lay.slots.apply_placement(out_of_range))
    grab("gpus", lambda: lay.slots.apply_placement(Placement.identity(1, E, num_gpus=2 * R)))
    grab("layer_index", lambda: lay.slots.apply_placement(Placement.identity(2, E, num_gpus=R), layer_index=2))
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    grab("optimizer", lambda: lay.slots.apply_placement(torch.arange(2 * E) % E, optimizer=other))
    saved = lay.state_dict()
    saved["slots.phy2log"] = torch.zeros(2 * E, dtype=torch.int64)
    grab("load", lambda: _build(num_slots=2 * E).load_state_dict(saved))
    # ranks that disagree: every rank raises, none hangs in the exchange
    mine = torch.arange(2 * E) % E if rank == 0 else torch.arange(2 * E).flip(0) % E
    grab("disagree", lambda: lay.slots.apply_placement(mine))
    return errors


def test_bad_placement_inputs_raise_naming_the_argument():
    outs = spawn(_rank_errors, 2, timeout_s=60, collective_timeout_s=30)
    expected = {
        "not_divisible": r"ValueError: MoELayer: `num_slots` must be .* divisible by the group size 2 \(rank \d\), "
                         r"got 9",
        "too_few": r"`num_slots` must be an int >= num_experts=8 .* got 6",
        "decay": r"`load_ema_decay` must lie in \[0, 1\), got 1.0",
        "no_stats": r"ValueError: ExpertSlots.plan_placement: no load statistics yet",
        "2d": r"`phy2log` must be 1-D .* got shape \[1, 16\]",
        "missing": r"gives no slot to logical expert\(s\) \[1, 2, 3, 4, 5, 6, 7\]",
        "range": r"phy2log\[3\]=11",
        "gpus": r"`placement` is for num_gpus=4 .* a group of 2",
        "layer_index": r"`layer_index` must lie in \[0, 2\) \(rank \d\), got 2",
        "optimizer": r"`optimizer` does not hold this layer's expert weights",
        "disagree": r"the ranks passed different placements",
        "load": r"MoELayer.load_state_dict: `phy2log` gives no slot to logical expert",
    }
    for rank, errors in enumerate(outs):
        assert set(errors) == set(expected), (rank, sorted(set(expected) - set(errors)))
        for name, pattern in expected.items():
            assert re.search(pattern, errors[name]), (rank, name, errors[name])


def _rank_node_limited():
    rank = dist.get_rank()
    from moeflow import Buffer
    make = lambda N: MoELayer(D, FF, E, K, num_shared_experts=1, num_slots=N, max_nodes_per_token=1,  # noqa: E731
                              buffer=Buffer(dist.group.WORLD, ranks_per_node=2))   # 2 emulated nodes
    ref, lay = make(None), make(12)
    for layer in (ref, lay):
        layer.load_global_weights(*_global_weights())
    out = dict(default=lay.slots.phy2log.clone())
    with torch.no_grad():
        x = _inputs(rank)
        out["y"], out["y_ref"] = lay(x), ref(x)
        lay.router.update_bias()
        placement = lay.slots.plan_placement()
        out["planned"] = placement.phy2log[0]
        lay.slots.apply_placement(placement)
        out["y_after"] = lay(x)
    crossing = torch.arange(12) % E                  # experts 4..7 in node 0's slots
    try:
        lay.slots.apply_placement(crossing)
    except ValueError as e:
        out["error"] = str(e)
    return out


def test_node_limited_routing_keeps_experts_on_their_node():
    outs = spawn(_rank_node_limited, 4, timeout_s=120)
    # node 0 (slots 0-5) holds experts 0-3, node 1 (slots 6-11) experts 4-7
    assert outs[0]["default"].tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 4, 5]
    planned = outs[0]["planned"]
    assert (planned[:6] < 4).all() and (planned[6:] >= 4).all(), planned
    for r, o in enumerate(outs):
        torch.testing.assert_close(o["y"], o["y_ref"], **TOL, msg=f"rank {r}")
        torch.testing.assert_close(o["y_after"], o["y_ref"], **TOL, msg=f"rank {r} after placement")
        assert re.search(r"needs each expert on its own node, but `phy2log` puts expert 4 in slot 4, on node 0",
                         o["error"]), o["error"]
