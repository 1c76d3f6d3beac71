"""World-size-1 dispatch + combine on one GPU against the HBM bound of the bytes it must move.

    python3 benchmarks/bench_gpu.py [--tokens 4096] [--hidden 7168] [--experts 64] [--topk 8] [--json FILE]

With one rank every token stays on the GPU: dispatch must read ``x`` and write ``recv_x``,
combine must read the expert outputs and write the combined tokens, so the floor is
``4 * T * H * 2`` bytes at the GPU's memory bandwidth. Printed beside it, from the same run:
the bandwidth of a plain device-to-device ``copy_`` of the same bytes (what the GPU achieves
here), and the bf16 and FP8 dispatch + combine times (CUDA events, median of ``--iters``).
Host syncs are included (the count exchange and the plan read counts on the host), as a user
pays them.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from moeflow import Buffer, spawn
from moeflow.quant import per_token_cast_to_fp8

# Nominal memory bandwidth in GB/s of GPUs we may meet (vendor data sheets).
NOMINAL_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
                "A100": 1555.0, "L40S": 864.0, "L4": 300.0, "A10": 600.0}


def _nominal(name: str):
    for key, gbps in NOMINAL_GBPS.items():
        if key in name:
            return gbps
    return None


def _time(fn, iters: int) -> float:
    """Median milliseconds of ``fn`` between CUDA events (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _bench(cfg: dict) -> dict:
    torch.cuda.set_device(0)
    T, H, E, K, iters = cfg["tokens"], cfg["hidden"], cfg["experts"], cfg["topk"], cfg["iters"]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w, idx = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1)
    buffer = Buffer()
    x_fp8 = per_token_cast_to_fp8(x)

    def round_trip(x_in):
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
        recv_x, _, _, _, handle, _ = buffer.dispatch(x_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                     num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
        y = recv_x if isinstance(recv_x, torch.Tensor) else x  # FP8: combine bf16 rows of the same shape
        buffer.combine(y, handle)

    src, dst = torch.empty(2 * T * H, dtype=torch.bfloat16, device="cuda"), torch.empty(2 * T * H, dtype=torch.bfloat16,
                                                                                          device="cuda")
    floor_bytes = 4 * T * H * 2
    copy_ms = _time(lambda: dst.copy_(src), iters)  # reads and writes floor_bytes in total
    bf16_ms = _time(lambda: round_trip(x), iters)
    fp8_ms = _time(lambda: round_trip(x_fp8), iters)
    name = torch.cuda.get_device_name(0)
    nominal = _nominal(name)
    measured_gbps = floor_bytes / copy_ms / 1e6
    return dict(device=name, torch=torch.__version__, cuda=torch.version.cuda, tokens=T, hidden=H, experts=E, topk=K,
                floor_bytes=floor_bytes, copy_ms=copy_ms, copy_GBps=measured_gbps, nominal_GBps=nominal,
                bf16_ms=bf16_ms, fp8_ms=fp8_ms, bf16_vs_copy=bf16_ms / copy_ms,
                bf16_vs_nominal=bf16_ms / (floor_bytes / nominal / 1e6) if nominal else None,
                transport=type(buffer.transport).__name__)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device visible to torch")
    r = spawn(_bench, 1, vars(args), backend="cpu:gloo,cuda:nccl", timeout_s=100)[0]
    print(f"{r['device']} (torch {r['torch']}, CUDA {r['cuda']}, {r['transport']}): {r['tokens']} x {r['hidden']} "
          f"bf16, {r['experts']} experts, top-{r['topk']}")
    print(f"  floor: {r['floor_bytes'] / 2**20:.0f} MiB read + written; copy_ of those bytes {r['copy_ms']:.3f} ms "
          f"= {r['copy_GBps']:.0f} GB/s (nominal {r['nominal_GBps']} GB/s)")
    print(f"  dispatch + combine, bf16 {r['bf16_ms']:.3f} ms = {r['bf16_vs_copy']:.1f}x the copy; "
          f"FP8 dispatch + bf16 combine {r['fp8_ms']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
