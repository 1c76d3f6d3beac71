"""Under torchrun: the examples join torchrun's job (here 2 emulated nodes x 2 ranks on
127.0.0.1, c10d rendezvous) instead of spawning jobs of their own, and moeflow.spawn refuses to
run inside a job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from moeflow import spawn

from _torchrun import ATTEMPTS, ROOT, env, free_port, start_failed_transiently
from test_examples import check_train_fsdp_lines


def _torchrun(args: list[str], nodes: int = 2, per_node: int = 2, timeout: int = 240) -> list[str]:
    """Run ``args`` under ``nodes`` torchrun agents (one per emulated node) on this machine;
    the lines the workers printed. Run again once if Gloo's start-up failed (tests/_torchrun.py)."""
    for attempt in range(1, ATTEMPTS + 1):
        port = free_port()
        agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                                    "--nproc-per-node", str(per_node), "--node-rank", str(n), "--rdzv-backend", "c10d",
                                    "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"moeflow-test-{port}", *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env())
                  for n in range(nodes)]
        try:
            done = [agent.communicate(timeout=timeout) for agent in agents]
        finally:
            for agent in agents:
                if agent.poll() is None:
                    agent.kill()
        failed = [err for agent, (_, err) in zip(agents, done) if agent.returncode != 0]
        if failed and attempt < ATTEMPTS and any(start_failed_transiently(err, "in init_from_env") for err in failed):
            continue
        assert not failed, failed[0][-3000:]
        return [line for out, _ in done for line in out.strip().splitlines()]
    raise AssertionError("unreachable")


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
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script), str(pids_dir)], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


def test_only_a_gloo_start_up_failure_runs_a_torchrun_job_again():
    # what a worker printed when Gloo's set-up failed in its start-up (CI, load2A-2 on 2026-12-02)
    start_up = '''Traceback (most recent call last):
  File "tests/test_elastic.py", line 417, in _torchrun_worker
    dist.init_process_group("gloo")
  File "torch/distributed/distributed_c10d.py", line 1899, in init_process_group
  File "torch/distributed/distributed_c10d.py", line 2169, in _new_process_group_helper
    backend_class = ProcessGroupGloo(
RuntimeError: Gloo connectFullMesh failed with [gloo/transport/tcp/pair.cc:553] Connection closed by peer'''
    assert start_failed_transiently(start_up, "in _torchrun_worker")
    assert not start_failed_transiently(start_up, "in init_from_env")  # not where this job starts
    later = start_up.replace("in _torchrun_worker", "in _train_step")  # the code under test: never run again
    assert not start_failed_transiently(later, "in _torchrun_worker")
    assert not start_failed_transiently(start_up.replace("connectFullMesh failed", "invalid backend")
                                        .replace("Connection closed by peer", ""), "in _torchrun_worker")
