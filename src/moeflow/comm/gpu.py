"""``SymmMemTransport``: the process-group transport plus torch's NVSHMEM symmetric memory for the
low-latency slot exchange, which moves only the used slots with their counts kept on the device
(no host sync; capturable in a CUDA graph). Written from torch 2.13's documented API
(``torch.distributed._symmetric_memory``; ``torch.ops.symm_mem.all_to_all_vdev(input, out,
in_splits [R], out_splits_offsets [2, R], group_name)``, splits in elements of the 1-D input);
``scripts/gpu_check.sh`` runs ``tests/test_gpu.py`` against it on a GPU machine.

Two buffer sets per shape, used in turn: ``all_to_all_vdev`` pulls from the peers' inputs and
writes their split tables before its own barrier, so a rank one call ahead would overwrite a set
a slower peer still reads; with two, the barrier of call k + 1 ends every peer's call k before
any rank touches that set again. Without CUDA nothing here imports torch's CUDA code.

Shape letters (docs/architecture.md): R ranks, ``T_max`` slots per (source, destination) pair;
a slot row is ``Wq`` int64 words.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .transport import ProcessGroupTransport

__all__ = ["SymmMemTransport", "symm_mem_available", "symm_mem_unavailable"]


def symm_mem_available(group: Optional[dist.ProcessGroup]) -> bool:
    """Whether :func:`make_transport` picks :class:`SymmMemTransport` for ``group``; see
    :func:`symm_mem_unavailable`."""
    return symm_mem_unavailable(group) is None


def symm_mem_unavailable(group: Optional[dist.ProcessGroup]) -> Optional[str]:
    """None when ``group`` can use the symmetric-memory slot exchange, else why not.

    It needs NCCL on CUDA, a torch with NVSHMEM and the 5-argument ``all_to_all_vdev``, and two
    settings of the process, which moeflow leaves to the user because they are process-wide:
    torch's symmetric-memory backend ``NVSHMEM`` (env ``TORCH_SYMMMEM=NVSHMEM``; torch's default
    is its own ``CUDA`` backend, which has no ``all_to_all_vdev``), and env
    ``TORCH_SYMMMEM_NBLOCKS`` below twice the group size: the kernel splits each peer's bytes over
    ``NBLOCKS // R`` blocks and asserts (ending the CUDA context) when they do not divide evenly,
    so one block per peer is the setting under which every slot count works."""
    if not torch.cuda.is_available() or "nccl" not in str(dist.get_backend(group)).lower():
        return "the group is not NCCL on CUDA"
    try:
        import torch.distributed._symmetric_memory as symm_mem

        op = torch.ops.symm_mem.all_to_all_vdev
        if len(op.default._schema.arguments) != 5:  # torch <= 2.8: (input, out, in_out_splits, group)
            return "this torch's all_to_all_vdev takes other arguments"
        if not symm_mem.is_nvshmem_available():
            return "this torch has no NVSHMEM (is_nvshmem_available() is False)"
        backend = symm_mem.get_backend(torch.device("cuda", torch.cuda.current_device()))
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"this torch has no usable symmetric memory ({type(e).__name__}: {e})"
    if backend != "NVSHMEM":
        return f"torch's symmetric-memory backend is {backend!r}, not 'NVSHMEM' (set env TORCH_SYMMMEM=NVSHMEM)"
    blocks = os.environ.get("TORCH_SYMMMEM_NBLOCKS", "")
    R = dist.get_world_size(group)
    if not blocks.isdigit() or not 1 <= int(blocks) < 2 * R:
        return f"env TORCH_SYMMMEM_NBLOCKS is {blocks or 'unset'}: set it to the group size ({R})"
    return None


class _SymmBuffers:
    """Symmetric buffers (same size on every rank) for ``R * T_max`` slot rows of ``Wq`` words."""

    def __init__(self, group_name: str, R: int, T_max: int, Wq: int, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        n = R * T_max * Wq
        self.inp = symm_mem.empty(n, dtype=torch.int64, device=device)
        self.out = symm_mem.empty(n, dtype=torch.int64, device=device)
        self.in_splits = symm_mem.empty(R, dtype=torch.int64, device=device)
        self.out_splits_offsets = symm_mem.empty((2, R), dtype=torch.int64, device=device)
        for t in (self.inp, self.out, self.in_splits, self.out_splits_offsets):
            symm_mem.rendezvous(t, group_name)  # collective: once, when the buffers are made


class SymmMemTransport(ProcessGroupTransport):
    """:class:`~moeflow.comm.transport.ProcessGroupTransport` whose :meth:`exchange_slots`, for CUDA
    slots with device-side counts, moves only the used slots through NVSHMEM symmetric memory."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, **kwargs):
        super().__init__(group, **kwargs)
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = (group or dist.group.WORLD).group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.11, deprecated after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
        self._buffers: dict[tuple, list] = {}  # (T_max, Wq, device) -> [two _SymmBuffers, turn]

    def exchange_slots(self, send: torch.Tensor, recv: torch.Tensor, num_valid_per_rank: Optional[torch.Tensor],
                       kind: str, *, new_call: bool = True) -> tuple:
        """See :meth:`Transport.exchange_slots`; ``send``/``recv`` ``[R * T_max, W]`` with ``W`` a
        multiple of 8 bytes. Counted at the static size (what the process-group transport moves)."""
        R = self.num_ranks
        if num_valid_per_rank is None or send.device.type != "cuda" or (send.size(1) * send.element_size()) % 8:
            return super().exchange_slots(send, recv, num_valid_per_rank, kind, new_call=new_call)
        T_max, Wq = send.size(0) // R, send.size(1) * send.element_size() // 8
        row = send.size(1) * send.element_size()
        self.counters.record(kind, [T_max * row] * R, [T_max * row] * R, new_call)
        pair = self._buffers.setdefault((T_max, Wq, send.device), [None, None, 0])
        turn = pair[2] % 2
        pair[2] += 1
        if pair[turn] is None:
            pair[turn] = _SymmBuffers(self.group_name, R, T_max, Wq, send.device)
        return None, _exchange(pair[turn], send.view(torch.int64).view(R * T_max, Wq), num_valid_per_rank,
                               recv.view(torch.int64).view(R * T_max, Wq), self.group_name)

    def destroy(self) -> None:
        """Drop the symmetric buffers: their memory goes back to torch's symmetric-memory pool."""
        self._buffers.clear()


