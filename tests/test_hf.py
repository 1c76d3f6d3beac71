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
        # layers 1 and 3 MoE (decoder_sparse_step=2); top-k weights not renormalised (Qwen3-MoE's
        # default; Mixtral and DeepSeek-V3 cover renormalised weights)
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                                num_key_value_heads=2, num_experts=num_experts, decoder_sparse_step=2,
                                norm_topk_prob=False, **overrides)
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
            out.update(s_w1=s.gate_proj.weight.grad.t(), s_w3=s.up_proj.weight.grad.t(),
                       s_w2=s.down_proj.weight.grad.t())
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
    # router logits recorded: Mixtral's and Qwen3-MoE's loss then includes their aux loss
    out = ref(ids, labels=ids, output_router_logits=True)
    out.loss.backward()

    ep = expert_parallelize(copy.deepcopy(ref), group=group)
    for p in ep.parameters():
        p.grad = None
    ep_out = ep(ids, labels=ids, output_router_logits=True)
    ep_out.loss.backward()

    moe_names = [n for n, m in ref.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS]
    errs = {"logits": _rel_err(ep_out.logits.detach(), out.logits.detach())}
    assert len(ep_out.router_logits) == len(out.router_logits) == len(moe_names)
    for i, (a, b) in enumerate(zip(ep_out.router_logits, out.router_logits)):
        errs[f"router_logits.{i}"] = _rel_err(a.detach(), b.detach())
    if family != "deepseek_v3":
        assert out.aux_loss is not None and out.aux_loss > 0
        errs["aux_loss"] = _rel_err(ep_out.aux_loss.detach(), out.aux_loss.detach())
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


def _assert_parity(out, ep_size):
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


def test_same_logits_and_grads_as_unmodified_model_on_1_rank():
    _assert_parity(spawn(_parity_rank, 1, FAMILIES, timeout_s=180), None)


def _data_parallel_step_rank():
    """docs/hf.md's gradient recipe: all-reduce the replicated parameters' gradients, scale every
    gradient by 1 / R; with activation checkpointing on. Returns the max relative difference from
    one unmodified model's gradients of the mean loss over every rank's batch, for the replicated
    and the expert parameters."""
    rank, R = dist.get_rank(), dist.get_world_size()
    ref = _build("deepseek_v3")
    batches = [torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(100 + r)) for r in range(R)]
    (sum(ref(b, labels=b).loss for b in batches) / R).backward()

    model = expert_parallelize(copy.deepcopy(ref))
    model.zero_grad()
    # transformers' activation checkpointing re-runs each decoder layer, dispatch and combine
    # included, during backward: every rank does so in the same layer order
    model.activation_checkpointing_enable()
    model(batches[rank], labels=batches[rank]).loss.backward()
    # -- the recipe, as in docs/hf.md
    expert_params = {p for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()}
    for p in model.parameters():
        if p.grad is None:
            continue
        if p not in expert_params:
            dist.all_reduce(p.grad)  # replicated: sum over the ranks' batches
        p.grad /= R                  # expert shards: the dispatch backward already summed them
    # --
    ref_params = dict(ref.named_parameters())
    replicated = max(_rel_err(p.grad, ref_params[n].grad) for n, p in model.named_parameters() if n in ref_params)
    experts = 0.0
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            ref_g = _moe_grads(ref.get_submodule(name), ref=True)
            L = m.num_local_experts
            for key, g in _moe_grads(m, ref=False).items():
                if key in ("w1", "w2", "w3"):
                    experts = max(experts, _rel_err(g, ref_g[key][rank * L:(rank + 1) * L]))
    return replicated, experts, len(expert_params)


def _two_rank_fn():
    # one spawn for every 2-rank check: each rank process pays ~2 s importing transformers
    return _parity_rank(FAMILIES), _data_parallel_step_rank()


@pytest.fixture(scope="module")
def two_ranks():
    return spawn(_two_rank_fn, 2, timeout_s=180)


def test_same_logits_and_grads_as_unmodified_model_on_2_ranks(two_ranks):
    _assert_parity([parity for parity, _ in two_ranks], None)


def test_data_parallel_recipe_gives_the_global_batch_gradients(two_ranks):
    for rank, (_, (replicated, experts, num_expert_params)) in enumerate(two_ranks):
        assert num_expert_params == 2 * 3  # 2 MoE layers x (w1, w2, w3)
        assert replicated < 1e-4 and experts < 1e-4, (rank, replicated, experts)


def _four_rank_fn():
    # one spawn for every 4-rank check: each rank process pays ~2 s importing transformers
    return _parity_rank(FAMILIES, 2), _generate_and_modes_rank()


@pytest.fixture(scope="module")
def four_ranks():
    return spawn(_four_rank_fn, 4, timeout_s=240)


def test_same_logits_and_grads_on_4_ranks_and_2_rank_groups(four_ranks):
    """The whole world as one expert-parallel group, and two groups of 2 (``group=``)."""
    _assert_parity([parity for parity, _ in four_ranks], 2)


