"""Cluster cost simulator: an alpha-beta model of MoE dispatch and combine time per layer.

Answers "what would dispatch/combine cost on N nodes of R / N GPUs?" without the cluster, from three
things: where tokens go under the routing (:func:`expected_reach`), how many bytes that puts on
each GPU's NVLink and RDMA links (:func:`link_bytes`), and a small set of physical link
parameters (:class:`ClusterSpec`), each link costing ``latency + bytes / bandwidth``
(:func:`simulate_dispatch_combine`). :data:`DEEPEP_H800` holds DeepEP's published H800 figures
and :func:`compare_deepep` puts the model beside them.

Shape letters (docs/architecture.md): T tokens per rank, H hidden, E experts, K top-k, R ranks
(GPUs), N nodes, G expert groups; ``gpus_per_node`` is R / N. Experts are split evenly and
contiguously over ranks, ranks contiguously over nodes (rank r lives on node
r // gpus_per_node), as in :class:`moeflow.Buffer`; who goes where comes from
:mod:`moeflow.layout`, as there.

Model assumptions, stated once:
- Every source rank routes with the same distribution, so one ``[R]`` vector of hit
  probabilities describes all of them; times are for the busiest GPU (max over GPUs of what it
  sends or receives on a link; links are full duplex, NVLink and RDMA run concurrently).
- Normal kernels send a token to a rank once however many of its experts live there. Flat mode
  sends every copy directly (NVLink inside the node, RDMA across). Hierarchical mode (DeepEP's
  internode kernels) sends a token once per remote node over RDMA, to the GPU with the sender's
  local index, which forwards it over NVLink to the ranks it reaches in that node; the two stages
  are chunk-pipelined, so the slower stage sets the time.
- Low-latency kernels send one message per (token, expert) pair (receive buffers are per expert),
  NVLink to ranks in the node, RDMA to the rest, with a 16-byte header on dispatch messages.
- Combine moves the same copies back in the reverse direction (bf16), reduced per node on the
  forwarder in hierarchical mode, so it crosses the inter-node link once per node too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import layout
from .quant import FP8_BLOCK  # one float32 scale per 128 channels (DeepSeek-V3 / DeepEP FP8 format)

__all__ = [
    "ClusterSpec", "Reach", "LinkBytes", "PhaseCost", "SimResult", "DeepEPRow", "Comparison",
    "DEEPEP_H800", "deepep_setup", "expected_reach", "bytes_per_token", "link_bytes", "simulate_dispatch_combine",
    "compare_deepep",
]

LL_HEADER_BYTES = 16      # DeepEP low-latency dispatch: one int4 of source info per message


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """A cluster of ``nodes`` x ``gpus_per_node`` GPUs and its links' effective parameters.

    The defaults are calibrated once against all of DeepEP's published H800 rows (see
    :func:`compare_deepep`); each is a physical quantity, not a per-row correction:

    - ``nvlink_GBps``: NVLink bandwidth one GPU achieves in each direction. DeepEP calls H800
      NVLink "~160 GB/s maximum"; 135 is ~84% of that, what SM-driven copies reach after
      NVLink packet overhead (the intranode rows alone would allow ~145; the EP16 row, which is
      bound by NVLink forwarding, asks for less).
    - ``rdma_GBps``: RDMA bandwidth per GPU in each direction. One CX7 400 Gb/s NIC per GPU is
      50 GB/s line rate; 43.5 is ~87% of it after IB headers (4 KiB MTU) and per-chunk
      signalling.
    - ``nvlink_latency_us`` / ``rdma_latency_us``: one-way latency of a transfer on each link
      (NVLink P2P store ~1 us, GPU-initiated RDMA write through the NIC and switch ~3 us).
    - ``kernel_us``: fixed cost of one dispatch or combine call: kernel launch, the per-rank
      count/flag handshake that tells receivers all data has arrived, and the receive-side
      packing. It dominates low-latency decode calls and is noise for prefill-sized ones.
    """

    nodes: int
    gpus_per_node: int
    nvlink_GBps: float = 135.0
    rdma_GBps: float = 43.5
    nvlink_latency_us: float = 1.0
    rdma_latency_us: float = 3.0
    kernel_us: float = 25.0

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
        for name in ("nvlink_GBps", "rdma_GBps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {name}={v!r}")
        for name in ("nvlink_latency_us", "rdma_latency_us", "kernel_us"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {name}={v!r}")

    @property
    def num_ranks(self) -> int:
        return self.nodes * self.gpus_per_node


# ---------------------------------------------------------------------------------------------
# Where tokens go
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class Reach:
    """Where one token's top-k lands, in expectation over tokens.

    Attributes:
        prob_token_in_rank: [R] float64, P(a token reaches rank r), i.e. at least one of its
            experts lives there.
        prob_token_in_node: [N] float64, P(a token reaches node n).
        num_selections_per_rank: [R] float64, expected top-k selections per token that land on
            rank r (sums to K; what low-latency mode sends, one message each).
        method: how it was computed ("exact" or "Monte Carlo, S tokens, seed X").
    """

    num_experts: int
    num_topk: int
    num_ranks: int
    gpus_per_node: int
    prob_token_in_rank: np.ndarray
    prob_token_in_node: np.ndarray
    num_selections_per_rank: np.ndarray
    method: str

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.gpus_per_node

    @property
    def num_ranks_per_token(self) -> float:
        """Expected number of ranks a token reaches (E[ranks])."""
        return float(self.prob_token_in_rank.sum())

    @property
    def num_nodes_per_token(self) -> float:
        """Expected number of nodes a token reaches, its own node included (E[nodes])."""
        return float(self.prob_token_in_node.sum())

    @classmethod
    def from_topk_idx(cls, topk_idx: torch.Tensor, num_experts: int, num_ranks: int, gpus_per_node: int,
                      method: str = "measured") -> "Reach":
        """Empirical reach of a concrete routing.

        Args:
            topk_idx: [T, K] int64, expert ids, -1 means no selection.
        """
        _check_topology(num_experts, num_ranks, gpus_per_node)
        if topk_idx.dim() != 2 or topk_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_idx must be [num_tokens, num_topk] int32/int64, got "
                             f"{tuple(topk_idx.shape)} {topk_idx.dtype}")
        if topk_idx.numel() and (topk_idx.min() < -1 or topk_idx.max() >= num_experts):
            raise ValueError(f"topk_idx values must be in [-1, {num_experts}), got "
                             f"[{int(topk_idx.min())}, {int(topk_idx.max())}]")
        T, K = topk_idx.shape
        if T == 0:
            raise ValueError("topk_idx must have at least one token, got 0")
        in_rank = layout.is_token_in_rank(topk_idx, num_experts, num_ranks)                       # [T, R]
        in_node = layout.is_token_in_node(in_rank, num_ranks // gpus_per_node)                   # [T, N]
        rank_idx = torch.where(topk_idx >= 0, topk_idx // (num_experts // num_ranks), num_ranks)
        per_rank = torch.bincount(rank_idx.flatten().long(), minlength=num_ranks + 1)[:-1]        # selections
        return cls(num_experts=num_experts, num_topk=K, num_ranks=num_ranks, gpus_per_node=gpus_per_node,
                   prob_token_in_rank=in_rank.double().mean(0).numpy(),
                   prob_token_in_node=in_node.double().mean(0).numpy(),
                   num_selections_per_rank=(per_rank.double() / T).numpy(), method=method)


def _check_topology(num_experts: int, num_ranks: int, gpus_per_node: int) -> None:
    for name, v in (("num_experts", num_experts), ("num_ranks", num_ranks), ("gpus_per_node", gpus_per_node)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
    if num_ranks % gpus_per_node:
        raise ValueError(f"num_ranks ({num_ranks}) must be a multiple of gpus_per_node, got gpus_per_node={gpus_per_node}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must split evenly over {num_ranks} ranks, got num_experts={num_experts}")


def _sample_topk(expert_loads: np.ndarray | None, num_experts: int, num_topk: int, num_groups: int,
                 num_topk_groups: int, num_samples: int, seed: int) -> torch.Tensor:
    """[T, K] int64 expert ids of ``num_samples`` = T tokens sampled like a router: iid scores (with
    loads, the exponential race -Exp(1) / load, whose top-K is sampling K experts without
    replacement in proportion to load), group score = best expert score, the best
    ``num_topk_groups`` of the G groups, then top-K experts inside them."""
    T, E, G, top_groups = num_samples, num_experts, num_groups, num_topk_groups
    gen = torch.Generator().manual_seed(seed)
    if expert_loads is None:
        scores = torch.rand(T, E, generator=gen)                                       # [T, E]
    else:
        p = torch.from_numpy(expert_loads / expert_loads.sum()).float()
        scores = -torch.empty(T, E).exponential_(generator=gen) / p                     # load 0 -> -inf
        scores = scores.masked_fill(p == 0, -math.inf)
    if top_groups < G:
        group_idx = scores.view(T, G, E // G).amax(dim=2).topk(top_groups, dim=1).indices  # [T, top_groups]
        in_group = torch.zeros(T, G, dtype=torch.bool).scatter_(1, group_idx, True)     # [T, G]
        scores = scores.masked_fill(~in_group.repeat_interleave(E // G, dim=1), -math.inf)
    return scores.topk(num_topk, dim=1).indices


def expected_reach(num_experts: int, num_topk: int, num_ranks: int, gpus_per_node: int, *,
                   num_groups: int = 1, num_topk_groups: int | None = None, max_nodes: int | None = None,
                   expert_loads: np.ndarray | None = None, num_samples: int = 20000, seed: int = 0) -> Reach:
    """Expected ranks and nodes a token reaches under a routing.

    Routings:
        uniform (default): top-K of E without replacement, every expert equally likely.
        group-limited: ``num_groups`` contiguous expert groups, each token picks
            ``num_topk_groups`` of them, then its top-K inside those (DeepSeek-V3: 256 experts,
            8 groups, top-4 groups). ``max_nodes=M`` is node-limited routing: groups = nodes,
            top-M groups.
        measured: ``expert_loads`` [E] float, per-expert load (token counts or frequencies);
            tokens pick K distinct experts with probability in proportion to load
            (combinable with groups).

    Uniform routing has a closed form: P(rank hit) = 1 - C(E - E/R, K) / C(E, K), likewise per
    node. Group limits and measured loads are Monte Carlo over ``num_samples`` tokens with a
    fixed ``seed``, sampled like a router (:func:`_sample_topk`): a group's score is its best
    expert's score, as in DeepEP's benchmarks. That is not "uniform groups, then uniform experts
    inside them": the chosen groups are those holding the best scores, so a token's picks spread
    over more of its groups than uniform picks would.
    """
    _check_topology(num_experts, num_ranks, gpus_per_node)
    E, K, R, per_node = num_experts, num_topk, num_ranks, gpus_per_node
    N = R // per_node
    if not isinstance(K, int) or isinstance(K, bool) or not 1 <= K <= E:
        raise ValueError(f"num_topk must be in [1, num_experts={E}], got num_topk={K!r}")
    if max_nodes is not None:
        if num_groups != 1 or num_topk_groups is not None:
            raise ValueError(f"max_nodes sets the groups to the nodes; pass it alone, got max_nodes={max_nodes}, "
                             f"num_groups={num_groups}, num_topk_groups={num_topk_groups}")
        if not isinstance(max_nodes, int) or not 1 <= max_nodes <= N:
            raise ValueError(f"max_nodes must be in [1, nodes={N}], got max_nodes={max_nodes!r}")
        num_groups, num_topk_groups = N, max_nodes
    if not isinstance(num_groups, int) or num_groups < 1 or E % num_groups:
        raise ValueError(f"num_groups must divide num_experts={E}, got num_groups={num_groups!r}")
    M = num_groups if num_topk_groups is None else num_topk_groups
    if not isinstance(M, int) or not 1 <= M <= num_groups:
        raise ValueError(f"num_topk_groups must be in [1, num_groups={num_groups}], got num_topk_groups={M!r}")
    if K > M * (E // num_groups):
        raise ValueError(f"num_topk={K} is more than the {M * (E // num_groups)} experts in {M} of {num_groups} "
                         f"groups, got num_topk={K}")
    if expert_loads is not None:
        expert_loads = np.asarray(expert_loads, dtype=np.float64)
        if expert_loads.shape != (E,):
            raise ValueError(f"expert_loads must be [num_experts={E}], got shape {expert_loads.shape}")
        if not np.isfinite(expert_loads).all() or (expert_loads < 0).any():
            raise ValueError("expert_loads must be finite and >= 0, got "
                             f"min={expert_loads.min()!r}, finite={bool(np.isfinite(expert_loads).all())}")
        if (expert_loads > 0).sum() < K:
            raise ValueError(f"expert_loads has {(expert_loads > 0).sum()} experts with load > 0, fewer than "
                             f"num_topk={K}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got num_samples={num_samples!r}")

    if expert_loads is None and M == num_groups:
        # Uniform top-K without replacement: a block of u experts is missed by all K picks with
        # probability C(E - u, K) / C(E, K).
        miss_rank = math.comb(E - E // R, K) / math.comb(E, K)
        miss_node = math.comb(E - E // N, K) / math.comb(E, K)
        return Reach(num_experts=E, num_topk=K, num_ranks=R, gpus_per_node=per_node,
                     prob_token_in_rank=np.full(R, 1 - miss_rank), prob_token_in_node=np.full(N, 1 - miss_node),
                     num_selections_per_rank=np.full(R, K / R), method="exact")
    topk_idx = _sample_topk(expert_loads, E, K, num_groups, M, num_samples, seed)
    return Reach.from_topk_idx(topk_idx, E, R, per_node, method=f"Monte Carlo, {num_samples} tokens, seed {seed}")


# ---------------------------------------------------------------------------------------------
# Bytes on each link
# ---------------------------------------------------------------------------------------------


def bytes_per_token(hidden: int, fp8: bool) -> int:
    """Payload bytes of one token copy: FP8 is H e4m3 bytes + H/128 float32 scales; bf16 is 2H."""
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise ValueError(f"hidden must be a positive int, got hidden={hidden!r}")
    if fp8:
        if hidden % FP8_BLOCK:
            raise ValueError(f"hidden must be a multiple of {FP8_BLOCK} for FP8, got hidden={hidden}")
        return hidden + hidden // FP8_BLOCK * 4
    return 2 * hidden


@dataclass(frozen=True, eq=False)
class LinkBytes:
    """Bytes each GPU sends and receives on each link in one dispatch (combine: swap send/recv).

    Each field is [R] float64, indexed by rank.
    """

    nvlink_send: np.ndarray
    nvlink_recv: np.ndarray
    rdma_send: np.ndarray
    rdma_recv: np.ndarray

    def reversed(self) -> "LinkBytes":
        return LinkBytes(self.nvlink_recv, self.nvlink_send, self.rdma_recv, self.rdma_send)

    def scaled(self, factor: float) -> "LinkBytes":
        return LinkBytes(self.nvlink_send * factor, self.nvlink_recv * factor,
                         self.rdma_send * factor, self.rdma_recv * factor)

    @property
    def nvlink_max(self) -> float:
        """The busiest GPU's NVLink bytes in its busier direction."""
        return float(max(self.nvlink_send.max(), self.nvlink_recv.max()))

    @property
    def rdma_max(self) -> float:
        return float(max(self.rdma_send.max(), self.rdma_recv.max()))


