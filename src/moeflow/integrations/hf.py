"""Expert-parallelize Hugging Face transformers MoE models in place.

:func:`expert_parallelize` walks a model and replaces every MoE block of a supported family by a
:class:`moeflow.MoELayer` (:class:`HFMoELayer`) that holds this rank's contiguous shard of the
block's routed experts and a full copy of its shared experts, and routes with the block's own
gate Parameter. The
rest of the model (embeddings, attention, norms, dense MLPs, the LM head) is untouched, so its
forward, ``generate`` and the loss keep working; each rank runs its own batch (data parallel)
and the MoE layers move tokens to the ranks that own their experts.

Shape letters:
    E  routed experts of a block    D  hidden size
    F  intermediate size of one routed expert    F_s  of the shared experts together

Supported blocks (transformers >= 5 layout: routed experts as two fused 3-D parameters,
``gate_up_proj`` ``[E, 2F, D]`` with the gate rows first and ``down_proj`` ``[E, D, F]``, each
expert ``down(silu(x @ gate.T) * (x @ up.T))``), and the :class:`moeflow.Router` options that
reproduce their routing exactly:

- ``DeepseekV3MoE``: sigmoid scores; ``e_score_correction_bias`` added for selection only
  (-> ``Router.expert_bias``); group-limited top-k over ``n_group`` groups scored by their top-2,
  keeping ``topk_group`` (-> ``num_groups``, ``num_topk_groups``); weights are the unbiased scores,
  normalised if ``norm_topk_prob``, times ``routed_scaling_factor`` (-> ``route_scale``); shared
  experts (one SwiGLU of ``F_s = n_shared_experts * F``) on every token.
- ``Qwen3MoeSparseMoeBlock``: softmax over E, top-k, renormalised only if ``norm_topk_prob``.
- ``MixtralSparseMoeBlock``: softmax over E, top-k, always renormalised (the same as a softmax
  over the top-k logits). ``router_jitter_noise > 0`` is refused: moeflow does not reproduce it.

Routing runs in fp32 (the gate's logits included), where Qwen3-MoE and Mixtral compute the
logits in the model's dtype: identical in fp32, a rare different choice near ties in bf16.

Router logits: each new layer keeps the block's own router module (``hf_router``), its weight
the very Parameter the moeflow Router routes with (and DeepSeek-V3's bias the same buffer), and
runs it once more for its logits once transformers' output recorder has hooked it (from the
first forward that asks for recorded outputs, e.g. ``output_router_logits=True``, on), so
``outputs.router_logits`` and Mixtral's and Qwen3-MoE's ``aux_loss`` come out as before, with
gradients into the shared gate (cost: one more ``[T, D] x [D, E]`` product per layer, only then).
Hooks that other libraries registered on a replaced block (e.g. accelerate's ``device_map``
offload) go with the block.

This module imports nothing from transformers: it recognises blocks by class name and reads
their tensors, so ``import moeflow`` works without the ``hf`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..layer import MoELayer
from ..parallel.mesh import GroupLike, resolve_groups

__all__ = ["expert_parallelize", "HFMoELayer", "SUPPORTED_BLOCKS"]

# MoELayer arguments that expert_parallelize takes from the model, not from the caller
_FROM_MODEL = ("hidden", "ffn_hidden", "num_experts", "num_topk", "num_shared_experts", "score_func",
               "num_groups", "num_topk_groups", "route_scale", "norm_topk_prob")


@dataclass(frozen=True)
class _BlockSpec:
    """What one HF block holds, in the block's own tensors (no copies)."""

    router_kwargs: dict
    router: nn.Module                   # the block's router module (kept for its logits)
    gate: nn.Parameter                  # [E, D] router weight
    expert_bias: Optional[torch.Tensor]  # [E] selection-only bias, or None
    gate_up: torch.Tensor               # [E, 2F, D] gate rows, then up rows
    down: torch.Tensor                  # [E, D, F]
    # shared experts: (gate [F_s, D], up [F_s, D], down [D, F_s]) or None
    shared: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def num_experts(self) -> int:
        return self.gate_up.size(0)


# ------------------------------------------------------------------------------ reading blocks
def _read_deepseek_v3(block: nn.Module, name: str) -> _BlockSpec:
    router = _child(block, "gate", name)
    kwargs = dict(score_func="sigmoid", num_groups=int(_attr(router, block, "num_group", name)),
                  num_topk_groups=int(_attr(router, block, "topk_group", name)),
                  route_scale=float(_attr(router, block, "routed_scaling_factor", name)),
                  norm_topk_prob=bool(_attr(router, block, "norm_topk_prob", name)))
    return _spec(block, name, router, int(_attr(router, block, "top_k", name)), kwargs,
                 expert_bias=_attr(router, block, "e_score_correction_bias", name),
                 shared=_mlp_weights(_child(block, "shared_experts", name), f"{name}.shared_experts"))


