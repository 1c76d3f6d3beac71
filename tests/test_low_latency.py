"""Low-latency dispatch / combine on local Gloo ranks against a single-process reference."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from moeflow import Buffer, spawn
from moeflow.quant import per_token_cast_back, per_token_cast_to_fp8


def _inputs(case: dict, rank: int):
    g = torch.Generator().manual_seed(100 * case["seed"] + rank)
    N = case["N"][rank]
    E, K, H = case["E"], case["K"], case["H"]
    x = torch.randn(N, H, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]) if N else \
        torch.empty(0, K, dtype=torch.int64)
    if case.get("drop") and N:
        idx[torch.rand(N, K, generator=g) < case["drop"]] = -1
    w = torch.rand(N, K, generator=g)
    return x, idx, w


def _experts(recv_x, recv_count):
    """Expert e returns (e + 1) * its input; slots past recv_count hold NaN (they must be ignored)."""
    x = per_token_cast_back(recv_x[0].flatten(0, 1), recv_x[1].flatten(0, 1)).view(recv_x[0].shape) \
        if isinstance(recv_x, tuple) else recv_x.float()
    L, S, _ = x.shape
    y = x * torch.arange(1, L + 1, dtype=torch.float32).view(L, 1, 1)
    y[torch.arange(S).view(1, S) >= recv_count.view(L, 1)] = float("nan")
    return y.bfloat16()


def _run(cases, trim_on_cpu=True):
    R, rank = dist.get_world_size(), dist.get_rank()
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True)
    buffer._low_latency.trim_on_cpu = trim_on_cpu  # False: the static-shape path GPUs run
    results = []
    for case in cases:
        x, idx, w = _inputs(case, rank)
        T, E, fp8 = case["T"], case["E"], case["fp8"]
        mode = case.get("mode", "sync")
        stats = torch.zeros(E // R, dtype=torch.int32)
        buffer.counters.reset()
        recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
            x, idx, T, E, cumulative_local_expert_recv_stats=stats, use_fp8=fp8,
            async_finish=mode == "async", return_recv_hook=mode == "hook")
        if mode == "hook":
            assert not event.is_pending() and callable(hook)
            hook()
        else:
            assert hook is None
            event.current_stream_wait()
        dispatch_wire = buffer.counters.wire_bytes("dispatch")
        y = _experts(recv_x, recv_count)
        out = torch.empty(x.size(0), x.size(1), dtype=torch.bfloat16) if mode == "async" else None
        combined, event, hook = buffer.low_latency_combine(y, idx, w, handle, async_finish=mode == "async",
                                                           return_recv_hook=mode == "hook", out=out)
        (hook or event.current_stream_wait)()
        if out is not None:
            assert combined is out
        # A second dispatch (the other buffer set) must leave the first result alone.
        parts = (recv_x[0], recv_x[1]) if fp8 else (recv_x,)
        snapshot = [p.clone() for p in parts]
        buffer.low_latency_dispatch(x * 2, idx, T, E, use_fp8=fp8)
        # (bytes compared: float8 has no equality; the FP8 scales are column-major, as in DeepEP)
        same = all(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
                   for a, b in zip(parts, snapshot))
        results.append(dict(x=x, idx=idx, w=w, recv_x=recv_x, recv_count=recv_count, src_info=handle.src_info,
                            layout_range=handle.layout_range, y=y, combined=combined, stats=stats,
                            dispatch_wire=dispatch_wire, combine_wire=buffer.counters.wire_bytes("combine"),
                            same_twice=same))
    return results


def _reference(case, outs, R):
    """Per rank d: per local expert, the (src, token) of each slot in order; fp8 or bf16 rows."""
    L = case["E"] // R
    ref = []
    for d in range(R):
        slots = [[] for _ in range(L)]
        for s in range(R):
            for t, row in enumerate(outs[s]["idx"].tolist()):
                for e in row:
                    if e >= 0 and e // L == d:
                        slots[e % L].append((s, t))
        ref.append(slots)
    return ref


def _check(case, outs, R):
    E, K, T, H, fp8 = case["E"], case["K"], case["T"], case["H"], case["fp8"]
    L, name = E // R, case["name"]
    ref = _reference(case, outs, R)
    casts = [per_token_cast_to_fp8(o["x"]) if fp8 else None for o in outs]
    for d, o in enumerate(outs):
        where = f"{name}, rank {d}"
        assert o["same_twice"], f"{where}: a second dispatch overwrote the first result"
        counts = [len(sl) for sl in ref[d]]
        assert o["recv_count"].tolist() == counts and o["recv_count"].dtype == torch.int32, where
        assert o["stats"].tolist() == counts, where
        rx = o["recv_x"]
        assert (rx[0] if fp8 else rx).shape == (L, R * T, H)
        for e, sl in enumerate(ref[d]):
            for p, (s, t) in enumerate(sl):
                if fp8:
                    assert torch.equal(rx[0][e, p].view(torch.uint8), casts[s][0][t].view(torch.uint8)), where
                    assert torch.equal(rx[1][e, p], casts[s][1][t]), where
                else:
                    assert torch.equal(rx[e, p], outs[s]["x"][t]), where
                assert int(o["src_info"][e, p]) == t, where
            for s in range(R):
                begin = sum(1 for (q, _) in sl if q < s)
                count = sum(1 for (q, _) in sl if q == s)
                assert int(o["layout_range"][e, s]) == (begin << 32) | count, where
        # static bytes: R-1 peers x T slot rows each, whatever the routing
        pad8 = lambda n: -(-n // 8) * 8  # noqa: E731 - every field starts on 8 bytes
        row = pad8(H if fp8 else 2 * H) + pad8(4 * H // 128 if fp8 else 0) + pad8(K) + 8
        assert o["dispatch_wire"] == (R - 1) * T * row, where
        assert o["combine_wire"] == (R - 1) * T * (4 * K + 2 * H), where
    # combine: fp32 weighted sum of the expert outputs (bf16 round of each rank's partial sum)
    for s, o in enumerate(outs):
        exact = torch.zeros(o["x"].size(0), H)
        for t, row in enumerate(o["idx"].tolist()):
            for k, e in enumerate(row):
                if e < 0:
                    continue
                d = e // L
                p = ref[d][e % L].index((s, t))
                exact[t] += o["w"][t, k] * outs[d]["y"][e % L, p].float()
        assert not torch.isnan(o["combined"]).any(), f"{name}, rank {s}: unused slots leaked into combine"
        torch.testing.assert_close(o["combined"].float(), exact, rtol=2 ** -6, atol=2 ** -6,
                                   msg=lambda m: f"{name}, rank {s}: {m}")
        unrouted = (o["idx"] < 0).all(1)
        assert torch.all(o["combined"][unrouted] == 0)


def _cases(R):
    return [
        dict(name="fp8", seed=1, N=[16, 9, 0, 16][:R] + [5] * max(0, R - 4), T=16, E=4 * R, K=4, H=256, fp8=True, drop=0.2),
        dict(name="bf16-async", seed=2, N=[7] * R, T=8, E=2 * R, K=2, H=64, fp8=False, mode="async"),
        dict(name="fp8-hook-top8", seed=3, N=[12] * R, T=12, E=16 * R, K=8, H=128, fp8=True, mode="hook"),
    ]


@pytest.mark.parametrize("world_size,trim_on_cpu", [(1, True), (4, True), (4, False)])
def test_low_latency_matches_reference(world_size, trim_on_cpu):
    cases = _cases(world_size)
    outs = spawn(_run, world_size, cases, trim_on_cpu, timeout_s=180, collective_timeout_s=60)
    for i, case in enumerate(cases):
        _check(case, [outs[r][i] for r in range(world_size)], world_size)


def _bad():
    buffer = Buffer(low_latency_mode=True)
    rank = dist.get_rank()
    x, idx = torch.randn(5, 128).bfloat16(), torch.tensor([[0, 1]] * 5)
    msgs = []
    twice = torch.tensor([[0, 1], [2, 3], [5, -1], [4, 4], [6, 7]])
    for kwargs in (dict(x=x, num_max=4), dict(x=x.float()), dict(idx=idx + 99), dict(x=x[:, :100], fp8=True),
                   dict(idx=twice)):
        try:
            buffer.low_latency_dispatch(kwargs.get("x", x), kwargs.get("idx", idx), kwargs.get("num_max", 8), 8,
                                        use_fp8=kwargs.get("fp8", False))
        except (ValueError, TypeError) as e:
            msgs.append((type(e).__name__, str(e)))
    try:
        Buffer().low_latency_dispatch(x, idx, 8, 8)
    except ValueError as e:
        msgs.append(("ValueError", str(e)))
    try:
        buffer.low_latency_dispatch(x, idx, 8, 8, use_fp8=False, round_scale=True)
    except ValueError as e:
        msgs.append(("ValueError", str(e)))
    return rank, msgs


def test_bad_input_names_argument_and_rank():
    for rank, msgs in spawn(_bad, 2, timeout_s=60):
        assert len(msgs) == 7, msgs
        kinds = [k for k, _ in msgs]
        assert kinds == ["ValueError", "TypeError", "ValueError", "ValueError", "ValueError", "ValueError",
                         "ValueError"]
        assert all(f"rank {rank}" in m for _, m in msgs)
        assert "`x`" in msgs[0][1] and "more than num_max_dispatch_tokens_per_rank=4" in msgs[0][1]
        assert "`topk_idx`" in msgs[2][1] and "found 100" in msgs[2][1]
        assert "multiple of 128" in msgs[3][1]
        assert "`topk_idx`" in msgs[4][1] and "lists an expert twice for token 3 ([4, 4]; 1 such tokens)" in msgs[4][1]
        assert "low_latency_mode=True" in msgs[5][1]
        assert f"`round_scale` on rank {rank} needs use_fp8=True" in msgs[6][1]


def test_fp8_cast_into_kept_buffers_matches_fresh_cast():
    """The dispatch casts into buffers it keeps: same bits as the allocating cast (which is
    itself checked against the blockwise formula here), and a misfit buffer is named."""
    x = (torch.randn(6, 256) * torch.logspace(-5, 3, 6).view(6, 1)).bfloat16()
    x[2] = 0
    fresh = per_token_cast_to_fp8(x)
    out = (torch.empty(6, 256, dtype=torch.float8_e4m3fn), torch.empty(6, 2))
    kept = per_token_cast_to_fp8(x, out=out, workspace=torch.empty(6, 256))
    assert kept[0] is out[0] and kept[1] is out[1]
    assert torch.equal(kept[0].view(torch.uint8), fresh[0].view(torch.uint8)) and torch.equal(kept[1], fresh[1])
    blocks = x.float().view(6, 2, 128)
    scales = blocks.abs().amax(2).clamp(min=1e-4) / 448.0
    assert torch.equal(fresh[1], scales)
    assert torch.equal(fresh[0].view(torch.uint8),
                       (blocks / scales.unsqueeze(2)).to(torch.float8_e4m3fn).view(6, 256).view(torch.uint8))
    with pytest.raises(ValueError, match=r"`workspace` must be a contiguous \[6, 256\] torch.float32"):
        per_token_cast_to_fp8(x, workspace=torch.empty(6, 128))


@pytest.mark.parametrize("argv,match", [
    (["bench-ll", "--topk", "99"], r"moeflow bench-ll: error: --topk 99 exceeds --experts 64"),
    (["bench-ll", "--hidden", "100"], r"moeflow bench-ll: error: FP8 needs --hidden divisible by 128, got 100"),
    (["bench-ll", "--ranks", "3"], r"moeflow bench-ll: error: --experts 64 not divisible by 3 ranks"),
    (["bench", "--fp8", "--hidden", "100"], r"moeflow bench: error: FP8 needs --hidden divisible by 128, got 100"),
    (["bench", "--iters", "0"], r"moeflow bench: error: --iters must be >= 1, got 0"),
])
def test_bench_commands_check_the_workload_before_spawning(argv, match, capsys):
    from moeflow.cli import main

    assert main(argv) == 2
    assert re.fullmatch(match + "\n", capsys.readouterr().err)


def test_bench_ll_small_run(tmp_path):
    """``moeflow bench-ll`` runs and reports the static bytes the module docstring promises."""
    import json

    from moeflow.cli import main

    out = tmp_path / "ll.json"
    assert main(["bench-ll", "--ranks", "2", "--tokens", "8", "--hidden", "128", "--experts", "8", "--topk", "2",
                 "--iters", "1", "--warmup", "0", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    R, T, H, K = 2, 8, 128, 2
    assert row["ll_dispatch_wire_bytes"] == R * (R - 1) * T * (H + 8 + 8 + 8)   # fp8 | scales | ids | src
    assert row["ll_combine_wire_bytes"] == R * (R - 1) * T * (4 * K + 2 * H)   # weights, then one row per slot
    assert row["ll_dispatch_ms"] > 0 and row["raw_dispatch_ms"] > 0 and row["ll_vs_raw"] > 0


def _destroy_and_reuse():
    """``Buffer.destroy()`` frees the kept buffers; every kind of call works after it, with the
    same results as before (it once raised IndexError on the next low-latency dispatch)."""
    R, rank = dist.get_world_size(), dist.get_rank()
    buffer = Buffer(low_latency_mode=True)
    case = dict(seed=5, N=[6] * R, E=2 * R, K=2, H=128)
    x, idx, w = _inputs(case, rank)
    results = []
    for _ in range(2):
        # an odd number of low-latency calls before destroy: the next one takes the second set
        recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, idx, 8, case["E"], use_fp8=False)
        combined, _, _ = buffer.low_latency_combine(_experts(recv_x, count), idx, w, handle)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, case["E"])
        rx, *_, h, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                       num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
        y, _, _ = buffer.combine(rx, h)
        used = torch.cat([recv_x[e, :n] for e, n in enumerate(count.tolist())])  # the rest is never written
        results.append((used, count.clone(), combined, y))
        buffer.destroy()
    return results


def test_destroy_then_every_call_works_again():
    for rank, (first, second) in enumerate(spawn(_destroy_and_reuse, 2, timeout_s=60)):
        for a, b in zip(first, second):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"rank {rank}"
