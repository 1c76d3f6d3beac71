"""moeflow: expert parallelism for PyTorch Mixture-of-Experts models on any torch.distributed backend.

The DeepEP-compatible entry point is :class:`Buffer`; :mod:`moeflow.autograd` makes its dispatch
and combine differentiable; :mod:`moeflow.quant` holds the FP8 cast; :func:`moeflow.launch.spawn`
runs a function on local ranks; :mod:`moeflow.balance` plans expert placement (EPLB contract).
:class:`MoELayer` puts them together: :class:`Router` -> dispatch -> :class:`GroupedExperts` ->
combine, with shared experts and overlap.
"""

from . import autograd, balance, layout, quant
from .comm import Buffer, ByteCounters, DispatchHandle, EventOverlap, PeerFailureError
from .experts import GroupedExperts, SwiGLU
from .layer import MoELayer
from .checkpoint import CheckpointError  # after .layer, which it builds on
from .parallel.fsdp import parallelize
from .routing import Router, RouterOutput
from .launch import RankError, spawn
from . import integrations  # after .layer: integrations.hf builds on MoELayer; imports no transformers
from .quant import per_token_cast_back, per_token_cast_to_fp8

__version__ = "0.1.0"

__all__ = [
    "Buffer", "DispatchHandle", "EventOverlap", "ByteCounters", "PeerFailureError", "CheckpointError",
    "autograd", "balance", "layout", "quant", "per_token_cast_to_fp8", "per_token_cast_back",
    "spawn", "RankError",
    "Router", "RouterOutput", "GroupedExperts", "SwiGLU", "MoELayer", "parallelize",
    "integrations",
]