def _read_qwen3_moe(block: nn.Module, name: str) -> _BlockSpec:
    router = _child(block, "gate", name)
    kwargs = dict(score_func="softmax", norm_topk_prob=bool(_attr(router, block, "norm_topk_prob", name)))
    return _spec(block, name, router, int(_attr(router, block, "top_k", name)), kwargs)


def _read_mixtral(block: nn.Module, name: str) -> _BlockSpec:
    jitter = getattr(block, "jitter_noise", 0.0)
    if jitter:
        raise ValueError(f"expert_parallelize: {name} has router_jitter_noise={jitter}, which moeflow's Router "
                         "does not reproduce; set config.router_jitter_noise = 0 before building the model")
    router = _child(block, "gate", name)
    return _spec(block, name, router, int(_attr(router, block, "top_k", name)),
                 dict(score_func="softmax", norm_topk_prob=True))


#: block class name -> reader of its weights and routing; the families :func:`expert_parallelize` knows
SUPPORTED_BLOCKS: dict[str, Callable[[nn.Module, str], _BlockSpec]] = {
    "DeepseekV3MoE": _read_deepseek_v3,
    "Qwen3MoeSparseMoeBlock": _read_qwen3_moe,
    "MixtralSparseMoeBlock": _read_mixtral,
}


def _attr(router: nn.Module, block: nn.Module, attr: str, name: str) -> Any:
    """A routing setting, held by the router module (transformers 5) or by the block."""
    for owner in (router, block):
        value = getattr(owner, attr, None)
        if value is not None:
            return value
    raise TypeError(f"expert_parallelize: neither {name} ({type(block).__name__}) nor its router holds `{attr}`; "
                    "this transformers version's layout is not supported")


def _child(module: nn.Module, attr: str, name: str) -> nn.Module:
    child = getattr(module, attr, None)
    if not isinstance(child, nn.Module):
        raise TypeError(f"expert_parallelize: {name} ({type(module).__name__}) has no submodule `{attr}`; "
                        "this transformers version's layout is not supported")
    return child


