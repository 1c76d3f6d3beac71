"""Communication layer: the Buffer (dispatch / combine) and the transports under it."""

from .buffer import Buffer, DispatchHandle
from .compat import Config, topk_idx_t
from .elastic import ElasticBuffer, EPHandle
from .health import PeerFailureError
from .hierarchical import NodeRoute
from .low_latency import LowLatencyHandle
from .transport import ByteCounters, EventOverlap, FlatTransport

__all__ = ["Buffer", "Config", "ElasticBuffer", "EPHandle", "DispatchHandle", "topk_idx_t", "EventOverlap",
           "ByteCounters", "FlatTransport", "LowLatencyHandle",
           "NodeRoute", "PeerFailureError"]
