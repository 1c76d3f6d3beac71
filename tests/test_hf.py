"""expert_parallelize on tiny random DeepSeek-V3, Qwen3-MoE and Mixtral models: the same logits and
gradients as the unmodified model, on 1, 2 and 4 ranks.

Each rank builds every reference model from the same seed, runs it forward and backward on its
own batch, then expert-parallelizes a deep copy and runs the same batch. Non-expert gradients
compare rank by rank; a rank's expert-weight gradients hold every rank's tokens (expert
parallelism), so they compare against the reference's expert gradients summed over the ranks.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("transformers")

from moeflow import MoELayer, spawn  # noqa: E402
from moeflow.integrations.hf import SUPPORTED_BLOCKS, expert_parallelize  # noqa: E402

VOCAB, D = 96, 64
FAMILIES = ("deepseek_v3", "qwen3_moe", "mixtral")


def _build(family: str, num_experts: int = 8, **overrides) -> nn.Module:
    """A tiny random model of ``family``, the same on every rank (seeded), fp32, train mode."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=D, num_attention_heads=4, max_position_embeddings=64,
                  num_experts_per_tok=2)
    if family == "deepseek_v3":
        # layer 0 dense, layers 1-2 MoE; 4 groups of 2 experts, top-2 groups; 2 shared experts
        cfg = tf.DeepseekV3Config(**common, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                                  num_key_value_heads=4, n_shared_experts=2, n_routed_experts=num_experts, n_group=4,
                                  topk_group=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **overrides)
        cls = tf.DeepseekV3ForCausalLM
    elif family == "qwen3_moe":
        # layers 1 and 3 MoE (decoder_sparse_step=2), with renormalised top-k
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                                num_key_value_heads=2, num_experts=num_experts, decoder_sparse_step=2,
                                norm_topk_prob=True, **overrides)
        cls = tf.Qwen3MoeForCausalLM
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
                               num_local_experts=num_experts, **overrides)
        cls = tf.MixtralForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(cfg).float().train()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for module in model.modules():
            if type(module).__name__ in SUPPORTED_BLOCKS:
                # HF's 0.02-std init makes every router nearly uniform: spread the logits so routing
                # is decided by clear margins, and give DeepSeek-V3 a non-zero selection bias.
                module.gate.weight.normal_(0, 0.3, generator=g)
                if hasattr(module.gate, "e_score_correction_bias"):
                    module.gate.e_score_correction_bias.normal_(0, 0.1, generator=g)
    return model


def _moe_grads(block_or_layer, ref: bool):
    """Named gradients of one MoE block, in moeflow's layout ([E or L, D, F] etc.)."""
    if ref:
        F_ = block_or_layer.experts.gate_up_proj.size(1) // 2
        g_gu = block_or_layer.experts.gate_up_proj.grad
        out = {"gate": block_or_layer.gate.weight.grad, "w1": g_gu[:, :F_].transpose(1, 2),
               "w3": g_gu[:, F_:].transpose(1, 2), "w2": block_or_layer.experts.down_proj.grad.transpose(1, 2)}
        if hasattr(block_or_layer, "shared_experts"):
            s = block_or_layer.shared_experts
            out.update(s_w1=s.gate_proj.weight.grad.t(), s_w3=s.up_proj.weight.grad.t(), s_w2=s.down_proj.weight.grad.t())
        return out
    layer = block_or_layer
    out = {"gate": layer.router.gate.weight.grad, "w1": layer.experts.w1.grad, "w3": layer.experts.w3.grad,
           "w2": layer.experts.w2.grad}
    if layer.shared is not None:
        out.update(s_w1=layer.shared.w1.grad, s_w3=layer.shared.w3.grad, s_w2=layer.shared.w2.grad)
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _parity_rank(families, ep_size=None):
    """On one rank: per family and expert-parallel group, the max relative differences of the
    logits and of every gradient. The default group always; with ``ep_size``, also groups of
    ``ep_size`` consecutive ranks (``expert_parallelize(group=...)``)."""
    R = dist.get_world_size()
    groups = {"world": None}
    if ep_size is not None:
        for start in range(0, R, ep_size):  # every rank creates every group, in the same order
            pg = dist.new_group(list(range(start, start + ep_size)))
            if start <= dist.get_rank() < start + ep_size:
                groups[f"ep{ep_size}"] = pg
    return {(family, gname): _compare(family, pg) for family in families for gname, pg in groups.items()}


def _compare(family, group):
    rank = dist.get_rank()
    ep_rank = dist.get_rank(group)
    ref = _build(family)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (2, 6 + rank), generator=g)      # ranks hold different batches
    out = ref(ids, labels=ids)
    out.loss.backward()

    ep = expert_parallelize(copy.deepcopy(ref), group=group)
    for p in ep.parameters():
        p.grad = None
    ep_out = ep(ids, labels=ids)
    ep_out.loss.backward()

    moe_names = [n for n, m in ref.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS]
    errs = {"logits": _rel_err(ep_out.logits.detach(), out.logits.detach())}
    ep_params = dict(ep.named_parameters())
    num_dense = 0
    for name, p in ref.named_parameters():
        if any(name.startswith(m + ".") for m in moe_names):
            continue
        errs[name] = _rel_err(ep_params[name].grad, p.grad)
        num_dense += 1
    for m in moe_names:
        layer = ep.get_submodule(m)
        assert isinstance(layer, MoELayer), (m, type(layer))
        ref_g = _moe_grads(ref.get_submodule(m), ref=True)
        ep_g = _moe_grads(layer, ref=False)
        assert ref_g.keys() == ep_g.keys()
        L = layer.num_local_experts
        for key, r in ref_g.items():
            if key in ("w1", "w2", "w3"):
                # expert parallelism: this rank's experts saw every token of its group
                r = r.contiguous()
                dist.all_reduce(r, group=group)
                r = r[ep_rank * L:(ep_rank + 1) * L]
            errs[f"{m}.{key}"] = _rel_err(ep_g[key], r)
    return dict(errs=errs, num_moe=len(moe_names), num_dense=num_dense,
                loss=(ep_out.loss.item(), out.loss.item()))


@pytest.mark.parametrize("world_size,ep_size", [(1, None), (2, None), (4, 2)])
def test_same_logits_and_grads_as_unmodified_model(world_size, ep_size):
    """4 ranks also run two expert-parallel groups of 2 (``group=``) beside the whole world."""
    out = spawn(_parity_rank, world_size, FAMILIES, ep_size, timeout_s=180)
    expected_moe = {"deepseek_v3": 2, "qwen3_moe": 2, "mixtral": 2}
    for rank, res in enumerate(out):
        assert len(res) == len(FAMILIES) * (1 if ep_size is None else 2)
        for (family, gname), r in res.items():
            assert r["num_moe"] == expected_moe[family], (family, r["num_moe"])
            assert r["num_dense"] > 5, family  # embeddings, attention, norms, LM head (and dense MLPs)
            n_moe_grads = sum(1 for k in r["errs"] if k.rsplit(".", 1)[-1] in ("gate", "w1", "w2", "w3"))
            assert n_moe_grads == 4 * r["num_moe"]
            bad = sorted(((v, k) for k, v in r["errs"].items() if not v < 1e-4), reverse=True)
            assert not bad, f"rank {rank}, {family}, group {gname}: {len(bad)} differ, worst {bad[:4]}"
            assert abs(r["loss"][0] - r["loss"][1]) < 1e-5, (rank, family, gname, r["loss"])
