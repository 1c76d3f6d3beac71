"""Communication layer: the Buffer (DeepEP's dispatch / combine), the route it plans, and the
Transport every ``torch.distributed`` call of moeflow goes through (docs/architecture.md).
:mod:`~moeflow.comm.compat` holds DeepEP's names without an engine behind them, and
:mod:`~moeflow.comm.elastic` DeepEP V2's ``ElasticBuffer`` on the Buffer (docs/deep_ep.md)."""

from .buffer import Buffer, DispatchHandle
from .compat import Config, topk_idx_t
from .elastic import ElasticBuffer, EPHandle
from .health import PeerFailureError
from .low_latency import LowLatencyHandle
from .plan import Hop, Plan
from .transport import ByteCounters, EventOverlap, ProcessGroupTransport, Transport

__all__ = ["Buffer", "Config", "ElasticBuffer", "EPHandle", "DispatchHandle", "topk_idx_t", "EventOverlap",
           "ByteCounters", "LowLatencyHandle", "Hop", "Plan", "PeerFailureError", "Transport",
           "ProcessGroupTransport"]