def link_bytes(reach: Reach, num_tokens: int, num_bytes_per_token: float, *, hierarchical: bool = False,
               low_latency: bool = False) -> LinkBytes:
    """Dispatch bytes per GPU and link for ``num_tokens`` tokens per rank (see the module
    docstring for the three modes). A rank's copies to itself never touch a link."""
    if low_latency and hierarchical:
        raise ValueError("low_latency sends each (token, expert) directly; it cannot be hierarchical, "
                         "got hierarchical=True, low_latency=True")
    R, per_node, N = reach.num_ranks, reach.gpus_per_node, reach.num_nodes
    b = float(num_tokens) * float(num_bytes_per_token)
    # copies per token per destination rank: once per rank reached, or once per selection (LL)
    per_rank = reach.num_selections_per_rank if low_latency else reach.prob_token_in_rank    # [R]
    per_rank_by_node = per_rank.reshape(N, per_node)                                           # [N, R / N]
    in_node = per_rank_by_node.sum(axis=1, keepdims=True)                                    # [N, 1]
    if hierarchical and N > 1:
        p_node = reach.prob_token_in_node                                                      # [N]
        # RDMA: once per remote node reached, to the GPU with the sender's local index.
        rdma_send = np.repeat(p_node.sum() - p_node, per_node) * b
        rdma_recv = np.repeat(p_node * (N - 1), per_node) * b
        # NVLink: the forwarder on each node passes tokens from all N senders with its local
        # index (its own included) to the other ranks they reach in its node.
        nvlink_send = ((in_node - per_rank_by_node) * N).reshape(R) * b
        nvlink_recv = per_rank * N * (per_node - 1) * b
    else:
        total = per_rank.sum()
        nvlink_send = (in_node - per_rank_by_node).reshape(R) * b
        nvlink_recv = per_rank * (per_node - 1) * b
        rdma_send = (total - np.repeat(in_node[:, 0], per_node)) * b
        rdma_recv = per_rank * (R - per_node) * b
    return LinkBytes(nvlink_send, nvlink_recv, rdma_send, rdma_recv)


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseCost:
    """One dispatch or one combine.

    Attributes:
        time_us: modelled time of the call.
        nvlink_bytes, rdma_bytes: the busiest GPU's bytes on each link (busier direction).
        nvlink_us, rdma_us: latency + bytes / bandwidth of each link.
        bottleneck: "nvlink", "rdma" or "none" (nothing crosses a link).
        deepep_bytes: the bytes DeepEP's benchmarks divide by, per rank: all selections for
            low-latency; tokens received incl. its own for intranode ("NVL bandwidth"); tokens
            times nodes reached incl. its own for internode ("RDMA bandwidth").
        deepep_GBps: deepep_bytes / time, DeepEP's "bottleneck bandwidth".
    """

    time_us: float
    nvlink_bytes: float
    rdma_bytes: float
    nvlink_us: float
    rdma_us: float
    bottleneck: str
    deepep_bytes: float

    @property
    def deepep_GBps(self) -> float:
        return self.deepep_bytes / (self.time_us * 1e3)


