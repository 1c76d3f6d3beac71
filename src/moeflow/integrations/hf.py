"""Expert-parallelize Hugging Face transformers MoE models in place.

:func:`expert_parallelize` walks a model and replaces every MoE block of a known family by a
:class:`moeflow.MoELayer` (:class:`HFMoELayer`) that holds this rank's contiguous shard of the
block's routed experts and the block's own shared-expert module. The rest of the model
(embeddings, attention, norms, dense MLPs, the LM head) is untouched, so its forward,
``generate`` and the loss keep working; each rank runs its own batch (data parallel) and the MoE
layers move tokens to the ranks that own their experts. :func:`from_pretrained` loads a
checkpoint so that each rank reads only its own routed experts from disk.

Shape letters:
    E  routed experts of a block    D  hidden size    T  tokens    K  experts per token
    F  intermediate size of one routed expert

Routed experts: transformers >= 5 keeps them as two fused 3-D parameters, ``gate_up_proj``
``[E, 2F, D]`` (gate rows first) and ``down_proj`` ``[E, D, F]``, each expert
``down(act(x @ gate.T) * (x @ up.T))``; moeflow reads that layout when the activation is SiLU
and there are no biases. Routing, one of two ways per family (:data:`SUPPORTED_BLOCKS`):

- **moeflow's Router** where its options reproduce the family's routing (softmax or sigmoid
  scores, top-k, group-limited top-k, selection bias, normalised and scaled weights). The Router
  takes over the block's gate Parameter (and selection-bias buffer) as they are, so moeflow's
  routing options work: ``bias_update_rate``, the aux losses, ``max_nodes_per_token``. It routes
  in fp32, where some families compute the logits in the model's dtype: identical in fp32, a
  rare different choice near ties in bf16.
- **the block's own router module** for the others (sparsemixer, DeepSeek-V2's group-limited
  greedy, clamped normalisation, ...): the layer calls it and dispatches the ids and weights it
  returns, so the routing is the family's own in every dtype; moeflow's routing options are
  refused there.

Shared experts stay the block's own module (with Qwen2-MoE's sigmoid gate where there is one)
and run while the routed tokens travel.

Router logits (``output_router_logits=True``): a Router-routed layer keeps the block's router
module (``hf_router``) on the same gate Parameter and runs it once more for its logits once
transformers' output recorder has hooked it, so ``outputs.router_logits`` and the families' aux
losses come out as before (cost: one more ``[T, D] x [D, E]`` product per layer, only then); a
layer that routes with the block's router records them as it routes. Hooks that other libraries
registered on a replaced block (e.g. accelerate's ``device_map`` offload) go with the block.

This module imports nothing from transformers at import time: it recognises blocks by class name
and reads their tensors, so ``import moeflow`` works without the ``hf`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..comm.agree import check_same, describe, fingerprint, gather_rows
from ..comm.transport import ProcessGroupTransport
from ..layer import MoELayer
from ..parallel.mesh import GroupLike, is_dtensor, resolve_groups
from ..routing import Router, RouterOutput

__all__ = ["expert_parallelize", "from_pretrained", "HFMoELayer", "Family", "SUPPORTED_BLOCKS", "REFUSED_BLOCKS"]

# MoELayer arguments that expert_parallelize takes from the model, not from the caller
_FROM_MODEL = ("hidden", "ffn_hidden", "num_experts", "num_topk", "num_shared_experts", "score_func",
               "num_groups", "num_topk_groups", "route_scale", "norm_topk_prob")
# MoELayer arguments that change the routing: refused where the block's own router routes
_ROUTING_OPTIONS = ("bias_update_rate", "aux_loss_coeff", "seq_aux_loss_coeff", "global_aux_loss_coeff",
                    "z_loss_coeff", "max_nodes_per_token")


# ------------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class _Routing:
    """moeflow Router options that reproduce a block's routing, and the tensors it routes with."""

    kwargs: dict                          # Router arguments (num_topk, score_func, ...)
    gate: nn.Parameter                    # [E, D] the block's gate weight, shared
    expert_bias: Optional[torch.Tensor] = None  # [E] selection-only bias, shared when fp32


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block class maps onto a :class:`HFMoELayer`.

    Attributes:
        model_type: transformers' ``model_type`` of the family (messages, docs).
        routing: reads the block's routing as moeflow :class:`Router` options
            (``(block, router, name) -> _Routing``), or None: the block's own router module
            routes (``router(x, *router_args) -> (logits, weights [T, K], ids [T, K])``).
        router: the block's attribute holding its router module.
        shared: the block's attribute holding its shared-expert module, if any (may be None on
            a given block).
        shared_gate: the block's attribute holding a ``Linear(D, 1)`` whose sigmoid scales the
            shared output (Qwen2-MoE), if any.
        router_args: block attributes passed to the router after ``x`` (own-router families).
        router_input_3d: the router takes ``[B, S, D]`` rather than ``[T, D]``.
        scales: ``block -> (routed, shared)`` factors the block applies to the routed output
            and to the shared output (own-router families), default ``(1, 1)``.
        check: ``(block, name) -> None``, raises on settings the layer would not reproduce.
    """

    model_type: str
    routing: Optional[Callable[[nn.Module, nn.Module, str], _Routing]]
    router: str = "gate"
    shared: Optional[str] = None
    shared_gate: Optional[str] = None
    router_args: tuple[str, ...] = ()
    router_input_3d: bool = False
    scales: Optional[Callable[[nn.Module], tuple[float, float]]] = None
    check: Optional[Callable[[nn.Module, str], None]] = None


def _setting(block: nn.Module, router: nn.Module, attr: str, name: str) -> Any:
    """A routing setting, held by the router module (transformers 5) or by the block."""
    for owner in (router, block):
        value = getattr(owner, attr, None)
        if value is not None:
            return value
    raise TypeError(f"expert_parallelize: neither {name} ({type(block).__name__}) nor its router holds `{attr}`; "
                    "this transformers version's layout is not supported")


def _gate(router: nn.Module, name: str) -> nn.Parameter:
    gate = getattr(router, "weight", None)
    if not isinstance(gate, nn.Parameter) or gate.dim() != 2:
        raise TypeError(f"expert_parallelize: {name}'s router ({type(router).__name__}) has no [E, D] `weight`")
    if getattr(router, "bias", None) is not None:
        raise TypeError(f"expert_parallelize: {name}'s router has a bias, which moeflow's Router lacks")
    return gate


def _sigmoid_grouped(block: nn.Module, router: nn.Module, name: str) -> _Routing:
    """DeepSeek-V3's router: sigmoid scores, ``e_score_correction_bias`` for selection only,
    group-limited top-k (a group scores its top-2), weights normalised if ``norm_topk_prob`` and
    times ``routed_scaling_factor``."""
    kwargs = dict(score_func="sigmoid", num_topk=int(_setting(block, router, "top_k", name)),
                  num_groups=int(_setting(block, router, "num_group", name)),
                  num_topk_groups=int(_setting(block, router, "topk_group", name)),
                  route_scale=float(_setting(block, router, "routed_scaling_factor", name)),
                  norm_topk_prob=bool(_setting(block, router, "norm_topk_prob", name)))
    return _Routing(kwargs, _gate(router, name), _setting(block, router, "e_score_correction_bias", name))


def _softmax_topk(norm: Optional[bool]) -> Callable[[nn.Module, nn.Module, str], _Routing]:
    """Softmax over E, top-k; weights renormalised always (True), never (False) or as the
    router's ``norm_topk_prob`` says (None). A softmax over the top-k logits (Granite) is the
    renormalised case."""

    def read(block: nn.Module, router: nn.Module, name: str) -> _Routing:
        renorm = bool(_setting(block, router, "norm_topk_prob", name)) if norm is None else norm
        kwargs = dict(score_func="softmax", num_topk=int(_setting(block, router, "top_k", name)), norm_topk_prob=renorm)
        return _Routing(kwargs, _gate(router, name))

    return read


def _no_jitter(*attrs: str) -> Callable[[nn.Module, str], None]:
    """Refuse multiplicative input noise in training, which the layer does not apply."""

    def check(block: nn.Module, name: str) -> None:
        for owner in (block, *block.children()):
            for attr in attrs:
                value = getattr(owner, attr, None)
                if value:
                    raise ValueError(f"expert_parallelize: {name} has {attr}={value}, input noise that moeflow does "
                                     f"not reproduce; set the config's {attr} to 0 before building the model")

    return check


def _cohere2_scales(block: nn.Module) -> tuple[float, float]:
    strategy = getattr(block, "shared_expert_combination_strategy", "sum")
    if getattr(block, "shared_experts", None) is None or strategy == "sum":
        return 1.0, 1.0
    if strategy == "average":  # (routed + shared) / 2
        return 0.5, 0.5
    raise ValueError(f"expert_parallelize: unknown shared_expert_combination_strategy {strategy!r}")


_DEEPSEEK_V3 = dict(routing=_sigmoid_grouped, shared="shared_experts")
_QWEN2 = dict(routing=_softmax_topk(None), shared="shared_expert", shared_gate="shared_expert_gate")
_MIXTRAL = dict(routing=_softmax_topk(True), check=_no_jitter("jitter_noise"))
_GRANITE = dict(routing=_softmax_topk(True), router="router")

#: block class name -> :class:`Family`: the blocks :func:`expert_parallelize` knows, each checked
#: against the unmodified model by tests/test_hf.py
SUPPORTED_BLOCKS: dict[str, Family] = {
    # moeflow's Router routes
    "DeepseekV3MoE": Family("deepseek_v3", **_DEEPSEEK_V3),
    "Glm4MoeMoE": Family("glm4_moe", **_DEEPSEEK_V3),
    "Glm4MoeLiteMoE": Family("glm4_moe_lite", **_DEEPSEEK_V3),
    "Dots1MoE": Family("dots1", **_DEEPSEEK_V3),
    "SolarOpenMoE": Family("solar_open", **_DEEPSEEK_V3),
    "ExaoneMoeSparseMoEBlock": Family("exaone_moe", **_DEEPSEEK_V3),
    "MiMoV2FlashMoE": Family("mimo_v2_flash", routing=_sigmoid_grouped),
    "Qwen3MoeSparseMoeBlock": Family("qwen3_moe", routing=_softmax_topk(None)),
    "Qwen2MoeSparseMoeBlock": Family("qwen2_moe", **_QWEN2),
    "OlmoeSparseMoeBlock": Family("olmoe", routing=_softmax_topk(None)),
    "FlexOlmoSparseMoeBlock": Family("flex_olmo", routing=_softmax_topk(None)),
    "MixtralSparseMoeBlock": Family("mixtral", **_MIXTRAL),
    "MiniMaxSparseMoeBlock": Family("minimax", **_MIXTRAL),
    "JambaSparseMoeBlock": Family("jamba", routing=_softmax_topk(False), router="router"),
    "GraniteMoeMoE": Family("granitemoe", **_GRANITE),
    "GraniteMoeSharedMoE": Family("granitemoeshared", **_GRANITE),
    # the block's own router routes
    "DeepseekV2Moe": Family("deepseek_v2", routing=None, shared="shared_experts"),
    "PhimoeSparseMoeBlock": Family("phimoe", routing=None, router="router", check=_no_jitter("input_jitter_noise")),
    "Ernie4_5_MoeSparseMoeBlock": Family("ernie4_5_moe", routing=None, shared="shared_experts"),
    "HunYuanMoEV1Moe": Family("hunyuan_v1_moe", routing=None, shared="shared_mlp"),
    "Lfm2MoeSparseMoeBlock": Family("lfm2_moe", routing=None, router_args=("expert_bias",)),
    "MiniMaxM2SparseMoeBlock": Family("minimax_m2", routing=None, router_args=("e_score_correction_bias",),
                                      check=_no_jitter("jitter_noise")),
    "AfmoeSparseMoeBlock": Family("afmoe", routing=None, router="router", shared="shared_experts",
                                  router_args=("expert_bias",), router_input_3d=True),
    "LagunaSparseMoeBlock": Family("laguna", routing=None, shared="shared_experts",
                                   scales=lambda block: (float(block.routed_scaling_factor), 1.0)),
    "Cohere2MoeSparseMoeBlock": Family("cohere2_moe", routing=None, shared="shared_experts", scales=_cohere2_scales),
}

#: block class name -> why :func:`expert_parallelize` refuses it
REFUSED_BLOCKS: dict[str, str] = {
    "GptOssMLP": "gpt_oss: its experts have biases and a clamped SwiGLU (alpha 1.702, limit 7), not SiLU-gated "
                 "experts without biases",
    "Llama4TextMoe": "llama4: it scales each expert's input by the router score; moeflow (like most MoEs) scales "
                     "the expert's output",
    "DbrxFFN": "dbrx: its experts keep their own layout (w1, v1, w2 as [E * F, D] matrices), not transformers' "
               "fused 3-D one",
    "NemotronHMoE": "nemotron_h: its experts are not gated (up then ReLU^2 then down)",
    "LongcatFlashMoE": "longcat_flash: it has zero-computation (identity) experts beside the routed ones",
    "JetMoeMoE": "jetmoe: its experts have biases and its attention is a mixture of experts too",
    "GraniteMoeHybridMoE": "granitemoehybrid: not covered by a parity test yet (its Mamba layers need a cache "
                           "this test does not build)",
    "Qwen3NextSparseMoeBlock": "qwen3_next: not covered by a parity test yet (its linear-attention layers need "
                               "flash-linear-attention kernels or a long CPU fallback)",
}


# ------------------------------------------------------------------------------ reading blocks
@dataclass(frozen=True)
class _BlockSpec:
    """What one HF block holds, in the block's own tensors and modules (no copies)."""

    family: Family
    router: nn.Module                     # the block's router module
    routing: Optional[_Routing]           # None: the router module routes
    num_topk: int
    gate_up: torch.Tensor                 # [E or L, 2F, D] gate rows, then up rows
    down: torch.Tensor                    # [E or L, D, F]
    num_experts: int                      # E
    first_expert: Optional[int]           # the shard's first expert when the tensors hold only this rank's
    shared: Optional[nn.Module]           # the shared-expert module, called on [T, D]
    shared_gate: Optional[nn.Module]      # Linear(D, 1) or None
    router_args: tuple[tuple[str, Any], ...]
    scales: tuple[float, float]


