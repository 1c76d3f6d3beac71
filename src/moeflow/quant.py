"""FP8 (e4m3) per-token, per-128-channel cast and the cast back, as DeepEP and DeepGEMM use.

Shape letters (docs/architecture.md): T tokens, H hidden (a multiple of 128, in H / 128 blocks of
128 channels, each block one fp32 scale).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["FP8_BLOCK", "FP8_MAX", "per_token_cast_to_fp8", "per_token_cast_back", "pack_ue8m0"]

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_AMAX_FLOOR = 1e-4  # keeps all-zero blocks from a zero scale (and 0/0 on the way back)


def per_token_cast_to_fp8(x: torch.Tensor, out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                          workspace: Optional[torch.Tensor] = None, round_scale: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each 128-channel block of each token to FP8 with its own scale.

    Args:
        x: ``[T, H]`` float (bf16, fp16 or fp32), ``H % 128 == 0``.
        out: optional ``(x_fp8 [T, H] float8_e4m3fn, scales [T, H / 128] float32)`` contiguous
            tensors to write into.
        workspace: optional contiguous ``[T, H]`` float32 scratch. Callers that cast every step
            pass ``out`` and ``workspace`` kept across calls: fresh multi-MB tensors page-fault
            on CPU (~0.2 ms/MB here), which costs more than the cast itself.
        round_scale: round each scale up to a power of two (DeepEP's ``round_scale``, what
            UE8M0 scales need, see :func:`pack_ue8m0`).

    Returns:
        x_fp8: ``[T, H]`` float8_e4m3fn.
        scales: ``[T, H / 128]`` float32, ``amax(block) / 448`` with amax clamped at 1e-4 (with
            ``round_scale``: the next power of two at or above it), so that
            ``x ~= x_fp8.float() * scales`` blockwise.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise TypeError(f"per_token_cast_to_fp8: `x` must be a 2-D tensor, got {_describe(x)}")
    T, H = x.shape
    if H % FP8_BLOCK:
        raise ValueError(f"per_token_cast_to_fp8: hidden size {H} is not a multiple of {FP8_BLOCK}")
    num_blocks = H // FP8_BLOCK
    ws = torch.empty(T, H, dtype=torch.float32, device=x.device) if workspace is None else workspace
    x_fp8, scales = out if out is not None else (torch.empty(T, H, dtype=torch.float8_e4m3fn, device=x.device),
                                                 torch.empty(T, num_blocks, dtype=torch.float32, device=x.device))
    for name, t, shape, dtype in (("workspace", ws, (T, H), torch.float32), ("out[0]", x_fp8, (T, H), torch.float8_e4m3fn),
                                  ("out[1]", scales, (T, num_blocks), torch.float32)):
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"per_token_cast_to_fp8: `{name}` must be a contiguous {list(shape)} {dtype} tensor, "
                             f"got {_describe(t)}")
    ws_blocks = ws.view(T, num_blocks, FP8_BLOCK)
    x_blocks = x.reshape(T, num_blocks, FP8_BLOCK)
    ws_blocks.copy_(x_blocks).abs_()
    torch.amax(ws_blocks, dim=2, out=scales).clamp_(min=_AMAX_FLOOR).div_(FP8_MAX)
    if round_scale:
        scales.log2_().ceil_().exp2_()
    torch.div(x_blocks, scales.unsqueeze(2), out=ws_blocks)   # promoted to fp32, as x.float() / scales
    x_fp8.copy_(ws)
    return x_fp8, scales


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo :func:`per_token_cast_to_fp8`: ``[T, H]`` fp8 and ``[T, H/128]`` scales -> ``[T, H]`` ``dtype``."""
    if x_fp8.dim() != 2 or scales.dim() != 2 or scales.shape != (x_fp8.size(0), x_fp8.size(1) // FP8_BLOCK):
        raise ValueError(f"per_token_cast_back: shapes {tuple(x_fp8.shape)} and {tuple(scales.shape)} "
                         f"do not match [T, H] and [T, H/{FP8_BLOCK}]")
    T, H = x_fp8.shape
    x_blocks = x_fp8.float().view(T, H // FP8_BLOCK, FP8_BLOCK) * scales.unsqueeze(2)
    return x_blocks.view(T, H).to(dtype)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales ``[T, H / 128]`` (a multiple of 4 columns) as UE8M0 bytes, four to an int32.

    UE8M0 keeps a scale's 8 exponent bits only (DeepGEMM's scale format, DeepEP's ``use_ue8m0``):
    byte ``j`` of int ``i`` (little-endian) is the exponent of ``scales[:, 4 i + j]``. Returns
    ``[T, H / 512]`` int32. The scales must be powers of two (``round_scale=True``).
    """
    if scales.dtype != torch.float32 or scales.dim() != 2 or scales.size(1) % 4:
        raise ValueError(f"pack_ue8m0: `scales` must be a [T, H / 128] float32 tensor with a multiple of 4 columns, "
                         f"got {_describe(scales)}")
    exponent = (scales.contiguous().view(torch.int32) >> 23) & 0xFF
    return exponent.to(torch.uint8).view(torch.int32)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
