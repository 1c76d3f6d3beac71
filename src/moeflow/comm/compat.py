"""DeepEP V1 names that have no engine behind them here: ``Config``, ``topk_idx_t``, the handle's tuple view.

DeepEP code passes these around (``Config`` into every normal-mode call, ``topk_idx_t`` to cast
routing ids, the dispatch handle indexed or unpacked as a tuple); moeflow accepts them with
DeepEP's spelling and says here what each one means on a ``torch.distributed`` transport.
docs/deep_ep.md maps DeepEP's API call by call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .transport import EventOverlap

__all__ = ["Config", "topk_idx_t", "DeepEPTuple", "DeepEPBufferMethods"]

# DeepEP's routing-id dtype ("typically torch.int64"); moeflow takes int64 ids everywhere.
topk_idx_t = torch.int64


@dataclass(frozen=True)
class Config:
    """DeepEP's normal-mode kernel tuning config, same fields, defaults and checks.

    DeepEP sizes its SM channels and NVLink/RDMA ring chunks from it. moeflow launches no kernels
    of its own (the transfer is ``torch.distributed``'s), so a ``Config`` changes nothing a call
    returns and nothing it moves: ``dispatch``/``combine`` accept it for DeepEP compatibility.

    Args (DeepEP's):
        num_sms: SMs DeepEP's kernels use (even, >= 0).
        num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens: NVLink ring chunk sizes
            (send < recv).
        num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens: RDMA ring chunk sizes
            (recv rounded up to a multiple of send; send <= recv / 2).
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            value = getattr(self, name)
            least = 0 if name == "num_sms" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"moeflow.Config: `{name}` must be an int >= {least}, got {value!r}")
        nvl_send, nvl_recv = self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens
        if nvl_send >= nvl_recv:
            raise ValueError(f"moeflow.Config: `num_max_nvl_chunked_send_tokens` ({nvl_send}) must be below "
                             f"`num_max_nvl_chunked_recv_tokens` ({nvl_recv})")
        send = self.num_max_rdma_chunked_send_tokens
        recv = -(-self.num_max_rdma_chunked_recv_tokens // send) * send  # rounded up, as DeepEP does
        object.__setattr__(self, "num_max_rdma_chunked_recv_tokens", recv)
        if send > recv // 2:
            raise ValueError(f"moeflow.Config: `num_max_rdma_chunked_send_tokens` ({send}) must be at most half of "
                             f"`num_max_rdma_chunked_recv_tokens` ({recv})")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer DeepEP would need preallocated: 0 here, moeflow sizes memory per call."""
        return 0

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA buffer DeepEP would need preallocated: 0 here, moeflow sizes memory per call."""
        return 0


class DeepEPTuple:
    """Lets a handle be indexed, unpacked and measured as DeepEP's handle tuple.

    DeepEP returns its handles as plain tuples; code written for it reads entries by position
    (``handle[0]``) or unpacks them. moeflow's handles are frozen dataclasses with named fields
    (what moeflow's own code reads); a subclass lists DeepEP's entries, in DeepEP's order, in
    :meth:`_deep_ep_entries`. The tuple is built once per handle, on first use.
    """

    def _deep_ep_entries(self) -> tuple:
        raise NotImplementedError

    @cached_property
    def _deep_ep_tuple(self) -> tuple:
        return self._deep_ep_entries()

    def __getitem__(self, i):
        return self._deep_ep_tuple[i]

    def __iter__(self):
        return iter(self._deep_ep_tuple)

    def __len__(self) -> int:
        return len(self._deep_ep_tuple)


SHRINK_UNSUPPORTED = ("DeepEP's shrink mode masks a failed rank out of one-sided transfers. moeflow's transfers "
           "are collectives over the Buffer's group, and a collective cannot leave a member out: "
           "a lost rank raises moeflow.PeerFailureError naming it instead. To go on without it, "
           "build a new group over the survivors (dist.new_group(survivors, "
           "use_local_synchronization=True)) and a new Buffer on it")


class DeepEPBufferMethods:
    """The methods of ``deep_ep.Buffer`` that need no transfer engine: tuning knobs, size hints,
    events, and the calls tied to DeepEP's registered memory, which raise saying what to use.

    Mixed into :class:`~moeflow.comm.buffer.Buffer`; kept here so that the Buffer's own file
    holds only what moves data.
    """

    num_sms: int = 20  # DeepEP's class-wide SM count for its normal-mode kernels

    @staticmethod
    def _refuse(enable_shrink: bool, comm: object) -> None:
        """The constructor's DeepEP options that cannot be honoured here."""
        if enable_shrink:
            raise NotImplementedError(f"moeflow.Buffer: enable_shrink=True is not supported. {SHRINK_UNSUPPORTED}")
        if comm is not None:
            raise NotImplementedError("moeflow.Buffer: `comm` (an mpi4py communicator) is not supported: moeflow "
                                      "moves data through torch.distributed; pass `group` (a ProcessGroup)")

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the class-wide ``num_sms`` that :meth:`get_dispatch_config` puts in its Config
        (even, as DeepEP requires). Changes nothing moeflow moves: it launches no kernels."""
        if isinstance(new_num_sms, bool) or not isinstance(new_num_sms, int) or new_num_sms < 0 or new_num_sms % 2:
            raise ValueError(f"Buffer.set_num_sms: the SM count must be an even non-negative int, got {new_num_sms!r}")
        DeepEPBufferMethods.num_sms = new_num_sms

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: everything DeepEP gates on its SM90 build (FP8 dispatch) works here on any device."""
        return True

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's recommended dispatch :class:`Config` for ``num_ranks``; here a default Config
        with the class-wide ``num_sms`` for any group size (it tunes nothing, see :class:`Config`)."""
        return Config(DeepEPBufferMethods.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """See :meth:`get_dispatch_config`."""
        return Config(DeepEPBufferMethods.num_sms)

    @staticmethod
    def capture() -> EventOverlap:
        """An already-complete event (DeepEP records one on the current CUDA stream). moeflow's
        calls take work already queued into account, so waiting on it is a no-op."""
        return EventOverlap()

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int, *, num_topk: int = 8) -> int:
        """Bytes the low-latency mode keeps per configuration on each rank (its two alternating
        buffer sets for dispatch and combine, BF16 or FP8, whichever is larger), for
        ``num_topk`` experts per token (keyword, moeflow's: its rows carry the top-k ids).

        DeepEP returns the RDMA buffer to pass as ``num_rdma_bytes``; moeflow allocates these
        buffers itself on the first call of each configuration, so the Buffer ignores
        ``num_rdma_bytes`` and this figure is for memory planning.
        """
        from .low_latency import static_bytes  # low_latency imports this module's names

        return max(static_bytes(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts, num_topk, fp8)
                   for fp8 in (False, True))

    def internode_dispatch(self, *args, **kwargs):
        """DeepEP's internode dispatch, called by its ``dispatch`` when the group spans nodes: here
        :meth:`dispatch` itself, which takes the node-aware route when ``ranks_per_node`` < group size."""
        self._need_nodes("internode_dispatch")
        return self.dispatch(*args, **kwargs)

    def internode_combine(self, *args, **kwargs):
        """DeepEP's internode combine: here :meth:`combine` (see :meth:`internode_dispatch`)."""
        self._need_nodes("internode_combine")
        return self.combine(*args, **kwargs)

    def _need_nodes(self, where: str) -> None:
        if self.num_nodes == 1:
            raise ValueError(f"Buffer.{where}: rank {self.rank}: this Buffer's group is one node "
                             f"(ranks_per_node={self.ranks_per_node}); call dispatch/combine, or create the "
                             "Buffer with ranks_per_node below the group size")

    def get_comm_stream(self):
        raise NotImplementedError(
            "Buffer.get_comm_stream: moeflow has no communication stream of its own; its transfers "
            "are torch.distributed calls, whose backend (NCCL, Gloo) orders them. To overlap, pass "
            "async_finish=True and wait on the returned event (event.current_stream_wait())")

    def get_local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        raise NotImplementedError(
            "Buffer.get_local_buffer_tensor: moeflow registers no communication buffer (it sizes "
            "memory per call, num_nvl_bytes/num_rdma_bytes are ignored), so there is no raw buffer "
            "to view; allocate your own tensor")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        raise NotImplementedError(f"Buffer.low_latency_update_mask_buffer: {SHRINK_UNSUPPORTED}")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        raise NotImplementedError(f"Buffer.low_latency_query_mask_buffer: {SHRINK_UNSUPPORTED}")

    def low_latency_clean_mask_buffer(self) -> None:
        raise NotImplementedError(f"Buffer.low_latency_clean_mask_buffer: {SHRINK_UNSUPPORTED}")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean: DeepEP zeroes the signal words its kernels count on, moeflow's
        low-latency calls rewrite every slot they read, so a normal-mode call in between is harmless."""
