"""Expert-sharded checkpoints of MoE models with ``torch.distributed.checkpoint`` (DCP).

Every :class:`~moeflow.layer.MoELayer` in the model saves its routed experts as *logical*
experts, one key per expert and weight (``<layer>.experts.w1.<e>``: ``[D, F]``; ``w2``:
``[F, D]``; ``w3``: ``[D, F]``), each written once, by the rank that holds the expert's first
replica (its lowest slot). Everything else in the model's ``state_dict`` (router, shared experts,
dense layers) is taken as replicated over the group and written once by DCP. The layer's
placement (``phy2log``) is not part of the checkpoint.

Loading reads, on each rank, exactly the logical experts that its slots hold under the loading
layer's placement, so a checkpoint loads into any number of ranks and any placement: saved on 4
ranks and loaded on 2, saved with replicas and loaded without, or loaded straight into a
placement planned for the ranks left after a failure (``placements=``, e.g. from
:func:`moeflow.balance.replan_after_loss`). Optimizer state is not covered.

Every rank of the group calls :func:`save` / :func:`load` (they are collective).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .layer import MoELayer

__all__ = ["save", "load", "expert_key"]

_EXPERT_WEIGHTS = ("w1", "w2", "w3")
_NOT_SAVED = ("slots.phy2log",)  # the placement belongs to the run, not to the weights


def expert_key(layer_name: str, weight: str, expert: int) -> str:
    """Checkpoint key of logical ``expert``'s ``weight`` (``"w1"``, ``"w2"``, ``"w3"``) in a layer."""
    return f"{layer_name}.experts.{weight}.{expert}" if layer_name else f"experts.{weight}.{expert}"


def _moe_layers(model: nn.Module, where: str) -> dict[str, MoELayer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"moeflow.checkpoint.{where}: `model` must be an nn.Module, got {type(model).__name__}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ValueError(f"moeflow.checkpoint.{where}: `model` ({type(model).__name__}) holds no MoELayer")
    return layers


def _skipped(layers: Mapping[str, MoELayer]) -> set[str]:
    p = {name: f"{name}." if name else "" for name in layers}
    return {p[n] + f"experts.{w}" for n in layers for w in _EXPERT_WEIGHTS} | \
           {p[n] + k for n in layers for k in _NOT_SAVED}


def _local_slots(layer: MoELayer) -> list[int]:
    """Logical expert of each of this rank's slots."""
    return layer.slots.local_experts()


def save(model: nn.Module, checkpoint_id: Union[str, os.PathLike], *,
         process_group: Optional[dist.ProcessGroup] = None) -> None:
    """Save ``model`` (an :class:`MoELayer` or a module holding some) to the directory ``checkpoint_id``.

    Args:
        model: the module; its MoELayers' experts are saved as logical experts (see the module
            docstring), the rest of its ``state_dict`` as replicated.
        checkpoint_id: a directory (created by DCP).
        process_group: the group whose ranks write (default: the world); every rank of it calls.
    """
    layers = _moe_layers(model, "save")
    skipped = _skipped(layers)
    state = {k: v for k, v in model.state_dict().items() if k not in skipped}
    for name, layer in layers.items():
        S, rank = layer.slots.num_local_experts, layer.buffer.rank
        first_slot = layer.slots.log2phy[:, 0].tolist()  # host sync: one int per expert
        for e, slot in enumerate(first_slot):
            if slot // S != rank:
                continue  # another rank holds this expert's first replica and writes it
            for w in _EXPERT_WEIGHTS:
                # a copy: a row view would drag the whole [S, ...] storage into the file
                state[expert_key(name, w, e)] = getattr(layer.experts, w)[slot % S].detach().clone()
    dcp.save(state, checkpoint_id=checkpoint_id, process_group=process_group)


@torch.no_grad()
def load(model: nn.Module, checkpoint_id: Union[str, os.PathLike], *,
         process_group: Optional[dist.ProcessGroup] = None,
         placements: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Load a checkpoint written by :func:`save` into ``model``, in place.

    Args:
        model: built like the saved one (same hidden sizes and expert counts); the number of
            ranks and the placement may differ.
        checkpoint_id: the directory :func:`save` wrote.
        process_group: the group whose ranks read (default: the world); every rank of it calls.
        placements: optional ``{layer name: phy2log [N] int64}`` ("" for a bare MoELayer): the
            layer takes this placement before its experts are read (N must be the layer's
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
    skipped = _skipped(layers)
    state = {k: v for k, v in model.state_dict().items() if k not in skipped}
    wanted: dict[str, list[tuple[torch.Tensor, int]]] = {}
    for name, layer in layers.items():
        for slot, e in enumerate(_local_slots(layer)):
            for w in _EXPERT_WEIGHTS:
                param = getattr(layer.experts, w)
                key = expert_key(name, w, e)
                if key not in state:
                    state[key] = torch.empty_like(param[slot])
                wanted.setdefault(key, []).append((param, slot))
    dcp.load(state, checkpoint_id=checkpoint_id, process_group=process_group)
    for key, targets in wanted.items():
        for param, slot in targets:
            param[slot].copy_(state[key])