# ------------------------------------------------------------------ the model's other entry points
def _generate_and_modes_rank():
    """Greedy generation with the KV cache through the expert-parallel model (ranks with prompts
    of different lengths, ``synced_gpus`` so they step together); train/eval, requires_grad and
    dtype carried over; an expert count that does not divide over the ranks, and a second call on
    the same model, refused."""
    rank = dist.get_rank()
    ref = _build("qwen3_moe").eval()
    ids = torch.randint(0, VOCAB, (1, 3 + 2 * rank), generator=torch.Generator().manual_seed(7 + rank))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref_tokens = ref.generate(ids, **kw)
        ep = expert_parallelize(copy.deepcopy(ref))
        ep_tokens = ep.generate(ids, synced_gpus=True, **kw)

    frozen = _build("deepseek_v3")
    for m in frozen.modules():
        if type(m).__name__ == "DeepseekV3MoE":
            m.experts.down_proj.requires_grad_(False)
            m.gate.float()  # transformers keeps this gate in fp32 (_keep_in_fp32_modules_strict)
    frozen.bfloat16().eval()
    for m in frozen.modules():
        if type(m).__name__ == "DeepseekV3TopkRouter":
            m.float()
    expert_parallelize(frozen)
    layers = [m for m in frozen.modules() if isinstance(m, MoELayer)]
    modes = dict(
        num_layers=len(layers), training=[m.training for m in layers],
        requires_grad=[(m.experts.w1.requires_grad, m.experts.w2.requires_grad, m.router.gate.weight.requires_grad)
                       for m in layers],
        dtypes=[(m.experts.w1.dtype, m.shared.w1.dtype, m.router.gate.weight.dtype, m.router.expert_bias.dtype)
                for m in layers])
    with torch.no_grad():
        logits = frozen(ids).logits
    modes["bf16_logits_finite"] = bool(logits.isfinite().all()) and logits.dtype == torch.bfloat16

    errors = []
    for make in (lambda: _build("mixtral", num_experts=6), lambda: frozen):
        try:
            expert_parallelize(make())
        except ValueError as e:
            errors.append(str(e))
    return ref_tokens, ep_tokens, modes, errors


def test_generate_modes_and_uneven_split_on_4_ranks(four_ranks):
    for rank, (_, (ref_tokens, ep_tokens, modes, errors)) in enumerate(four_ranks):
        assert ref_tokens.shape == (1, 3 + 2 * rank + 5)
        assert torch.equal(ep_tokens, ref_tokens), rank
        assert modes["num_layers"] == 2
        assert modes["training"] == [False, False]
        assert modes["requires_grad"] == [(True, False, True)] * 2
        assert modes["dtypes"] == [(torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)] * 2
        assert modes["bf16_logits_finite"]
        assert len(errors) == 2, errors
        assert "has 6 experts, which do not divide over the 4 ranks" in errors[0]
        assert "DeepseekV3ForCausalLM is already expert-parallel" in errors[1]


# ------------------------------------------------------------------------------ refused inputs
def test_refuses_bad_arguments_and_unknown_blocks():
    import transformers as tf

    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        expert_parallelize("model")
    with pytest.raises(TypeError, match=r"\['norm_topk_prob', 'num_topk'\] come from the model"):
        expert_parallelize(_build("mixtral"), num_topk=4, norm_topk_prob=True)
    with pytest.raises(ValueError, match="no MoE block found in Linear"):
        expert_parallelize(nn.Linear(4, 4))
    # Qwen2-MoE: routed experts plus a sigmoid-gated shared expert, which MoELayer does not have
    cfg = tf.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp is a Qwen2MoeSparseMoeBlock, an MoE block of a "
                                        "family moeflow does not know"):
        expert_parallelize(tf.Qwen2MoeForCausalLM(cfg))
    odd = _build("qwen3_moe")
    odd.model.layers[1].mlp.gate.top_k = None  # a layout that keeps top_k nowhere we look
    with pytest.raises(TypeError, match=r"neither model\.layers\.1\.mlp \(Qwen3MoeSparseMoeBlock\) nor its "
                                        "router holds `top_k`"):
        expert_parallelize(odd)
    with pytest.raises(ValueError, match=r"router_jitter_noise=0\.1"):
        expert_parallelize(_build("mixtral", router_jitter_noise=0.1))
    with pytest.raises(ValueError, match=r"experts\.act_fn \(GELU.*\) is not SiLU"):
        expert_parallelize(_build("qwen3_moe", hidden_act="gelu"))
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            expert_parallelize(_build("deepseek_v3"))


def test_moeflow_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import moeflow\n"
            "assert 'DeepseekV3MoE' in moeflow.integrations.hf.SUPPORTED_BLOCKS\n"
            "assert callable(moeflow.integrations.hf.expert_parallelize)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