def _read_block(block: nn.Module, name: str, family: Family, group: Optional[dist.ProcessGroup]) -> _BlockSpec:
    if family.check is not None:
        family.check(block, name)
    router = _child(block, family.router, name)
    experts = _child(block, "experts", name)
    gate_up, down, first = _expert_tensors(experts, f"{name}.experts", group)
    E = gate_up.size(0) if first is None else experts.gate_up_proj.size(0)
    F2, D = gate_up.shape[1:]
    if F2 % 2 or tuple(down.shape[1:]) != (D, F2 // 2) or down.size(0) != gate_up.size(0):
        raise ValueError(f"expert_parallelize: {name}.experts has gate_up_proj {list(gate_up.shape)} and down_proj "
                         f"{list(down.shape)}; expected [E, 2F, D] and [E, D, F]")
    routing = family.routing(block, router, name) if family.routing is not None else None
    if routing is not None:
        if tuple(routing.gate.shape) != (E, D):
            raise ValueError(f"expert_parallelize: {name}'s gate weight must be [E={E}, D={D}], got "
                             f"{list(routing.gate.shape)}")
        num_topk = routing.kwargs["num_topk"]
    else:
        num_topk = int(_setting(block, router, "top_k", name))
    shared = getattr(block, family.shared) if family.shared else None
    shared_gate = getattr(block, family.shared_gate) if family.shared_gate and shared is not None else None
    args = tuple((attr, getattr(block, attr, None)) for attr in family.router_args)
    scales = family.scales(block) if family.scales is not None else (1.0, 1.0)
    return _BlockSpec(family, router, routing, num_topk, gate_up, down, E, first, shared, shared_gate, args, scales)


def _child(module: nn.Module, attr: str, name: str) -> nn.Module:
    child = getattr(module, attr, None)
    if not isinstance(child, nn.Module):
        raise TypeError(f"expert_parallelize: {name} ({type(module).__name__}) has no submodule `{attr}`; "
                        "this transformers version's layout is not supported")
    return child


def _expert_tensors(experts: nn.Module, name: str, group: Optional[dist.ProcessGroup]):
    """``(gate_up [E or L, 2F, D], down [E or L, D, F], first expert of a local shard or None)``.

    Refuses every experts layout but transformers' default fused one with SiLU gates (the flags
    its ``use_experts_implementation`` decorator sets on the module)."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3):
        raise TypeError(f"expert_parallelize: {name} ({type(experts).__name__}) does not hold fused 3-D "
                        "`gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F] parameters (the transformers >= 5 "
                        "layout); other layouts (e.g. a ModuleList of Linear experts) are not supported")
    layout = {"has_bias": False, "has_gate": True, "is_transposed": False, "is_concatenated": True,
              "has_post_expert_norm": False}
    odd = {k: getattr(experts, k) for k, v in layout.items() if getattr(experts, k, v) != v}
    if odd or any(p.dim() < 3 for p in experts.parameters(recurse=False)):
        raise TypeError(f"expert_parallelize: {name} ({type(experts).__name__}) has a layout moeflow's SwiGLU "
                        f"experts do not reproduce ({odd or 'bias parameters'})")
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        raise TypeError(f"expert_parallelize: {name} ({type(experts).__name__}) gates its experts its own way")
    _check_silu(getattr(experts, "act_fn", None), name)
    if gate_up.device.type == "meta":
        raise ValueError(f"expert_parallelize: {name}'s expert weights are on the meta device; load them first")
    local_gate_up, first = _local_shard(gate_up, name, group)
    local_down, first_down = _local_shard(down, name, group)
    if first != first_down:
        raise ValueError(f"expert_parallelize: {name}'s gate_up_proj and down_proj are sharded differently")
    return local_gate_up, local_down, first


def _local_shard(t: torch.Tensor, name: str, group: Optional[dist.ProcessGroup]):
    """A plain tensor: ``(t, None)``. A DTensor sharded on the expert dim over this group (as
    :func:`from_pretrained` loads it): ``(this rank's experts, index of the first)``."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without DTensor: nothing can be sharded
        return t, None
    if not isinstance(t, DTensor):
        return t, None
    mesh = t.device_mesh
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    if tuple(t.placements) != (Shard(0),) or mesh.ndim != 1 or mesh.mesh.tolist() != ranks:
        raise ValueError(f"expert_parallelize: {name} holds DTensors placed {tuple(t.placements)} over ranks "
                         f"{mesh.mesh.tolist()}; only Shard(0) over the group's ranks {ranks} is read")
    local = t.to_local()
    return local, mesh.get_local_rank() * local.size(0)


def _check_silu(act: Any, name: str) -> None:
    """moeflow's experts are SwiGLU: the block's activation must be SiLU (checked on values)."""
    probe = torch.linspace(-4, 4, 9)
    if not callable(act) or not torch.allclose(act(probe), F.silu(probe)):
        raise ValueError(f"expert_parallelize: {name}.act_fn ({type(act).__name__}) is not SiLU; moeflow's "
                         "experts are SwiGLU")


def _looks_like_moe(module: nn.Module) -> bool:
    """An MoE block of a class we have no entry for: routed experts beside a router."""
    children = dict(module.named_children())
    return "experts" in children and ("gate" in children or "router" in children)


# ------------------------------------------------------------------------------- layer parts
class _BlockRouter(Router):
    """A :class:`moeflow.Router` whose ids and weights come from a transformers block's own router
    module (``self.gate``), called as the block calls it; counts the load like the Router, so
    :meth:`MoELayer.update_bias`, the load statistics and placement work. Returns no losses."""

    def __init__(self, hidden: int, num_experts: int, num_topk: int, module: nn.Module,
                 args: tuple[tuple[str, Any], ...], input_3d: bool, weight_scale: float, num_nodes: int = 1) -> None:
        super().__init__(hidden, num_experts, num_topk, num_nodes=num_nodes)
        self.gate = module
        # e.g. LFM2's selection bias, saved with the layer as in the block; prefixed: the Router
        # has an `expert_bias` of its own (unused here)
        self.arg_names = tuple(f"block_{attr}" for attr, _ in args)
        for attr, (_, value) in zip(self.arg_names, args):
            if isinstance(value, nn.Parameter):
                self.register_parameter(attr, value)
            elif isinstance(value, torch.Tensor):
                self.register_buffer(attr, value)
            else:
                setattr(self, attr, value)
        self.input_3d, self.weight_scale = input_3d, weight_scale

    def forward(self, x: torch.Tensor, seq_len: Optional[int] = None) -> RouterOutput:
        """``x`` ``[..., D]`` -> :class:`RouterOutput` over the flattened T tokens (zero losses)."""
        D = x.size(-1)
        x_in = x if self.input_3d else x.reshape(-1, D)
        _, weights, idx = self.gate(x_in, *(getattr(self, a) for a in self.arg_names))
        topk_idx = idx.reshape(-1, self.num_topk).long()                    # [T, K]
        topk_weights = weights.reshape(-1, self.num_topk).float()          # [T, K]
        if self.weight_scale != 1.0:
            topk_weights = topk_weights * self.weight_scale
        flat = topk_idx.flatten()
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        if self.training:
            with torch.no_grad():
                self.num_tokens_per_expert_since_update += counts_E
        zero = torch.zeros((), device=x.device)
        return RouterOutput(topk_idx=topk_idx, topk_weights=topk_weights, loss=zero, aux_loss=zero,
                            seq_aux_loss=zero, global_aux_loss=zero, z_loss=zero, num_tokens_per_expert=counts_E)


class _SharedExperts(nn.Module):
    """A block's shared-expert module, its output scaled by ``sigmoid(gate(x))`` when the block
    has such a gate (Qwen2-MoE) and by a constant when the block averages (Cohere2-MoE)."""

    def __init__(self, mlp: nn.Module, gate: Optional[nn.Module], scale: float) -> None:
        super().__init__()
        self.mlp, self.gate, self.scale = mlp, gate, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, D]`` -> ``[T, D]``."""
        y = self.mlp(x)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y * self.scale if self.scale != 1.0 else y


class HFMoELayer(MoELayer):
    """A :class:`moeflow.MoELayer` that stands in for a transformers MoE block.

    Same forward as the block in transformers >= 5 (``[B, S, D]`` -> ``[B, S, D]``). Takes
    :class:`moeflow.MoELayer`'s arguments. Where moeflow's Router routes,
    :func:`expert_parallelize` sets ``hf_router`` to the block's router module, whose ``weight``
    is ``self.router.gate.weight`` (one Parameter); when transformers has hooked it to record
    router logits, it is run on the input so that the hook sees them (its top-k goes unused).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hf_router: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, D]`` (or ``[..., D]``); returns the same shape and dtype."""
        y = super().forward(x)
        if self.hf_router is not None and self.hf_router._forward_hooks:
            # output_router_logits: transformers' recorder hook reads the logits ([T, E], as the block's call)
            self.hf_router(x.reshape(-1, x.size(-1)))
        return y


# ------------------------------------------------------------------------------- public entry
def expert_parallelize(model: nn.Module, group: GroupLike = None,
                       **layer_kwargs: Any) -> nn.Module:
    """Replace every supported MoE block of ``model`` by a :class:`moeflow.MoELayer` holding this
    rank's shard of the same weights; return ``model`` (changed in place).

    Call it on every rank of ``group``, each holding the same full weights (the same checkpoint,
    or the same seed), after ``torch.distributed`` is initialised; or on a model loaded by
    :func:`from_pretrained`, whose expert tensors already hold only this rank's experts. Routed
    experts are split evenly and contiguously over the ranks (rank r holds experts
    ``[r * E / R, (r + 1) * E / R)``); the shared-expert module, the router module (its gate
    Parameter and selection bias) are taken over as they are, not copied. Each new layer is
    built on the device of the block's experts, in their dtype, in the block's train/eval mode,
    with ``requires_grad`` as on the block's tensors; the replaced block and its full expert
    tensors are released when nothing else refers to them.

    Gradients: a rank's expert weights receive the gradient of every rank's tokens routed to
    them (the sum over the group), so they need no data-parallel reduction over ``group``; the
    other parameters get this rank's batch only, as in plain data parallelism. With a mesh,
    :func:`moeflow.parallelize` applies FSDP2 to both (docs/hf.md has
    the recipe that reproduces global-batch gradients, and why plain DDP must skip the experts).

    Args:
        model: a transformers model of a family in :data:`SUPPORTED_BLOCKS` (e.g.
            ``Qwen3MoeForCausalLM``), or any module containing such blocks.
        group: the expert-parallel process group (default: the world), or a ``DeviceMesh`` with
            an ``"ep"`` dim (see :class:`moeflow.MoELayer`); each block's E must divide by the
            expert-parallel size. With a mesh, :func:`moeflow.parallelize` then applies FSDP2.
        **layer_kwargs: passed to every :class:`moeflow.MoELayer` (``num_chunks``,
            ``capacity_factor``, ``wire_dtype``, ``bias_update_rate``, the Router's loss
            coefficients, ...). The routing options and sizes come from the model and may not
            be given; families routed by their own router refuse moeflow's routing options.

    Returns:
        ``model`` (or the new layer, when ``model`` is itself a block), whose MoE blocks are now
        :class:`HFMoELayer` modules, subclasses of :class:`moeflow.MoELayer` (find them with
        ``isinstance(m, moeflow.MoELayer)``, e.g. to call ``m.update_bias()`` each step).

    Raises:
        TypeError: ``model`` is not a module, ``layer_kwargs`` names a routing option or size
            (or a routing option of a family routed by its own router), or a block has an
            unknown class or weight layout.
        ValueError: no MoE block found, a block's experts do not divide over the group, a
            block uses a feature moeflow does not reproduce (non-SiLU experts, input jitter), or
            the ranks hold different weights (every full tensor of ``model`` is compared across
            the ranks that route to the experts, once, before anything is built).
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expert_parallelize: `model` must be a torch.nn.Module, got {type(model).__name__}")
    taken = sorted(set(layer_kwargs) & set(_FROM_MODEL))
    if taken:
        raise TypeError(f"expert_parallelize: {taken} come from the model's config and cannot be passed in "
                        "`layer_kwargs`")

    ep_group = resolve_groups(group)[0]  # the experts' ranks (a mesh's "ep" dim)
    # Read and check every block before building anything, so a bad block fails on every rank alike.
    found: list[tuple[str, nn.Module, _BlockSpec]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _, _ in found) or isinstance(module, MoELayer):
            continue
        cls = type(module).__name__
        family = SUPPORTED_BLOCKS.get(cls)
        if family is not None:
            found.append((name, module, _read_block(module, name or "model", family, ep_group)))
        elif cls in REFUSED_BLOCKS:
            raise TypeError(f"expert_parallelize: {name or 'model'} is a {cls}, which moeflow does not reproduce: "
                            f"{REFUSED_BLOCKS[cls]}")
        elif _looks_like_moe(module):
            raise TypeError(f"expert_parallelize: {name or 'model'} is a {cls}, an MoE block of a family moeflow "
                            f"does not know; supported blocks: {sorted(SUPPORTED_BLOCKS)}")
    if not found:
        if any(isinstance(m, MoELayer) for m in model.modules()):
            raise ValueError(f"expert_parallelize: {type(model).__name__} is already expert-parallel (its MoE "
                             "blocks are moeflow MoELayers)")
        raise ValueError(f"expert_parallelize: no MoE block found in {type(model).__name__}; supported blocks: "
                         f"{sorted(SUPPORTED_BLOCKS)}")
    if not dist.is_initialized():
        raise RuntimeError("expert_parallelize: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or use moeflow.spawn)")
    R = dist.get_world_size(ep_group)
    for name, _, spec in found:
        if spec.num_experts % R:
            raise ValueError(f"expert_parallelize: {name} has {spec.num_experts} experts, which do not divide "
                             f"over the {R} ranks of `group` (rank {dist.get_rank()})")
        refused = sorted(k for k in _ROUTING_OPTIONS if k in layer_kwargs) if spec.routing is None else []
        if refused:
            raise TypeError(f"expert_parallelize: {name} ({spec.family.model_type}) routes with its own router, "
                            f"which moeflow's routing options {refused} do not reach")

    _check_same_weights(model, resolve_groups(group)[1])

    # One block at a time, each released before the next layer is built: the peak holds one
    # block's expert tensors beside the layers, not all of them twice.
    found.reverse()
    while found:
        name, block, spec = found.pop()
        layer = _build_layer(spec, group, layer_kwargs)
        layer.train(block.training)
        if not name:  # `model` is itself a block: there is no parent to put the layer in
            return layer
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer)
        del block, spec, layer
    return model


