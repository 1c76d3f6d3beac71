"""The commands check every flag before the first rank starts: a flag they cannot run with is one
line on stderr (``moeflow demo: error: ...``) and exit status 2, never a traceback, nor an error
after the run (an --out that cannot be written, found once the training is over)."""

from __future__ import annotations

import tempfile

import pytest

import moeflow.launch
import moeflow.parallel.launch
from moeflow.cli import main

pytestmark = pytest.mark.faults


def _error(fn) -> str:
    try:
        fn()
    except OSError as e:
        return e.strerror
    return "no error"


@pytest.fixture
def no_ranks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(moeflow.launch, "spawn", refuse)
    monkeypatch.setattr(moeflow.parallel.launch, "spawn", refuse)


CASES = [
    (["demo", "--out", "{file}"], "--out {file} is a file, not a directory"),
    (["demo", "--out", "{file}/run"], "--out {file}/run cannot be created: {file} is a file"),
    (["demo", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["demo", "--layers", "0"], "--layers must be >= 2 (the first block is dense, so 0 block(s) hold no MoE layer), "
                                "got 0"),
    (["demo", "--layers", "1"], "--layers must be >= 2 (the first block is dense, so 1 block(s) hold no MoE layer), "
                                "got 1"),
    (["demo", "--ranks", "0"], "--ranks must be >= 1, got 0"),
    (["demo", "--dp", "0"], "--dp must be >= 1, got 0"),
    (["demo", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["demo", "--experts", "0"], "--experts must be >= 1, got 0"),
    (["demo", "--ranks", "1", "--experts", "1"], "--experts must be >= 2, the experts each token picks, got 1"),
    (["demo", "--rebalance-every", "-1"], "--rebalance-every must be >= 0, got -1"),
    (["demo", "--ranks", "3", "--replicas", "16"],
     "--replicas 16 must be >= --experts 16 and divide by the 3 expert-parallel ranks"),
    (["demo", "--kill-rank", "1"], "--kill-rank, --at-step, --add-rank-at-step and --checkpoint-every need --elastic"),
    (["demo", "--checkpoint", "full"],
     "--checkpoint needs --pp P with P > 1 (the pipelined demo; without one they change nothing)"),
    (["demo", "--schedule", "1f1b", "--no-overlap"],
     "--schedule, --no-overlap need --pp P with P > 1 (the pipelined demo; without one they change nothing)"),
    (["demo", "--ranks", "4", "--dp", "3"], "--dp 3 must divide the 4 ranks"),
    (["demo", "--ranks", "2", "--replicas", "17"],
     "--replicas 17 must be >= --experts 16 and divide by the 2 expert-parallel ranks"),
    (["bench", "--json", "{dir}"], "--json {dir} is a directory, not a file"),
    (["bench", "--json", "{file}/out.json"], "--json {file}/out.json: the directory {file} does not exist"),
    (["bench", "--json", "{dir}/missing/out.json"], "--json {dir}/missing/out.json: the directory {dir}/missing "
                                                    "does not exist"),
    (["bench", "--json", "/proc/moeflow.json"], "--json /proc/moeflow.json is not writable ({proc_error})"),
    (["demo", "--out", "/proc/moeflow"], "--out /proc/moeflow is not writable ({proc_dir_error} in /proc)"),
    (["bench", "--ranks", "0"], "--ranks must be >= 1, got 0"),
    (["bench", "--ranks", "2", "0"], "--ranks must be >= 1, got 2 0"),
    (["bench", "--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["bench", "--hidden", "-3"], "--hidden must be >= 1, got -3"),
    (["bench", "--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["bench", "--ranks-per-node", "0"], "--ranks-per-node 0 must divide every --ranks [2]"),
    (["bench-layer", "--ffn", "0"], "--ffn must be >= 1, got 0"),
    (["bench-layer", "--chunks", "2", "0"], "--chunks must be >= 1, got 2 0"),
    (["bench-layer", "--json", "{file}/x.json"], "--json {file}/x.json: the directory {file} does not exist"),
    (["bench-ll", "--iters", "0"], "--iters must be >= 1, got 0"),
    (["bench-ll", "--topk", "0"], "--topk must be >= 1, got 0"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_flags_are_one_line_before_any_rank_starts(argv, message, tmp_path, capsys, no_ranks):
    """(/proc: unwritable even for root, whose permission bits say otherwise)"""
    paths = dict(file=str(tmp_path / "a_file"), dir=str(tmp_path),
                 proc_error=_error(lambda: open("/proc/moeflow.json", "a")),
                 proc_dir_error=_error(lambda: tempfile.TemporaryFile(dir="/proc")))
    (tmp_path / "a_file").write_text("")
    argv = [a.format(**paths) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err == f"moeflow {argv[0]}: error: {message.format(**paths)}\n"
    assert out == ""


def test_a_bad_timeout_in_the_environment_is_one_line(tmp_path, capsys, monkeypatch, no_ranks):
    monkeypatch.setenv("MOEFLOW_TIMEOUT_S", "soon")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "moeflow demo: error: env MOEFLOW_TIMEOUT_S must be a number of seconds, got 'soon'\n"


def test_the_checks_leave_nothing_behind(tmp_path, no_ranks):
    """--out may name a directory to be made (the run makes it), --json a file to be written
    (the run writes it): the checks leave neither, nor their probes."""
    with pytest.raises(AssertionError, match="a rank was started"):
        main(["demo", "--out", str(tmp_path / "new" / "run"), "--quiet"])
    with pytest.raises(AssertionError, match="a rank was started"):
        main(["bench", "--json", str(tmp_path / "out.json")])
    assert list(tmp_path.iterdir()) == []
