"""moeflow.spawn's start-up: a broken Gloo connection set-up starts the group again, anything else
fails at once, and every call's environment reaches its ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from moeflow import RankError, spawn

pytestmark = pytest.mark.faults  # issue 14's classes: a flaky start, a frozen environment, orphans

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


_LAUNCHER = """
import os, sys, time
from moeflow import spawn

def rank_fn(path):
    open(os.path.join(path, str(os.getpid())), "w").close()
    time.sleep(120)

if __name__ == "__main__":
    spawn(rank_fn, 2, sys.argv[1], timeout_s=300)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_ranks_do_not_outlive_their_launcher(tmp_path, sig):
    """Killed without a chance to clean up, the launcher leaves no rank running and no temporary
    directory behind."""
    pids_dir, tmp = tmp_path / "pids", tmp_path / "tmp"
    pids_dir.mkdir()
    tmp.mkdir()
    script = tmp_path / "launcher.py"
    script.write_text(_LAUNCHER)
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join(sys.path))
    launcher = subprocess.Popen([sys.executable, str(script), str(pids_dir)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(pids_dir)) < 2:
            assert launcher.poll() is None, launcher.stderr.read().decode()
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.2)
        assert any(tmp.iterdir()), "the launcher's multiprocessing directory should exist while it runs"
        ranks = [int(p) for p in os.listdir(pids_dir)]
        launcher.send_signal(sig)
        launcher.wait(timeout=30)
        t0 = time.monotonic()
        while any(map(_running, ranks)) and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        assert not any(map(_running, ranks)), f"ranks still running {time.monotonic() - t0:.1f} s after the launcher died"
        while any(tmp.iterdir()) and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        assert not any(tmp.iterdir()), list(tmp.iterdir())
    finally:
        launcher.kill()
        for pid in os.listdir(pids_dir):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
