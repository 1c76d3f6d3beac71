"""Single-process reference for dispatch and combine, written as plain loops.

Built from every rank's inputs gathered in one process; never calls the code under test.
"""

from __future__ import annotations

import torch


def ref_dispatch(xs, topk_idxs, topk_weights, num_experts, alignment=1):
    """Per destination rank: rows, local ids, weights, per-expert counts, (src, token) of each row.

    xs[r]: [N_r, H] tensor (or an (fp8, scales) tuple: rows are taken from both).
    """
    R = len(xs)
    L = num_experts // R
    out = []
    for dst in range(R):
        rows, scales, idx_rows, w_rows, origin = [], [], [], [], []
        for src in range(R):
            x = xs[src]
            x_data, x_scales = x if isinstance(x, tuple) else (x, None)
            for t in range(x_data.size(0)):
                experts = [int(e) for e in topk_idxs[src][t]]
                if not any(e >= 0 and e // L == dst for e in experts):
                    continue
                rows.append(x_data[t])
                if x_scales is not None:
                    scales.append(x_scales[t])
                local = [e - dst * L if e >= 0 and e // L == dst else -1 for e in experts]
                idx_rows.append(local)
                if topk_weights is not None:
                    w_rows.append([float(topk_weights[src][t][k]) if local[k] >= 0 else 0.0
                                   for k in range(len(experts))])
                origin.append((src, t))
        K = topk_idxs[0].size(1)
        H = (xs[0][0] if isinstance(xs[0], tuple) else xs[0]).size(1)
        dtype = (xs[0][0] if isinstance(xs[0], tuple) else xs[0]).dtype
        recv_x = torch.stack(rows) if rows else torch.empty(0, H, dtype=dtype)
        recv_scales = torch.stack(scales) if scales else torch.empty(0, H // 128)
        recv_idx = torch.tensor(idx_rows, dtype=torch.int64).view(-1, K)
        recv_w = torch.tensor(w_rows, dtype=torch.float32).view(-1, K) if topk_weights is not None else None
        counts = [0] * L
        for row in idx_rows:
            for e in row:
                if e >= 0:
                    counts[e] += 1
        counts = [(c + alignment - 1) // alignment * alignment for c in counts]
        out.append(dict(recv_x=recv_x, recv_scales=recv_scales, recv_topk_idx=recv_idx,
                        recv_topk_weights=recv_w, counts=counts, origin=origin))
    return out


def ref_combine(ys, origins, num_tokens, hidden, dtype, weights=None):
    """ys[d]: [M_d, H] rows on rank d; origins[d]: (src, token) per row.

    Sums in fp32, adding the copies in rank order (as the fast path does), then casts to ``dtype``.
    """
    R = len(ys)
    acc = [torch.zeros(num_tokens[s], hidden, dtype=torch.float32) for s in range(R)]
    wacc = None
    if weights is not None:
        K = weights[0].size(1)
        wacc = [torch.zeros(num_tokens[s], K, dtype=torch.float32) for s in range(R)]
    for d in range(R):
        for i, (s, t) in enumerate(origins[d]):
            acc[s][t] += ys[d][i].float()
            if wacc is not None:
                wacc[s][t] += weights[d][i].float()
    combined = [a.to(dtype) for a in acc]
    return combined, wacc


def random_layer_weights(E, D, FF, seed=0):
    """Global weights for a :class:`moeflow.MoELayer` with one shared expert, in the order of
    ``load_global_weights``: ``(gate [E, D], w1 [E, D, F], w2 [E, F, D], w3 [E, D, F], shared)``."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, D, generator=g) * 0.3
    w1, w3 = (torch.randn(E, D, FF, generator=g) * 0.2 for _ in range(2))
    w2 = torch.randn(E, FF, D, generator=g) * 0.2
    shared = tuple(torch.randn(*s, generator=g) * 0.2 for s in ((D, FF), (FF, D), (D, FF)))
    return gate, w1, w2, w3, shared