@dataclass(frozen=True, eq=False)
class SimResult:
    """Modelled dispatch and combine of one MoE layer on a cluster."""

    cluster: ClusterSpec
    reach: Reach
    num_tokens: int
    hidden: int
    fp8: bool
    hierarchical: bool
    low_latency: bool
    dispatch_bytes_per_token: int
    combine_bytes_per_token: int
    dispatch_link_bytes: LinkBytes
    dispatch: PhaseCost
    combine: PhaseCost


def _phase(cluster: ClusterSpec, lb: LinkBytes, hierarchical: bool, deepep_bytes: float) -> PhaseCost:
    nvl, rdma = lb.nvlink_max, lb.rdma_max
    nvl_alpha = cluster.nvlink_latency_us if nvl > 0 else 0.0
    rdma_alpha = cluster.rdma_latency_us if rdma > 0 else 0.0
    nvl_beta = nvl / (cluster.nvlink_GBps * 1e3)          # bytes / (GB/s) in us
    rdma_beta = rdma / (cluster.rdma_GBps * 1e3)
    if hierarchical:
        # Chunk-pipelined RDMA -> NVLink stages: the slower stage's bytes plus both hops' latency.
        wire_us = rdma_alpha + nvl_alpha + max(nvl_beta, rdma_beta)
    else:
        wire_us = max(nvl_alpha + nvl_beta, rdma_alpha + rdma_beta)
    bottleneck = "none" if nvl == rdma == 0 else ("nvlink" if nvl_beta >= rdma_beta else "rdma")
    return PhaseCost(time_us=cluster.kernel_us + wire_us, nvlink_bytes=nvl, rdma_bytes=rdma,
                     nvlink_us=nvl_alpha + nvl_beta, rdma_us=rdma_alpha + rdma_beta, bottleneck=bottleneck,
                     deepep_bytes=deepep_bytes)


