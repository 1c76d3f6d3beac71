"""A transformers Qwen3-MoE, unmodified vs expert-parallelized: fwd+bwd time and parameters per rank.

    python3 benchmarks/bench_hf.py [--ranks 2] [--tokens 512] [--hidden 256] [--experts 32] [--reps 5]

On every rank the same random model (seeded) runs the rank's own batch of ``--tokens`` tokens:
first as transformers builds it (every expert on every rank, its loop over experts), then after
``moeflow.integrations.hf.expert_parallelize`` (E / R experts per rank, tokens moved by
dispatch/combine, grouped experts). The two are timed in the same processes, alternating, one
forward+backward per repetition; the table shows medians over repetitions, the slowest rank's,
and the ratio. fp32 on CPU, one thread per rank.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist

from moeflow import spawn
from moeflow.commands import speed_words


def _rank(tokens: int, hidden: int, experts: int, reps: int, seq: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from moeflow.integrations.hf import expert_parallelize

    rank = dist.get_rank()
    cfg = Qwen3MoeConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                         moe_intermediate_size=hidden // 2, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=experts, num_experts_per_tok=4, norm_topk_prob=True)
    torch.manual_seed(0)
    reference = Qwen3MoeForCausalLM(cfg).train()
    model = expert_parallelize(copy.deepcopy(reference))
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, cfg.vocab_size, (tokens // seq, seq), generator=g)

    def step(m):
        m.zero_grad(set_to_none=True)
        dist.barrier()  # start together: the expert-parallel step waits for the slowest rank anyway
        t0 = time.perf_counter()
        m(ids, labels=ids).loss.backward()
        return time.perf_counter() - t0

    step(reference), step(model)  # warm-up
    times = {"unmodified": [], "expert-parallel": []}
    for _ in range(reps):
        times["unmodified"].append(step(reference))
        times["expert-parallel"].append(step(model))
    params = {"unmodified": sum(p.numel() for p in reference.parameters()),
              "expert-parallel": sum(p.numel() for p in model.parameters())}
    return {k: statistics.median(v) for k, v in times.items()}, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if a.tokens % a.seq:
        ap.error(f"--tokens ({a.tokens}) must be a multiple of --seq ({a.seq})")
    outs = spawn(_rank, a.ranks, a.tokens, a.hidden, a.experts, a.reps, a.seq, threads_per_rank=1, timeout_s=1200)
    print(f"Qwen3-MoE, 2 MoE layers, hidden {a.hidden}, {a.experts} experts top-4, {a.ranks} ranks, "
          f"{a.tokens} tokens per rank, fwd+bwd, median of {a.reps} (slowest rank)")
    print(f"{'model':<16} {'ms / step':>10} {'params / rank':>14}")
    for name in ("unmodified", "expert-parallel"):
        ms = max(o[0][name] for o in outs) * 1e3
        print(f"{name:<16} {ms:>10.1f} {outs[0][1][name]:>14,}")
    ep, plain = (max(o[0][k] for o in outs) for k in ("expert-parallel", "unmodified"))
    print(f"expert-parallel step: {speed_words(ep, plain)} than unmodified")


if __name__ == "__main__":
    main()
