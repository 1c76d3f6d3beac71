"""Spawn local ranks: one process per rank, joined into a torch.distributed group.

This is the one harness that the tests, ``moeflow bench`` and ``moeflow demo`` use to run a
function on N local Gloo ranks. The parent process hosts the rendezvous store on a free port, so
two runs never race for a port; each child initialises the process group with a timeout, runs
the function and reports either its return value or its traceback. The first failure ends the
run: the other ranks are killed (they may be blocked in a collective that will never complete)
and the failing rank's traceback is raised in the parent. A rank that dies without reporting
(killed, segfault, ``os._exit``) is named with its exit code or signal within about a second.
With ``return_failures=True`` the run instead waits for the other ranks and returns each
failure in its rank's slot (the fault tests use this to read what the survivors saw).
"""

from __future__ import annotations

import datetime
import functools
import multiprocessing as mp
import io
import os
import queue
import signal
import sys
import time
import traceback
from typing import Any, Callable

__all__ = ["spawn", "RankError"]


class RankError(RuntimeError):
    """A spawned rank failed; carries the rank, its traceback text and, if it died, its exit code.

    ``exitcode`` is None when the rank raised (``traceback`` holds it), else the process's exit
    code (negative: killed by that signal).
    """

    def __init__(self, rank: int, tb: str, exitcode: int | None = None):
        super().__init__(f"rank {rank} failed:\n{tb}")
        self.rank = rank
        self.traceback = tb
        self.exitcode = exitcode


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"process was killed by {name} (exit code {code}) without reporting"
    return f"process exited with code {code} without reporting"


def _context() -> mp.context.BaseContext:
    # forkserver: the server imports torch once, every rank forks from that clean process (no
    # OpenMP threads, no pytest state), so a rank starts in ~0.1 s instead of re-importing torch.
    # torch.distributed.tensor too: transformers and torch.distributed.checkpoint import it, ~2 s
    # per rank otherwise.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor"])
        return ctx
    return mp.get_context("spawn")


def _worker(fn, args, kwargs, rank, world_size, port, backend, timeout_s, threads, results):
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
        os.environ["LOCAL_RANK"] = str(rank)
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        out = fn(*args, **kwargs)
        # torch.save copies tensor data into the message; the queue's own pickler would share
        # storage through file descriptors that vanish when this process exits.
        blob = io.BytesIO()
        torch.save(out, blob)
        results.put((rank, True, blob.getvalue()))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        # Reported first: after a lost peer, tearing the group down can block on a transfer that
        # never completes; the parent kills a rank that is still here once every rank reported.
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - nothing left to report to
            pass


_IMPORT_FIX = ("define it with `def` at module level in a file (a module, or the script itself with the "
               "spawn call under `if __name__ == \"__main__\":`) and pass it by name, as "
               "examples/dispatch_combine.py does")


def _check_importable(fn: Callable[..., Any]) -> None:
    """Each rank is a fresh process that imports ``fn`` by module and name: refuse at once what
    it cannot find (a lambda, a nested function, a function of an interactive ``__main__``)."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    if not callable(target):
        raise TypeError(f"spawn: `fn` must be callable, got {type(fn).__name__}")
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module is None or qualname is None:  # a callable object: pickling decides
        return
    if "<lambda>" in qualname or "<locals>" in qualname:
        kind = "a lambda" if "<lambda>" in qualname else "a function defined inside another function"
        raise TypeError(f"spawn: `fn` ({qualname}) is {kind}, which the ranks cannot import; {_IMPORT_FIX}")
    if module == "__main__" and getattr(sys.modules.get("__main__"), "__file__", None) is None:
        raise TypeError(f"spawn: `fn` ({qualname}) is defined in the __main__ of `python -c`, a REPL or a notebook, "
                        f"which the ranks cannot import; {_IMPORT_FIX}")


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
          timeout_s: float = 120.0, collective_timeout_s: float | None = None,
          threads_per_rank: int | None = None, kwargs: dict | None = None,
          return_failures: bool = False) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` local ranks and return the results by rank.

    Args:
        fn: a module-level function of an importable file (each rank imports it by name; a
            lambda, a nested function or one defined under ``python -c`` or in a notebook is
            refused with ``TypeError``); it runs after ``init_process_group`` and may use the
            default group. Its return value must be picklable.
        world_size: number of ranks, >= 1.
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"``.
        timeout_s: wall-clock limit for the whole run; past it every rank is killed and
            ``TimeoutError`` is raised.
        collective_timeout_s: the process group's timeout for one collective (default
            ``timeout_s``), so a rank waiting on a peer that never comes raises instead of hanging.
        threads_per_rank: intra-op threads for each rank (default: cores / ranks, at least 1).
        return_failures: False (default): the first failure kills the other ranks and is raised.
            True: a failed or dead rank's slot holds its :class:`RankError` and the other ranks
            run on to the end (or to ``timeout_s``).

    Raises:
        TypeError: the ranks could not import ``fn`` (before any process starts).
        RankError: a rank raised (the message holds its traceback) or died (the message holds
            its exit code or signal; ``exitcode`` is set).
        TimeoutError: the run did not finish within ``timeout_s``.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"spawn: world_size must be a positive int, got {world_size!r}")
    _check_importable(fn)
    import torch.distributed as dist

    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    coll_timeout = collective_timeout_s or timeout_s
    # The parent hosts the store (port 0 = the OS picks a free port); children connect to it.
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    ctx = _context()
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(fn, args, kwargs or {}, r, world_size, store.port, backend,
                               coll_timeout, threads, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    failures: dict[int, RankError] = {}
    deadline = time.monotonic() + timeout_s

    def fail(err: RankError) -> None:
        if not return_failures:
            raise err
        failures[err.rank] = err

    try:
        while len(outs) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outs) - set(failures))
                raise TimeoutError(f"spawn: ranks {missing} did not finish within {timeout_s:.0f} s")
            try:
                rank, ok, val = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in outs and r not in failures and p.exitcode is not None]
                if not dead:
                    continue
                # A rank exited without reporting (killed, segfault, os._exit): give any report
                # in flight a moment, then fail naming it.
                try:
                    rank, ok, val = results.get(timeout=1.0)
                except queue.Empty:
                    code = procs[dead[0]].exitcode
                    hint = ""
                    if getattr(fn, "__module__", None) == "__main__":  # the rank re-imported the script
                        hint = ("; if the script calls spawn outside `if __name__ == \"__main__\":`, every rank "
                                "re-runs it on import: put the call under that guard")
                    fail(RankError(dead[0], _describe_exit(code) + hint, code))
                    continue
            if not ok:
                fail(RankError(rank, val))
                continue
            import torch

            outs[rank] = torch.load(io.BytesIO(val), weights_only=False)
    finally:
        # One grace period for all ranks together, not one per rank.
        end = time.monotonic() + (5 if len(outs) + len(failures) == world_size else 0.2)
        for p in procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        del store
    return [outs[r] if r in outs else failures[r] for r in range(world_size)]
