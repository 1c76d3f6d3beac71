"""Peak memory per rank when loading a transformers MoE checkpoint expert-parallel: every rank
loading the full model then ``expert_parallelize`` (the baseline), against
``moeflow.integrations.hf.from_pretrained`` (each rank reads only its experts).

    python3 benchmarks/bench_hf_load.py [--ranks 4] [--families qwen3_moe mixtral ...]
        [--hidden 1024] [--ffn 512] [--experts 64] [--layers 4]

Per family: one process saves a random bf16 model of that family (``hf_random.random_model``)
with ``save_pretrained``; then, in the same run, R fresh ranks load it the baseline way and R
fresh ranks load it with ``from_pretrained``. Each rank resets its peak-RSS mark after importing
torch and transformers and reports the peak during loading (``VmHWM``), in total and above
what the imports hold (the ``imports`` column: the largest rank's RSS before loading); the table
shows the largest rank of each. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

import torch

from moeflow import spawn
from moeflow.commands import reset_peak_rss, rss_bytes

DEFAULT_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "olmoe", "phimoe"]


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per rank would bury the table
    transformers.utils.logging.set_verbosity_error()


def _save(family: str, sizes: dict, path: str) -> tuple[int, float]:
    from moeflow.integrations.hf_random import random_model

    _quiet_transformers()

    model = random_model(family, dtype=torch.bfloat16, **sizes)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return size, experts / total


def _load(path: str, mode: str) -> dict:
    import transformers

    from moeflow import MoELayer
    from moeflow.integrations import hf

    _quiet_transformers()
    gc.collect()
    base = rss_bytes("VmRSS")
    if not reset_peak_rss():
        raise SystemExit("bench_hf_load: cannot reset the peak RSS mark (/proc/self/clear_refs); Linux only")
    if mode == "full":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        model = hf.expert_parallelize(model)
    else:
        model = hf.from_pretrained(path, dtype=torch.bfloat16)
    gc.collect()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    return dict(base=base, peak=rss_bytes("VmHWM"), end=rss_bytes("VmRSS"), num_layers=len(layers),
                local=layers[0].num_local_experts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4, help="expert-parallel ranks (local Gloo processes)")
    ap.add_argument("--families", nargs="+", default=DEFAULT_FAMILIES,
                    help="model types of moeflow.integrations.hf_random.FAMILY_CONFIGS, or 'all'")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size")
    ap.add_argument("--ffn", type=int, default=512, help="intermediate size of one routed expert")
    ap.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    a = ap.parse_args()
    from moeflow.integrations.hf_random import FAMILY_CONFIGS

    families = list(FAMILY_CONFIGS) if a.families == ["all"] else a.families
    unknown = sorted(set(families) - set(FAMILY_CONFIGS))
    if unknown:
        ap.error(f"--families: unknown {unknown}; known: {sorted(FAMILY_CONFIGS)}")
    if a.experts % a.ranks:
        ap.error(f"--experts {a.experts} must divide by --ranks {a.ranks}")
    sizes = dict(hidden=a.hidden, ffn_hidden=a.ffn, num_experts=a.experts, num_layers=a.layers, vocab=1024)
    mib = 2**20
    print(f"{a.ranks} ranks; random bf16 models: hidden {a.hidden}, {a.layers} layers, {a.experts} experts of "
          f"ffn {a.ffn}; peak RSS per rank while loading (largest rank), total and above the imports")
    print(f"{'family':<16}{'checkpoint':>11}{'experts':>8}{'imports':>9}  {'full load':>20}  {'from_pretrained':>20}  "
          f"{'ratio':>6} {'above imports':>14}")
    for family in families:
        with tempfile.TemporaryDirectory() as path:
            (size, frac), = spawn(_save, 1, family, sizes, path, timeout_s=1800)
            full = spawn(_load, a.ranks, path, "full", timeout_s=1800)
            sharded = spawn(_load, a.ranks, path, "sharded", timeout_s=1800)
        assert all(r["local"] == a.experts // a.ranks for r in full + sharded)
        f_peak, s_peak = max(r["peak"] for r in full), max(r["peak"] for r in sharded)
        f_above = max(r["peak"] - r["base"] for r in full)
        s_above = max(r["peak"] - r["base"] for r in sharded)
        base = max(r["base"] for r in full + sharded)
        print(f"{family:<16}{size / mib:>8.0f}MiB{frac:>8.0%}{base / mib:>6.0f}MiB  {f_peak / mib:>10.0f} MiB/rank  "
              f"{s_peak / mib:>10.0f} MiB/rank  {s_peak / f_peak:>5.2f}x {s_above / f_above:>13.2f}x", flush=True)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}")


if __name__ == "__main__":
    main()
