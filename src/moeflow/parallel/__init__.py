"""Training in the PyTorch stack: device meshes (:mod:`.mesh`), FSDP2 over them (:mod:`.fsdp`,
``moeflow.parallelize``) and running under torchrun or on local ranks (:mod:`.launch`).

``moeflow.parallel.mesh`` is a leaf (it imports nothing from moeflow): the layers read it. The
rest builds on the layers.
"""

from .launch import init_from_env, run, under_launcher
from .mesh import GroupLike, MoEMesh, is_dtensor, local_tensor, resolve_groups

__all__ = ["GroupLike", "MoEMesh", "is_dtensor", "local_tensor", "resolve_groups", "init_from_env", "run",
           "under_launcher"]
