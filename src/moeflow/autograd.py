"""Differentiable dispatch and combine, synchronous or in flight: the one home of moeflow's autograd.

Dispatch copies each token to the ranks that hold its experts, so its backward sums the copies'
gradients back onto the token: a combine. Combine sums copies, so its backward hands each copy
the gradient of its token: a cached dispatch (the route is already known, no count exchange).

With ``async_finish=True`` a call returns a :class:`Pending` as soon as its transfer is under
way; ``wait()`` returns the result (an autograd identity, so gradients flow through it). The
layer overlaps work with the transfer this way (shared experts, the previous chunk's experts).
Backward runs synchronously.

Micro-batches run as lanes (:mod:`moeflow.parallel.overlap`) overlap across these calls: every
wait, forward and backward, is a hand-over point of the Transport's events
(:mod:`moeflow.comm.interleave`), and each call here is timed as an ``issuing`` span.

Shape letters (docs/architecture.md): T tokens on this rank, M rows received, H hidden, K top-k,
L local experts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Generic, TypeVar, Union

import torch

from .comm.buffer import Buffer, DispatchHandle
from .comm.interleave import issuing
from .comm.transport import EventOverlap

__all__ = ["DispatchOutput", "Pending", "dispatch", "combine"]

V = TypeVar("V")


@dataclass(frozen=True)
class DispatchOutput:
    """What :func:`dispatch` returns (see ``Buffer.dispatch`` for the meaning of each field).

    recv_x ``[M, H]``, recv_topk_idx ``[M, K]`` int64 local ids (``-1`` elsewhere),
    recv_topk_weights ``[M, K]`` float32, num_recv_tokens_per_expert_list ``[L]`` ints, handle.
    """

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert_list: list[int]
    handle: DispatchHandle


class Pending(Generic[V]):
    """A dispatch or combine in flight. Its tensors are filled once the transfer is done; read
    them only through :meth:`wait`, which waits (once) and returns the result."""

    def __init__(self, event: EventOverlap, tensors: tuple, build: Callable[[tuple], V]):
        self.event, self._tensors, self._build = event, tensors, build
        self.done = False

    def wait(self) -> V:
        self.done = True
        return self._build(_Wait.apply(self.event, *self._tensors))

    def finish(self) -> None:
        """Complete the transfer without reading it (once; nothing if :meth:`wait` ran): for a
        forward cut short, whose transfers every rank posted alike. A transfer posted and never
        waited on can stall the group's next one."""
        if not self.done:
            self.done = True
            self.event.current_stream_wait()


class _Wait(torch.autograd.Function):
    """Wait for a transfer; identity for autograd (gradients pass straight through)."""

    @staticmethod
    def forward(ctx, event, *tensors):
        event.current_stream_wait()  # fills the tensors in place, outside autograd's view
        outs = tuple(t.view_as(t) for t in tensors)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx, num_experts, expert_alignment, async_finish, holder):
        with issuing():
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=expert_alignment,
                async_finish=async_finish)
        holder.extend([counts, handle, event])
        # Attributes, not saved tensors: an async dispatch fills recv_idx in place after this
        # returns, which would trip autograd's version check on a saved tensor.
        ctx.buffer, ctx.handle, ctx.recv_idx = buffer, handle, recv_idx
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_recv_idx, grad_recv_w):
        handle: DispatchHandle = ctx.handle
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(handle.num_recv_tokens, handle.hidden, dtype=torch.float32,
                                      device=ctx.recv_idx.device)
        if grad_recv_w is not None:
            # recv_topk_weights is 0 (a constant) where the expert lives elsewhere, so those
            # entries pass no gradient back to the source's weights.
            grad_recv_w = torch.where(ctx.recv_idx >= 0, grad_recv_w, 0.0).float()
        with issuing():
            grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x.contiguous(), handle, topk_weights=grad_recv_w)
        return grad_x, grad_w, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle, async_finish, holder):
        ctx.buffer, ctx.handle = buffer, handle
        with issuing():
            combined_x, _, event = buffer.combine(x, handle, async_finish=async_finish)
        holder.append(event)
        return combined_x

    @staticmethod
    def backward(ctx, grad_combined):
        with issuing():
            grad_x, *_ = ctx.buffer.dispatch(grad_combined.contiguous(), handle=ctx.handle)
        return grad_x, None, None, None, None


def dispatch(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
             num_experts: int, expert_alignment: int = 1, *, async_finish: bool = False
             ) -> Union[DispatchOutput, Pending[DispatchOutput]]:
    """Differentiable :meth:`Buffer.dispatch` with the layout computed inside.

    Args:
        buffer: the group's :class:`Buffer`.
        x: ``[T, H]`` bf16, fp16 or fp32 (FP8 is not differentiable: cast after dispatch).
        topk_idx: ``[T, K]`` int64 expert ids, ``-1`` = none.
        topk_weights: ``[T, K]`` float32.
        num_experts: E. expert_alignment: as in :meth:`Buffer.dispatch`.
        async_finish: return a :class:`Pending` while the rows travel (the handle and counts are
            known already: the count exchange is synchronous).

    Gradients flow to ``x`` (through ``recv_x``) and to ``topk_weights`` (through
    ``recv_topk_weights``).
    """
    holder: list = []
    recv = _Dispatch.apply(x, topk_weights, buffer, topk_idx, num_experts, expert_alignment, async_finish, holder)
    counts, handle, event = holder
    out = DispatchOutput(*recv, counts, handle)
    if not async_finish:
        return out
    return Pending(event, recv, lambda t: replace(out, recv_x=t[0], recv_topk_idx=t[1], recv_topk_weights=t[2]))


def combine(buffer: Buffer, x: torch.Tensor, handle: DispatchHandle, *, async_finish: bool = False
            ) -> Union[torch.Tensor, Pending[torch.Tensor]]:
    """Differentiable :meth:`Buffer.combine`: ``[M, H]`` -> ``[T, H]``; backward is a cached
    dispatch. With ``async_finish`` a :class:`Pending` whose ``wait()`` gives the ``[T, H]`` sum."""
    holder: list = []
    combined = _Combine.apply(x, buffer, handle, async_finish, holder)
    if not async_finish:
        return combined
    return Pending(holder[0], (combined,), lambda t: t[0])
