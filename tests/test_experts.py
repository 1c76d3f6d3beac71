"""GroupedExperts, permute and unpermute against a per-token dense loop written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.experts import GroupedExperts, SwiGLU, permute, unpermute

D, FF, L, K = 12, 8, 4, 3


def _expert(x, w1, w2, w3):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def _reference(x, topk_idx, topk_weights, w1, w2, w3):
    """One token, one pair at a time: out[m] = sum_k w[m, k] * expert_{idx[m, k]}(x[m])."""
    rows = []
    for m in range(x.size(0)):
        acc = x.new_zeros(x.size(1))
        for k in range(topk_idx.size(1)):
            e = int(topk_idx[m, k])
            if e >= 0:
                weight = 1.0 if topk_weights is None else topk_weights[m, k]
                acc = acc + weight * _expert(x[m], w1[e], w2[e], w3[e])
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(0, x.size(1))


def _inputs(M=9, dtype=torch.float64, seed=0, frac_missing=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g, dtype=dtype)
    # distinct experts per row (as dispatch delivers), some "-1" = expert on another rank
    idx = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(M)]) if M else torch.zeros(0, K)
    idx = idx.long()
    idx[torch.rand(M, K, generator=g) < frac_missing] = -1
    w = torch.rand(M, K, generator=g, dtype=torch.float32)
    w[idx < 0] = 0.0
    return x, idx, w


def _experts(dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    ex = GroupedExperts(L, D, FF).to(dtype)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.4)
    return ex


def test_permute_sorts_by_expert_keeps_row_order_and_drops_minus_one():
    x = torch.arange(4.0).unsqueeze(1).repeat(1, 2)                  # row m holds m
    idx = torch.tensor([[2, -1], [0, 2], [-1, -1], [2, 0]])
    w = torch.tensor([[0.5, 9.0], [0.25, 0.75], [9.0, 9.0], [1.0, 2.0]])
    xs, info = permute(x, idx, 3, topk_weights=w)
    assert info.num_tokens_per_expert == [2, 0, 3]
    assert info.row_idx.tolist() == [1, 3, 0, 1, 3]                  # expert 0: rows 1, 3; expert 2: 0, 1, 3
    assert xs[:, 0].tolist() == [1.0, 3.0, 0.0, 1.0, 3.0]
    assert info.weights.tolist() == [0.25, 2.0, 0.5, 0.75, 1.0]
    out = unpermute(xs * 10, info)
    assert out[:, 0].tolist() == [0 * 10 * 0.5, 1 * 10 * (0.25 + 0.75), 0.0, 3 * 10 * (2.0 + 1.0)]


def test_permute_with_given_counts_matches_counted():
    x, idx, w = _inputs()
    xs, info = permute(x, idx, L, topk_weights=w)
    xs2, info2 = permute(x, idx, L, topk_weights=w, num_tokens_per_expert=info.num_tokens_per_expert)
    assert torch.equal(xs, xs2) and torch.equal(info.row_idx, info2.row_idx)


@pytest.mark.parametrize("M,frac_missing", [(9, 0.3), (6, 0.0), (5, 1.0), (0, 0.0)])
def test_forward_and_backward_match_dense_loop(M, frac_missing):
    x, idx, w = _inputs(M, frac_missing=frac_missing)
    ex = _experts()
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = ex(x1, idx, w1)
    ref_params = [p.detach().clone().requires_grad_() for p in (ex.w1, ex.w2, ex.w3)]
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _reference(x2, idx, w2, *ref_params)
    assert out.shape == (M, D) and out.dtype == x.dtype
    torch.testing.assert_close(out, ref)
    # even with no pair here the output hangs off x and the weights: a rank's backward must
    # reach its dispatch/combine, or the other ranks wait for it in a collective
    assert out.grad_fn is not None
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    if ref.requires_grad:
        (ref * grad_out).sum().backward()

    def same(got, want):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want)

    same(x1.grad, x2.grad)
    same(w1.grad, w2.grad)
    for p, r in zip((ex.w1, ex.w2, ex.w3), ref_params):
        same(p.grad, r.grad)


def test_skewed_routing_takes_the_loop_and_matches():
    """One expert holding most pairs makes padding too costly: the per-expert loop runs."""
    x, idx, w = _inputs(M=12, frac_missing=0.0)
    idx[:, 0] = 3
    idx[:, 1:] = -1
    idx[0, 1], idx[1, 1] = 0, 1                                       # L * max = 4 * 12 > 2 * 14
    ex = _experts()
    x1 = x.clone().requires_grad_()
    out = ex(x1, idx, w)
    torch.testing.assert_close(out, _reference(x, idx, w, ex.w1, ex.w2, ex.w3))
    out.sum().backward()
    ref_w1 = ex.w1.detach().clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    _reference(x2, idx, w, ref_w1, ex.w2, ex.w3).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ex.w1.grad, ref_w1.grad)


def test_empty_experts_get_zero_gradient_and_unweighted_sum():
    x, idx, _ = _inputs(frac_missing=0.0)
    idx[idx == 1] = -1                                                # expert 1 receives nothing
    ex = _experts()
    out = ex(x, idx)                                                  # no weights: weight 1
    torch.testing.assert_close(out, _reference(x, idx, None, ex.w1, ex.w2, ex.w3))
    out.sum().backward()
    assert not ex.w1.grad[1].any() and not ex.w2.grad[1].any() and not ex.w3.grad[1].any()
    assert ex.w1.grad[0].any()


def test_gradcheck():
    x, idx, w = _inputs(M=5)
    ex = GroupedExperts(L, 3, 2).double()
    x = x[:, :3].clone().requires_grad_()
    w = w.double().requires_grad_()

    def fn(x, w, w1, w2, w3):
        return GroupedExperts.forward(_Params(w1, w2, w3), x, idx, w)

    assert torch.autograd.gradcheck(fn, (x, w, ex.w1, ex.w2, ex.w3))


class _Params(torch.nn.Module):
    """GroupedExperts' forward over given tensors, so gradcheck can perturb the weights."""

    def __init__(self, w1, w2, w3):
        super().__init__()
        self.num_local_experts, self.w1, self.w2, self.w3 = w1.size(0), w1, w2, w3

    forward_sorted = GroupedExperts.forward_sorted
    _padded_bmm = GroupedExperts._padded_bmm
    _loop = GroupedExperts._loop


