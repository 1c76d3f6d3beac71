"""``moeflow plan``: reads .npy/.csv/.json loads, prints before/after balance, writes a placement
that ``--previous`` reads back, and fails with a named error on bad input."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from moeflow.balance import Placement, imbalance, plan
from moeflow.cli import main

from _files import write_loads

ARGS = ["--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "4"]


@pytest.fixture
def loads():
    return np.random.default_rng(0).pareto(1.1, (3, 16)) + 0.1


@pytest.mark.parametrize("fmt", ["npy", "csv", "json"])
def test_plan_reads_each_format_and_writes_the_planned_placement(tmp_path, capsys, loads, fmt):
    src = tmp_path / f"loads.{fmt}"
    write_loads(src, loads, json_key="loads")
    out = tmp_path / "p.json"
    assert main(["plan", str(src), *ARGS, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    got = Placement.load(out)
    want = plan(loads, 24, 4, 2, 4)
    assert torch.equal(got.phy2log, want.phy2log)
    before = imbalance(Placement.identity(3, 16, 4, 2), loads).numpy().mean()
    after = imbalance(want, loads).numpy().mean()
    assert f"before (no replicas)   {before:16.4f}" in text
    assert f"after                  {after:16.4f}" in text
    assert "gpu   0:" in text


@pytest.mark.parametrize("suffix", ["json", "npz", "pt"])
def test_previous_round_trips_and_replan_moves_nothing_on_same_loads(tmp_path, capsys, loads, suffix):
    np.save(tmp_path / "l.npy", loads)
    out = tmp_path / f"p.{suffix}"
    assert main(["plan", str(tmp_path / "l.npy"), *ARGS, "--out", str(out)]) == 0
    assert main(["plan", str(tmp_path / "l.npy"), *ARGS, "--previous", str(out)]) == 0
    assert "moves (expert weights copied from --previous): 0 of 72 slots" in capsys.readouterr().out


def test_bad_input_is_a_named_error(tmp_path, capsys, loads):
    np.save(tmp_path / "l.npy", loads)
    assert main(["plan", str(tmp_path / "l.npy"), "--replicas", "10", "--gpus", "2"]) == 2
    assert "num_replicas must be >= the number of logical experts (16), got num_replicas=10" in capsys.readouterr().err
    (tmp_path / "l.txt").write_text("1,2")
    assert main(["plan", str(tmp_path / "l.txt"), *ARGS]) == 2
    assert "LOADS must end in .npy, .csv or .json" in capsys.readouterr().err
