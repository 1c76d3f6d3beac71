"""Run a function on every rank: under torchrun (or any launcher that sets ``RANK`` and
``WORLD_SIZE``) on the ranks it started, else on local ranks from :func:`moeflow.spawn`.

The examples and ``moeflow demo`` use :func:`run`, so the same script works as
``python script.py`` (local Gloo ranks) and as ``torchrun --nnodes N --nproc-per-node P ...
script.py`` (the real job: one process per device, on as many nodes as torchrun joins).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..launch import spawn

__all__ = ["under_launcher", "init_from_env", "exit_with_agent", "run"]


def under_launcher() -> bool:
    """True when a launcher (torchrun, SLURM scripts, ...) started this process as one rank of a
    job: ``RANK`` and ``WORLD_SIZE`` are set, or a process group already exists."""
    return dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_from_env(backend: str | None = None, timeout_s: Optional[float] = None) -> bool:
    """Join the launcher's job (``env://``) unless this process already has a process group.
    Under torchrun, this worker also ends when its agent dies (:func:`exit_with_agent`).

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default NCCL when CUDA is available (each rank then
            uses device ``LOCAL_RANK``), else Gloo.
        timeout_s: the process group's timeout for one collective (default: torch's).

    Returns:
        True when this call created the process group (the caller then destroys it).
    """
    exit_with_agent()
    if dist.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s) if timeout_s else None)
    return True


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_agent_watched = False


def exit_with_agent() -> None:
    """Under torchrun (env ``TORCHELASTIC_RUN_ID``), make this worker end within moments of its
    agent's death, however the agent died (SIGKILL, the OOM killer), so that no worker trains
    on, or blocks in a collective, without the agent that would have stopped it.

    On Linux the kernel sends SIGKILL to this process when its parent goes
    (``prctl(PR_SET_PDEATHSIG)``): no thread, no polling delay, and it works while the worker
    is stuck in a C call holding the interpreter. "Parent" means the thread that started this
    process; torchrun's agent starts its workers from its main thread, so that thread ends
    only with the agent. SIGKILL, not SIGTERM: the job is broken once its agent is gone, and a
    training script's SIGTERM handler (checkpoint on preemption) would wait on collectives
    that never finish. Elsewhere a daemon thread polls the parent pid every 0.5 s. Outside
    torchrun (another launcher, a shell) nothing changes: a parent's death need not end a
    process that was started with nohup, say. Idempotent.
    """
    global _agent_watched
    if _agent_watched or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _agent_watched = True
    agent = os.getppid()
    watched = False
    if sys.platform.startswith("linux"):
        try:
            watched = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):  # no libc prctl: poll instead
            watched = False
    if not watched:
        threading.Thread(target=_poll_parent, args=(agent,), name="moeflow-agent-watch", daemon=True).start()
    if os.getppid() != agent:  # the agent died before the signal was armed: no one sends it now
        _agent_gone(agent)


def _poll_parent(agent: int) -> None:
    while os.getppid() == agent:
        time.sleep(0.5)
    _agent_gone(agent)


def _agent_gone(agent: int) -> None:
    # one write (print sends the newline apart when Python is unbuffered): workers share stderr
    sys.stderr.write(f"moeflow: rank {os.environ.get('RANK', '?')}: torchrun's agent (pid {agent}) is gone; exiting\n")
    sys.stderr.flush()
    os._exit(1)


def run(fn: Callable[..., Any], num_ranks: int, *args: Any, **spawn_kwargs: Any) -> list[Any]:
    """``fn(*args)`` on every rank of the job this process belongs to, or on ``num_ranks`` local ranks.

    Under a launcher: joins its process group (:func:`init_from_env`, with ``collective_timeout_s``
    from ``spawn_kwargs`` as its timeout), runs ``fn`` on this rank only, and returns
    ``[result]``; ``num_ranks`` is not used (the launcher chose the ranks). Under torchrun the
    worker ends when its agent dies.
    Otherwise: ``moeflow.spawn(fn, num_ranks, *args, **spawn_kwargs)``, one result per rank.
    """
    if not under_launcher():
        return spawn(fn, num_ranks, *args, **spawn_kwargs)
    created = init_from_env(timeout_s=spawn_kwargs.get("collective_timeout_s"))
    try:
        return [fn(*args)]
    finally:
        if created:
            dist.destroy_process_group()
