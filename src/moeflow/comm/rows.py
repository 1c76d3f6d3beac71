"""Moving chosen rows of several tensors between ranks in one message per peer (expert weight
migration), and several tensors from one rank to all in one message (a state hand-over).

Shape letters (docs/architecture.md): R ranks; each tensor is ``[S_local, ...]`` (rows, e.g. this
rank's expert slots).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .transport import Transport

__all__ = ["exchange_rows", "broadcast_tensors"]


def exchange_rows(transport: Transport, tensors: Sequence[torch.Tensor], send_rows: Sequence[torch.Tensor],
                  num_recv_rows: Sequence[int], kind: str = "migration") -> list[list[torch.Tensor]]:
    """Send rows ``send_rows[d]`` of every tensor to rank d; receive the rows the others send.

    Everything travels as bytes in one ``all_to_all_single`` with uneven splits through
    ``transport`` (watched: a lost peer is named; counted under ``kind``): per destination, one
    flat block holding tensor 0's rows, then tensor 1's, ... (so tensors of different dtypes share
    the message). Every rank of the group must call it, with matching counts
    (``num_recv_rows[s]`` on rank d = ``send_rows[d].numel()`` on rank s) and tensors of the same
    row shapes and dtypes in the same order.

    Args:
        transport: the group's :class:`~moeflow.comm.transport.Transport`.
        tensors: ``[S_local, ...]`` tensors on one device (rows may differ in shape and dtype).
        send_rows: R int64 tensors, the rows to send to each rank (empty for this rank).
        num_recv_rows: R ints, the rows arriving from each rank.

    Returns:
        ``recv[s][j]``: ``[num_recv_rows[s], ...]`` rows of tensor j from rank s, in the order
        rank s listed them.
    """
    R = transport.num_ranks
    if len(send_rows) != R or len(num_recv_rows) != R:
        raise ValueError(f"exchange_rows: `send_rows` and `num_recv_rows` must hold one entry per rank ({R}), "
                         f"got {len(send_rows)} and {len(num_recv_rows)} (rank {transport.rank})")
    device = tensors[0].device
    row_bytes = [math.prod(t.shape[1:]) * t.element_size() for t in tensors]  # also with no rows (a joiner)
    width = sum(row_bytes)
    sends = [t.index_select(0, rows.to(device)).reshape(-1).view(torch.uint8)
             for rows in send_rows for t in tensors]
    send_buf = torch.cat(sends) if sends else torch.empty(0, dtype=torch.uint8, device=device)
    in_splits = [rows.numel() * width for rows in send_rows]
    out_splits = [n * width for n in num_recv_rows]
    recv_buf = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
    transport.arrive(kind)
    # one collective for every row of every tensor (sizes known on both sides: no count exchange)
    transport.all_to_all(recv_buf, send_buf, out_splits, in_splits, kind=kind, host=True)
    out = []
    for n, chunk in zip(num_recv_rows, recv_buf.split(out_splits)):
        parts = chunk.split([n * b for b in row_bytes])
        # a typed view needs an offset aligned to its element size: copy the rare misaligned part
        out.append([(p if p.storage_offset() % t.element_size() == 0 else p.clone()).view(t.dtype)
                    .view(n, *t.shape[1:]) for t, p in zip(tensors, parts)])
    return out


def broadcast_tensors(transport: Transport, tensors: Sequence[torch.Tensor], src: int, kind: str = "state",
                      device: Optional[torch.device] = None) -> None:
    """Copy ``tensors`` of group rank ``src`` into the same tensors on every rank, in place.

    One broadcast of bytes through ``transport`` (watched, counted under ``kind``): the tensors
    (any shapes and dtypes) are packed back to back on ``device`` (default: the first tensor's;
    give the backend's device, e.g. CUDA for NCCL, when some live elsewhere, like Adam's CPU
    ``step`` counts). Every rank of the group calls it with tensors of the same shapes and dtypes
    in the same order.
    """
    if not tensors:
        return
    device = tensors[0].device if device is None else device
    sizes = [t.numel() * t.element_size() for t in tensors]
    if transport.rank == src:
        buf = torch.cat([t.detach().reshape(-1).view(torch.uint8).to(device) for t in tensors])
    else:
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    # one message for all of them, however many small tensors the state holds
    transport.broadcast(buf, src, kind=kind)
    if transport.rank == src:
        return
    with torch.no_grad():
        for t, part in zip(tensors, buf.split(sizes)):
            aligned = part if part.storage_offset() % t.element_size() == 0 else part.clone()
            t.copy_(aligned.view(t.dtype).view(t.shape))
