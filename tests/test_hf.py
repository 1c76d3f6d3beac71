"""expert_parallelize on a small random model of every supported transformers MoE family: the same
logits, loss, router logits, aux loss and gradients as the unmodified model, on 1, 2 and 4 ranks.

Each rank builds every reference model from the same seed, runs it forward and backward on its
own batch, then expert-parallelizes a deep copy and runs the same batch (the same RNG state:
PhiMoE samples its experts in training). Non-expert gradients (attention, embeddings, the
router, shared experts) compare rank by rank; a rank's expert-weight gradients hold every rank's
tokens (expert parallelism), so they compare against the reference's expert gradients summed
over the ranks. Two spawns serve every family and world size (a rank pays ~2 s importing
transformers): 2 ranks, each also alone in a 1-rank group; 4 ranks, also in two 2-rank groups.
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
from moeflow.integrations.hf import REFUSED_BLOCKS, SUPPORTED_BLOCKS, expert_parallelize, from_pretrained  # noqa: E402
from moeflow.integrations.hf_random import FAMILY_CONFIGS, random_model  # noqa: E402

VOCAB = 96
FAMILIES = tuple(FAMILY_CONFIGS)
# families also run with the world split into two expert-parallel groups of 2 (group=): one per
# way of routing and of shared experts
GROUP_FAMILIES = ("deepseek_v3", "qwen2_moe", "phimoe")
# MoE blocks per tiny model (layers the family's config makes sparse)
NUM_MOE = {f: 2 for f in FAMILIES} | {"glm4_moe_lite": 1, "mimo_v2_flash": 1, "laguna": 2}


def _build(family: str, **sizes) -> nn.Module:
    """A tiny random model of ``family``, the same on every rank (seeded), fp32, train mode, with
    routing decided by clear margins."""
    model = random_model(family, vocab=VOCAB, **sizes)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.modules():
            family_entry = SUPPORTED_BLOCKS.get(type(block).__name__)
            if family_entry is None:
                continue
            E = block.experts.gate_up_proj.size(0)
            router = getattr(block, family_entry.router)
            # HF's 0.02-std init makes every router nearly uniform: spread the logits, and give
            # selection biases (DeepSeek-V3's, LFM2's, ...) non-zero values
            for t in [*router.parameters(), *router.buffers(), *block.buffers(recurse=False)]:
                if t.dim() == 2 and t.size(0) == E and t.dtype.is_floating_point:
                    t.normal_(0, 0.3, generator=g)
                elif t.numel() == E and t.dtype.is_floating_point:
                    t.normal_(0, 0.1, generator=g)
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _parity_rank(families, ep_size=None, group_families=()):
    """On one rank: per family and expert-parallel group, the max relative differences of the
    logits and of every gradient. The default group always; with ``ep_size``, also groups of
    ``ep_size`` consecutive ranks (``expert_parallelize(group=...)``) for ``group_families``."""
    R = dist.get_world_size()
    groups = {"world": None}
    if ep_size is not None:
        for start in range(0, R, ep_size):  # every rank creates every group, in the same order
            pg = dist.new_group(list(range(start, start + ep_size)))
            if start <= dist.get_rank() < start + ep_size:
                groups[f"ep{ep_size}"] = pg
    return {(family, gname): _compare(family, pg) for family in families for gname, pg in groups.items()
            if gname == "world" or family in group_families}


def _compare(family, group):
    rank = dist.get_rank()
    ep_rank = dist.get_rank(group)
    ref = _build(family)
    ids = torch.randint(3, VOCAB, (2, 6 + rank), generator=torch.Generator().manual_seed(100 + rank))
    # router logits recorded: the families with an aux loss add it to the loss
    torch.manual_seed(7)
    out = ref(ids, labels=ids, output_router_logits=True)
    out.loss.backward()

    moe_names = [n for n, m in ref.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS]
    model = copy.deepcopy(ref)
    # the blocks' routers and shared experts are taken over as they are: their gradients compare by name
    kept = {m: {n: p for n, p in model.get_submodule(m).named_parameters() if not n.startswith("experts.")}
            for m in moe_names}
    ep = expert_parallelize(model, group=group)
    for p in ep.parameters():
        p.grad = None
    torch.manual_seed(7)
    ep_out = ep(ids, labels=ids, output_router_logits=True)
    ep_out.loss.backward()

    errs = {"logits": _rel_err(ep_out.logits.detach(), out.logits.detach())}
    assert len(ep_out.router_logits) == len(out.router_logits) == len(moe_names)
    for i, (a, b) in enumerate(zip(ep_out.router_logits, out.router_logits)):
        errs[f"router_logits.{i}"] = _rel_err(a.detach(), b.detach())
    if getattr(out, "aux_loss", None) is not None:
        errs["aux_loss"] = _rel_err(ep_out.aux_loss.detach(), out.aux_loss.detach())
    ep_params = dict(ep.named_parameters())
    ep_ids = {id(p) for p in ep_params.values()}
    num_dense = 0
    for name, p in ref.named_parameters():
        if any(name.startswith(m + ".") for m in moe_names):
            continue
        errs[name] = _rel_err(ep_params[name].grad, p.grad)
        num_dense += 1
    num_block_grads = 0
    for m in moe_names:
        layer = ep.get_submodule(m)
        assert isinstance(layer, MoELayer), (m, type(layer))
        ref_block = ref.get_submodule(m)
        for n, p in kept[m].items():
            assert id(p) in ep_ids, f"{m}.{n} is no longer a parameter of the model"
            ref_grad = ref_block.get_parameter(n).grad
            if ref_grad is None:
                assert p.grad is None or not p.grad.any(), f"{m}.{n}"
                continue
            errs[f"{m}.{n}"] = _rel_err(p.grad, ref_grad)
            num_block_grads += 1
        F_ = ref_block.experts.gate_up_proj.size(1) // 2
        g_gu, g_down = ref_block.experts.gate_up_proj.grad, ref_block.experts.down_proj.grad
        L = layer.num_local_experts
        for key, r, g in (("w1", g_gu[:, :F_].transpose(1, 2), layer.experts.w1.grad),
                          ("w3", g_gu[:, F_:].transpose(1, 2), layer.experts.w3.grad),
                          ("w2", g_down.transpose(1, 2), layer.experts.w2.grad)):
            # expert parallelism: this rank's experts saw every token of its group
            r = r.contiguous()
            dist.all_reduce(r, group=group)
            errs[f"{m}.experts.{key}"] = _rel_err(g, r[ep_rank * L:(ep_rank + 1) * L])
    return dict(errs=errs, num_moe=len(moe_names), num_dense=num_dense, num_block_grads=num_block_grads,
                loss=(ep_out.loss.item(), out.loss.item()))


def _assert_parity(per_rank, family, gname="world"):
    for rank, res in enumerate(per_rank):
        r = res[(family, gname)]
        assert r["num_moe"] == NUM_MOE[family], (family, r["num_moe"])
        assert r["num_dense"] > 5, family  # embeddings, attention, norms, LM head (and dense MLPs)
        assert r["num_block_grads"] >= r["num_moe"], family  # at least each block's router weight
        assert sum(k.endswith((".w1", ".w2", ".w3")) for k in r["errs"]) == 3 * r["num_moe"]
        bad = sorted(((v, k) for k, v in r["errs"].items() if not v < 1e-4), reverse=True)
        assert not bad, f"rank {rank}, {family}, group {gname}: {len(bad)} differ, worst {bad[:4]}"
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5, (rank, family, gname, r["loss"])


@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_and_grads_as_unmodified_model_on_1_rank(two_ranks, family):
    """Each rank of the 2-rank run alone in its group (``group=`` a 1-rank group): E experts local."""
    _assert_parity([parity for parity, _, _ in two_ranks], family, "ep1")


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
            block = ref.get_submodule(name).experts
            F_ = block.gate_up_proj.size(1) // 2
            L = m.num_local_experts
            for g, r in ((m.experts.w1.grad, block.gate_up_proj.grad[:, :F_].transpose(1, 2)),
                         (m.experts.w3.grad, block.gate_up_proj.grad[:, F_:].transpose(1, 2)),
                         (m.experts.w2.grad, block.down_proj.grad.transpose(1, 2))):
                experts = max(experts, _rel_err(g, r[rank * L:(rank + 1) * L]))
    return replicated, experts, len(expert_params)


def _load_rank(path):
    """from_pretrained: every rank reads only its experts, and the model is the one
    expert_parallelize makes of the full checkpoint (same logits). Rank 0 saved it."""
    rank = dist.get_rank()
    out = {}
    for family in ("qwen3_moe", "mixtral", "deepseek_v3"):
        ref = _build(family).eval()
        if rank == 0:
            ref.save_pretrained(f"{path}/{family}")
        dist.barrier()
        loaded = from_pretrained(f"{path}/{family}")
        full = expert_parallelize(copy.deepcopy(ref))
        ids = torch.randint(3, VOCAB, (1, 5 + rank), generator=torch.Generator().manual_seed(3 + rank))
        with torch.no_grad():
            err = _rel_err(loaded(ids).logits, full(ids).logits)
        same = all(torch.equal(a, b) for (n, a), (_, b) in zip(loaded.state_dict().items(), full.state_dict().items()))
        layers = [m for m in loaded.modules() if isinstance(m, MoELayer)]
        out[family] = dict(err=err, same_state=same, cls=type(loaded).__name__, ref_cls=type(ref).__name__,
                           local=[tuple(m.experts.w1.shape) for m in layers],
                           E=layers[0].num_experts, training=loaded.training)
    return out


def _two_rank_fn(path):
    # one spawn for 1 and 2 ranks: the 1-rank case is each rank alone in a group of its own
    return _parity_rank(FAMILIES, 1, FAMILIES), _data_parallel_step_rank(), _load_rank(path)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn(_two_rank_fn, 2, str(tmp_path_factory.mktemp("hf_checkpoints")), timeout_s=900)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_and_grads_as_unmodified_model_on_2_ranks(two_ranks, family):
    _assert_parity([parity for parity, _, _ in two_ranks], family)


def test_data_parallel_recipe_gives_the_global_batch_gradients(two_ranks):
    for rank, (_, (replicated, experts, num_expert_params), _) in enumerate(two_ranks):
        assert num_expert_params == 2 * 3  # 2 MoE layers x (w1, w2, w3)
        assert replicated < 1e-4 and experts < 1e-4, (rank, replicated, experts)


def test_from_pretrained_reads_only_this_ranks_experts(two_ranks):
    for rank, (_, _, loads) in enumerate(two_ranks):
        assert set(loads) == {"qwen3_moe", "mixtral", "deepseek_v3"}
        for family, r in loads.items():
            assert r["E"] == 8 and all(shape[0] == 4 for shape in r["local"]), (rank, family, r["local"])
            assert r["cls"] == r["ref_cls"]  # the loader's subclass does not leak
            assert r["same_state"], (rank, family)  # every tensor equals expert_parallelize's of the full model
            assert r["err"] < 1e-6, (rank, family, r["err"])
            assert not r["training"]


def _four_rank_fn():
    return _parity_rank(FAMILIES, 2, GROUP_FAMILIES), _generate_and_modes_rank()


@pytest.fixture(scope="module")
def four_ranks():
    return spawn(_four_rank_fn, 4, timeout_s=1200)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_and_grads_on_4_ranks(four_ranks, family):
    _assert_parity([parity for parity, _ in four_ranks], family)


@pytest.mark.parametrize("family", GROUP_FAMILIES)
def test_same_logits_and_grads_on_4_ranks_in_2_rank_groups(four_ranks, family):
    """The world split into two expert-parallel groups of 2 (``group=``)."""
    _assert_parity([parity for parity, _ in four_ranks], family, "ep2")


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
    frozen.bfloat16().eval()
    for m in frozen.modules():
        if type(m).__name__ == "DeepseekV3TopkRouter":
            m.float()  # transformers keeps this gate in fp32 (_keep_in_fp32_modules_strict)
    expert_parallelize(frozen)
    layers = [m for m in frozen.modules() if isinstance(m, MoELayer)]
    modes = dict(
        num_layers=len(layers), training=[m.training for m in layers],
        requires_grad=[(m.experts.w1.requires_grad, m.experts.w2.requires_grad, m.router.gate.weight.requires_grad)
                       for m in layers],
        dtypes=[(m.experts.w1.dtype, m.shared.mlp.gate_proj.weight.dtype, m.router.gate.weight.dtype,
                 m.router.expert_bias.dtype) for m in layers])
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
def _refusals_rank():
    errors = {}
    cases = {
        # routing options cannot reach a family that routes with its own router
        "own_router_options": lambda: expert_parallelize(_build("phimoe"), bias_update_rate=1e-3),
        "sizes_from_model": lambda: expert_parallelize(_build("mixtral"), num_topk=4, norm_topk_prob=True),
    }
    for name, call in cases.items():
        try:
            call()
        except TypeError as e:
            errors[name] = str(e)
    return errors


def test_refuses_routing_options_the_block_router_ignores():
    (errors,) = spawn(_refusals_rank, 1, timeout_s=120)
    assert "model.layers.0.mlp (phimoe) routes with its own router, which moeflow's routing options " \
           "['bias_update_rate'] do not reach" in errors["own_router_options"]
    assert "['norm_topk_prob', 'num_topk'] come from the model" in errors["sizes_from_model"]


def test_refuses_bad_arguments_and_unknown_blocks():
    import transformers as tf

    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        expert_parallelize("model")
    with pytest.raises(ValueError, match="no MoE block found in Linear"):
        expert_parallelize(nn.Linear(4, 4))
    # GPT-OSS: a known family with a reason
    cfg = tf.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"])
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp is a GptOssMLP, which moeflow does not reproduce: "
                                        r"gpt_oss: its experts have biases"):
        expert_parallelize(tf.GptOssForCausalLM(cfg))
    assert all(cls not in SUPPORTED_BLOCKS for cls in REFUSED_BLOCKS)

    class FancyMoE(nn.Module):  # an MoE block of a class nobody registered
        def __init__(self):
            super().__init__()
            self.gate, self.experts = nn.Linear(4, 2), nn.Linear(4, 4)

    with pytest.raises(TypeError, match=r"expert_parallelize: 1 is a FancyMoE, an MoE block of a family moeflow "
                                        r"does not know"):
        expert_parallelize(nn.Sequential(nn.Linear(4, 4), FancyMoE()))
    odd = _build("qwen3_moe")
    odd.model.layers[1].mlp.gate.top_k = None  # a layout that keeps top_k nowhere we look
    with pytest.raises(TypeError, match=r"neither model\.layers\.1\.mlp \(Qwen3MoeSparseMoeBlock\) nor its "
                                        "router holds `top_k`"):
        expert_parallelize(odd)
    with pytest.raises(ValueError, match=r"jitter_noise=0\.1"):
        expert_parallelize(_build("mixtral", router_jitter_noise=0.1))
    with pytest.raises(ValueError, match=r"input_jitter_noise=0\.1"):
        expert_parallelize(_build("phimoe", input_jitter_noise=0.1))
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


def test_docs_table_lists_every_supported_and_refused_block():
    """docs/hf.md's two tables name exactly the registry's blocks and families."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "hf.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| (Router|own router|[^|]+) \|", text, re.M)
    supported = {block: fam for fam, block, kind in rows if kind in ("Router", "own router")}
    refused = {block for fam, block, kind in rows if kind not in ("Router", "own router")}
    assert supported == {block: f.model_type for block, f in SUPPORTED_BLOCKS.items()}
    assert refused == set(REFUSED_BLOCKS)
    for fam, block, kind in rows:
        if block in SUPPORTED_BLOCKS:
            assert (kind == "Router") == (SUPPORTED_BLOCKS[block].routing is not None), block
    assert set(FAMILY_CONFIGS) == {f.model_type for f in SUPPORTED_BLOCKS.values()}  # each has a parity test
