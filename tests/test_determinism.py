"""Same inputs, bitwise the same outputs and gradients: 20 reruns on 1, 2 and 4 ranks.

Here each world size runs 6 reruns in one spawn (time); ``benchmarks/bench_determinism.py`` runs
the full 20 in two spawns of 10 (so fresh processes are compared too) on a larger size. Every
rerun builds a fresh Buffer and layer. Covered: dispatch/combine (bf16 and
fp32, weights, FP8 tuple, async), the differentiable dispatch/combine's forward and backward, and
MoELayer forward+backward with two chunks (async pipeline) and shared experts. Outputs are
compared as SHA-256 digests of their bytes. A control rerun with one input bit flipped must
change the digests, so the comparison can fail.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist

from moeflow import Buffer, autograd, spawn
from moeflow.layer import MoELayer
from moeflow.quant import per_token_cast_to_fp8

N, H, E, K, FF = 48, 256, 8, 3, 32
RERUNS = 6


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _inputs(rank: int, flip: bool, N: int, H: int):
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(N, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    idx[::5, -1] = -1  # some -1 entries
    w = torch.rand(N, K, generator=g)
    if flip:  # the control: one bit of one input element
        x.view(torch.int32)[3, 7] ^= 1 << 20
    return x, idx, w


def _run_once(flip: bool, N: int = N, H: int = H) -> dict[str, str]:
    rank = dist.get_rank()
    x, idx, w = _inputs(rank, flip, N, H)
    out: dict[str, str] = {}
    buffer = Buffer()
    for dtype in (torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            xd, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx, topk_weights=w, async_finish=True)
        event.current_stream_wait()
        y = recv_x.float() * (1 + recv_w.sum(1, keepdim=True))  # stand-in expert: row-dependent scale
        combined, combined_w, event = buffer.combine(y.to(dtype), handle, topk_weights=recv_w, async_finish=True)
        event.current_stream_wait()
        cached_x, *_ = buffer.dispatch(xd, handle=handle)
        out[f"dispatch_combine_{dtype}"] = _digest(recv_x, recv_idx, recv_w, torch.tensor(counts), combined,
                                                   combined_w, cached_x)
    fp8 = per_token_cast_to_fp8(x)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
    (recv_q, recv_s), *_ = buffer.dispatch(fp8, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                           num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
    out["dispatch_fp8"] = _digest(recv_q, recv_s)

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    d = autograd.dispatch(buffer, xg, idx, wg, E)
    y = autograd.combine(buffer, d.recv_x * d.recv_topk_weights.sum(1, keepdim=True).sin(), d.handle)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    out["autograd"] = _digest(y, xg.grad, wg.grad)

    torch.manual_seed(7)  # same initial weights on every rank and rerun
    layer = MoELayer(H, FF, E, K, num_shared_experts=1, num_chunks=2, buffer=Buffer())
    xl = x.clone().requires_grad_()
    yl = layer(xl)
    (yl * torch.linspace(-1, 1, yl.numel()).view_as(yl)).sum().backward()
    out["layer"] = _digest(yl, xl.grad, layer.router.gate.weight.grad, *(p.grad for p in layer.experts.parameters()),
                           *(p.grad for p in layer.shared.parameters()))
    out["_nonzero"] = bool(yl.abs().sum() > 0 and xl.grad.abs().sum() > 0)
    return out


def _reruns(n: int, N: int = N, H: int = H):
    """``n`` reruns and one control rerun (a flipped input bit), each a dict of digests."""
    runs = [_run_once(False, N, H) for _ in range(n)]
    return runs, _run_once(True, N, H)


def check_reruns(outs: list) -> dict[str, int]:
    """Assert every rerun on a rank matches its first; return how many reruns per rank matched."""
    matched = {}
    for rank, (runs, control) in enumerate(outs):
        ref = runs[0]
        for r in runs:
            assert r["_nonzero"]
            diff = [k for k in r if r[k] != ref[k]]
            assert not diff, f"rank {rank}: reruns differ in {diff}"
        # The flipped bit is in every rank's x: every digest that reads x must change.
        for key in ("dispatch_combine_torch.float32", "dispatch_fp8", "autograd", "layer"):
            assert control[key] != ref[key], (rank, key)
        matched[rank] = len(runs)
    return matched


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_reruns_are_bitwise_identical(world_size):
    out = spawn(_reruns, world_size, RERUNS, timeout_s=240, threads_per_rank=1)
    assert check_reruns(out) == {r: RERUNS for r in range(world_size)}