def _spec(block: nn.Module, name: str, router: nn.Module, num_topk: int, router_kwargs: dict, *,
          expert_bias: Optional[torch.Tensor] = None,
          shared: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> _BlockSpec:
    experts = _child(block, "experts", name)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3):
        raise TypeError(f"expert_parallelize: {name}.experts ({type(experts).__name__}) does not hold fused 3-D "
                        "`gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F] parameters (the transformers >= 5 "
                        "layout); other layouts (e.g. a ModuleList of Linear experts) are not supported")
    E, F2, D = gate_up.shape
    if F2 % 2 or tuple(down.shape) != (E, D, F2 // 2):
        raise ValueError(f"expert_parallelize: {name}.experts has gate_up_proj {list(gate_up.shape)} and down_proj "
                         f"{list(down.shape)}; expected [E, 2F, D] and [E, D, F]")
    if any(p.dim() < 3 for p in experts.parameters(recurse=False)):
        raise TypeError(f"expert_parallelize: {name}.experts has bias parameters, which SwiGLU experts lack")
    _check_silu(getattr(experts, "act_fn", None), f"{name}.experts")
    gate = getattr(router, "weight", None)
    if not isinstance(gate, nn.Parameter) or tuple(gate.shape) != (E, D):
        raise ValueError(f"expert_parallelize: {name}.gate.weight must be [E={E}, D={D}], got "
                         f"{None if gate is None else list(gate.shape)}")
    if getattr(router, "bias", None) is not None:
        raise TypeError(f"expert_parallelize: {name}.gate has a bias, which moeflow's Router lacks")
    router_kwargs = dict(router_kwargs, num_topk=num_topk)
    if shared is not None and shared[0].size(0) % (F2 // 2):
        raise ValueError(f"expert_parallelize: {name}'s shared experts have intermediate size {shared[0].size(0)}, "
                         f"not a multiple of the routed experts' {F2 // 2}")
    return _BlockSpec(router_kwargs, router, gate, expert_bias, gate_up, down, shared)


def _mlp_weights(mlp: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate [F_s, D], up [F_s, D], down [D, F_s])`` of a gate/up/down SwiGLU MLP."""
    linears = [getattr(mlp, attr, None) for attr in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(lin, nn.Linear) for lin in linears):
        raise TypeError(f"expert_parallelize: {name} ({type(mlp).__name__}) is not a gate_proj/up_proj/down_proj "
                        "MLP of nn.Linear layers")
    if any(lin.bias is not None for lin in linears):
        raise TypeError(f"expert_parallelize: {name} has biased projections, which SwiGLU lacks")
    _check_silu(getattr(mlp, "act_fn", None), name)
    return tuple(lin.weight for lin in linears)


def _check_silu(act: Any, name: str) -> None:
    """moeflow's experts are SwiGLU: the block's activation must be SiLU (checked on values)."""
    probe = torch.linspace(-4, 4, 9)
    if not callable(act) or not torch.allclose(act(probe), F.silu(probe)):
        raise ValueError(f"expert_parallelize: {name}.act_fn ({type(act).__name__}) is not SiLU; moeflow's "
                         "experts are SwiGLU")


def _looks_like_moe(module: nn.Module) -> bool:
    """An unsupported MoE block: routed experts beside a router, in a class we have no reader for."""
    children = dict(module.named_children())
    return "experts" in children and ("gate" in children or "router" in children)


# ------------------------------------------------------------------------------------ adapter
class HFMoELayer(MoELayer):
    """A :class:`moeflow.MoELayer` that stands in for a transformers MoE block.

    Same forward as the block in transformers >= 5 (``[B, S, D]`` -> ``[B, S, D]``). Takes
    :class:`moeflow.MoELayer`'s arguments. :func:`expert_parallelize` sets ``hf_router`` to the
    block's router module, whose ``weight`` is ``self.router.gate.weight`` (one Parameter); when
    transformers has hooked it to record router logits, it is run on the input so that the hook
    sees them (its top-k goes unused: the moeflow Router routes).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hf_router: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, D]`` (or ``[..., D]``); returns the same shape and dtype."""
        y = super().forward(x)
        if self.hf_router is not None and self.hf_router._forward_hooks:
            self.hf_router(x)  # output_router_logits: transformers' recorder hook reads the logits
        return y


# ------------------------------------------------------------------------------- public entry
def expert_parallelize(model: nn.Module, group: GroupLike = None, **layer_kwargs: Any) -> nn.Module:
    """Replace every supported MoE block of ``model`` by a :class:`moeflow.MoELayer` holding this
    rank's shard of the same weights; return ``model`` (changed in place).

    Call it on every rank of ``group``, each holding the same full weights (the same checkpoint,
    or the same seed), after ``torch.distributed`` is initialised. Routed experts are split evenly
    and contiguously over the ranks (rank r holds experts ``[r * E / R, (r + 1) * E / R)``); the
    shared experts are copied whole; the router gate Parameter (and an fp32 expert bias) are
    taken over as they are, not copied. Each new layer is built on the device of the block's
    experts, in their dtype (the router gate keeps its own dtype), in the block's train/eval
    mode, with ``requires_grad`` as on the block's tensors; the replaced block and its full
    expert tensors are released when nothing else refers to them.

    Gradients: a rank's expert weights receive the gradient of every rank's tokens routed to
    them (the sum over the group), so they need no data-parallel reduction over ``group``; the
    other parameters get this rank's batch only, as in plain data parallelism. With a mesh,
    :func:`moeflow.parallelize` applies FSDP2 to both; docs/hf.md has the recipe by hand, and
    why plain DDP must skip the experts.

    Args:
        model: a transformers model (e.g. ``DeepseekV3ForCausalLM``, ``Qwen3MoeForCausalLM``,
            ``MixtralForCausalLM``) or any module containing blocks named in
            :data:`SUPPORTED_BLOCKS`.
        group: the expert-parallel process group (default: the world), or a ``DeviceMesh`` with
            an ``"ep"`` dim (see :class:`moeflow.MoELayer`); each block's E must divide by the
            expert-parallel size. With a mesh, :func:`moeflow.parallelize` then applies FSDP2.
        **layer_kwargs: passed to every :class:`moeflow.MoELayer` (``num_chunks``,
            ``capacity_factor``, ``wire_dtype``, ``bias_update_rate``, the Router's loss
            coefficients, ...). The routing options and sizes come from the model and may not
            be given.

    Returns:
        ``model`` (or the new layer, when ``model`` is itself a block), whose MoE blocks are now
        :class:`HFMoELayer` modules, subclasses of :class:`moeflow.MoELayer` (find them with
        ``isinstance(m, moeflow.MoELayer)``, e.g. to call ``m.router.update_bias()`` each step).

    Raises:
        TypeError: ``model`` is not a module, ``layer_kwargs`` names a routing option or size,
            or a block has an unknown class or weight layout.
        ValueError: no MoE block found, a block's experts do not divide over the group, or a
            block uses a feature moeflow does not reproduce (non-SiLU experts, router jitter).
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expert_parallelize: `model` must be a torch.nn.Module, got {type(model).__name__}")
    taken = sorted(set(layer_kwargs) & set(_FROM_MODEL))
    if taken:
        raise TypeError(f"expert_parallelize: {taken} come from the model's config and cannot be passed in "
                        "`layer_kwargs`")

    # Read and check every block before building anything, so a bad block fails on every rank alike.
    found: list[tuple[str, nn.Module, _BlockSpec]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _, _ in found) or isinstance(module, MoELayer):
            continue
        reader = SUPPORTED_BLOCKS.get(type(module).__name__)
        if reader is not None:
            found.append((name, module, reader(module, name or "model")))
        elif _looks_like_moe(module):
            raise TypeError(f"expert_parallelize: {name or 'model'} is a {type(module).__name__}, an MoE block of "
                            f"a family moeflow does not know; supported blocks: {sorted(SUPPORTED_BLOCKS)}")
    if not found:
        if any(isinstance(m, MoELayer) for m in model.modules()):
            raise ValueError(f"expert_parallelize: {type(model).__name__} is already expert-parallel (its MoE "
                             "blocks are moeflow MoELayers)")
        raise ValueError(f"expert_parallelize: no MoE block found in {type(model).__name__}; supported blocks: "
                         f"{sorted(SUPPORTED_BLOCKS)}")
    if not dist.is_initialized():
        raise RuntimeError("expert_parallelize: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or use moeflow.spawn)")
    R = dist.get_world_size(resolve_groups(group)[0])
    for name, _, spec in found:
        if spec.num_experts % R:
            raise ValueError(f"expert_parallelize: {name} has {spec.num_experts} experts, which do not divide "
                             f"over the {R} ranks of `group` (rank {dist.get_rank()})")

    for name, block, spec in found:
        layer = _build_layer(spec, group, layer_kwargs)
        layer.train(block.training)
        if not name:  # `model` is itself a block: there is no parent to put the layer in
            return layer
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer)
    return model


