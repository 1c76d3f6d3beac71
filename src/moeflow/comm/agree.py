"""What every rank of a group must hold alike, checked in one small exchange.

Ranks that disagree on a size (one built its layer with other sizes, read another config) make
their collectives pair mismatched messages: Gloo aborts the process (``EnforceNotMet ... 96 vs
80``), NCCL reads garbage or hangs, and a different number of calls waits for the timeout and
then blames a slow transfer. Checked here instead, as a ``ValueError`` on every rank that names
the ranks and their values:

- once, where a thing is built: the Buffer's topology (:class:`~moeflow.comm.buffer.Buffer`),
  an MoE layer's sizes and options (:class:`~moeflow.MoELayer`), the replicated and full
  weights a model is split from (``expert_parallelize``);
- on every fresh dispatch, inside the count exchange it makes anyway: hidden size, dtype,
  experts, top-k, weights or not (:mod:`moeflow.comm.checks`).

An exchange is one ``all_to_all`` of a few int64 per peer through the group's Transport
(watched and counted); the values each rank shows in a message travel only once a
disagreement was found (a second exchange that every rank makes, since every rank sees it).
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch

from .transport import Transport

__all__ = ["gather_rows", "describe", "check_same", "fingerprint"]

_SHOWN = 48  # bytes of each value's repr carried into a message


def gather_rows(transport: Transport, row: torch.Tensor, kind: str = "agree") -> torch.Tensor:
    """Every rank's ``row`` (``[C]`` int64, C the same on every rank: fixed by the caller's code),
    as ``[R, C]`` on the host: one all-to-all of C int64 per peer, counted as one call."""
    R = transport.num_ranks
    if R == 1:
        return row.view(1, -1).cpu()
    transport.arrive(kind)
    # Collective: every rank's row to every rank (the count exchange's all-to-all, host-timed).
    return transport.exchange_counts(row.view(1, -1).expand(R, -1).contiguous(), kind=kind).cpu()


def describe(values: Sequence[Any]) -> str:
    """``values[r]`` of each rank r, ranks holding the same value together: ``"rank 0: 96,
    rank 1: 80"`` or ``"ranks 0, 2, 3: 96; rank 1: 80"``."""
    groups: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(str(v), []).append(r)
    if all(len(rs) == 1 for rs in groups.values()):
        return ", ".join(f"rank {rs[0]}: {v}" for v, rs in groups.items())
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {v}" for v, rs in groups.items())


def _code(value: Any) -> int:
    """An int64 that differs between ranks when ``value`` does: the int itself, else a hash of its repr."""
    if isinstance(value, (bool, int)) and -2**62 < value < 2**62:
        return int(value)
    return 2**62 + zlib.crc32(repr(value).encode())


# Off in a process that joins a running job (moeflow.elastic), from Membership.join until the
# ElasticRun that takes it in: it builds its model while the members build nothing, so a
# construction-time exchange would pair with no peer and time out. ElasticRun then rebuilds the
# Buffers on every rank together, and those constructions check again.
_construction_checks = True


def set_construction_checks(on: bool) -> None:
    """Turn :func:`check_same` on or off in this process (see ``_construction_checks``)."""
    global _construction_checks
    _construction_checks = on


def check_same(transport: Transport, fields: dict[str, Any], where: str, hint: str) -> None:
    """Raise ``ValueError`` on every rank of ``transport``'s group when its ranks' ``fields``
    differ (the same names, in the same order, on every rank); ``where`` starts the message,
    ``hint`` ends it (what to do). Construction-time only; a no-op in a process that is joining
    a running job (see :func:`set_construction_checks`)."""
    names = list(fields)
    if transport.num_ranks == 1 or not _construction_checks:
        return
    codes = gather_rows(transport, torch.tensor([_code(fields[n]) for n in names], dtype=torch.int64))
    differ = [i for i in range(len(names)) if len(set(codes[:, i].tolist())) > 1]
    if not differ:
        return
    # Every rank found the same columns: each sends its values' text for them (a second exchange).
    text = b"".join(repr(fields[names[i]]).encode()[:_SHOWN].ljust(_SHOWN) for i in differ)
    shown = gather_rows(transport, torch.frombuffer(bytearray(text), dtype=torch.int64))
    raw = shown.contiguous().view(torch.uint8).view(transport.num_ranks, len(differ), _SHOWN)
    values = [[bytes(raw[r, j].tolist()).decode(errors="replace").rstrip() for r in range(raw.size(0))]
              for j in range(len(differ))]
    parts = [f"{names[i]} ({describe(values[j])})" for j, i in enumerate(differ)]
    raise ValueError(f"{where}: ranks disagree on {'; '.join(parts)} (this is rank {transport.rank}); {hint}")


def fingerprint(t: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """A 62-bit hash of ``t``'s bits on its device (int64 scalar): a position-weighted sum of the
    bits, wrapping in int64, so that equal tensors agree and any changed, moved or swapped
    element changes it (up to hash collisions). Chunked: the extra memory is bounded by ``chunk``
    elements however large ``t`` is. No host sync."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, bits.numel(), chunk):
        part = bits[start:start + chunk].to(torch.int64)
        weights = torch.arange(start + 1, start + 1 + part.numel(), dtype=torch.int64, device=t.device)
        total += (part * weights).sum()
    return total & (2**62 - 1)
