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
import multiprocessing.util
import io
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

from . import _MODULES

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
    # per rank otherwise. And moeflow's public modules (imported lazily by `import moeflow`):
    # moeflow.layer brings in torch._dynamo (torch.compiler.disable); without them here a 2-rank
    # spawn took 1.4 s to reach fn on 2 cores, with them 0.06 s.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor", *_MODULES])
        return ctx
    return mp.get_context("spawn")


# What a failed start-up says when Gloo's TCP connection set-up went wrong (a peer closed or reset
# the socket during the handshake, or a connect timed out): outside our control, and gone on a
# fresh start. Anything else (no such backend, bad arguments) fails the same way every time.
_TRANSIENT_START = re.compile(r"connectFullMesh|Connection (closed|reset) by peer|Connection refused|"
                              r"Connect timeout|timed out connecting|Broken pipe")
_START_ATTEMPTS = 3


def _exit_with_launcher(rank: int, lifeline, tempdir: str | None) -> None:
    """End this rank within moments of its launcher's death, however it died.

    ``lifeline`` is the read end of a pipe whose only write end the launcher holds: when the
    launcher exits (SIGKILL, the OOM killer, a crash, with no chance to clean up) the kernel
    closes it and a daemon thread here reads EOF. (The parent process id cannot tell: under the
    fork server the parent is the server, which every rank keeps alive.) Rank 0 also removes the
    launcher's multiprocessing temporary directory (the fork server's socket), which the launcher
    no longer can; named semaphores are unlinked by multiprocessing's resource tracker, which
    outlives the launcher for that purpose.
    """

    def watch() -> None:
        try:
            lifeline.recv()
        except (EOFError, OSError):
            pass
        if rank == 0 and tempdir:
            shutil.rmtree(tempdir, ignore_errors=True)
        # one write (print sends the newline apart when Python is unbuffered): ranks share stderr
        sys.stderr.write(f"moeflow.spawn: rank {rank}: the launcher is gone; exiting\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="moeflow-launcher-watch", daemon=True).start()


def _worker(fn, args, kwargs, rank, world_size, port, attempt, backend, timeout_s, threads, env, lifeline,
            tempdir, results):
    try:
        _exit_with_launcher(rank, lifeline, tempdir)
        # The environment of this spawn() call, not the one the fork server was started with.
        os.environ.clear()
        os.environ.update(env)
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
        os.environ["LOCAL_RANK"] = str(rank)
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        try:
            # Each attempt joins under its own prefix, so a restarted start-up never meets keys
            # (Gloo addresses, heartbeats) that a killed attempt left behind.
            dist.init_process_group(backend, store=dist.PrefixStore(f"moeflow/start{attempt}", store),
                                    rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception:  # noqa: BLE001 - the parent decides whether to start again
            results.put((rank, "start_failed", traceback.format_exc()))
            return
        results.put((rank, "started", None))
        # fn runs only once every rank has joined: a rank whose peer failed to connect must not
        # have started the user's work (it would be run twice).
        store.wait([_go_key(attempt)])
        if store.get(_go_key(attempt)) != b"run":
            return
        out = fn(*args, **kwargs)
        # torch.save copies tensor data into the message; the queue's own pickler would share
        # storage through file descriptors that vanish when this process exits.
        blob = io.BytesIO()
        torch.save(out, blob)
        results.put((rank, "ok", blob.getvalue()))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        # Reported first: after a lost peer, tearing the group down can block on a transfer that
        # never completes; the parent kills a rank that is still here once every rank reported.
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - nothing left to report to
            pass


def _go_key(attempt: int) -> str:
    return f"moeflow/go{attempt}"


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

    Each rank sees the environment of this call (``os.environ`` now), however many calls came
    before. ``fn`` starts on a rank only once every rank has joined the process group. When joining
    fails because Gloo's TCP connection set-up broke (a peer closed or reset the socket, a
    connect timed out; seen now and then on a loaded machine), every rank
    is stopped and the whole group starts again, at most three times, with a warning on stderr.
    Any other start-up failure is raised at once.

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
            run on to the end (or to ``timeout_s``). Start-up failures are always raised.

    Raises:
        TypeError: the ranks could not import ``fn`` (before any process starts).
        RankError: a rank raised (the message holds its traceback) or died (the message holds
            its exit code or signal; ``exitcode`` is set), or could not join the group.
        TimeoutError: the run did not finish within ``timeout_s``.
        RuntimeError: this process is already a rank of a job (inside a process group, or
            started by torchrun): it must not start ranks of its own.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"spawn: world_size must be a positive int, got {world_size!r}")
    _check_importable(fn)
    import torch.distributed as dist

    launched = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    if dist.is_initialized() or len(launched) == 2:
        raise RuntimeError(f"spawn: this process is already a rank of a distributed job ("
                           f"{'inside a process group' if dist.is_initialized() else launched}, e.g. under "
                           "torchrun); run the function on each rank directly instead of spawning more ranks "
                           "(moeflow.parallel.run does either)")

    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    coll_timeout = collective_timeout_s or timeout_s
    # The parent hosts the store (port 0 = the OS picks a free port); children connect to it.
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    deadline = time.monotonic() + timeout_s
    try:
        for attempt in range(1, _START_ATTEMPTS + 1):
            run = _Run(fn, args, kwargs or {}, world_size, backend, coll_timeout, threads, store.port, attempt,
                       deadline, timeout_s)
            try:
                failure = run.start()
                if failure is None:
                    store.set(_go_key(attempt), "run")
                    return run.collect(return_failures)
                store.set(_go_key(attempt), "stop")
                if attempt == _START_ATTEMPTS or not _TRANSIENT_START.search(failure.traceback):
                    raise failure
                first = [ln for ln in failure.traceback.strip().splitlines() if ln.strip()][-1]
                print(f"moeflow.spawn: rank {failure.rank} could not join the process group ({first.strip()}); "
                      f"starting all {world_size} ranks again (attempt {attempt + 1} of {_START_ATTEMPTS})",
                      file=sys.stderr, flush=True)
            finally:
                run.stop()
    finally:
        del store
    raise AssertionError("unreachable")


