"""``Router``: scores, (group- and node-limited) top-k, expert bias, balance losses.

Shape letters:
    T  tokens (batch x sequence, flattened)   D  hidden size
    E  routed experts                         K  top-k
    N  nodes the experts lie on               M  max nodes per token
    G  expert groups                          B  sequences, S  sequence length (T = B * S)

Routing runs in fp32 whatever the input dtype: the gate's logits, the scores, the bias and the
weights. Selection uses ``scores + expert_bias``; the weights use the unbiased scores.

Balancing, two ways that can be combined:

- expert bias (aux-loss-free, DeepSeek-V3): a per-expert fp32 offset added to the scores for
  *selection only*; once per optimizer step :meth:`Router.update_bias` moves it by
  ``bias_update_rate * sign(mean_load - load)``, with the load counted since the last update and
  summed over the data-parallel group;
- losses, each with its coefficient (0 = off), all of the form ``sum_e f_e * P_e`` where
  ``f_e = E / (K * tokens) * (pairs routed to e)`` (1 for every expert when balanced) and
  ``P_e`` is the mean over tokens of expert e's score normalised over the E experts:
  micro-batch aux loss (Switch / GShard: f and P over this forward's tokens), sequence-wise aux
  loss (DeepSeek-V3: f and P per sequence, averaged over sequences), global-batch aux loss
  ("Demons in the Detail", Qwen: f from counts summed over the data-parallel group and over the
  micro-batches since the last ``update_bias``, P local) and the router z-loss (ST-MoE:
  ``mean_t logsumexp(logits_t)^2``).

Counting state (load since the last update) lives in non-persistent buffers, accumulated only in
training mode. :meth:`Router.update_bias` is the one per-step call of the balancing machinery:
it sums the step's load over the group, moves the bias, folds the load into the average that
placement planning reads (:meth:`Router.expert_load`) and clears the counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .comm.interleave import in_backward
from .comm.agree import fingerprint
from .comm.transport import ProcessGroupTransport, Transport
from .parallel.mesh import is_dtensor

__all__ = ["Router", "RouterOutput"]

_SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RouterOutput:
    """What :meth:`Router.forward` returns.

    Attributes:
        topk_idx: ``[T, K]`` int64 expert ids in ``[0, E)``, best (biased) first.
        topk_weights: ``[T, K]`` float32, the unbiased scores of the chosen experts, normalised
            to sum 1 if configured, times ``route_scale``; differentiable w.r.t. the gate.
        loss: ``[]`` float32, ``sum coeff * loss`` over the enabled losses (0 if none);
            differentiable, add it to the training loss.
        aux_loss, seq_aux_loss, global_aux_loss, z_loss: ``[]`` float32, detached, the losses
            before their coefficients (0 when off), for logging. Tensors, not floats: no
            device-to-host sync unless the caller asks.
        num_tokens_per_expert: ``[E]`` int64, the pairs this forward routed to each expert
            (this rank only).
    """

    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    loss: torch.Tensor
    aux_loss: torch.Tensor
    seq_aux_loss: torch.Tensor
    global_aux_loss: torch.Tensor
    z_loss: torch.Tensor
    num_tokens_per_expert: torch.Tensor


class Router(nn.Module):
    """Linear gate with (group-limited) top-k selection and load balancing.

    Args:
        hidden: D.
        num_experts: E, routed experts in the whole model (not per rank).
        num_topk: K, experts per token.
        score_func: ``"softmax"`` or ``"sigmoid"``.
        num_groups, num_topk_groups: group-limited routing (DeepSeek-V3): the E experts fall into
            ``num_groups`` equal contiguous groups, a group scores the sum of its top-2 biased
            scores (top-1 when a group holds one expert), and a token picks its K experts inside
            its ``num_topk_groups`` best groups only. ``num_groups=1`` is plain top-k.
        num_nodes, max_nodes_per_token: node-limited routing (DeepSeek-V3): the E experts lie
            contiguously on ``num_nodes`` nodes (expert-parallel group size / ranks per node), a
            node scores the sum of its top ``ceil(K / max_nodes_per_token)`` biased scores, and a
            token picks its K experts on its ``max_nodes_per_token`` best nodes only, so it
            crosses to at most that many nodes. None = no limit. Combines with group-limited
            routing (applied after it) when groups nest inside nodes.
        route_scale: multiplies the weights (DeepSeek-V3 uses 2.5 with sigmoid).
        norm_topk_prob: normalise each token's K weights to sum 1; default True for sigmoid
            (whose scores do not sum to 1), False for softmax.
        bias_update_rate: step of the expert-bias update; 0 keeps the bias at 0.
        aux_loss_coeff: micro-batch (Switch) aux loss coefficient.
        seq_aux_loss_coeff: sequence-wise aux loss coefficient; needs the sequence structure
            (``[B, S, D]`` input or ``seq_len``).
        global_aux_loss_coeff: global-batch aux loss coefficient; costs one all-reduce of
            ``E + 1`` numbers per training forward.
        z_loss_coeff: router z-loss coefficient.
        group: every rank that routes tokens through this router's experts (data parallel x
            expert parallel), whose load counts are summed (bias update, global-batch aux loss,
            load average), so that the bias is the same everywhere; None = the default group
            when torch.distributed is initialised, else no communication.
        transport: the :class:`~moeflow.comm.transport.Transport` the sums go through (its group
            replaces ``group``; a :class:`MoELayer` passes one over its routing ranks). Default: one made over
            ``group`` at the first sum. Either way the sums are watched: a lost peer is named
            within the timeout instead of hanging the update.
        load_ema_decay: decay of the load average :meth:`expert_load` kept by
            :meth:`update_bias` (0 = the last step only).
    """

    def __init__(self, hidden: int, num_experts: int, num_topk: int, *, score_func: str = "softmax",
                 num_groups: int = 1, num_topk_groups: int = 1, route_scale: float = 1.0,
                 norm_topk_prob: Optional[bool] = None, bias_update_rate: float = 0.0,
                 aux_loss_coeff: float = 0.0, seq_aux_loss_coeff: float = 0.0,
                 global_aux_loss_coeff: float = 0.0, z_loss_coeff: float = 0.0,
                 group: Optional[dist.ProcessGroup] = None, num_nodes: int = 1,
                 max_nodes_per_token: Optional[int] = None, load_ema_decay: float = 0.9,
                 transport: Optional[Transport] = None) -> None:
        super().__init__()
        for name, value in (("hidden", hidden), ("num_experts", num_experts), ("num_groups", num_groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Router: `{name}` must be a positive int, got {value!r}")
        if score_func not in _SCORE_FUNCS:
            raise ValueError(f"Router: `score_func` must be one of {_SCORE_FUNCS}, got {score_func!r}")
        if not isinstance(num_topk, int) or not 1 <= num_topk <= num_experts:
            raise ValueError(f"Router: `num_topk` must lie in [1, num_experts={num_experts}], got {num_topk!r}")
        if num_experts % num_groups:
            raise ValueError(f"Router: `num_groups` must divide num_experts={num_experts}, got {num_groups}")
        if not isinstance(num_topk_groups, int) or not 1 <= num_topk_groups <= num_groups:
            raise ValueError(f"Router: `num_topk_groups` must lie in [1, num_groups={num_groups}], "
                             f"got {num_topk_groups!r}")
        if num_topk_groups * (num_experts // num_groups) < num_topk:
            raise ValueError(f"Router: `num_topk`={num_topk} exceeds the "
                             f"{num_topk_groups * (num_experts // num_groups)} experts of "
                             f"num_topk_groups={num_topk_groups} groups of {num_experts // num_groups}")
        self._check_node_limit(num_experts, num_topk, num_groups, num_topk_groups, num_nodes, max_nodes_per_token)
        if not route_scale > 0:
            raise ValueError(f"Router: `route_scale` must be > 0, got {route_scale!r}")
        for name, value in (("bias_update_rate", bias_update_rate), ("aux_loss_coeff", aux_loss_coeff),
                            ("seq_aux_loss_coeff", seq_aux_loss_coeff),
                            ("global_aux_loss_coeff", global_aux_loss_coeff), ("z_loss_coeff", z_loss_coeff)):
            if not value >= 0:
                raise ValueError(f"Router: `{name}` must be >= 0, got {value!r}")
        if not 0.0 <= load_ema_decay < 1.0:
            raise ValueError(f"Router: `load_ema_decay` must lie in [0, 1), got {load_ema_decay!r}")
        self.hidden, self.num_experts, self.num_topk = hidden, num_experts, num_topk
        self.score_func = score_func
        self.num_groups, self.num_topk_groups = num_groups, num_topk_groups
        self.num_nodes = num_nodes
        self.max_nodes_per_token = num_nodes if max_nodes_per_token is None else max_nodes_per_token
        self.route_scale = route_scale
        self.norm_topk_prob = (score_func == "sigmoid") if norm_topk_prob is None else bool(norm_topk_prob)
        self.bias_update_rate = bias_update_rate
        self.aux_loss_coeff, self.seq_aux_loss_coeff = aux_loss_coeff, seq_aux_loss_coeff
        self.global_aux_loss_coeff, self.z_loss_coeff = global_aux_loss_coeff, z_loss_coeff
        self.load_ema_decay = load_ema_decay
        self.num_load_updates = 0
        self.group = transport.group if transport is not None else group
        self.transport = transport
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        # [E] fp32, saved with the model, not trained: used for selection only. Kept fp32 through
        # module.to(dtype) (see _apply): an update of 1e-3 vanishes next to a bias of 1 in bf16.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        # [E] int64: pairs routed to each expert on this rank since the last update_bias()
        self.register_buffer("num_tokens_per_expert_since_update", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)
        # [E + 1] int64: the same summed over the group, then the token count: the global-batch
        # aux loss's frequencies (only counted while that loss is on)
        self.register_buffer("global_counts_since_update", torch.zeros(num_experts + 1, dtype=torch.int64),
                             persistent=False)
        # [E] fp32: EMA over update_bias calls of the group's pairs per expert per step (fp32 like
        # the bias: counts past 256 lose integers in bf16)
        self.register_buffer("expert_load_ema", torch.zeros(num_experts), persistent=False)

    @staticmethod
    def _check_node_limit(E: int, K: int, G: int, num_topk_groups: int, num_nodes: int,
                          max_nodes_per_token: Optional[int]) -> None:
        if not isinstance(num_nodes, int) or num_nodes < 1 or E % num_nodes:
            raise ValueError(f"Router: `num_nodes` must be a positive int dividing num_experts={E}, got {num_nodes!r}")
        if max_nodes_per_token is None:
            return
        M = max_nodes_per_token
        if not isinstance(M, int) or not 1 <= M <= num_nodes:
            raise ValueError(f"Router: `max_nodes_per_token` must lie in [1, num_nodes={num_nodes}], got {M!r}")
        if M * (E // num_nodes) < K:
            raise ValueError(f"Router: `num_topk`={K} exceeds the {M * (E // num_nodes)} experts of "
                             f"max_nodes_per_token={M} nodes of {E // num_nodes}")
        if M < num_nodes and num_topk_groups < G and (G % num_nodes or num_topk_groups > M * (G // num_nodes)):
            # Otherwise a kept group could straddle a dropped node, or more groups be wanted than
            # the kept nodes hold.
            raise ValueError(f"Router: group-limited routing (num_groups={G}, num_topk_groups={num_topk_groups}) "
                             f"combines with max_nodes_per_token={M} only when num_nodes={num_nodes} divides "
                             f"num_groups and num_topk_groups <= max_nodes_per_token * num_groups / num_nodes")

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() cast floating buffers too; the bias and the load average
        # keep their fp32 values (device moves still apply).
        keep = {name: getattr(self, name) for name in ("expert_bias", "expert_load_ema")}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, old.to(device=getattr(self, name).device))
        return self

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, seq_len: Optional[int] = None) -> RouterOutput:
        """Route ``x``.

        Args:
            x: ``[T, D]``, or ``[..., S, D]`` (e.g. ``[B, S, D]``) which also gives the sequence
                length S for the sequence-wise aux loss; any dtype (routing runs in fp32).
            seq_len: S for a flattened ``[B * S, D]`` input; overrides the shape's S.

        Returns:
            :class:`RouterOutput` over the flattened T tokens. In training mode the pairs are
            added to the counts :meth:`update_bias` consumes (once: a forward recomputed by
            activation checkpointing inside backward is not counted again); in eval mode losses
            are 0 and nothing is counted or communicated.
        """
        D = x.size(-1)
        if D != self.hidden:
            raise ValueError(f"Router: `x` must end in hidden={self.hidden}, got shape {list(x.shape)}")
        if seq_len is None and x.dim() >= 3:
            seq_len = x.size(-2)
        x_TD = x.reshape(-1, D)
        T, E, K = x_TD.size(0), self.num_experts, self.num_topk
        if seq_len is not None and (seq_len < 1 or T % seq_len):
            raise ValueError(f"Router: `seq_len` must be positive and divide the {T} tokens, got {seq_len}")
        if self.training and self.seq_aux_loss_coeff and seq_len is None:
            raise ValueError("Router: `seq_len` is needed for seq_aux_loss_coeff > 0: pass x as [B, S, D] "
                             "or seq_len=S")

        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        scores_TE = logits_TE.softmax(-1) if self.score_func == "softmax" else logits_TE.sigmoid()
        topk_idx = self._select(scores_TE.detach() + self.expert_bias)      # [T, K] int64
        topk_weights = scores_TE.gather(1, topk_idx)                          # [T, K] fp32, unbiased
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            topk_weights = topk_weights * self.route_scale
        # scatter_add, not bincount: no device-to-host sync on CUDA
        flat_idx = topk_idx.flatten()
        counts_E = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat_idx, torch.ones_like(flat_idx))

        zero = logits_TE.new_zeros(())
        aux, seq_aux, glob, z = zero, zero, zero, zero
        if self.training:
            # a forward inside backward is activation checkpointing's recomputation: its tokens
            # were counted (and summed over the group) by the first forward already
            recomputing = in_backward()
            if not recomputing:
                with torch.no_grad():
                    self.num_tokens_per_expert_since_update += counts_E
            # P_e's per-token terms: scores normalised over the E experts (softmax already is)
            probs_TE = scores_TE if self.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            if self.aux_loss_coeff and T:
                aux = (counts_E * (E / (K * T)) * probs_TE.mean(0)).sum()
            if self.seq_aux_loss_coeff and T:
                seq_aux = self._seq_aux_loss(topk_idx, probs_TE, seq_len)
            if self.global_aux_loss_coeff:  # even with T = 0: every rank joins the all-reduce
                glob = self._global_aux_loss(counts_E, probs_TE, recomputing)
            if self.z_loss_coeff and T:
                z = torch.logsumexp(logits_TE, -1).square().mean()
        loss = (self.aux_loss_coeff * aux + self.seq_aux_loss_coeff * seq_aux
                + self.global_aux_loss_coeff * glob + self.z_loss_coeff * z)
        return RouterOutput(topk_idx=topk_idx, topk_weights=topk_weights, loss=loss,
                            aux_loss=aux.detach(), seq_aux_loss=seq_aux.detach(),
                            global_aux_loss=glob.detach(), z_loss=z.detach(), num_tokens_per_expert=counts_E)

    def _select(self, biased_TE: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` biased scores -> ``[T, K]`` int64 ids, restricted to the best nodes and groups."""
        E = biased_TE.size(1)
        G, N, M = self.num_groups, self.num_nodes, self.max_nodes_per_token
        if M < N:  # a node scores its ceil(K / M) best experts
            biased_TE = _keep_best_blocks(biased_TE, N, min(-(-self.num_topk // M), E // N), M)
        if self.num_topk_groups < G:  # a group scores its top-2
            biased_TE = _keep_best_blocks(biased_TE, G, min(2, E // G), self.num_topk_groups)
        return biased_TE.topk(self.num_topk, dim=-1).indices

    def _seq_aux_loss(self, topk_idx: torch.Tensor, probs_TE: torch.Tensor, S: int) -> torch.Tensor:
        T, K = topk_idx.shape
        E, B = self.num_experts, T // S
        counts_BE = torch.zeros(B, E, device=probs_TE.device).scatter_add_(
            1, topk_idx.view(B, S * K), torch.ones(B, S * K, device=probs_TE.device))
        f_BE = counts_BE * (E / (K * S))
        return (f_BE * probs_TE.view(B, S, E).mean(1)).sum(1).mean()

    def _global_aux_loss(self, counts_E: torch.Tensor, probs_TE: torch.Tensor, recomputing: bool) -> torch.Tensor:
        T = probs_TE.size(0)
        if not recomputing:  # recomputed: the frequencies are the first forward's (every rank skips alike)
            counts = torch.cat([counts_E, counts_E.new_tensor([T])])             # [E + 1] int64
            if self._group_size() > 1:
                # the global batch's expert frequencies need every rank's counts (not differentiable)
                self._sum(counts)
            with torch.no_grad():
                self.global_counts_since_update += counts
        E, K = self.num_experts, self.num_topk
        total = self.global_counts_since_update
        f_E = total[:E] * (E / K) / total[E].clamp(min=1)
        return (f_E * probs_TE.sum(0)).sum() / max(T, 1)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ``group`` in place, through the (watched, counted) transport."""
        if self.transport is None:
            self.transport = ProcessGroupTransport(self.group)
        return self.transport.all_reduce(tensor, kind="router_load")

    def _group_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1

    def _gate_fingerprints(self, R: int) -> torch.Tensor:
        """``[R]`` int64, zero but for this rank's entry: a positive hash of the gate's bits (0
        when the gate is a DTensor, sharded and kept in sync by FSDP2)."""
        out = torch.zeros(R, dtype=torch.int64, device=self.expert_bias.device)
        w = self.gate.weight
        if is_dtensor(w):
            return out
        out[dist.get_rank(self.group)] = fingerprint(w).to(out.device) + 1
        return out

    def _check_same_gate(self, fingerprints: list[int]) -> None:
        versions: dict[int, list[int]] = {}
        for r, h in enumerate(fingerprints):
            if h:
                versions.setdefault(h, []).append(r)
        if len(versions) < 2:
            return
        ranks = dist.get_process_group_ranks(self.group if self.group is not None else dist.group.WORLD)
        held = "; ".join(f"ranks {[ranks[r] for r in rs]} hold one version" for rs in versions.values())
        raise ValueError(f"Router.update_bias: the router gate differs between the ranks that route tokens ({held}; "
                         f"this is rank {dist.get_rank()}). It is replicated, and nothing keeps replicated "
                         "parameters in sync: call moeflow.parallelize(model, mesh) before training (FSDP2 "
                         "over the data-parallel ranks), or average their gradients over the group yourself, "
                         "and build the model from the same seed on every rank")

    # ------------------------------------------------------------------------------- per step
    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """The per-step hook of load balancing; call once per optimizer step (after it), on every
        rank of ``group``, also with ``bias_update_rate = 0`` whenever the global-batch aux loss
        or placement planning is used.

        Sums the load counted since the last call over the group, moves the expert bias by
        ``bias_update_rate * sign(mean_load - load)`` (identically on every rank), folds the load
        into :meth:`expert_load`, and clears the counts, the global-batch aux loss's included.

        The same all-reduce carries a fingerprint of each rank's gate weight: the gate is
        replicated over the group, and one that differs between ranks (nothing averages the
        replicated parameters' gradients, or the ranks started from different weights) raises
        here instead of training on silently. Gates sharded by FSDP2 are not checked: FSDP keeps
        them in sync.

        Returns:
            ``[E]`` int64, the summed load (pairs per expert) that drove the update.

        Raises:
            ValueError: on every rank, naming the ranks whose gates differ.
        """
        load_E = self.num_tokens_per_expert_since_update.clone()
        R = self._group_size()
        if R > 1:
            # every rank must apply the same update: the load of the whole data-parallel batch;
            # [R] more int64 carry each rank's gate fingerprint (0 = not checked) in its own slot
            E = self.num_experts
            summed = self._sum(torch.cat([load_E, self._gate_fingerprints(R)]))
            load_E = summed[:E]
            self._check_same_gate(summed[E:].tolist())  # host sync: R ints
        if self.bias_update_rate:
            load = load_E.float()
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        decay = self.load_ema_decay if self.num_load_updates else 0.0
        self.expert_load_ema.mul_(decay).add_(load_E.to(self.expert_load_ema), alpha=1.0 - decay)
        self.num_load_updates += 1
        self.num_tokens_per_expert_since_update.zero_()
        self.global_counts_since_update.zero_()
        return load_E

    def expert_load(self) -> torch.Tensor:
        """``[E]`` float32, the group's pairs per expert per step, averaged over the
        :meth:`update_bias` calls (EMA with ``load_ema_decay``): what placement planning balances."""
        return self.expert_load_ema.clone()


def _keep_best_blocks(scores_TE: torch.Tensor, num_blocks: int, top_n: int, keep: int) -> torch.Tensor:
    """Split the E experts into ``num_blocks`` equal contiguous blocks (nodes or groups), score a
    block by the sum of its ``top_n`` best scores, and set every expert outside a token's ``keep``
    best blocks to ``-inf``."""
    T, E = scores_TE.shape
    scores_TBE = scores_TE.view(T, num_blocks, E // num_blocks)
    block_scores_TB = scores_TBE.topk(top_n, dim=-1).values.sum(-1)
    keep_TB = torch.zeros(T, num_blocks, dtype=torch.bool, device=scores_TE.device)
    keep_TB.scatter_(1, block_scores_TB.topk(keep, dim=-1).indices, True)
    return scores_TBE.masked_fill(~keep_TB.unsqueeze(-1), float("-inf")).view(T, E)