def test_sharded_experts_sum_to_the_full_bank():
    """Rank r's shard on the rows with its local ids (-1 elsewhere), summed over ranks, equals
    the full bank: the contract the MoE layer relies on."""
    R, E = 2, 2 * L
    g = torch.Generator().manual_seed(3)
    w1, w3 = (torch.randn(E, D, FF, generator=g, dtype=torch.float64) for _ in range(2))
    w2 = torch.randn(E, FF, D, generator=g, dtype=torch.float64)
    x = torch.randn(7, D, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(7)])
    w = torch.rand(7, K, generator=g)
    total = 0
    for r in range(R):
        shard = GroupedExperts.from_full(w1, w2, w3, rank=r, num_ranks=R)
        assert shard.num_local_experts == L and shard.w1.dtype == torch.float64
        mine = (idx >= r * L) & (idx < (r + 1) * L)
        total = total + shard(x, torch.where(mine, idx - r * L, -1), torch.where(mine, w, 0.0))
    torch.testing.assert_close(total, _reference(x, idx, w, w1, w2, w3))


def test_fp32_matches_and_swiglu_is_one_expert():
    x, idx, w = _inputs(dtype=torch.float32)
    ex = _experts(torch.float32)
    torch.testing.assert_close(ex(x, idx, w), _reference(x, idx, w, ex.w1, ex.w2, ex.w3), rtol=1e-4, atol=1e-5)
    dense = SwiGLU(D, FF)
    with torch.no_grad():
        dense.w1.copy_(ex.w1[2]), dense.w2.copy_(ex.w2[2]), dense.w3.copy_(ex.w3[2])
    one = torch.full((x.size(0), 1), 2)
    torch.testing.assert_close(dense(x), ex(x, one))


