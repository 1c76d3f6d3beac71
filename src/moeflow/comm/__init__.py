"""Communication layer: the Buffer (dispatch / combine) and the transports under it."""

from .buffer import Buffer, DispatchHandle
from .health import PeerFailureError
from .hierarchical import NodeRoute
from .low_latency import LowLatencyHandle
from .transport import ByteCounters, EventOverlap, FlatTransport

__all__ = ["Buffer", "DispatchHandle", "EventOverlap", "ByteCounters", "FlatTransport", "LowLatencyHandle",
           "NodeRoute", "PeerFailureError"]
