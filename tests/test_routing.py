"""Router against a slow, readable reference written here; the global-batch aux loss and the bias
update across 2 Gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from moeflow import spawn
from moeflow.routing import Router

D, E, K = 16, 8, 2


def _token_scores(x, gate, bias, score_func):
    """One token's scores and biased scores, as Python floats."""
    logits = [float(gate[e] @ x) for e in range(gate.size(0))]
    if score_func == "softmax":
        z = sum(math.exp(v) for v in logits)
        scores = [math.exp(v) / z for v in logits]
    else:
        scores = [1 / (1 + math.exp(-v)) for v in logits]
    return scores, [scores[e] + float(bias[e]) for e in range(gate.size(0))]


def _reference_route(x_TD, gate, bias, *, score_func, num_topk, num_groups=1, num_topk_groups=1,
                     norm=None, route_scale=1.0):
    """Per token, in plain Python: scores, groups by the sum of their top-2 biased scores, the
    top-k biased experts inside the kept groups, weights from the unbiased scores."""
    norm = (score_func == "sigmoid") if norm is None else norm
    E_ = gate.size(0)
    per_group = E_ // num_groups
    all_idx, all_w = [], []
    for x in x_TD:
        scores, biased = _token_scores(x, gate, bias, score_func)
        group_score = []
        for g in range(num_groups):
            members = sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)
            group_score.append(sum(members[:2]))
        kept_groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:num_topk_groups]
        candidates = [e for e in range(E_) if e // per_group in kept_groups]
        idx = sorted(candidates, key=lambda e: -biased[e])[:num_topk]
        w = [scores[e] for e in idx]
        if norm:
            w = [v / sum(w) for v in w]
        all_idx.append(idx)
        all_w.append([v * route_scale for v in w])
    return torch.tensor(all_idx), torch.tensor(all_w)


def _router(seed=0, **kw):
    torch.manual_seed(seed)
    r = Router(D, kw.pop("num_experts", E), kw.pop("num_topk", K), **kw)
    with torch.no_grad():
        r.gate.weight.normal_(0, 0.5)
    return r


def _x(T=24, seed=1):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [
    dict(score_func="softmax"),
    dict(score_func="softmax", norm_topk_prob=True, route_scale=2.0),
    dict(score_func="sigmoid", num_topk=3),
    dict(score_func="sigmoid", num_groups=4, num_topk_groups=2, num_topk=3, route_scale=2.5),
    dict(score_func="softmax", num_groups=8, num_topk_groups=3, num_topk=3),  # groups of one expert
])
def test_routing_matches_reference(cfg):
    r = _router(**cfg)
    x = _x()
    out = r(x)
    ref_idx, ref_w = _reference_route(x, r.gate.weight.detach(), r.expert_bias, score_func=cfg["score_func"],
                                      num_topk=r.num_topk, num_groups=r.num_groups, num_topk_groups=r.num_topk_groups,
                                      norm=cfg.get("norm_topk_prob"), route_scale=r.route_scale)
    assert out.topk_idx.dtype == torch.int64 and out.topk_weights.dtype == torch.float32
    assert torch.equal(out.topk_idx, ref_idx)
    torch.testing.assert_close(out.topk_weights, ref_w)
    if cfg["score_func"] == "sigmoid":
        torch.testing.assert_close(out.topk_weights.sum(-1), torch.full((24,), r.route_scale))
    assert torch.equal(out.num_tokens_per_expert, torch.bincount(ref_idx.flatten(), minlength=E))


