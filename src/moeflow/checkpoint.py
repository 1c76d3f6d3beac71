"""Checkpoints of MoE models (and their optimizer) with ``torch.distributed.checkpoint`` (DCP),
loadable on another number of ranks, another mesh and another placement.

Routed experts are saved as *logical* experts, one key per expert and weight
(``model.<layer>.experts.w1.<e>``, see :func:`expert_key`: ``[D, F]``; ``w2``: ``[F, D]``;
``w3``: ``[D, F]``), written by the
ranks that hold the expert's first replica (its lowest slot); the optimizer's per-slot state
(Adam's ``exp_avg``, ...) the same way, under the parameter's key. When FSDP2 shards the experts
(:func:`moeflow.parallelize`: dim 1, over the data-parallel ranks of the shard), each such rank
writes its part of the expert (a DTensor). Everything else (router, shared experts, dense
layers, their optimizer state and step counts) is saved as the model's and the optimizer's
state dicts hold it: replicated tensors once, FSDP2's DTensors shard by shard; DCP reshards
them on load. The layers' placement (``slots.phy2log``) is not part of the checkpoint.

Loading reads, on each rank, exactly the logical experts its slots hold under the loading
layer's placement and mesh, so a checkpoint loads into any number of ranks, any ``(dp, ep)``
mesh and any placement: saved on 2 dp x 2 ep and loaded on 1 x 4, 4 x 1 or 1 x 2, saved with
replicas and loaded without, or loaded straight into a placement planned for the ranks left
after a failure (``placements=``, e.g. from :func:`moeflow.balance.replan_after_loss`).

Every rank of the job calls :func:`save` / :func:`load` (they are collective).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, Shard

from .layer import MoELayer
from .parallel.mesh import is_dtensor, local_tensor

__all__ = ["save", "load", "load_experts", "expert_key"]

_EXPERT_WEIGHTS = ("w1", "w2", "w3")
_NOT_SAVED = ("slots.phy2log",)  # the placement belongs to the run, not to the weights


def expert_key(layer_name: str, weight: str, expert: int) -> str:
    """Checkpoint key (as DCP stores it) of logical ``expert``'s ``weight`` (``"w1"``, ``"w2"``,
    ``"w3"``) in a layer; its optimizer state lies under ``optim.state.<key without model.>.<name>.<e>``."""
    return f"model.{layer_name}.experts.{weight}.{expert}" if layer_name else f"model.experts.{weight}.{expert}"


def _moe_layers(model: nn.Module, where: str) -> dict[str, MoELayer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"moeflow.checkpoint.{where}: `model` must be an nn.Module, got {type(model).__name__}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ValueError(f"moeflow.checkpoint.{where}: `model` ({type(model).__name__}) holds no MoELayer")
    return layers


def _expert_params(layers: Mapping[str, MoELayer]) -> dict[str, tuple[MoELayer, str]]:
    """``{parameter key: (layer, weight name)}`` of every routed expert weight."""
    return {(f"{name}." if name else "") + f"experts.{w}": (layer, w) for name, layer in layers.items()
            for w in _EXPERT_WEIGHTS}


def _row(t: torch.Tensor, slot: int) -> torch.Tensor:
    """Row ``slot`` of a per-slot tensor ``[L, ...]`` as this rank saves or loads it: a tensor,
    or, when FSDP2 splits ``t`` along dim 1, this rank's part of a DTensor of the whole row."""
    row = local_tensor(t)[slot]
    if not is_dtensor(t):
        return row
    (placement,) = t.placements
    if placement != Shard(1) or t.device_mesh.ndim != 1:
        raise TypeError(f"moeflow.checkpoint: expert tensors sharded as {t.placements} over a {t.device_mesh.ndim}-D "
                        "mesh are not supported; moeflow.parallelize shards them Shard(1) over one dim")
    shape = t.shape[1:]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(row, t.device_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def _written_slots(layer: MoELayer) -> dict[int, int]:
    """``{local slot: logical expert}`` for the experts whose first replica (lowest slot) lives here."""
    L, rank = layer.slots.num_local_experts, layer.buffer.rank
    first = layer.slots.log2phy[:, 0].tolist()  # host sync: one int per expert
    return {slot % L: e for e, slot in enumerate(first) if slot // L == rank}


def _per_expert(t: torch.Tensor, slots: Mapping[int, int], fresh: bool) -> dict[str, torch.Tensor]:
    """``{str(e): row}`` of per-slot tensor ``t`` for ``slots`` ``{local slot: logical expert}``;
    ``fresh`` gives empty rows of the right shape to load into, else copies to save (a row view
    would drag the whole ``[L, ...]`` storage into the file)."""
    out = {}
    for slot, e in slots.items():
        row = _row(t, slot)
        out[str(e)] = torch.empty_like(row) if fresh else row.detach().clone()
    return out


def _state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], layers: Mapping[str, MoELayer],
           for_load: bool) -> tuple[dict, list[tuple[dict, str, torch.Tensor, MoELayer]]]:
    """The dict DCP saves or loads into, and where its per-expert entries stand in for per-slot
    tensors: ``(container, key, tensor, layer)`` with ``container[key] = {str(e): row}``."""
    experts = _expert_params(layers)
    skipped = {(f"{n}." if n else "") + k for n in layers for k in _NOT_SAVED}
    state = {"model": {k: v for k, v in model.state_dict().items() if k not in skipped}}
    stand_ins = [(state["model"], key, getattr(layer.experts, w), layer) for key, (layer, w) in experts.items()]
    if optimizer is not None:
        # FQN-keyed; on load it also creates the state of an optimizer that never stepped
        optim = get_optimizer_state_dict(model, optimizer)
        # its per-parameter dicts may be the optimizer's own: copies, so the stand-ins go there only
        state["optim"] = dict(optim, state={k: dict(v) for k, v in optim["state"].items()})
        for key, (layer, _) in experts.items():
            held = state["optim"]["state"].get(key, {})
            # per-slot state (like the weight); scalars (Adam's step) stay as they are
            stand_ins += [(held, name, v, layer) for name, v in held.items()
                          if isinstance(v, torch.Tensor) and v.dim() > 0]
    for container, key, tensor, layer in stand_ins:
        slots = dict(enumerate(layer.slots.local_experts())) if for_load else _written_slots(layer)
        container[key] = _per_expert(tensor, slots, fresh=for_load)
    return state, stand_ins


