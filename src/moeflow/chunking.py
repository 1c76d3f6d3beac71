"""``num_chunks="auto"``: the chunk count of an MoE layer's token pipeline, chosen by timing it.

Which chunk count is fastest depends on the machine more than on any rule: more chunks hide
more communication behind the experts but pay per-message latency and smaller GEMMs, and on a
CPU smaller chunks can even compute faster (they stay in cache) or slower (more, smaller
matmuls). So the layer measures: for each token count T (rounded up to a power of two) it runs
``TRIALS`` forwards at each candidate count in turn, takes the shortest time of each (other
work on the machine only ever adds time, so the minimum is the steadiest estimate), agrees on
the slowest rank's figures with one all-reduce, and keeps the fastest count (the fewest chunks
on a tie) for that T from then on. Every rank sees the same T (the layer agrees on the largest
first) and runs the same trials in the same order, so all pick the same count.

Candidates: 1, 2 and 4 chunks, a count only when its chunks hold at least ``MIN_TOKENS`` tokens.
Timing covers the forward pipeline (dispatch, experts, combine): backward runs the same
transfers and GEMMs per chunk, so it follows the forward's ranking. On CUDA the clock waits for
the device (one synchronize per trial forward, none after).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["ChunkTuner"]

CANDIDATES = (1, 2, 4)
MIN_TOKENS = 256   # a chunk of fewer tokens pays more in per-message latency than it can hide
TRIALS = 3         # forwards timed per candidate (the shortest counts): one slow outlier does not decide


class ChunkTuner:
    """Per-T chunk counts for one layer; see the module docstring.

    Args:
        all_reduce: in-place all-reduce over the expert-parallel group taking an ``op`` keyword
            (the layer's ``Buffer.all_reduce``), or None on one rank.
    """

    def __init__(self, all_reduce: Optional[Callable[..., torch.Tensor]]) -> None:
        self._all_reduce = all_reduce
        self.chosen: dict[int, int] = {}                 # T bucket -> chunk count
        self._times: dict[int, list[list[float]]] = {}   # T bucket -> seconds per candidate
        self._device = torch.device("cpu")

    @staticmethod
    def candidates(T: int) -> list[int]:
        return [c for c in CANDIDATES if c == 1 or T // c >= MIN_TOKENS]

    def next(self, T: int) -> tuple[int, bool]:
        """``(chunk count, timed)`` for a forward of T tokens (T already agreed by every rank)."""
        bucket = 1 << max(T - 1, 0).bit_length()
        if bucket in self.chosen:
            return self.chosen[bucket], False
        cands = self.candidates(bucket)
        if len(cands) == 1:
            self.chosen[bucket] = 1
            return 1, False
        times = self._times.setdefault(bucket, [[] for _ in cands])
        done = sum(len(t) for t in times)
        return cands[done % len(cands)], True

    def start(self, device: torch.device) -> float:
        self._device = device  # where the agreement's all-reduce runs (NCCL: the GPU)
        _sync(device)
        return time.perf_counter()

    def stop(self, T: int, chunks: int, t0: float, device: torch.device) -> None:
        """The trial forward of ``chunks`` chunks that began at ``t0`` (:meth:`start`) is over."""
        _sync(device)
        self.record(T, chunks, time.perf_counter() - t0)

    def record(self, T: int, chunks: int, seconds: float) -> None:
        """One trial's time; after the last trial, agree on the fastest count (one all-reduce
        of the candidates' shortest times)."""
        bucket = 1 << max(T - 1, 0).bit_length()
        cands = self.candidates(bucket)
        times = self._times[bucket]
        times[cands.index(chunks)].append(seconds)
        if min(len(t) for t in times) < TRIALS:
            return
        best = torch.tensor([min(t) for t in times], dtype=torch.float64, device=self._device)
        if self._all_reduce is not None:
            # the slowest rank decides, and every rank gets the same numbers: the same choice
            self._all_reduce(best, op=dist.ReduceOp.MAX)
        self.chosen[bucket] = cands[int(torch.argmin(best))]  # host sync, once; argmin: fewest chunks on a tie
        del self._times[bucket]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the clock must see the device's work, not its launch