def _build_layer(spec: _BlockSpec, group: GroupLike, layer_kwargs: dict) -> HFMoELayer:
    E, F2, D = spec.gate_up.shape
    F_ = F2 // 2
    num_shared = spec.shared[0].size(0) // F_ if spec.shared is not None else 0
    device, dtype = spec.gate_up.device, spec.gate_up.dtype
    if device.type == "meta":
        raise ValueError("expert_parallelize: the model's expert weights are on the meta device; load them first")
    with torch.device(device):
        layer = HFMoELayer(D, F_, E, num_shared_experts=num_shared, group=group, **spec.router_kwargs,
                           **layer_kwargs)
    layer.to(dtype=dtype)
    # The router routes with the block's own gate Parameter (its dtype kept: DeepSeek-V3's is
    # fp32) and selection bias buffer, which the kept HF router module shares for its logits.
    layer.router.gate.weight = spec.gate
    if spec.expert_bias is not None:
        if spec.expert_bias.dtype == torch.float32:
            layer.router.expert_bias = spec.expert_bias
        else:  # the Router's bias stays fp32 (see Router._apply): a copy, not shared
            with torch.no_grad():
                layer.router.expert_bias.copy_(spec.expert_bias)
    layer.hf_router = spec.router
    # gate_up_proj [E, 2F, D] -> w1 (gate), w3 (up) [E, D, F]; down_proj [E, D, F] -> w2 [E, F, D]:
    # transposed views; load_global_weights copies only this rank's E / R experts out of them.
    w1 = spec.gate_up[:, :F_].transpose(1, 2)
    w3 = spec.gate_up[:, F_:].transpose(1, 2)
    w2 = spec.down.transpose(1, 2)
    shared = None
    if spec.shared is not None:
        s_gate, s_up, s_down = spec.shared
        shared = (s_gate.t(), s_down.t(), s_up.t())
    layer.load_global_weights(spec.gate, w1, w2, w3, shared)
    layer.experts.w1.requires_grad_(spec.gate_up.requires_grad)
    layer.experts.w3.requires_grad_(spec.gate_up.requires_grad)
    layer.experts.w2.requires_grad_(spec.down.requires_grad)
    if spec.shared is not None:
        for w, src in ((layer.shared.w1, spec.shared[0]), (layer.shared.w3, spec.shared[1]),
                       (layer.shared.w2, spec.shared[2])):
            w.requires_grad_(src.requires_grad)
    return layer
