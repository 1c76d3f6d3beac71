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

from . import autograd, balance, layout, quant
from .comm import (Buffer, ByteCounters, Config, DispatchHandle, ElasticBuffer, EPHandle, EventOverlap,
                   PeerFailureError, topk_idx_t)
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
    "Buffer", "Config", "DispatchHandle", "EventOverlap", "topk_idx_t", "ElasticBuffer", "EPHandle",
    "ByteCounters", "PeerFailureError", "CheckpointError",
    "autograd", "balance", "layout", "quant", "per_token_cast_to_fp8", "per_token_cast_back",
    "spawn", "RankError",
    "Router", "RouterOutput", "GroupedExperts", "SwiGLU", "MoELayer", "parallelize",
    "integrations",
]
