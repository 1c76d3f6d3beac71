"""Argument checks shared by the Buffer's calls.

Every message names the call, the argument, the rank and the bad value, so that on a run with
hundreds of ranks the one log line says where to look.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant import FP8_BLOCK

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.float8_e4m3fn: 4}
CODE_DTYPE = {v: k for k, v in DTYPE_CODE.items()}


class ArgChecker:
    """Raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value)."""

    def __init__(self, rank: int, num_ranks: int):
        self.rank = rank
        self.num_ranks = num_ranks

    def x(self, where: str, x) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.dtype]:
        if isinstance(x, tuple):
            if len(x) != 2 or not all(isinstance(t, torch.Tensor) for t in x):
                raise TypeError(f"Buffer.{where}: `x` on rank {self.rank}: an FP8 tuple must be "
                                f"(float8_e4m3fn [N, H], float32 [N, H/128]), got {len(x)} items")
            x_fp8, scales = x
            self.tensor(where, "x[0]", x_fp8, torch.float8_e4m3fn, (None, None))
            N, H = x_fp8.shape
            if H % FP8_BLOCK:
                raise ValueError(f"Buffer.{where}: `x` on rank {self.rank}: FP8 hidden size {H} is not a "
                                 f"multiple of {FP8_BLOCK}")
            self.tensor(where, "x[1]", scales, torch.float32, (N, H // FP8_BLOCK))
            return x_fp8.contiguous(), scales.contiguous(), torch.float8_e4m3fn
        self.tensor(where, "x", x, FLOAT_DTYPES, (None, None))
        return x.contiguous(), None, x.dtype

    def tensor(self, where: str, name: str, t, dtype, shape: tuple) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Buffer.{where}: `{name}` on rank {self.rank} must be a tensor, got {type(t).__name__}")
        if dtype is not None:
            allowed = dtype if isinstance(dtype, tuple) else (dtype,)
            if t.dtype not in allowed:
                names = " or ".join(str(d).replace("torch.", "") for d in allowed)
                raise TypeError(f"Buffer.{where}: `{name}` on rank {self.rank} must be {names}, got {t.dtype}")
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"Buffer.{where}: `{name}` on rank {self.rank} must have shape {want}, "
                             f"got {list(t.shape)}")

    def num_experts(self, where: str, num_experts) -> None:
        if not isinstance(num_experts, int) or num_experts < 1 or num_experts % self.num_ranks:
            raise ValueError(f"Buffer.{where}: `num_experts` on rank {self.rank} must be a positive multiple "
                             f"of the group size {self.num_ranks}, got {num_experts!r}")

    def topk_idx(self, where: str, topk_idx, num_tokens: Optional[int], num_experts: int) -> None:
        self.tensor(where, "topk_idx", topk_idx, torch.int64, (num_tokens, None))
        if topk_idx.numel():
            # Host sync (one, for both bounds): out-of-range ids would silently corrupt the layout.
            lo, hi = torch.aminmax(topk_idx)
            lo, hi = int(lo), int(hi)
            if lo < -1 or hi >= num_experts:
                bad = lo if lo < -1 else hi
                raise ValueError(f"Buffer.{where}: `topk_idx` on rank {self.rank} must lie in "
                                 f"[-1, {num_experts}), found {bad}")

    def finite(self, where: str, name: str, t: torch.Tensor) -> None:
        """Raise naming the first row of ``t`` holding NaN or Inf (``Buffer(check_finite=True)``)."""
        if t.numel() == 0:
            return
        # float8_e4m3fn has no isfinite kernel; its NaN survives the cast to fp32.
        values = t.float() if t.dtype == torch.float8_e4m3fn else t
        bad_rows = (~torch.isfinite(values)).reshape(t.size(0), -1).any(1).nonzero()
        if bad_rows.numel():  # host sync, paid only with check_finite
            row = int(bad_rows[0])
            shown = values[row].reshape(-1)
            value = shown[~torch.isfinite(shown)][0].item()
            raise ValueError(f"Buffer.{where}: `{name}` on rank {self.rank} holds a non-finite value ({value}) "
                             f"in row {row} ({bad_rows.numel()} bad rows of {t.size(0)}); "
                             "check_finite=True was set on the Buffer")

    def signatures(self, sigs: torch.Tensor) -> None:
        names = ("hidden", "dtype", "num_experts", "num_topk", "has topk_idx", "has topk_weights")
        for col, name in enumerate(names):
            values = sigs[:, col].tolist()
            if len(set(values)) > 1:
                if name == "dtype":
                    values = [str(CODE_DTYPE.get(v, v)).replace("torch.", "") for v in values]
                shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise ValueError(f"Buffer.dispatch: ranks disagree on {name} ({shown}); every rank of "
                                 "the group must dispatch the same kind of tensor")
