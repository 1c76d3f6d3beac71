"""moeflow: expert parallelism for PyTorch Mixture-of-Experts models on any torch.distributed backend.

The DeepEP-compatible entry point is :class:`Buffer`, with DeepEP's :class:`Config`, ``topk_idx_t``
and :class:`EventOverlap`: ``import moeflow as deep_ep`` runs DeepEP V1 code; :class:`ElasticBuffer`
takes DeepEP V2's dispatch/combine (docs/deep_ep.md).
:mod:`moeflow.autograd` makes dispatch and combine differentiable; :mod:`moeflow.quant` holds the
FP8 cast; :func:`moeflow.launch.spawn`
runs a function on local ranks; :mod:`moeflow.balance` plans expert placement (EPLB contract).
:class:`MoELayer` puts them together: :class:`Router` -> dispatch -> :class:`GroupedExperts` ->
combine, with shared experts and overlap.
"""

from importlib import import_module as _import_module
from importlib.util import find_spec as _find_spec

# Public name -> the module that defines it, imported on first use (PEP 562): `import moeflow`
# costs nothing, and `moeflow --help` or a planning script never pays for torch._dynamo (which
# moeflow.layer brings in through torch.compiler.disable) or for the layers it does not use.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["Buffer", "ByteCounters", "Config", "DispatchHandle", "ElasticBuffer", "EPHandle", "EventOverlap",
                     "PeerFailureError", "topk_idx_t"], "moeflow.comm"),
    **dict.fromkeys(["GroupedExperts", "SwiGLU"], "moeflow.experts"),
    "MoELayer": "moeflow.layer",
    "CheckpointError": "moeflow.checkpoint",
    "parallelize": "moeflow.parallel.fsdp",
    **dict.fromkeys(["Router", "RouterOutput"], "moeflow.routing"),
    **dict.fromkeys(["RankError", "spawn"], "moeflow.launch"),
    **dict.fromkeys(["per_token_cast_to_fp8", "per_token_cast_back"], "moeflow.quant"),
}
# What a fresh rank needs at hand (moeflow.launch preloads it once in the forkserver).
_MODULES = tuple(sorted(set(_EXPORTS.values()) | {"moeflow.integrations"}))


def __getattr__(name: str):
    """A public name, or a submodule (``moeflow.layout``, ``moeflow.balance``, ...), imported now."""
    if name in _EXPORTS:
        value = getattr(_import_module(_EXPORTS[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    if not name.startswith("_") and _find_spec(f"{__name__}.{name}") is not None:
        return _import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "Buffer", "Config", "DispatchHandle", "EventOverlap", "topk_idx_t", "ElasticBuffer", "EPHandle",
    "ByteCounters", "PeerFailureError", "CheckpointError",
    "autograd", "balance", "layout", "quant", "per_token_cast_to_fp8", "per_token_cast_back",
    "spawn", "RankError",
    "Router", "RouterOutput", "GroupedExperts", "SwiGLU", "MoELayer", "parallelize",
    "integrations",
]
