"""``moeflow bench-layer`` at a tiny size: the report's structure and sanity (not speed), and the
no-dedup baseline layer against the dense reference used for MoELayer."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.distributed as dist

from moeflow import spawn
from moeflow.cli import main
from moeflow.commands.bench_layer import NoDedupMoE

TINY = ["--tokens", "48", "--hidden", "32", "--ffn", "16", "--experts", "8", "--topk", "3",
        "--iters", "2", "--warmup", "0", "--chunks", "1", "2"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_bench_layer_report(tmp_path, capsys):
    out = tmp_path / "layer.json"
    assert main(["bench-layer", "--ranks", "2", *TINY, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert (row["ranks"], row["tokens_per_rank"], row["hidden"], row["experts"], row["topk"]) == (2, 48, 32, 8, 3)
    cols = row["columns"]
    expected = ({"moeflow", "moeflow_bf16", "no_dedup", "moeflow_C2", "moeflow_auto"}
                | ({"deepspeed"} if HAS_DEEPSPEED else set()))
    assert set(cols) == expected
    for name, c in cols.items():
        assert c["ms"] > 0, name
        # tokens/s counts every rank's tokens
        assert c["tokens_per_s"] == pytest.approx(2 * 48 / (c["ms"] / 1e3)), name
        assert c["cpu_ms"] > 0, name
    r = row["ratios"]
    assert r["vs_no_dedup"] == pytest.approx(cols["no_dedup"]["ms"] / cols["moeflow"]["ms"])
    assert r["bf16_vs_no_dedup"] == pytest.approx(cols["no_dedup"]["ms"] / cols["moeflow_bf16"]["ms"])
    assert r["cpu_vs_no_dedup"] == pytest.approx(cols["no_dedup"]["cpu_ms"] / cols["moeflow"]["cpu_ms"])
    if HAS_DEEPSPEED:
        assert r["vs_deepspeed"] == pytest.approx(cols["deepspeed"]["ms"] / cols["moeflow"]["ms"])
        assert "DeepSpeed-MoE, dropless" in text
    # Every column computes the same layer (same weights, same routing) in fp32; bf16 on the wire
    # costs bf16 rounding, no more.
    diffs = row["max_abs_diff"]
    for name in ("no_dedup", "moeflow_C2") + (("deepspeed",) if HAS_DEEPSPEED else ()):
        assert diffs[name]["y"] < 1e-4 and diffs[name]["grad_x"] < 1e-4, (name, diffs[name])
    assert 0 < diffs["moeflow_bf16"]["y"] < 5e-2
    # Overlap: one row per chunk count; ratio = layer / max(comm, compute), best = fastest layer.
    assert [o["chunks"] for o in row["overlap"]] == [1, 2]
    for o in row["overlap"]:
        assert o["comm_ms"] > 0 and o["compute_ms"] > 0
        assert o["ratio"] == pytest.approx(o["layer_ms"] / max(o["comm_ms"], o["compute_ms"]))
    assert row["overlap"][0]["layer_ms"] == pytest.approx(cols["moeflow"]["ms"])
    assert row["best_chunks"] == min(row["overlap"], key=lambda o: o["layer_ms"])["chunks"]
    assert row["targets"] == {"vs_no_dedup": 1.5, "vs_deepspeed": 1.2, "overlap": 1.2, "auto_vs_best_chunks": 0.97}
    # 48 tokens: chunks of 256 tokens or more cannot be made, so auto has nothing to try
    assert row["auto_chunks"] == 1
    best_ms = min(o["layer_ms"] for o in row["overlap"])
    assert r["auto_vs_best_chunks"] == pytest.approx(best_ms / cols["moeflow_auto"]["ms"])
    assert "num_chunks='auto' chose C=1: " in text
    # Each ratio is said in words ("faster"/"slower"), its target beside it as context, not pass/fail.
    words = (f"{r['vs_no_dedup']:.2f}x faster" if r["vs_no_dedup"] >= 1 else f"{1 / r['vs_no_dedup']:.2f}x slower")
    assert f"moeflow vs no-dedup (fp32 wire both): {words} (target: 1.5x faster); bf16 wire: " in text
    assert "overlap at the fastest chunk count" in text and "(1.00 = perfect overlap; target: at most 1.2x)" in text
    assert "MISSED" not in text and " / no-dedup" not in text


def test_bench_layer_rejects_bad_arguments(capsys):
    assert main(["bench-layer", "--experts", "8", "--topk", "9"]) == 2
    assert capsys.readouterr().err == "moeflow bench-layer: error: --topk 9 exceeds --experts 8\n"
    assert main(["bench-layer", "--ranks", "3", "--experts", "8", "--no-deepspeed"]) == 2
    assert capsys.readouterr().err == "moeflow bench-layer: error: --experts 8 not divisible by 3 ranks\n"


# ----------------------------------------------------------------------------- the baseline itself
D, FF, E, K = 16, 8, 8, 3


def _weights():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, D, generator=g) * 0.3, torch.randn(E, D, FF, generator=g) * 0.3,
            torch.randn(E, FF, D, generator=g) * 0.3, torch.randn(E, D, FF, generator=g) * 0.3)


def _no_dedup_rank():
    rank, R = dist.get_rank(), dist.get_world_size()
    gate, w1, w2, w3 = _weights()
    layer = NoDedupMoE(D, FF, E, K, norm_topk_prob=True)
    with torch.no_grad():
        layer.router.gate.weight.copy_(gate)
        layer.experts.load_shard(w1, w2, w3, rank, R)
    x = torch.randn(7 + 2 * rank, D, generator=torch.Generator().manual_seed(10 + rank)).requires_grad_()
    y = layer(x)
    (y * torch.arange(y.numel()).view_as(y).cos()).sum().backward()
    return x.detach(), y.detach(), x.grad, layer.experts.w2.grad, layer.router.gate.weight.grad


def test_no_dedup_layer_matches_dense_reference():
    R = 4
    out = spawn(_no_dedup_rank, R, timeout_s=120)
    gate, w1, w2, w3 = (t.clone().requires_grad_() for t in _weights())
    loss = 0
    xs = []
    for x, *_ in out:
        x = x.clone().requires_grad_()
        scores = (x @ gate.t()).softmax(-1)
        w, idx = scores.topk(K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for t in range(x.size(0)):
            for k in range(K):
                e = int(idx[t, k])
                y[t] += w[t, k] * ((torch.nn.functional.silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e])
        loss = loss + (y * torch.arange(y.numel()).view_as(y).cos()).sum()
        xs.append((x, y))
    loss.backward()
    L = E // R
    for rank, ((x, y), (_, got_y, got_gx, got_gw2, got_ggate)) in enumerate(zip(xs, out)):
        torch.testing.assert_close(got_y, y.detach(), rtol=1e-4, atol=1e-5, msg=f"rank {rank} output")
        torch.testing.assert_close(got_gx, x.grad, rtol=1e-4, atol=1e-5, msg=f"rank {rank} grad x")
        torch.testing.assert_close(got_gw2, w2.grad[rank * L:(rank + 1) * L], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sum(o[4] for o in out), gate.grad, rtol=1e-4, atol=1e-5)


def test_third_party_output_is_kept_out_of_the_table():
    """What DeepSpeed prints while it sets up (Python prints, logging handlers made earlier,
    C-level writes) goes nowhere; what the benchmark prints after it comes through. In a fresh
    process: pytest's own capture would stand between the streams and the descriptors."""
    import subprocess
    import sys

    code = ("import logging, os, sys\n"
            "from moeflow.commands.bench_layer import _silenced\n"
            "log = logging.getLogger('third_party'); log.addHandler(logging.StreamHandler(sys.stderr))\n"
            "with _silenced():\n"
            "    print('[INFO] building ops')\n"
            "    log.warning('[WARNING] Setting accelerator to CPU')\n"
            "    os.write(1, b'C-level write\\n'); os.write(2, b'C-level error\\n')\n"
            "print('  table row')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "  table row\n" and out.stderr == ""