def _check_same_weights(model: nn.Module, group: Optional[dist.ProcessGroup]) -> None:
    """Collective, once: every rank of ``group`` (the ranks that route to the experts) holds the
    same full tensors (parameters and buffers; DTensors, already sharded, are not compared).
    Ranks that loaded other checkpoints or drew other random weights would otherwise run, each
    rank's experts from its own model, and give wrong logits. One pass over the weights on their
    device (a 62-bit hash of each tensor's bits, :func:`moeflow.comm.agree.fingerprint`) and two
    small exchanges; raises ``ValueError`` on every rank naming the tensors, ranks and hashes."""
    if dist.get_world_size(group) == 1:
        return
    tensors = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers())
               if not is_dtensor(t) and t.device.type != "meta"]
    transport = ProcessGroupTransport(group, name="expert_parallelize")
    layout = ";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in tensors)
    hint = "load the same checkpoint (or seed) on every rank before expert_parallelize"
    check_same(transport, dict(tensors=len(tensors), names_shapes_dtypes_hash=layout), "expert_parallelize", hint)
    hashes = torch.zeros(len(tensors), dtype=torch.int64)
    on_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(tensors):
        on_device.setdefault(t.device, []).append(i)
    for at in on_device.values():  # one host sync per device, not one per tensor
        hashes[at] = torch.stack([fingerprint(tensors[i][1]) for i in at]).cpu()
    rows = gather_rows(transport, hashes)  # [R, tensors]
    differ = (rows != rows[0]).any(0).nonzero().flatten().tolist()
    if differ:
        first = differ[0]
        shown = "; ".join(f"{tensors[i][0]}" for i in differ[:3]) + ("; ..." if len(differ) > 3 else "")
        raise ValueError(f"expert_parallelize: the ranks hold different weights in {len(differ)} of {len(tensors)} "
                         f"tensors ({shown}); {tensors[first][0]}'s hash: "
                         f"{describe([f'{h:#x}' for h in rows[:, first].tolist()])} (this is rank "
                         f"{transport.rank}); {hint}")


