"""moeflow.spawn's start-up: a broken Gloo connection set-up starts the group again, anything else
fails at once, and every call's environment reaches its ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moeflow import RankError, spawn

_MARKER = "MOEFLOW_TEST_START_MARKER"


def _gloo_that_breaks_once(store, rank, world_size, timeout):
    """Gloo, except that rank 1's first start fails as Gloo's does when a peer closes the socket
    during the connection handshake (the failure issue 16 saw once in a few hundred starts)."""
    marker = os.environ[_MARKER]
    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("Gloo connectFullMesh failed with [../third_party/gloo/gloo/transport/tcp/pair.cc:599] "
                           "Connection closed by peer [127.0.0.1]:41234")
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def _gloo_that_never_starts(store, rank, world_size, timeout):
    with open(os.environ[_MARKER], "a") as f:
        f.write(f"{rank}\n")
    raise ValueError(f"no device for rank {rank}")


# Registered when a rank imports this module to unpickle its function, before it joins the group.
dist.Backend.register_backend("gloo_breaks_once", _gloo_that_breaks_once, devices=["cpu"])
dist.Backend.register_backend("gloo_never_starts", _gloo_that_never_starts, devices=["cpu"])


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return float(t)


def test_a_broken_connection_at_start_up_starts_the_group_again(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(_MARKER, str(tmp_path / "broke"))
    assert spawn(_sum_of_ranks, 3, backend="gloo_breaks_once", timeout_s=120) == [3.0] * 3
    err = capfd.readouterr().err
    assert "rank 1 could not join the process group (RuntimeError: Gloo connectFullMesh failed" in err, err
    assert "starting all 3 ranks again (attempt 2 of 3)" in err, err


def test_any_other_start_up_failure_is_raised_at_once(tmp_path, monkeypatch):
    marker = tmp_path / "starts"
    monkeypatch.setenv(_MARKER, str(marker))
    with pytest.raises(RankError, match=r"ValueError: no device for rank \d") as info:
        spawn(_sum_of_ranks, 2, backend="gloo_never_starts", timeout_s=120)
    assert "could not join" not in str(info.value)
    assert len(marker.read_text().split()) <= 2  # one start, not three


def _env(name):
    return os.environ.get(name)


def test_every_call_passes_its_own_environment(monkeypatch):
    monkeypatch.setenv("MOEFLOW_TIMEOUT_S", "7")
    assert spawn(_env, 2, "MOEFLOW_TIMEOUT_S", timeout_s=60) == ["7", "7"]
    monkeypatch.setenv("MOEFLOW_TIMEOUT_S", "11")  # the fork server is already running now
    assert spawn(_env, 2, "MOEFLOW_TIMEOUT_S", timeout_s=60) == ["11", "11"]
    monkeypatch.delenv("MOEFLOW_TIMEOUT_S")
    assert spawn(_env, 1, "MOEFLOW_TIMEOUT_S", timeout_s=60) == [None]
