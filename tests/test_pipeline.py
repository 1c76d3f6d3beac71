"""Pipelined MoE models (pp 2 x ep 2, 4 Gloo ranks): every schedule, with and without overlap,
activation checkpointing and FSDP2, trains like the unpipelined model.

Each rank builds the model twice from one seed: the reference runs whole on the rank's
expert-parallel group (the unpipelined model), the other is cut into pipeline stages. Both take
the same batches for several steps (SGD, expert-bias updates), and every step compares the
last stage's loss, every stage parameter's gradient and every MoE layer's counted load.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeflow import spawn
from moeflow.parallel.pipeline import SCHEDULES, ModelParts, build_pipeline, split_layers, stage_indices

STEPS, MICRO, BATCH = 3, 4, 8
# (schedule, overlap, checkpoint, fsdp)
CASES = [(name, False, None, False) for name in SCHEDULES] + [
    ("dualpipev", True, None, False),
    ("dualpipev", True, "full", False),
    ("dualpipev", True, "selective", False),
    ("dualpipev", True, "full", True),
]


def _loss(y, t):
    return F.cross_entropy(y.reshape(-1, y.size(-1)), t.reshape(-1))


def _demo_model(mesh):
    from moeflow.demo import DemoConfig, TinyMoELM

    cfg = DemoConfig(num_layers=4, dim=32, num_heads=2, ffn_hidden=32, num_experts=8, seq_len=16, batch_size=BATCH,
                     aux_loss_coeff=1e-2, bias_update_rate=1e-2, tie_embeddings=False)
    torch.manual_seed(cfg.seed)  # the same weights on every rank, whatever the layout (see MoELayer)
    model = TinyMoELM(cfg, mesh)
    return model, model.pipeline_parts(), model.moe_layers(), 256


def _hf_model(mesh):
    import transformers as tf

    from moeflow.integrations.hf import expert_parallelize
    from moeflow.integrations.hf_pipeline import pipeline_parts

    cfg = tf.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                            num_experts_per_tok=2, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                            num_key_value_heads=2, num_experts=8, decoder_sparse_step=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(cfg).float().train()
    with torch.no_grad():  # clear routing margins (HF's 0.02-std gates are nearly uniform)
        for m in model.modules():
            if type(m).__name__ == "Qwen3MoeSparseMoeBlock":
                m.gate.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    expert_parallelize(model, mesh, seq_aux_loss_coeff=1e-2)
    layers = [m for m in model.modules() if type(m).__name__ == "HFMoELayer"]
    return model, pipeline_parts(model), layers, 96


def _param_owners(model, parts) -> dict:
    """``(id(module), name) -> the model's name of that parameter``, for every module of the model
    and of its pipeline parts (FSDP2 swaps in new parameters, but keeps the modules)."""
    names = {id(p): n for n, p in model.named_parameters()}  # a shared parameter: its first name
    return {(id(m), n): names[id(p)] for root in (model, parts.embed, parts.head) for m in root.modules()
            for n, p in m.named_parameters(recurse=False)}


def _case(mesh, build, schedule, overlap, checkpoint, fsdp):
    """One configuration for STEPS steps: worst relative gradient and loss errors, whether every
    counted load matched, and how many parameters were compared."""
    ep = mesh["ep"].get_group()
    ref, _, ref_layers, V = build(mesh)
    model, parts, layers, _ = build(mesh)
    owners = _param_owners(model, parts)
    layer_names = {id(m): n for n, m in model.named_modules()}
    # FSDP2 as moeflow.parallelize applies it, each stage one unit kept gathered across micro-batches
    pipe = build_pipeline(parts, schedule=schedule, mesh=mesh, num_microbatches=MICRO, microbatch_size=BATCH // MICRO,
                          seq_len=16, loss_fn=_loss, overlap=overlap, checkpoint=checkpoint,
                          fsdp=dict(blocks=[], reshard_after_forward=False) if fsdp else None)
    mine = {owners[id(m), n]: p for module in pipe.modules for m in module.modules()
            for n, p in m.named_parameters(recurse=False)}
    in_stages = {id(mm) for module in pipe.modules for mm in module.modules()}
    ref_modules = dict(ref.named_modules())
    ref_of = {id(m): ref_modules[layer_names[id(m)]] for m in layers if id(m) in in_stages}
    ref_params = dict(ref.named_parameters())
    g = torch.Generator().manual_seed(mesh["ep"].get_local_rank())
    worst_grad = worst_loss = 0.0
    loads_equal = True
    for _ in range(STEPS):
        x = torch.randint(0, V, (BATCH, 16), generator=g)
        y = torch.randint(0, V, (BATCH, 16), generator=g)
        out = ref(x)
        loss_ref = _loss(getattr(out, "logits", out), y)
        aux = sum(m.last_router_output.loss for m in ref_layers)
        (loss_ref + aux).backward()
        if fsdp:  # parallelize's gradients are those of the mean loss over the routing ranks (here ep):
            # dense gradients averaged over them, expert gradients (which already sum every rank's
            # tokens through dispatch / combine) divided by their number
            for n, p in ref.named_parameters():
                if p.grad is not None:
                    if ".experts." not in n:
                        dist.all_reduce(p.grad, group=ep)
                    p.grad /= dist.get_world_size(ep)
        loss = pipe.step(x, y)
        if loss is not None:
            worst_loss = max(worst_loss, abs(float(loss) - loss_ref.item()) / loss_ref.item())
        for n, p in mine.items():
            a, b = p.grad, ref_params[n].grad
            a = a.full_tensor() if hasattr(a, "full_tensor") else a
            if b is None or float(b.norm()) == 0:
                assert a is None or float(a.norm()) == 0, n
                continue
            worst_grad = max(worst_grad, float((a - b).norm() / b.norm()))
        if not fsdp:  # data parallelism by hand: the replicated weights stay equal over the ep ranks
            # (Router.update_bias checks that the gates do)
            for named in (ref_params, mine):
                for n, p in named.items():
                    if p.grad is not None and ".experts." not in n:
                        dist.all_reduce(p.grad, group=ep)
                        p.grad /= dist.get_world_size(ep)
        with torch.no_grad():
            for params in (ref_params.values(), mine.values()):
                for p in params:
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
                    p.grad = None
        # update_bias sums over the expert-parallel group: both ranks of a stage call the same ones
        for m in layers:
            if id(m) in ref_of:
                loads_equal &= torch.equal(m.router.update_bias(), ref_of[id(m)].router.update_bias())
        for m in ref_layers:
            if all(m is not r for r in ref_of.values()):
                m.router.update_bias()
    return worst_grad, worst_loss, loads_equal, len(mine)


def _rank_fn(which):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    if which == "demo":
        return [_case(mesh, _demo_model, *case) for case in CASES]
    return [_case(mesh, _hf_model, *case) for case in (("1f1b", False, None, False), ("dualpipev", True, "full", False))]


def _print_worst(case, per_rank) -> None:
    print(f"\n{case}: largest relative gradient error {max(r[0] for r in per_rank):.1e}, "
          f"loss error {max(r[1] for r in per_rank):.1e}")


@pytest.fixture(scope="module")
def demo_results():
    return spawn(_rank_fn, 4, "demo", timeout_s=600)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{s}{'-overlap' if o else ''}{'-' + c if c else ''}"
                                                            f"{'-fsdp2' if f else ''}" for s, o, c, f in CASES])
def test_pipelined_demo_model_trains_like_the_unpipelined_one(demo_results, index):
    # every parameter of the model (44) is in a stage on both ranks of its pipeline position
    assert sum(results[index][3] for results in demo_results) == 2 * 44
    _print_worst(CASES[index], [results[index] for results in demo_results])  # docs/pipeline.md quotes it (-s)
    for rank, results in enumerate(demo_results):
        worst_grad, worst_loss, loads_equal, _ = results[index]
        assert worst_grad < 1e-5, (rank, CASES[index], worst_grad)
        assert worst_loss < 1e-5, (rank, CASES[index], worst_loss)
        assert loads_equal, (rank, CASES[index])  # a checkpoint recompute counts no token twice


def test_pipelined_hf_model_trains_like_the_unpipelined_one():
    pytest.importorskip("transformers")
    per_rank = spawn(_rank_fn, 4, "hf", timeout_s=600)
    for i, case in enumerate((("1f1b", False, None, False), ("dualpipev", True, "full", False))):
        _print_worst(("Qwen3-MoE",) + case, [results[i] for results in per_rank])
    for rank, results in enumerate(per_rank):
        for worst_grad, worst_loss, loads_equal, num_params in results:
            assert num_params > 0
            assert worst_grad < 1e-5 and worst_loss < 1e-5 and loads_equal, (rank, results)


def test_stage_split_and_placement():
    assert [len(r) for r in split_layers(6, 4)] == [1, 2, 2, 1]  # the middle stages take the extra layers
    assert [len(r) for r in split_layers(7, 4)] == [2, 2, 2, 1]
    assert [list(r) for r in split_layers(4, 4)] == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="3 layers cannot fill 4 stages"):
        split_layers(3, 4)
    # torch's placements: looped for interleaved 1F1B, a V for ZBV and DualPipeV
    assert [stage_indices("1f1b", r, 2) for r in range(2)] == [[0], [1]]
    assert [stage_indices("interleaved1f1b", r, 2) for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_indices("DualPipeV", r, 2) for r in range(2)] == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="unknown pipeline schedule 'pipedream'"):
        stage_indices("pipedream", 0, 2)


def _bad_arguments_rank():
    from torch import nn

    parts = ModelParts(embed=nn.Embedding(8, 4), layers=tuple(nn.Identity() for _ in range(4)), head=nn.Linear(4, 8),
                       hidden=4, output_size=8)
    errors = []
    for kwargs in (dict(schedule="1f1b", overlap=True), dict(schedule="dualpipev", num_microbatches=2),
                   dict(schedule="interleaved1f1b", num_microbatches=3), dict(schedule="gpipe", checkpoint="some")):
        args = dict(mesh=None, num_microbatches=4, microbatch_size=1, seq_len=2, loss_fn=_loss) | kwargs
        try:
            build_pipeline(parts, **args)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_build_pipeline_refuses_what_cannot_run():
    errors = spawn(_bad_arguments_rank, 2, timeout_s=60)[0]
    assert len(errors) == 4
    assert "overlap=True needs schedule='dualpipev'" in errors[0]
    assert "DualPipeV needs num_microbatches >= 4" in errors[1]
    assert "divisible by the pipeline size 2, got 3" in errors[2]
    assert "`checkpoint` must be one of" in errors[3]