def save(model: nn.Module, checkpoint_id: Union[str, os.PathLike], *,
         optimizer: Optional[torch.optim.Optimizer] = None,
         process_group: Optional[dist.ProcessGroup] = None) -> None:
    """Save ``model`` (an :class:`MoELayer` or a module holding some) and, if given, ``optimizer``
    to the directory ``checkpoint_id`` (see the module docstring).

    Args:
        model: the module (FSDP2-sharded by :func:`moeflow.parallelize` or not).
        checkpoint_id: a directory (created by DCP).
        optimizer: its state is saved too (per-parameter tensors and step counts; the
            hyperparameters of its param groups as well).
        process_group: the group whose ranks write (default: the world); every rank of it calls.
    """
    layers = _moe_layers(model, "save")
    state, _ = _state(model, optimizer, layers, for_load=False)
    dcp.save(state, checkpoint_id=checkpoint_id, process_group=process_group)


@torch.no_grad()
def load(model: nn.Module, checkpoint_id: Union[str, os.PathLike], *,
         optimizer: Optional[torch.optim.Optimizer] = None,
         process_group: Optional[dist.ProcessGroup] = None,
         placements: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``), in place.

    Args:
        model: built like the saved one (same sizes and expert counts); the number of ranks, the
            mesh, FSDP2 and the placement may differ.
        checkpoint_id: the directory :func:`save` wrote.
        optimizer: built over ``model``'s parameters like the saved one (it may never have
            stepped); needs a checkpoint saved with its optimizer.
        process_group: the group whose ranks read (default: the world); every rank of it calls.
        placements: optional ``{layer name: phy2log [S] int64}`` ("" for a bare MoELayer): the
            layer takes this placement before its experts are read (S must be the layer's
            ``num_slots``), so a re-planned placement is applied with no weight transfer.

    Raises:
        ValueError / TypeError: no MoELayer in ``model``, a placement for an unknown layer or
            of the wrong size, or (from DCP) keys or shapes the checkpoint lacks.
    """
    layers = _moe_layers(model, "load")
    for name, phy2log in (placements or {}).items():
        if name not in layers:
            raise ValueError(f"moeflow.checkpoint.load: `placements` names layer {name!r}, but the model's "
                             f"MoELayers are {sorted(layers)}")
        layer = layers[name]
        if not isinstance(phy2log, torch.Tensor) or tuple(phy2log.shape) != (layer.slots.num_slots,):
            raise ValueError(f"moeflow.checkpoint.load: `placements[{name!r}]` must be a [{layer.slots.num_slots}] "
                             f"tensor (the layer's num_slots), got {phy2log!r}")
        # through load_state_dict: the slots check the placement and re-derive their tables
        layer.slots.load_state_dict({"phy2log": phy2log.to(layer.slots.phy2log)})
    state, stand_ins = _state(model, optimizer, layers, for_load=True)
    dcp.load(state, checkpoint_id=checkpoint_id, process_group=process_group)
    # the other tensors were loaded in place; each expert row goes back into its slots
    for container, key, tensor, layer in stand_ins:
        rows = container[key]
        for slot, e in enumerate(layer.slots.local_experts()):
            local_tensor(tensor)[slot].copy_(local_tensor(rows[str(e)]))
        container[key] = tensor
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


@torch.no_grad()
def load_experts(model: nn.Module, checkpoint_id: Union[str, os.PathLike], experts: Mapping[str, list[int]], *,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 process_group: Optional[dist.ProcessGroup] = None) -> None:
    """Load only some logical experts from a checkpoint written by :func:`save`, in place.

    Each rank fills its slots that hold one of ``experts`` (the weights, and with ``optimizer``
    their per-slot state, e.g. Adam's moments; per-tensor scalars such as Adam's ``step`` stay);
    everything else in ``model`` and ``optimizer`` is left as it is. For experts whose every
    replica was lost with a rank (:mod:`moeflow.elastic`): the rest of the model keeps its newer
    weights.

    Args:
        model: as for :func:`load` (not FSDP2-sharded experts).
        checkpoint_id: the directory :func:`save` wrote.
        experts: ``{layer name: [logical expert, ...]}`` ("" for a bare MoELayer).
        optimizer: its per-slot state of those experts is loaded too (the checkpoint must hold it).
        process_group: the group whose ranks read (default: the world); every rank of it calls,
            with the same ``experts``.
    """
    layers = _moe_layers(model, "load_experts")
    unknown = sorted(set(experts) - set(layers))
    if unknown:
        raise ValueError(f"moeflow.checkpoint.load_experts: `experts` names layers {unknown}; the model's MoELayers "
                         f"are {sorted(layers)}")
    state: dict = {"model": {}, "optim": {"state": {}}}
    targets = []  # (container, key, tensor whose rows the slots are)
    for key, (layer, w) in _expert_params({n: layers[n] for n in experts}).items():
        name = key[:-len(f"experts.{w}")].rstrip(".")
        wanted = set(experts[name])
        slots = {slot: e for slot, e in enumerate(layer.slots.local_experts()) if e in wanted}
        param = getattr(layer.experts, w)
        tensors = [(state["model"], key, param)]
        if optimizer is not None:
            held = optimizer.state.get(param, {})
            per_slot = {k: v for k, v in held.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
            container = state["optim"]["state"].setdefault(key, {})
            tensors += [(container, k, v) for k, v in per_slot.items()]
        for container, k, t in tensors:
            container[k] = _per_expert(t, slots, fresh=True)
            targets.append((container, k, t, slots))
    dcp.load(state, checkpoint_id=checkpoint_id, process_group=process_group)
    for container, k, t, slots in targets:
        for slot, e in slots.items():
            local_tensor(t)[slot].copy_(local_tensor(container[k][str(e)]))