def test_group_limit_changes_the_choice():
    """With one group kept, every token's experts lie in one group: the limit is applied."""
    r = _router(num_groups=4, num_topk_groups=1, score_func="sigmoid")
    idx = r(_x(64)).topk_idx
    assert torch.equal(idx[:, 0] // 2, idx[:, 1] // 2)
    free = _router(score_func="sigmoid")(_x(64)).topk_idx
    assert not torch.equal(free[:, 0] // 2, free[:, 1] // 2)


def test_bias_moves_selection_not_weights():
    r = _router(score_func="sigmoid", num_topk=2)
    x = _x()
    with torch.no_grad():
        r.expert_bias[5] = 10.0                      # expert 5 always chosen ...
    out = r(x)
    assert (out.topk_idx[:, 0] == 5).all()
    scores = torch.sigmoid(x @ r.gate.weight.detach().t())
    chosen = scores.gather(1, out.topk_idx)          # ... with its unbiased score as weight
    torch.testing.assert_close(out.topk_weights, chosen / chosen.sum(-1, keepdim=True))
    ref_idx, ref_w = _reference_route(x, r.gate.weight.detach(), r.expert_bias, score_func="sigmoid", num_topk=2)
    assert torch.equal(out.topk_idx, ref_idx)
    torch.testing.assert_close(out.topk_weights, ref_w)
    assert "expert_bias" in r.state_dict() and not any(n == "expert_bias" for n, _ in r.named_parameters())


def test_update_bias_sign_rule_and_reset():
    r = _router(bias_update_rate=0.01)
    r(_x(10, seed=1))
    r(_x(14, seed=2))                               # counts accumulate over micro-batches
    load = r.num_tokens_per_expert_since_update.clone()
    assert int(load.sum()) == 24 * K
    returned = r.update_bias()
    assert torch.equal(returned, load)
    mean = load.float().mean()
    expected = torch.tensor([0.01 if n < mean else -0.01 if n > mean else 0.0 for n in load.tolist()])
    torch.testing.assert_close(r.expert_bias, expected)
    assert not r.num_tokens_per_expert_since_update.any()
    r.eval()
    r(_x())                                          # eval: nothing counted
    assert not r.num_tokens_per_expert_since_update.any()


def test_bias_stays_fp32_through_module_casts():
    r = _router()
    with torch.no_grad():
        r.expert_bias.fill_(1.0 + 2 ** -20)          # not representable in bf16
    r = r.to(torch.bfloat16)
    assert r.gate.weight.dtype == torch.bfloat16
    assert r.expert_bias.dtype == torch.float32 and r.expert_bias[0].item() == 1.0 + 2 ** -20
    out = r(_x().bfloat16())
    assert out.topk_weights.dtype == torch.float32


def _hand_losses(x_TD, gate, topk_idx, score_func, S):
    """The four losses by their formulas, with explicit loops over experts and sequences."""
    T = x_TD.size(0)
    logits = x_TD @ gate.t()
    s = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    p = s / s.sum(-1, keepdim=True)
    def f_dot_p(idx, probs):
        n = idx.size(0)
        return sum((idx == e).sum().item() * E / (K * n) * probs[:, e].mean() for e in range(E))
    aux = f_dot_p(topk_idx, p)
    seq = sum(f_dot_p(topk_idx[b * S:(b + 1) * S], p[b * S:(b + 1) * S]) for b in range(T // S)) / (T // S)
    z = sum(torch.logsumexp(logits[t], 0) ** 2 for t in range(T)) / T
    return aux, seq, z


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_losses_match_hand_formulas(score_func):
    coeffs = dict(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.2, global_aux_loss_coeff=0.3, z_loss_coeff=0.4)
    r = _router(score_func=score_func, **coeffs)
    B, S = 3, 8
    x = _x(B * S).view(B, S, D)
    out = r(x)
    gate = r.gate.weight.detach()
    aux, seq, z = _hand_losses(x.view(-1, D), gate, out.topk_idx, score_func, S)
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.seq_aux_loss, seq)
    torch.testing.assert_close(out.global_aux_loss, aux)   # one rank, first micro-batch: the same
    torch.testing.assert_close(out.z_loss, z)
    torch.testing.assert_close(out.loss, 0.1 * aux + 0.2 * seq + 0.3 * aux + 0.4 * z)
    out.loss.backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0
    # flattened input with seq_len gives the same sequence-wise loss
    torch.testing.assert_close(r(x.view(-1, D), seq_len=S).seq_aux_loss, seq)


def test_global_aux_accumulates_over_micro_batches():
    r = _router(global_aux_loss_coeff=1.0)
    x1, x2 = _x(10, seed=1), _x(30, seed=2)
    idx1 = r(x1).topk_idx
    out2 = r(x2)
    counts = torch.bincount(torch.cat([idx1, out2.topk_idx]).flatten(), minlength=E).float()
    f = counts * E / (K * 40)
    p2 = (x2 @ r.gate.weight.detach().t()).softmax(-1).mean(0)
    torch.testing.assert_close(out2.global_aux_loss, (f * p2).sum())
    r.update_bias()
    assert not r.global_counts_since_update.any()


def test_seq_aux_needs_sequence_structure():
    r = _router(seq_aux_loss_coeff=0.1)
    with pytest.raises(ValueError, match=r"`seq_len` is needed"):
        r(_x())
    with pytest.raises(ValueError, match=r"`seq_len` must be positive and divide the 24 tokens, got 5"):
        r(_x(), seq_len=5)


@pytest.mark.parametrize("kw,match", [
    (dict(num_topk=9), r"`num_topk` must lie in \[1, num_experts=8\], got 9"),
    (dict(num_topk=0), r"`num_topk` must lie in \[1, num_experts=8\], got 0"),
    (dict(num_groups=3), r"`num_groups` must divide num_experts=8, got 3"),
    (dict(num_groups=4, num_topk_groups=5), r"`num_topk_groups` must lie in \[1, num_groups=4\], got 5"),
    (dict(num_groups=4, num_topk_groups=1, num_topk=3), r"`num_topk`=3 exceeds the 2 experts"),
    (dict(score_func="relu"), r"`score_func` must be one of .*got 'relu'"),
    (dict(route_scale=0.0), r"`route_scale` must be > 0, got 0.0"),
    (dict(z_loss_coeff=-1.0), r"`z_loss_coeff` must be >= 0, got -1.0"),
    (dict(num_experts=0), r"`num_experts` must be a positive int, got 0"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        Router(D, kw.pop("num_experts", E), kw.pop("num_topk", K), **kw)


def test_wrong_hidden_raises():
    with pytest.raises(ValueError, match=r"`x` must end in hidden=16, got shape \[4, 5\]"):
        _router()(torch.zeros(4, 5))


# ------------------------------------------------------------------------------ two ranks
_SIZES = [(6, 10), (12, 0)]   # tokens per micro-batch on rank 0, rank 1 (rank 1's second is empty)


def _rank_fn():
    rank = dist.get_rank()
    r = _router(global_aux_loss_coeff=1.0, bias_update_rate=0.5)
    losses = []
    for mb, T in enumerate(_SIZES[rank]):
        out = r(_x(T, seed=10 * rank + mb))
        losses.append(out.global_aux_loss)
    load = r.update_bias()
    return dict(losses=losses, load=load, bias=r.expert_bias.clone())


def test_global_aux_and_bias_update_over_two_ranks():
    results = spawn(_rank_fn, 2, timeout_s=60)
    # single-process reference from both ranks' inputs
    r = _router(global_aux_loss_coeff=1.0, bias_update_rate=0.5)
    gate = r.gate.weight.detach()
    xs = {(rank, mb): _x(T, seed=10 * rank + mb) for rank in range(2) for mb, T in enumerate(_SIZES[rank])}
    idx = {k: r(v).topk_idx for k, v in xs.items()}
    counts = torch.zeros(E)
    for mb in range(2):
        for rank in range(2):                      # micro-batch mb's counts from both ranks
            counts += torch.bincount(idx[rank, mb].flatten(), minlength=E)
        tokens = sum(_SIZES[rank][m] for rank in range(2) for m in range(mb + 1))
        f = counts * E / (K * tokens)
        for rank in range(2):
            x = xs[rank, mb]
            want = (f * (x @ gate.t()).softmax(-1).mean(0)).sum() if x.size(0) else torch.tensor(0.0)
            torch.testing.assert_close(results[rank]["losses"][mb], want)
    expected_bias = 0.5 * torch.sign(counts.mean() - counts)
    for res in results:
        assert torch.equal(res["load"], counts.long())
        torch.testing.assert_close(res["bias"], expected_bias)


# ------------------------------------------------------------------------------ node-limited
def _reference_node_route(x_TD, gate, bias, *, score_func, num_topk, num_nodes, max_nodes, num_groups=1,
                          num_topk_groups=1):
    """Per token, in plain Python: nodes by the sum of their top ceil(K / M) biased scores, then
    groups (inside the kept nodes) by their top-2, then the top-k biased experts left."""
    E_ = gate.size(0)
    per_node, per_group = E_ // num_nodes, E_ // num_groups
    best_per_node = min(-(-num_topk // max_nodes), per_node)
    all_idx = []
    for x in x_TD:
        scores, biased = _token_scores(x, gate, bias, score_func)
        node_score = [sum(sorted(biased[n * per_node:(n + 1) * per_node], reverse=True)[:best_per_node])
                      for n in range(num_nodes)]
        kept_nodes = sorted(range(num_nodes), key=lambda n: -node_score[n])[:max_nodes]
        candidates = [e for e in range(E_) if e // per_node in kept_nodes]
        if num_topk_groups < num_groups:
            group_score = {g: sum(sorted([biased[e] for e in candidates if e // per_group == g], reverse=True)[:2])
                           for g in {e // per_group for e in candidates}}
            kept_groups = sorted(group_score, key=lambda g: -group_score[g])[:num_topk_groups]
            candidates = [e for e in candidates if e // per_group in kept_groups]
        all_idx.append(sorted(candidates, key=lambda e: -biased[e])[:num_topk])
    return torch.tensor(all_idx)


@pytest.mark.parametrize("cfg", [
    dict(score_func="sigmoid", num_experts=16, num_topk=4, num_nodes=4, max_nodes_per_token=2),  # top-2 per node
    dict(score_func="softmax", num_experts=16, num_topk=3, num_nodes=4, max_nodes_per_token=2),  # ceil(3/2) = 2
    dict(score_func="sigmoid", num_experts=16, num_topk=4, num_nodes=4, max_nodes_per_token=1),  # top-4 per node
    dict(score_func="softmax", num_experts=12, num_topk=2, num_nodes=3, max_nodes_per_token=3),  # no limit
    dict(score_func="sigmoid", num_experts=16, num_topk=3, num_nodes=2, max_nodes_per_token=1,
         num_groups=4, num_topk_groups=1),                                                       # groups inside nodes
])
def test_node_limited_routing_matches_reference(cfg):
    r = _router(**cfg)
    with torch.no_grad():
        r.expert_bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    x = _x(64)
    idx = r(x).topk_idx
    ref = _reference_node_route(x, r.gate.weight.detach(), r.expert_bias, score_func=cfg["score_func"],
                                num_topk=cfg["num_topk"], num_nodes=cfg["num_nodes"],
                                max_nodes=cfg["max_nodes_per_token"],
                                num_groups=cfg.get("num_groups", 1), num_topk_groups=cfg.get("num_topk_groups", 1))
    assert torch.equal(idx, ref)
    per_node = cfg["num_experts"] // cfg["num_nodes"]
    nodes_reached = torch.zeros(64, cfg["num_nodes"], dtype=torch.bool).scatter_(1, idx // per_node, True).sum(1)
    assert int(nodes_reached.max()) <= cfg["max_nodes_per_token"]


def _layer_node_limit_fn():
    from moeflow.comm.buffer import Buffer
    from moeflow.layer import MoELayer

    torch.manual_seed(0)   # the same gate on both ranks
    buffer = Buffer(dist.group.WORLD, ranks_per_node=1)          # 2 emulated nodes of 1 rank
    layer = MoELayer(D, 8, 16, 4, buffer=buffer, score_func="sigmoid", max_nodes_per_token=1)
    free = MoELayer(D, 8, 16, 4, buffer=buffer, score_func="sigmoid")
    free.load_state_dict(layer.state_dict())
    x = _x(32, seed=dist.get_rank())
    layer(x), free(x)
    return (layer.router.num_nodes, layer.last_router_output.topk_idx, free.last_router_output.topk_idx)


def test_layer_limits_tokens_to_its_buffers_nodes():
    """MoELayer gives its Router the Buffer's node count: on 2 emulated nodes (8 experts each)
    with max_nodes_per_token=1 no token reaches both nodes, where free routing does."""
    for num_nodes, limited, free in spawn(_layer_node_limit_fn, 2, timeout_s=60):
        assert num_nodes == 2
        assert (limited // 8 == limited[:, :1] // 8).all()
        assert (free // 8 != free[:, :1] // 8).any()


@pytest.mark.parametrize("kw,match", [
    (dict(num_nodes=3), r"`num_nodes` must be a positive int dividing num_experts=8, got 3"),
    (dict(num_nodes=4, max_nodes_per_token=5), r"`max_nodes_per_token` must lie in \[1, num_nodes=4\], got 5"),
    (dict(num_nodes=4, max_nodes_per_token=1, num_topk=3),
     r"`num_topk`=3 exceeds the 2 experts of max_nodes_per_token=1"),
    (dict(num_nodes=4, max_nodes_per_token=2, num_groups=2, num_topk_groups=1),
     r"combines with max_nodes_per_token=2 only when num_nodes=4 divides num_groups"),
])
def test_bad_node_limit_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        Router(D, E, kw.pop("num_topk", K), **kw)
