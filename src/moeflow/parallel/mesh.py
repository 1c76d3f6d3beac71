"""Which ranks do what for an MoE layer, from a ``DeviceMesh`` or a process group.

Conventions (torchtitan's): a mesh names its dims. The ``"ep"`` dim holds the expert-parallel
ranks: the routed experts are split over them and tokens travel between them (dispatch /
combine); put it last, so that its ranks are neighbours (the same node). A ``"pp"`` dim holds
pipeline stages (other layers: ignored here). Every other dim (``"dp"``, ``"dp_shard"``,
``"dp_replicate"``, ...) is data parallel: its ranks hold the same expert shard and route their
own tokens. ``ep`` may also be several dims, flattened here into one.

Three 1-D meshes follow (:class:`MoEMesh`):

- ``ep``: dispatch and combine, the experts' split;
- ``dp``: the data-parallel ranks holding the same expert shard: FSDP2 shards the routed
  experts over them (None when there are none);
- ``routing``: dp x ep, every rank that routes tokens to these experts: the router's load sums
  (so ``expert_bias`` is the same everywhere) and FSDP2 over the replicated parameters.

A plain process group is taken as the expert-parallel group with no data parallelism beside it
(``routing`` = ``ep``). This module imports nothing from moeflow: the layer reads it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["MoEMesh", "GroupLike", "PIPELINE_DIM", "resolve_groups", "is_dtensor", "local_tensor"]

PIPELINE_DIM = "pp"  #: the pipeline dim (moeflow.parallel.pipeline); not data parallel


@dataclass(frozen=True)
class MoEMesh:
    """The meshes an MoE layer works over (all 1-D); build with :meth:`from_mesh`.

    Attributes:
        ep: the expert-parallel ranks.
        dp: the data-parallel ranks holding the same expert shard, or None (one).
        routing: every rank that routes tokens to these experts (dp x ep).
    """

    ep: DeviceMesh
    dp: Optional[DeviceMesh]
    routing: DeviceMesh

    @classmethod
    def from_mesh(cls, mesh: Union[DeviceMesh, "MoEMesh"], ep: Union[str, Sequence[str]] = "ep") -> "MoEMesh":
        """Resolve a device mesh (see the module docstring).

        Args:
            mesh: a 1-D mesh (all expert parallel), or a mesh with named dims holding ``ep``.
            ep: the expert-parallel dim name, or several dim names (flattened, in mesh order).

        Raises:
            ValueError: a multi-dim mesh without names or without the ``ep`` dim(s).
        """
        if isinstance(mesh, MoEMesh):
            return mesh
        if not isinstance(mesh, DeviceMesh):
            raise TypeError(f"MoEMesh.from_mesh: `mesh` must be a DeviceMesh, got {type(mesh).__name__}")
        names = tuple(mesh.mesh_dim_names or ())
        ep_dims = (ep,) if isinstance(ep, str) else tuple(ep)
        if mesh.ndim == 1 and (not names or names[0] in ep_dims):
            return cls(mesh, None, mesh)
        missing = [d for d in ep_dims if d not in names]
        if missing:
            raise ValueError(f"MoEMesh.from_mesh: the mesh's dims are {list(names) or 'unnamed'}; the expert-parallel "
                             f"dim(s) {missing} are not among them (name the mesh's dims, e.g. "
                             "init_device_mesh(..., mesh_dim_names=('dp', 'ep')))")
        ep_dims = tuple(d for d in names if d in ep_dims)              # mesh order
        dp_dims = tuple(d for d in names if d not in ep_dims and d != PIPELINE_DIM)
        routing_dims = tuple(d for d in names if d in dp_dims or d in ep_dims)
        return cls(_one_dim(mesh, ep_dims), _one_dim(mesh, dp_dims) if dp_dims else None,
                   _one_dim(mesh, routing_dims))

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.ep.get_group()

    @property
    def routing_group(self) -> dist.ProcessGroup:
        return self.routing.get_group()


def _one_dim(mesh: DeviceMesh, dims: tuple[str, ...]) -> DeviceMesh:
    """``mesh[dims]`` as a 1-D mesh (flattened when several dims; torch caches the flattened
    mesh and its process group, so resolving the same mesh again makes no new group)."""
    sub = mesh[dims]
    return sub if len(dims) == 1 else sub._flatten("_".join(dims))


#: what a layer's ``group`` argument accepts
GroupLike = Union[None, dist.ProcessGroup, DeviceMesh, MoEMesh]


def resolve_groups(group: GroupLike) -> tuple[Optional[dist.ProcessGroup], Optional[dist.ProcessGroup],
                                              Optional[MoEMesh]]:
    """``(ep group, routing group, MoEMesh or None)`` for a layer's ``group`` argument: a process
    group (or None, the world) is both groups; a mesh resolves as :meth:`MoEMesh.from_mesh`."""
    if isinstance(group, (DeviceMesh, MoEMesh)):
        mesh = MoEMesh.from_mesh(group)
        return mesh.ep_group, mesh.routing_group, mesh
    return group, group, None


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (e.g. a parameter FSDP2 sharded), without importing
    ``torch.distributed.tensor`` (seconds) when nothing else has: then none can exist."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local tensor (a view, writes go through), else ``t``."""
    return t.to_local() if is_dtensor(t) else t
