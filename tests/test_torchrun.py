"""Under torchrun: the examples join torchrun's job (here 2 emulated nodes x 2 ranks on
127.0.0.1, c10d rendezvous) instead of spawning jobs of their own, and moeflow.spawn refuses to
run inside a job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from moeflow import spawn

from test_examples import ROOT, check_train_fsdp_lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nodes: int = 2, per_node: int = 2, timeout: int = 240) -> list[str]:
    """Run ``args`` under ``nodes`` torchrun agents (one per emulated node) on this machine;
    the lines the workers printed."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                                "--nproc-per-node", str(per_node), "--node-rank", str(n), "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"moeflow-test-{port}", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
              for n in range(nodes)]
    lines = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=timeout)
            assert agent.returncode == 0, err[-3000:]
            lines += out.strip().splitlines()
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    return lines


def test_train_example_under_torchrun_on_two_nodes_is_one_job():
    # one 4-rank job across both agents (not two 2-rank jobs, nor 4 spawned jobs of their own)
    check_train_fsdp_lines(_torchrun(["examples/train_fsdp.py"]), world=4, dp=2)


def _nested_spawn():
    try:
        spawn(_nested_spawn, 2)
    except RuntimeError as e:
        return str(e)
    return "spawned"


def test_spawn_refuses_inside_a_job(monkeypatch):
    msg = spawn(_nested_spawn, 1, timeout_s=60)[0]
    assert "already a rank of a distributed job (inside a process group" in msg, msg
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")   # as torchrun sets them
    with pytest.raises(RuntimeError, match=r"already a rank of a distributed job \(\{'RANK': '1', 'WORLD_SIZE': '4'\}"):
        spawn(_nested_spawn, 2)


_WORKERS = """
import os, sys, time
from moeflow.parallel import run

def rank_fn(path):
    open(os.path.join(path, str(os.getpid())), "w").close()
    time.sleep(120)

if __name__ == "__main__":
    run(rank_fn, 2, sys.argv[1])
"""


@pytest.mark.faults
def test_workers_do_not_outlive_a_killed_torchrun_agent(tmp_path):
    """torchrun's agent killed without a chance to clean up (SIGKILL): its workers, inside
    moeflow.parallel.run, end within seconds instead of running on as orphans."""
    from test_launch import _running

    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    script = tmp_path / "workers.py"
    script.write_text(_WORKERS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script), str(pids_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(pids_dir)) < 2:
            assert agent.poll() is None, agent.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        workers = [int(p) for p in os.listdir(pids_dir)]
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
        t0 = time.monotonic()
        while any(map(_running, workers)) and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        # PR_SET_PDEATHSIG acts at once; 20 s leaves room for a loaded machine
        assert not any(map(_running, workers)), \
            f"workers still running {time.monotonic() - t0:.1f} s after the agent was killed"
    finally:
        agent.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