def _build_layer(spec: _BlockSpec, group: GroupLike, layer_kwargs: dict) -> HFMoELayer:
    F2, D = spec.gate_up.shape[1:]
    F_, E = F2 // 2, spec.num_experts
    device, dtype = spec.gate_up.device, spec.gate_up.dtype
    router_kwargs = dict(spec.routing.kwargs) if spec.routing is not None else dict(num_topk=spec.num_topk)
    with torch.device(device):
        layer = HFMoELayer(D, F_, E, group=group, **router_kwargs, **layer_kwargs)
    layer.to(dtype=dtype)
    if spec.routing is not None:
        # The Router routes with the block's own gate Parameter (its dtype kept: DeepSeek-V3's is
        # fp32) and selection-bias buffer, which the kept HF router module shares for its logits.
        layer.router.gate.weight = spec.routing.gate
        bias = spec.routing.expert_bias
        if bias is not None:
            if bias.dtype == torch.float32:
                layer.router.expert_bias = bias
            else:  # the Router's bias stays fp32 (see Router._apply): a copy, not shared
                with torch.no_grad():
                    layer.router.expert_bias.copy_(bias)
        layer.hf_router = spec.router
    else:
        block_router = _BlockRouter(D, E, spec.num_topk, spec.router, spec.router_args, spec.family.router_input_3d,
                                    spec.scales[0], num_nodes=layer.router.num_nodes)
        # the load sums over the layer's routing ranks, through its router's watched transport
        block_router.group, block_router.transport = layer.router.group, layer.router.transport
        block_router.train(layer.training)
        layer.router = block_router
    if spec.shared is not None:
        layer.shared = _SharedExperts(spec.shared, spec.shared_gate, spec.scales[1])
    _load_experts(layer, spec)
    return layer


