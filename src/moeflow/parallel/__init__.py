"""Training in the PyTorch stack: device meshes (:mod:`.mesh`), FSDP2 over them (:mod:`.fsdp`,
``moeflow.parallelize``), running under torchrun or on local ranks (:mod:`.launch`), pipelines
on ``torch.distributed.pipelining`` (:mod:`.pipeline`) and the overlap of one micro-batch's
expert traffic with another's compute, in a pipeline or without one (:mod:`.overlap`, timed
by :mod:`.timeline`).

``moeflow.parallel.mesh`` is a leaf (it imports nothing from moeflow): the layers read it. The
rest builds on the layers, so its names load on first use (importing this package, as the
layers do for the mesh, must not import the layers back, nor FSDP and the pipelining engine,
which take seconds).
"""

from importlib import import_module

from .launch import init_from_env, run, under_launcher
from .mesh import PIPELINE_DIM, GroupLike, MoEMesh, is_dtensor, local_tensor, resolve_groups

# name -> the submodule that defines it, imported when the name is first read
_LAZY = {
    "parallelize": "fsdp",
    **{name: "pipeline" for name in ("SCHEDULES", "ModelParts", "Pipeline", "build_pipeline")},
    **{name: "overlap" for name in ("run_lanes", "overlap_f_b", "enable_overlap", "forward_two_halves",
                                    "train_micro_batches")},
    **{name: "timeline" for name in ("Timeline", "StepTimes")},
}

__all__ = ["GroupLike", "MoEMesh", "PIPELINE_DIM", "is_dtensor", "local_tensor", "resolve_groups", "init_from_env",
           "run", "under_launcher", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