def simulate_dispatch_combine(cluster: ClusterSpec, reach: Reach, *, num_tokens: int, hidden: int, fp8: bool = True,
                              hierarchical: bool = False, low_latency: bool = False) -> SimResult:
    """Model one layer's dispatch (FP8 if ``fp8``, else bf16) and bf16 combine.

    Args:
        cluster: the cluster and its link parameters.
        reach: the routing's reach, for ``cluster.num_ranks`` ranks (:func:`expected_reach`).
        num_tokens: tokens per rank.
        hidden: hidden size H.
        hierarchical: normal kernels only: cross nodes once per node, forward over NVLink.
        low_latency: one message per (token, expert) pair, as DeepEP's decode kernels.
    """
    if reach.num_ranks != cluster.num_ranks or reach.gpus_per_node != cluster.gpus_per_node:
        raise ValueError(f"reach is for {reach.num_ranks} ranks / {reach.gpus_per_node} per node, the cluster has "
                         f"{cluster.num_ranks} / {cluster.gpus_per_node}")
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got num_tokens={num_tokens!r}")
    dispatch_b = bytes_per_token(hidden, fp8) + (LL_HEADER_BYTES if low_latency else 0)
    combine_b = bytes_per_token(hidden, False)
    per_token = link_bytes(reach, num_tokens, 1.0, hierarchical=hierarchical, low_latency=low_latency)
    hier = hierarchical and cluster.nodes > 1
    if low_latency:
        copies = reach.num_topk                      # DeepEP counts every selection
    elif cluster.nodes == 1:
        copies = reach.num_ranks_per_token           # tokens received, own included
    else:
        copies = reach.num_nodes_per_token           # tokens x nodes reached, own included
    return SimResult(
        cluster=cluster, reach=reach, num_tokens=num_tokens, hidden=hidden, fp8=fp8, hierarchical=hier,
        low_latency=low_latency, dispatch_bytes_per_token=dispatch_b, combine_bytes_per_token=combine_b,
        dispatch_link_bytes=per_token.scaled(dispatch_b),
        dispatch=_phase(cluster, per_token.scaled(dispatch_b), hier, num_tokens * copies * dispatch_b),
        combine=_phase(cluster, per_token.reversed().scaled(combine_b), hier, num_tokens * copies * combine_b),
    )