@torch.no_grad()
def _load_experts(layer: HFMoELayer, spec: _BlockSpec) -> None:
    """Copy the experts of this rank's slots (slot s holds logical expert ``phy2log[s]``) out of
    the block's fused tensors: ``gate_up_proj`` ``[E, 2F, D]`` -> w1 (gate rows), w3 (up rows)
    ``[S, D, F]``; ``down_proj`` ``[E, D, F]`` -> w2 ``[S, F, D]``."""
    S, rank = layer.num_local_experts, layer.buffer.rank
    wanted = layer.slots.phy2log.cpu()[rank * S:(rank + 1) * S]            # host sync, once at build time
    first = spec.first_expert or 0
    idx = wanted - first
    if bool((idx < 0).any()) or bool((idx >= spec.gate_up.size(0)).any()):
        raise ValueError(f"expert_parallelize: rank {rank} holds experts [{first}, {first + spec.gate_up.size(0)}) "
                         f"of the model, but its slots need experts {wanted.tolist()}")
    contiguous = bool((idx == torch.arange(int(idx[0]), int(idx[0]) + S)).all())
    take = slice(int(idx[0]), int(idx[0]) + S) if contiguous else idx.to(spec.gate_up.device)
    gate_up, down = spec.gate_up[take], spec.down[take]              # views when contiguous
    F_ = gate_up.size(1) // 2
    layer.experts.w1.copy_(gate_up[:, :F_].transpose(1, 2))
    layer.experts.w3.copy_(gate_up[:, F_:].transpose(1, 2))
    layer.experts.w2.copy_(down.transpose(1, 2))
    layer.experts.w1.requires_grad_(spec.gate_up.requires_grad)
    layer.experts.w3.requires_grad_(spec.gate_up.requires_grad)
    layer.experts.w2.requires_grad_(spec.down.requires_grad)