@pytest.mark.parametrize("call,match", [
    (lambda ex, x, i, w: ex(x[0], i, w), r"`x` must be \[M, D\]"),
    (lambda ex, x, i, w: ex(x, i[:-1], w), r"`topk_idx` must be \[M=9, K\]"),
    (lambda ex, x, i, w: ex(x, i.float(), w), r"`topk_idx` must be int64"),
    (lambda ex, x, i, w: ex(x, i, w[:, :2]), r"`topk_weights` must have topk_idx's shape"),
    (lambda ex, x, i, w: ex(x, i + L, w), r"local expert id \d+ >= num_local_experts=4"),
    (lambda ex, x, i, w: ex(x, i, w, num_tokens_per_expert=[1, 2]), r"`num_tokens_per_expert` must hold"),
])
def test_bad_input_raises(call, match):
    x, idx, w = _inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        call(_experts(), x, idx, w)


def test_bad_config_and_shards_raise():
    with pytest.raises(ValueError, match=r"`num_local_experts` must be a positive int, got 0"):
        GroupedExperts(0, D, FF)
    w1 = torch.zeros(6, D, FF)
    with pytest.raises(ValueError, match=r"divisible by num_ranks=4"):
        GroupedExperts.from_full(w1, torch.zeros(6, FF, D), w1, rank=0, num_ranks=4)
    with pytest.raises(ValueError, match=r"`rank` must lie in \[0, num_ranks=2\), got 2"):
        GroupedExperts(3, D, FF).load_shard(w1, torch.zeros(6, FF, D), w1, rank=2, num_ranks=2)
    with pytest.raises(ValueError, match=r"`w2` must be \[6, 8, 12\]"):
        GroupedExperts(3, D, FF).load_shard(w1, torch.zeros(6, D, FF), w1, rank=1, num_ranks=2)


@pytest.mark.parametrize("counts", [[3, 0, 2, 4], [0, 0, 0, 0], [5, 1, 1, 2]])
def test_segment_loop_matches_the_padded_path_and_gradcheck(counts):
    """The per-expert path against the padded bmm on the same sorted rows, and its gradients
    (rows, weights, three weight banks) against finite differences; an empty expert gets zero
    gradients."""
    g = torch.Generator().manual_seed(7)
    P = sum(counts)
    x = torch.randn(P, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(P, generator=g, dtype=torch.float64, requires_grad=True)
    w1, w3 = (torch.randn(L, 3, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w2 = torch.randn(L, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bank = _Params(w1, w2, w3)
    loop = bank._loop(x, counts, w)
    torch.testing.assert_close(loop, bank._padded_bmm(x, counts, max(counts), w))
    torch.autograd.gradcheck(lambda *t: GroupedExperts._loop(_Params(*t[2:]), t[0], counts, t[1]), (x, w, w1, w2, w3))
    loop.sum().backward()
    for e, n in enumerate(counts):
        if n == 0:
            assert not w1.grad[e].any() and not w2.grad[e].any() and not w3.grad[e].any()


@pytest.mark.parametrize("counts,weighted", [([10, 0, 25, 5], True), ([0, 0, 0, 0], True), ([7, 9, 1, 3], False)])
def test_grouped_gemm_path_matches_the_loop_on_cpu(monkeypatch, counts, weighted):
    """The branch GPUs take (one ``torch._grouped_mm`` per weight bank), run here through
    PyTorch's CPU fallback of the same op, which makes the same stride checks: outputs and
    gradients equal the per-expert loop's, also for a loss whose gradient is expanded
    (``y.sum()``), which ``_grouped_mm``'s backward refuses unless made dense."""
    import moeflow.experts as experts

    g = torch.Generator().manual_seed(11)
    D, FF, P = 16, 24, sum(counts)
    bank = GroupedExperts(len(counts), D, FF)
    x = torch.randn(P, D, generator=g, requires_grad=True)
    w = torch.rand(P, generator=g, requires_grad=True) if weighted else None
    params = [x, bank.w1, bank.w2, bank.w3] + ([w] if weighted else [])

    def run(grouped: bool, loss):
        monkeypatch.setattr(experts, "_native_grouped_mm", lambda *t: grouped)
        y = bank.forward_sorted(x, counts, w)
        return [y.detach()] + list(torch.autograd.grad(loss(y), params, allow_unused=True))

    for loss in (lambda y: (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), lambda y: y.sum()):
        want, got = run(False, loss), run(True, loss)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