# ---------------------------------------------------------------------------------------------
# DeepEP's published figures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeepEPRow:
    """One published DeepEP H800 measurement (DeepEP's repository, github.com/deepseek-ai/DeepEP:
    docs/legacy.md there, section "Performance" of V1).

    ``unit`` is "GB/s" (DeepEP's bottleneck bandwidth: NVLink intranode, RDMA internode) or "us".
    Normal kernels: 4096 tokens, hidden 7168, top-8 of 256 experts, groups = nodes with top
    min(nodes, 4) groups (tests/test_internode.py), hierarchical internode. Low-latency kernels:
    128 tokens, hidden 7168, top-8; DeepEP does not state the expert count for every EP size
    (the test default of 288 does not divide EP64+), so 256 is used; uniform per-selection
    traffic does not depend on it.
    """

    low_latency: bool
    num_ranks: int
    dispatch: float
    combine: float

    @property
    def unit(self) -> str:
        return "us" if self.low_latency else "GB/s"


DEEPEP_H800: tuple[DeepEPRow, ...] = (
    DeepEPRow(False, 8, 153, 158),
    DeepEPRow(False, 16, 43, 43),
    DeepEPRow(False, 32, 58, 57),
    DeepEPRow(False, 64, 51, 50),
    DeepEPRow(True, 8, 77, 114),
    DeepEPRow(True, 16, 118, 195),
    DeepEPRow(True, 32, 155, 273),
    DeepEPRow(True, 64, 173, 314),
    DeepEPRow(True, 128, 192, 369),
    DeepEPRow(True, 256, 194, 360),
)