def _exchange(buf: _SymmBuffers, send: torch.Tensor, num_valid_per_rank: torch.Tensor, recv: torch.Tensor,
              group_name: str) -> torch.Tensor:
    """Pack the valid rows of ``send`` ``[R * T_max, Wq]`` int64 (destination ``d``'s at ``d * T_max``,
    valid first), exchange, unpack into the slot layout of ``recv``. Returns ``[R * T_max]`` bool on
    the device: which received slots hold a row."""
    RC, Wq = send.shape
    R = num_valid_per_rank.numel()
    T_max = RC // R
    i = torch.arange(RC, device=send.device)
    num_valid = num_valid_per_rank.to(torch.int64)
    # Packed row i is slot (d, i - start[d]) of the destination d it falls in.
    end = torch.cumsum(num_valid, 0)
    start = end - num_valid
    d = torch.bucketize(i, end, right=True).clamp(max=R - 1)
    src = (d * T_max + (i - start[d])).clamp(0, RC - 1)
    torch.index_select(send, 0, src, out=buf.inp.view(RC, Wq))
    buf.in_splits.copy_(num_valid * Wq)
    # The exchange: splits and offsets stay on the device (no host sync, capturable).
    torch.ops.symm_mem.all_to_all_vdev(buf.inp, buf.out, buf.in_splits, buf.out_splits_offsets, group_name)
    splits, offs = buf.out_splits_offsets[0] // Wq, buf.out_splits_offsets[1] // Wq
    s, j = i // T_max, i % T_max
    valid = j < splits[s]
    torch.index_select(buf.out.view(RC, Wq), 0, (offs[s] + j).clamp(0, RC - 1), out=recv)
    return valid
