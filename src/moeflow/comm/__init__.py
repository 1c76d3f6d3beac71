"""Communication layer: the Buffer (DeepEP's dispatch / combine), the route it plans, and the
Transport every ``torch.distributed`` call of moeflow goes through (docs/architecture.md)."""

from .buffer import Buffer, DispatchHandle
from .health import PeerFailureError
from .low_latency import LowLatencyHandle
from .plan import Hop, Plan
from .transport import ByteCounters, EventOverlap, ProcessGroupTransport, Transport

__all__ = ["Buffer", "DispatchHandle", "EventOverlap", "ByteCounters", "LowLatencyHandle", "Hop", "Plan",
           "PeerFailureError", "Transport", "ProcessGroupTransport"]
