"""``parallelize``: FSDP2 over a device mesh for a model holding MoE layers.

torch's FSDP2 (``fully_shard``) is the engine; this module only says which parameters go over
which ranks, torchtitan's way:

- the routed experts (``MoELayer.experts``) over the data-parallel ranks inside their expert
  shard (``MoEMesh.dp``; a one-rank mesh when there are none), sharded on dim 1 (``D`` of w1/w3,
  ``F`` of w2): each rank keeps all its slots, so the slot-wise work of
  :class:`~moeflow.slots.ExpertSlots` (migration, replica sums) runs on local rows;
- everything else (attention, dense FFNs, embeddings, the router gate, the shared experts) over
  every rank that routes tokens (``MoEMesh.routing``, data parallel x expert parallel), one
  FSDP unit per block (each element of the model's top-most ``nn.ModuleList``\\s), then the root.

Gradients: a rank's loss is the mean over its own tokens, and the training loss the mean over
the routing ranks. FSDP averages the replicated parameters' gradients over those ranks. An
expert's gradient already sums every expert-parallel rank's tokens (dispatch's backward is a
combine), so FSDP sums it over the data-parallel ranks and divides by the routing size too
(``set_gradient_divide_factor``): the gradient of the global mean loss, as with one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Union

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..layer import MoELayer
from .mesh import MoEMesh

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = ["parallelize"]


def parallelize(model: nn.Module, mesh: Union[DeviceMesh, MoEMesh, None] = None, *,
                blocks: Optional[Iterable[nn.Module]] = None, reshard_after_forward: bool = True,
                mp_policy: Optional["MixedPrecisionPolicy"] = None) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (see the module docstring) and return it.

    Call on every rank, after the model's MoE layers exist (built with ``group=mesh``, or made by
    :func:`moeflow.integrations.hf.expert_parallelize`) and before the optimizer is built: FSDP2
    replaces the parameters by sharded ``DTensor`` parameters.

    Args:
        model: a module holding :class:`~moeflow.MoELayer` modules (or, with ``mesh``, a part
            of such a model that holds none, e.g. a pipeline stage of dense blocks: all of it
            goes over the routing ranks).
        mesh: a ``DeviceMesh`` with an ``"ep"`` dim (others but ``"pp"`` data parallel) or a
            :class:`MoEMesh`; None = the mesh the layers were built with. Every layer's
            expert-parallel ranks must be the mesh's.
        blocks: the modules to shard one by one over the routing ranks (default: the elements
            of the model's top-most ``nn.ModuleList``\\s, e.g. transformer blocks).
        reshard_after_forward, mp_policy: passed to ``fully_shard`` (mixed precision: e.g.
            ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``).

    Raises:
        ValueError: no MoE layer and no mesh, a layer whose ranks are not the mesh's, or a mesh missing.
        TypeError: ``model`` already holds FSDP units.
    """
    # imported here: FSDP and DTensor take seconds to import, and `import moeflow` needs neither
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import Shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize: `model` must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers and mesh is None:
        # a part without MoE layers (a pipeline stage of dense blocks) needs the mesh to be named
        raise ValueError(f"parallelize: `model` ({type(model).__name__}) holds no moeflow.MoELayer; pass `mesh`")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise TypeError("parallelize: `model` already holds fully_shard units; call it on the plain model once")
    moe_mesh = _resolve(mesh, layers)
    config = dict(reshard_after_forward=reshard_after_forward)
    if mp_policy is not None:
        config["mp_policy"] = mp_policy
    units = []  # (unit, its mesh)
    if layers:
        dp = moe_mesh.dp if moe_mesh.dp is not None else _single_rank_mesh(moe_mesh.routing.device_type)
    for layer in layers:
        # experts: over the ranks holding the same shard, split along dim 1 so that every rank
        # keeps whole slots (ExpertSlots works on local rows)
        units.append((fully_shard(layer.experts, mesh=dp, shard_placement_fn=lambda p: Shard(1), **config), dp))
        layer.experts.set_gradient_divide_factor(float(moe_mesh.routing.size()))
    for block in (_default_blocks(model) if blocks is None else blocks):
        units.append((fully_shard(block, mesh=moe_mesh.routing, **config), moe_mesh.routing))
    units.append((fully_shard(model, mesh=moe_mesh.routing, **config), moe_mesh.routing))
    if dist.get_backend(moe_mesh.routing_group) == "gloo":
        for unit, unit_mesh in units:
            # Gloo has neither AVG nor PREMUL_SUM: sum, then divide. Not on a one-rank mesh (no
            # collective there): torch 2.13's one-rank path divides by the gradient divide factor,
            # and with sum reduction forced it divides by it once more afterwards (the experts'
            # gradients came out divided by the routing size squared)
            if unit_mesh.size() > 1:
                unit.set_force_sum_reduction_for_comms(True)
    return model


def _resolve(mesh: Union[DeviceMesh, MoEMesh, None], layers: list[MoELayer]) -> MoEMesh:
    if mesh is None:
        meshes = {id(layer.mesh): layer.mesh for layer in layers}
        if None in meshes.values() or len(meshes) != 1:
            raise ValueError("parallelize: pass `mesh`: the MoE layers were not all built with the same mesh "
                             "(group=mesh)")
        moe_mesh = next(iter(meshes.values()))
    else:
        moe_mesh = MoEMesh.from_mesh(mesh)
    ep = dist.get_process_group_ranks(moe_mesh.ep_group)
    routing = dist.get_process_group_ranks(moe_mesh.routing_group)
    for layer in layers:
        have = dist.get_process_group_ranks(layer.buffer.group if layer.buffer.group is not None
                                            else dist.group.WORLD)
        routes = dist.get_process_group_ranks(layer.router.group if layer.router.group is not None
                                              else dist.group.WORLD)
        if have != ep or routes != routing:
            raise ValueError(f"parallelize: a MoE layer splits its experts over ranks {have} and sums its load "
                             f"over ranks {routes}, the mesh's expert-parallel ranks are {ep} and its routing "
                             f"ranks {routing} (rank {dist.get_rank()}); build the layers with group=mesh")
    return moe_mesh


def _single_rank_mesh(device_type: str) -> DeviceMesh:
    """A one-rank mesh of this rank (the experts' data-parallel mesh when there is no dp dim)."""
    group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    return DeviceMesh.from_group(group, device_type)


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of every top-most ``nn.ModuleList`` under ``model`` (not inside another)."""
    found: list[nn.Module] = []
    lists: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p + ".") for p in lists):
            lists.append(name)
            found.extend(module)
    return found
