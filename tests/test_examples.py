"""The README's example runs and says what it should."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_example(name: str, timeout: int, ranks: int = 2) -> list[str]:
    """Run ``examples/<name>`` as a user would; its output lines (one per rank)."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name)],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == ranks, out.stdout
    return lines


def check_train_fsdp_lines(lines: list[str], world: int, dp: int) -> None:
    """``examples/train_fsdp.py``'s lines: one per rank of one job, each rank trained, and the
    expert bias (reduced over every rank) the same everywhere."""
    sums = set()
    for rank, line in enumerate(sorted(lines, key=lambda s: int(s.split()[1]))):
        m = re.match(rf"rank {rank} of {world} \({dp} dp x {world // dp} ep\): loss ([\d.]+) -> ([\d.]+), "
                     r"expert bias checksum ([\d.]+)$", line)
        assert m, line
        assert float(m.group(2)) < float(m.group(1)) - 1.0, line
        sums.add(m.group(3))
    assert len(sums) == 1 and float(sums.pop()) > 0, lines


def test_train_fsdp_example_runs():
    check_train_fsdp_lines(_run_example("train_fsdp.py", 240, ranks=4), world=4, dp=2)


def test_dispatch_combine_example_runs():
    for rank, line in enumerate(_run_example("dispatch_combine.py", 120)):
        m = re.match(rf"rank {rank}: received \d+ rows, per local expert \[[\d, ]+\]; "
                     r"combine error vs dense ([\d.]+) \(bf16\)", line)
        assert m, line
        assert float(m.group(1)) < 0.1  # bf16 rounding of the toy expert, not a routing error


def test_bench_cli_small_run(tmp_path, capsys):
    import json

    from moeflow.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--ranks", "2", "--tokens", "64", "--hidden", "256", "--experts", "8",
                 "--topk", "2", "--iters", "2", "--warmup", "1", "--fp8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    # one ratio convention: how much faster or slower moeflow is than each baseline, in words
    assert len(re.findall(r"moeflow is \d+\.\d\dx (faster|slower)", text)) == 6, text  # raw (wall, CPU), no-dedup x 2 modes
    assert "ours / raw" not in text and "speed-up" not in text
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["bf16", "fp8"]
    for r in rows:
        assert r["dispatch_ms"] > 0 and r["raw_dispatch_ms"] > 0 and r["no_dedup_ms"] > 0
        # dedup never sends more payload than one row per token-expert pair
        assert r["dispatch_wire_bytes"] <= r["no_dedup_wire_bytes"] // 2 * 1.1
    assert rows[0]["metadata_overhead"] < 0.1
    assert rows[1]["fp8_vs_no_dedup_dispatch"] < 0.6


def test_hf_expert_parallel_example_runs():
    pytest.importorskip("transformers")
    for rank, line in enumerate(_run_example("hf_expert_parallel.py", 180)):
        m = re.match(rf"rank {rank}: 2 MoE layers, experts {4 * rank}-{4 * rank + 3} of 8 here; "
                     r"max \|logit difference\| vs the unmodified model ([\d.e+-]+)$", line)
        assert m, line
        assert float(m.group(1)) < 1e-4  # float32 rounding, not a routing or weight error


class _Writes:
    """A stdout that records each write call."""

    def __init__(self):
        self.calls: list[str] = []

    def write(self, s: str) -> int:
        self.calls.append(s)
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("name", ["dispatch_combine.py", "hf_expert_parallel.py", "train_fsdp.py"])
def test_example_lines_go_out_in_one_write_each(name, monkeypatch):
    """Under torchrun the workers of a node share one stdout: a line written in two calls (print's
    text, then its newline, when Python is unbuffered) can have another worker's line between them."""
    import runpy

    import moeflow.parallel

    if name == "hf_expert_parallel.py":
        pytest.importorskip("transformers")
    lines = ["rank 0: first", "rank 1: second"]
    monkeypatch.setattr(moeflow.parallel, "run", lambda fn, num_ranks, *a, **k: lines)  # no ranks started
    out = _Writes()
    monkeypatch.setattr(sys, "stdout", out)
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    assert out.calls == [line + "\n" for line in lines]