@dataclass(frozen=True)
class Comparison:
    """Model beside one published row; errors are (model - published) / published."""

    row: DeepEPRow
    result: SimResult
    dispatch_model: float
    combine_model: float

    @property
    def dispatch_error(self) -> float:
        return self.dispatch_model / self.row.dispatch - 1

    @property
    def combine_error(self) -> float:
        return self.combine_model / self.row.combine - 1


def deepep_setup(row: DeepEPRow, gpus_per_node: int = 8) -> tuple[int, int, int, int, int, int | None]:
    """(nodes, tokens, hidden, experts, topk, max_nodes) DeepEP benchmarked ``row`` with."""
    nodes = max(1, row.num_ranks // gpus_per_node)
    if row.low_latency:
        return nodes, 128, 7168, 256, 8, None
    return nodes, 4096, 7168, 256, 8, (min(nodes, 4) if nodes > 1 else None)


def compare_deepep(cluster: ClusterSpec | None = None, rows: tuple[DeepEPRow, ...] = DEEPEP_H800) -> list[Comparison]:
    """Simulate each published DeepEP row with one set of link parameters (``cluster``'s, node
    and GPU counts replaced per row; default :class:`ClusterSpec`'s calibrated H800 values)."""
    base = cluster or ClusterSpec(nodes=1, gpus_per_node=8)
    out = []
    for row in rows:
        nodes, T, H, E, K, max_nodes = deepep_setup(row, base.gpus_per_node)
        spec = ClusterSpec(nodes=nodes, gpus_per_node=min(base.gpus_per_node, row.num_ranks),
                           nvlink_GBps=base.nvlink_GBps, rdma_GBps=base.rdma_GBps,
                           nvlink_latency_us=base.nvlink_latency_us, rdma_latency_us=base.rdma_latency_us,
                           kernel_us=base.kernel_us)
        reach = expected_reach(E, K, spec.num_ranks, spec.gpus_per_node, max_nodes=max_nodes)
        res = simulate_dispatch_combine(spec, reach, num_tokens=T, hidden=H, fp8=True,
                                        hierarchical=not row.low_latency, low_latency=row.low_latency)
        if row.low_latency:
            d, c = res.dispatch.time_us, res.combine.time_us
        else:
            d, c = res.dispatch.deepep_GBps, res.combine.deepep_GBps
        out.append(Comparison(row, res, d, c))
    return out
