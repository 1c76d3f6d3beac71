"""Run a function on every rank: under torchrun (or any launcher that sets ``RANK`` and
``WORLD_SIZE``) on the ranks it started, else on local ranks from :func:`moeflow.spawn`.

The examples and ``moeflow demo`` use :func:`run`, so the same script works as
``python script.py`` (local Gloo ranks) and as ``torchrun --nnodes N --nproc-per-node P ...
script.py`` (the real job: one process per device, on as many nodes as torchrun joins).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..launch import spawn

__all__ = ["under_launcher", "init_from_env", "run"]


def under_launcher() -> bool:
    """True when a launcher (torchrun, SLURM scripts, ...) started this process as one rank of a
    job: ``RANK`` and ``WORLD_SIZE`` are set, or a process group already exists."""
    return dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_from_env(backend: str | None = None) -> bool:
    """Join the launcher's job (``env://``) unless this process already has a process group.

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default NCCL when CUDA is available (each rank then
            uses device ``LOCAL_RANK``), else Gloo.

    Returns:
        True when this call created the process group (the caller then destroys it).
    """
    if dist.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def run(fn: Callable[..., Any], num_ranks: int, *args: Any, **spawn_kwargs: Any) -> list[Any]:
    """``fn(*args)`` on every rank of the job this process belongs to, or on ``num_ranks`` local ranks.

    Under a launcher: joins its process group (:func:`init_from_env`), runs ``fn`` on this rank
    only, and returns ``[result]``; ``num_ranks`` is not used (the launcher chose the ranks).
    Otherwise: ``moeflow.spawn(fn, num_ranks, *args, **spawn_kwargs)``, one result per rank.
    """
    if not under_launcher():
        return spawn(fn, num_ranks, *args, **spawn_kwargs)
    created = init_from_env()
    try:
        return [fn(*args)]
    finally:
        if created:
            dist.destroy_process_group()
