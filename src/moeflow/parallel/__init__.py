"""Training in the PyTorch stack: device meshes (:mod:`.mesh`) and FSDP2 over them (:mod:`.fsdp`).

``moeflow.parallel.mesh`` is a leaf (it imports nothing from moeflow): the layers read it. The
rest builds on the layers.
"""

from .mesh import GroupLike, MoEMesh, is_dtensor, local_tensor, resolve_groups

__all__ = ["GroupLike", "MoEMesh", "is_dtensor", "local_tensor", "resolve_groups"]