# ----------------------------------------------------------------------------------- loading
def from_pretrained(path: str, group: Optional[dist.ProcessGroup] = None, *,
                    model_class: Optional[type] = None, layer_kwargs: Optional[dict] = None,
                    **kwargs: Any) -> nn.Module:
    """Load a transformers MoE checkpoint expert-parallel, each rank reading only its experts.

    transformers' own ``from_pretrained`` loads the model; before it reads the weights, every
    block's routed-expert tensors are made ``DTensor`` placeholders sharded over ``group`` on
    the expert dim, so transformers' shard-on-read loader reads only this rank's
    ``E / R`` experts from disk (one stacked key or one key per expert alike). The rest of the
    model is loaded whole on every rank. Then :func:`expert_parallelize` builds the layers from
    those shards. Call it on every rank of ``group``, after ``torch.distributed`` is initialised.

    Args:
        path: a local checkpoint directory or a Hub id, as for transformers' ``from_pretrained``.
        group: the expert-parallel process group (default: the world).
        model_class: the transformers model class (default: the ``AutoModelForCausalLM`` class
            of the checkpoint's config).
        layer_kwargs: passed to :func:`expert_parallelize` (``MoELayer`` options).
        **kwargs: passed to transformers' ``from_pretrained`` (``dtype``, ``revision``, ...).

    Returns:
        The expert-parallel model, in eval mode (as transformers returns it), on the CPU unless
        ``kwargs`` says otherwise.
    """
    import transformers
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_initialized():
        raise RuntimeError("from_pretrained: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or use moeflow.spawn)")
    pg = group if group is not None else dist.group.WORLD
    device_type = "cuda" if dist.get_backend(pg) == "nccl" else "cpu"
    mesh = DeviceMesh.from_group(pg, device_type)
    if model_class is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        config = transformers.AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items()
                                                                  if k in ("revision", "token", "cache_dir")})
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def post_init(self) -> None:
        model_class.post_init(self)
        _shard_expert_placeholders(self, mesh)

    # The same class, name and conversions (transformers looks them up by class name and
    # model_type), with one more step at the end of __init__, which runs on the meta device.
    sharded = type(model_class.__name__, (model_class,), {"post_init": post_init, "__module__": model_class.__module__})
    model = sharded.from_pretrained(path, **kwargs)
    model.__class__ = model_class
    return expert_parallelize(model, group, **(layer_kwargs or {}))


def _shard_expert_placeholders(model: nn.Module, mesh) -> None:
    """Replace each supported block's ``gate_up_proj`` and ``down_proj`` (on the meta device,
    before loading) by ``DTensor`` placeholders sharded ``Shard(0)`` over ``mesh``."""
    from torch.distributed.tensor import DTensor, Shard

    R = mesh.size()
    for name, module in model.named_modules():
        if type(module).__name__ not in SUPPORTED_BLOCKS:
            continue
        experts = _child(module, "experts", name)
        for attr in ("gate_up_proj", "down_proj"):
            p = getattr(experts, attr)
            if p.size(0) % R:
                raise ValueError(f"from_pretrained: {name}.experts has {p.size(0)} experts, which do not divide "
                                 f"over the {R} ranks of `group` (rank {dist.get_rank()})")
            local = torch.empty((p.size(0) // R, *p.shape[1:]), dtype=p.dtype, device=p.device)
            shard = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
            setattr(experts, attr, nn.Parameter(shard, requires_grad=p.requires_grad))