class _Run:
    """One start of the ranks: its processes and the queue they report on."""

    def __init__(self, fn, args, kwargs, world_size, backend, coll_timeout, threads, port, attempt, deadline,
                 timeout_s):
        self.fn, self.world_size, self.deadline, self.timeout_s = fn, world_size, deadline, timeout_s
        ctx = _context()
        # A queue per start: a rank killed while writing may leave a queue's lock held.
        self.results = ctx.Queue()
        tempdir = mp.util.get_temp_dir() if ctx.get_start_method() == "forkserver" else None
        # Ranks get the read end; the write end never leaves this process (see _exit_with_launcher).
        lifeline, self.lifeline = ctx.Pipe(duplex=False)
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(fn, args, kwargs, r, world_size, port, attempt, backend, coll_timeout,
                                        threads, dict(os.environ), lifeline, tempdir, self.results))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()
        lifeline.close()
        self.done: set[int] = set()  # ranks that reported their end or died

    def _next(self, pending: set[int]) -> tuple[int, str, Any]:
        """The next report from a rank in ``pending``, or ``(rank, "died", exitcode)`` for one that
        exited without reporting; raises TimeoutError past the deadline."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"spawn: ranks {sorted(pending)} did not finish within {self.timeout_s:.0f} s")
            try:
                return self.results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r in sorted(pending) if self.procs[r].exitcode is not None]
                if not dead:
                    continue
                # A rank exited without reporting (killed, segfault, os._exit): give any report
                # in flight a moment, then name it.
                try:
                    return self.results.get(timeout=1.0)
                except queue.Empty:
                    return dead[0], "died", self.procs[dead[0]].exitcode

    def start(self) -> RankError | None:
        """Wait until every rank has joined the group; the first rank that could not, if any."""
        pending = set(range(self.world_size))
        while pending:
            rank, kind, val = self._next(pending)
            if kind == "started":
                pending.discard(rank)
            elif kind == "died":
                return self._died(rank, val, "could not join the process group: ")
            else:  # start_failed, or an error before init_process_group was reached
                return RankError(rank, val)
        return None

    def _died(self, rank: int, code: int, what: str = "") -> RankError:
        hint = ""
        if getattr(self.fn, "__module__", None) == "__main__":  # the rank re-imported the script
            hint = ("; if the script calls spawn outside `if __name__ == \"__main__\":`, every rank re-runs it "
                    "on import: put the call under that guard")
        return RankError(rank, what + _describe_exit(code) + hint, code)

    def collect(self, return_failures: bool) -> list[Any]:
        outs: dict[int, Any] = {}
        failures: dict[int, RankError] = {}
        while len(outs) + len(failures) < self.world_size:
            rank, kind, val = self._next(set(range(self.world_size)) - set(outs) - set(failures))
            if kind == "ok":
                import torch

                outs[rank] = torch.load(io.BytesIO(val), weights_only=False)
                continue
            err = self._died(rank, val) if kind == "died" else RankError(rank, val)
            if not return_failures:
                raise err
            failures[rank] = err
        self.done = set(range(self.world_size))
        return [outs[r] if r in outs else failures[r] for r in range(self.world_size)]

    def stop(self) -> None:
        # One grace period for all ranks together, not one per rank: 5 s when every rank
        # reported its end (they are tearing their groups down), else none to speak of.
        end = time.monotonic() + (5 if len(self.done) == self.world_size else 0.2)
        for p in self.procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.results.close()
        self.lifeline.close()
