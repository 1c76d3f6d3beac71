"""DeepEP conformance: the calls and checks of DeepEP's own tests, on Gloo at 2 and 4 ranks.

Mirrors deepseek-ai/DeepEP at commit 567632d (V1, the last commit before V2; upstream keeps these
tests as tests/legacy/): ``test_main`` of tests/test_intranode.py and of tests/test_low_latency.py,
and the ``handle[-4]`` check of tests/test_internode.py; and for V2's ElasticBuffer
``test_dispatch_combine`` of tests/elastic/test_ep.py at deepseek-ai/DeepEP@dd758ca. The calls,
their arguments and the properties checked follow upstream (sizes are small); each test is named
after the upstream check it mirrors. The code is ours. docs/deep_ep.md reports DeepEP's own test
files run against moeflow.

Each rank count is spawned once (a module fixture); every rank runs all scenarios and records
each named check, and the tests below read the records: a test fails if its check failed on any
rank, or never ran.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
import torch.distributed as dist

import moeflow as deep_ep  # the one import change DeepEP code makes
from moeflow import spawn
from moeflow.quant import per_token_cast_back, per_token_cast_to_fp8

UPSTREAM = "deepseek-ai/DeepEP@567632d (V1) / @dd758ca (V2)"


class _Checks:
    """name -> [times evaluated, failure details]."""

    def __init__(self):
        self.results: dict[str, list] = {}

    def __call__(self, name: str, ok, detail: str = "") -> None:
        entry = self.results.setdefault(name, [0, []])
        entry[0] += 1
        if not bool(ok):
            entry[1].append(detail)

    def raises(self, name: str, exc: type, fn, must_mention: str = "") -> None:
        try:
            fn()
        except exc as e:
            self(name, must_mention in str(e), f"message lacks {must_mention!r}: {e}")
            return
        except Exception as e:  # the wrong error is a failure too
            self(name, False, f"raised {type(e).__name__}: {e}")
            return
        self(name, False, f"did not raise {exc.__name__}")


def _gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Upstream's ``calc_diff``: 1 - the cosine-like similarity of x + 1 and y + 1, in float64."""
    x, y = x.double() + 1, y.double() + 1
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def _fp8(x: torch.Tensor):
    """Upstream's FP8 input: per-token cast, scales handed over column-major."""
    x_fp8, scales = per_token_cast_to_fp8(x)
    return x_fp8, scales.T.contiguous().T


def _bf16(recv_x) -> torch.Tensor:
    return per_token_cast_back(*recv_x, dtype=torch.bfloat16) if isinstance(recv_x, tuple) else recv_x


def _blocks_hold_their_rank(check, name, rows: torch.Tensor, ends: list[int]):
    """Upstream's ``check_data``: each row constant, the rows of block i (up to ends[i]) equal i."""
    check(name, torch.equal(rows.amin(dim=1), rows.amax(dim=1)), "a row is not constant")
    start = 0
    for i, end in enumerate(ends):
        check(name, (rows[start:end].int() - i).sum().item() == 0, f"rows {start}:{end} are not {i}")
        start = end


# ----------------------------------------------------------------------------- intranode
def _intranode(check: _Checks, buffer: deep_ep.Buffer, group) -> None:
    rank, R = dist.get_rank(), dist.get_world_size()
    N, H, K, E = 48, 256, 6, 32
    L = E // R
    torch.manual_seed(rank)
    x = torch.ones(N, H, dtype=torch.bfloat16) * rank
    x_pure_rand = torch.randn(N, H, dtype=torch.bfloat16)
    x_e4m3 = _fp8(x) if deep_ep.Buffer.is_sm90_compiled() else None
    scores = torch.randn(N, E, dtype=torch.float32).abs() + 1
    topk_idx = torch.topk(scores, K, dim=-1, largest=True, sorted=False)[1].to(deep_ep.topk_idx_t)
    topk_weights = torch.ones(N, K, dtype=torch.float32) * rank
    topk_weights_pure_rand = torch.randn(N, K, dtype=torch.float32)

    # Reference layout, built independently of the Buffer
    num_tokens_per_expert = torch.bincount(topk_idx.flatten(), minlength=E).to(torch.int)
    is_token_in_rank = torch.zeros(N, R, dtype=torch.bool)
    is_token_in_rank.scatter_(1, topk_idx // L, True)
    num_tokens_per_rank = is_token_in_rank.sum(0).to(torch.int)
    gbl_num_tokens_per_expert = num_tokens_per_expert.clone()
    dist.all_reduce(gbl_num_tokens_per_expert, group=group)
    gbl_num_tokens_per_rank = num_tokens_per_rank.clone()
    dist.all_reduce(gbl_num_tokens_per_rank, group=group)
    all_x = [torch.empty_like(x_pure_rand) for _ in range(R)]
    dist.all_gather(all_x, x_pure_rand, group=group)

    ref_per_rank, ref_per_rdma_rank, ref_per_expert, ref_in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    check("get_dispatch_layout", torch.equal(ref_per_rank, num_tokens_per_rank), "num_tokens_per_rank")
    check("get_dispatch_layout", torch.equal(ref_per_expert, num_tokens_per_expert), "num_tokens_per_expert")
    check("get_dispatch_layout", torch.equal(ref_in_rank, is_token_in_rank), "is_token_in_rank")
    check("get_dispatch_layout", ref_per_rdma_rank is None, "one node: no per-node counts")

    config = deep_ep.Config(24, 8, 256)
    for previous_mode in (False, True):
        for async_mode in (False, True):
            for current_x in [t for t in (x_pure_rand, x, x_e4m3) if t is not None]:
                for with_topk in (False, True):
                    is_rand = current_x is x_pure_rand
                    args = dict(x=current_x, num_tokens_per_rank=num_tokens_per_rank,
                                is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                                config=config, async_finish=async_mode)
                    if with_topk:
                        args.update(topk_idx=topk_idx, topk_weights=topk_weights_pure_rand if is_rand else topk_weights)
                    if previous_mode:
                        args.update(previous_event=buffer.capture())
                    recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event = buffer.dispatch(**args)
                    event.current_stream_wait() if async_mode else ()
                    recv_x = _bf16(recv_x)
                    M = recv_x.size(0)

                    rank_prefix_matrix = handle[0]
                    check("dispatch_recv_rows", gbl_num_tokens_per_rank[rank].item() == M, f"{M} rows")
                    expected = gbl_num_tokens_per_expert.view(R, -1)[rank].tolist()
                    check("dispatch_expert_counts", expected == per_expert_list,
                          f"with_topk={with_topk}: {per_expert_list}")
                    if not is_rand:
                        _blocks_hold_their_rank(check, "dispatch_rank_prefix_matrix", recv_x,
                                                rank_prefix_matrix[:, rank].tolist())
                    _handle_tuple(check, handle, recv_x, all_x if is_rand else None, is_token_in_rank, rank, R)

                    weights_clone = None
                    if with_topk:
                        valid = recv_topk_idx.eq(-1) | ((recv_topk_idx >= 0) & (recv_topk_idx < L))
                        check("recv_topk_idx", valid.all().item(), "ids outside [-1, L)")
                        for i, count in enumerate(per_expert_list):
                            check("recv_topk_idx", recv_topk_idx.eq(i).sum().item() == count, f"expert {i}")
                        weights_clone = recv_topk_weights.clone()
                        if not is_rand:  # in place, as upstream: the combine below sends these
                            none = recv_topk_idx.eq(-1)
                            recv_topk_weights[none] = recv_topk_weights.amax(dim=1, keepdim=True).expand_as(
                                recv_topk_weights)[none]
                            _blocks_hold_their_rank(check, "recv_topk_weights", recv_topk_weights,
                                                    rank_prefix_matrix[:, rank].tolist())

                        # num_worst_tokens: exactly W rows, -1 ids past the real ones, no per-expert list
                        W = N * R
                        worst_x, worst_idx, worst_w, empty_list, _, event = buffer.dispatch(**args, num_worst_tokens=W)
                        event.current_stream_wait() if async_mode else ()
                        worst_x = _bf16(worst_x)
                        name = "num_worst_tokens"
                        check(name, len(empty_list) == 0, f"list {empty_list}")
                        check(name, W == worst_x.size(0) == worst_idx.size(0) == worst_w.size(0), "row count")
                        check(name, torch.equal(recv_x, worst_x[:M]), "recv_x prefix")
                        check(name, torch.equal(recv_topk_idx, worst_idx[:M]), "recv_topk_idx prefix")
                        check(name, torch.equal(weights_clone, worst_w[:M]), "recv_topk_weights prefix")
                        check(name, torch.all(worst_idx[M:] == -1).item(), "padding ids")

                    if not with_topk:  # cached dispatch, without top-k
                        cached = dict(x=current_x, handle=handle, config=config, async_finish=async_mode)
                        if previous_mode:
                            cached.update(previous_event=buffer.capture())
                        cached_x, _, _, _, _, event = buffer.dispatch(**cached)
                        event.current_stream_wait() if async_mode else ()
                        cached_x = _bf16(cached_x)
                        check("cached_dispatch", torch.equal(cached_x, recv_x), "differs from the fresh dispatch")
                        if not is_rand:
                            _blocks_hold_their_rank(check, "cached_dispatch", cached_x,
                                                    rank_prefix_matrix[:, rank].tolist())

                    combine_args = dict(x=recv_x, handle=handle, config=config, async_finish=async_mode)
                    if with_topk:
                        combine_args.update(topk_weights=recv_topk_weights)
                    if previous_mode:
                        combine_args.update(previous_event=buffer.capture())
                    combined_x, combined_w, event = buffer.combine(**combine_args)
                    event.current_stream_wait() if async_mode else ()
                    copies = is_token_in_rank.sum(dim=1).unsqueeze(1)
                    ref_x = x_pure_rand if is_rand else x
                    gap = _gap(combined_x.float() / copies, ref_x)
                    check("combine", gap < 5e-6, f"x gap {gap}")
                    if with_topk:
                        got = combined_w if is_rand else combined_w / copies
                        gap = _gap(got, topk_weights_pure_rand if is_rand else topk_weights)
                        check("combine_topk_weights", gap < 1e-9, f"weights gap {gap}")

    # Tuning section: other Configs and the default ones change nothing a call returns
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=num_tokens_per_rank,
                                                 is_token_in_rank=is_token_in_rank,
                                                 num_tokens_per_expert=num_tokens_per_expert, config=config)
    deep_ep.Buffer.set_num_sms(24)
    for cfg in (deep_ep.Config(24, 4, 256), deep_ep.Buffer.get_dispatch_config(R)):
        again, *_ = buffer.dispatch(x, handle=handle, config=cfg)
        check("config_tuning", torch.equal(again, recv_x), f"dispatch with {cfg}")
    ref_combined, _, _ = buffer.combine(recv_x, handle)
    for cfg in (deep_ep.Config(24, 1, 256), deep_ep.Buffer.get_combine_config(R)):
        combined, _, _ = buffer.combine(recv_x, handle, config=cfg)
        check("config_tuning", torch.equal(combined, ref_combined), f"combine with {cfg}")

    # A W below what a rank receives is an error on every rank (DeepEP: a device assert)
    check.raises("num_worst_tokens_too_small", ValueError, lambda: buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, num_worst_tokens=1), "num_worst_tokens")


def _handle_tuple(check, handle, recv_x, all_x, is_token_in_rank, rank, R):
    """DeepEP's intranode handle as a 6-tuple, each entry with the meaning docs/deep_ep.md gives."""
    name = "handle_tuple"
    entries = tuple(handle)
    check(name, len(handle) == 6 and len(entries) == 6, f"{len(handle)} entries")
    rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, in_rank, send_head = handle
    M = recv_x.size(0)
    check(name, rank_prefix_matrix.dtype == torch.int32 and rank_prefix_matrix.shape == (R, R), "rank_prefix_matrix")
    check(name, rank_prefix_matrix[-1, rank].item() == M, "rank_prefix_matrix total")
    sent = is_token_in_rank.sum(0).to(torch.int32)
    check(name, torch.equal(rank_prefix_matrix[rank] - (rank_prefix_matrix[rank - 1] if rank else 0), sent),
          "this rank's row of rank_prefix_matrix")
    check(name, torch.equal(channel_prefix_matrix, sent.view(R, 1)), "channel_prefix_matrix")
    check(name, torch.equal(recv_channel_prefix_matrix, torch.zeros(R, 1, dtype=torch.int32)), "recv_channel_prefix")
    check(name, in_rank is handle.is_token_in_rank and torch.equal(in_rank, is_token_in_rank), "is_token_in_rank")
    for r in range(R):
        picked = send_head[is_token_in_rank[:, r], r]
        check(name, torch.equal(picked, torch.arange(picked.numel(), dtype=torch.int32)), f"send_head to {r}")
        check(name, (send_head[~is_token_in_rank[:, r], r] == -1).all().item(), f"send_head -1 for {r}")
    check(name, recv_src_idx.dtype == torch.int32 and recv_src_idx.shape == (M,), "recv_src_idx shape")
    if all_x is not None:  # row i is token recv_src_idx[i] of the rank whose block holds it
        per_source = torch.diff(rank_prefix_matrix[:, rank], prepend=torch.zeros(1, dtype=torch.int32))
        source = torch.repeat_interleave(torch.arange(R), per_source)
        expect = torch.stack([all_x[s][t] for s, t in zip(source.tolist(), recv_src_idx.tolist())]) if M else recv_x
        check(name, torch.equal(recv_x, expect), "recv_src_idx does not name the rows' tokens")


# ----------------------------------------------------------------------------- internode
def _internode(check: _Checks, group) -> None:
    """test_internode.py's ``check_data(recv_x, handle[-4])`` on a node-aware Buffer (2 nodes)."""
    rank, R = dist.get_rank(), dist.get_world_size()
    P = R // 2
    buffer = deep_ep.Buffer(group, int(1e9), int(1e9), ranks_per_node=P)
    N, H, K, E = 40, 256, 4, 16
    torch.manual_seed(100 + rank)
    x = torch.ones(N, H, dtype=torch.bfloat16) * rank
    topk_idx = torch.topk(torch.rand(N, E), K, dim=-1)[1]
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    check("internode_layout", torch.equal(per_node, in_rank.view(N, 2, P).any(2).sum(0).to(torch.int)), "per node")
    for W in (0, N * R):
        for fp8 in (False, True):
            recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
                _fp8(x) if fp8 else x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                topk_weights=torch.ones(N, K), num_worst_tokens=W, config=deep_ep.Config(24, 8, 512, 16, 128))
            recv_x = _bf16(recv_x)
            recv_gbl_rank_prefix_sum = handle[-4]
            M = recv_gbl_rank_prefix_sum[-1].item()
            check("internode_handle", len(handle) == 10, f"{len(handle)} entries")
            check("internode_handle", handle[0] is handle.is_token_in_rank, "entry 0 is is_token_in_rank")
            _blocks_hold_their_rank(check, "internode_recv_gbl_rank_prefix_sum", recv_x[:M],
                                    recv_gbl_rank_prefix_sum.tolist())
            if W:
                check("internode_num_worst_tokens", recv_x.size(0) == W and counts == [], "rows / list")
                check("internode_num_worst_tokens", (recv_idx[M:] == -1).all().item(), "padding ids")
            combined, _, _ = buffer.combine(recv_x, handle)
            gap = _gap(combined.float() / in_rank.sum(1, keepdim=True), x)
            check("internode_combine", gap < 5e-6, f"gap {gap}")
    # DeepEP's explicit internode entry points are the same calls here
    args = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=topk_idx)
    recv_x, *_, handle, _ = buffer.dispatch(x, **args)
    again, *_, handle2, _ = buffer.internode_dispatch(x, None, *args.values())
    check("internode_entry_points", torch.equal(recv_x, again), "internode_dispatch")
    check("internode_entry_points", torch.equal(buffer.combine(recv_x, handle)[0],
                                                buffer.internode_combine(again, handle2)[0]), "internode_combine")


# ----------------------------------------------------------------------------- low latency
def _low_latency(check: _Checks, buffer: deep_ep.Buffer, group) -> None:
    rank, R = dist.get_rank(), dist.get_world_size()
    N, H, K = 16, 512, 4
    E = 6 * R
    L = E // R
    torch.manual_seed(1 + rank)
    rng = random.Random(1 + rank)
    rank_offset = 128  # upstream: values rank - 128 stay exact in bf16 and FP8
    x = torch.ones(N, H, dtype=torch.bfloat16) * (rank - rank_offset)
    x[:, -128:] = torch.arange(N).to(torch.bfloat16).view(-1, 1)
    x_list = [x, torch.randn(N, H, dtype=torch.bfloat16) * 0.1]
    topk_idx = torch.topk(torch.randn(N, E).abs() + 1, K, dim=-1, largest=True, sorted=True)[1].to(deep_ep.topk_idx_t)
    topk_weights = torch.randn(N, K, dtype=torch.float32).abs()
    for _ in range(3):
        topk_idx[rng.randint(0, N - 1), rng.randint(0, K - 1)] = -1
    gathered = [torch.empty_like(topk_idx) for _ in range(R)]
    dist.all_gather(gathered, topk_idx, group=group)  # upstream: all_gather_into_tensor, [R, N, K]
    all_topk_idx = torch.stack(gathered)

    num_times = 0
    for current_x in x_list:
        for return_recv_hook in (False, True):
            for use_fp8 in (False, True):
                for round_scale in (False, True) if use_fp8 else (False,):
                    for use_ue8m0 in (False, True) if round_scale else (False,):
                        num_times += 1
                        for _ in range(num_times % 2 + 1):
                            stats = torch.zeros(L, dtype=torch.int)
                            packed_recv_x, packed_recv_count, handle, event, hook = buffer.low_latency_dispatch(
                                current_x, topk_idx, N, E, use_fp8=use_fp8, round_scale=round_scale,
                                use_ue8m0=use_ue8m0, cumulative_local_expert_recv_stats=stats,
                                async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
                            hook() if return_recv_hook else event.current_stream_wait()
                        check("ll_handle_tuple", len(handle) == 5 and tuple(handle)[2:] == (N, H, E), "entries")
                        if use_fp8:
                            scales = packed_recv_x[1]
                            want = (L, R * N, H // 512) if use_ue8m0 else (L, R * N, H // 128)
                            check("ll_scales_layout", scales.shape == want and scales.stride(1) == 1
                                  and scales.dtype == (torch.int32 if use_ue8m0 else torch.float32),
                                  f"{scales.dtype} {tuple(scales.shape)} strides {scales.stride()}")
                            packed_recv_x = (packed_recv_x[0], scales.contiguous())
                            gemm_x = _ll_cast_back(packed_recv_x[0].view(-1, H),
                                                   packed_recv_x[1].view(-1, scales.size(-1)))
                            gemm_x = gemm_x.view(packed_recv_x[0].shape)
                        else:
                            gemm_x = packed_recv_x.clone()
                        for i in range(L):
                            expert_id = rank * L + i
                            recv = (_ll_cast_back(packed_recv_x[0][i], packed_recv_x[1][i]) if use_fp8
                                    else packed_recv_x[i])
                            count = packed_recv_count[i].item()
                            src_info, layout_range = handle[0][i], handle[1][i]
                            check("ll_recv_stats", stats[i].item() == count, f"expert {i}")
                            check("ll_layout_range", count == (layout_range & 0xFFFFFFFF).sum().item(), f"expert {i}")
                            check("ll_recv_count", count == (all_topk_idx == expert_id).sum().item(), f"expert {i}")
                            if count == 0 or current_x is not x:
                                continue
                            rows = recv[:count]
                            amin = rows[:, :-128].amin(dim=-1)
                            check("ll_recv_data", torch.equal(amin, rows[:, :-128].amax(dim=-1)), "row not constant")
                            if round_scale:
                                gap = _gap(rows[:, -1], src_info[:count].view(-1))
                                check("ll_recv_data", gap < 0.007, f"token ids gap {gap}")
                            else:
                                ids_diff = rows[:, -128:] - src_info[:count].view(-1, 1) % N
                                check("ll_recv_data", ids_diff.sum().item() == 0, "token ids")
                                for j in range(R):
                                    begin, n = (layout_range[j] >> 32).item(), (layout_range[j] & 0xFFFFFFFF).item()
                                    check("ll_recv_data", (amin == j - rank_offset).sum().item()
                                          == (all_topk_idx[j] == expert_id).sum().item(), f"rows from {j}")
                                    block = rows[begin:begin + n, :-128] - j + rank_offset
                                    check("ll_recv_data", block.sum().item() == 0, f"block of {j}")

                        for zero_copy in (False, True):
                            if zero_copy:
                                buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = gemm_x
                            out = torch.empty(N, H, dtype=torch.bfloat16)
                            combined_x, event, hook = buffer.low_latency_combine(
                                gemm_x, topk_idx, topk_weights, handle, async_finish=not return_recv_hook,
                                zero_copy=zero_copy, return_recv_hook=return_recv_hook, out=out)
                            hook() if return_recv_hook else event.current_stream_wait()
                            ref = current_x * topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1).view(-1, 1)
                            name = "ll_combine_zero_copy" if zero_copy else "ll_combine"
                            check(name, torch.isnan(combined_x).sum().item() == 0, "NaN")
                            check(name, combined_x is out, "not written into `out`")
                            if not round_scale:
                                gap = _gap(ref, combined_x)
                                check(name, gap < (9e-4 if use_fp8 else 1e-5), f"gap {gap} fp8={use_fp8}")

    # The static-shape path (what GPUs run; CPU trims to the used slots) returns the same
    # slots, FP8 scales column-major and UE8M0-packed included
    ll = buffer._low_latency
    for use_ue8m0 in (False, True):
        outs = []
        for trim in (True, False):
            ll.trim_on_cpu = trim
            (fp8_x, scales), count, handle, _, _ = buffer.low_latency_dispatch(
                x, topk_idx, N, E, use_fp8=True, round_scale=use_ue8m0, use_ue8m0=use_ue8m0)
            outs.append([(fp8_x[i, :c].view(torch.uint8).clone(), scales[i, :c].clone(), tuple(scales.stride()))
                         for i, c in enumerate(count.tolist())])
        ll.trim_on_cpu = True
        check("ll_static_path", all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
                                    for a, b in zip(*outs)), f"ue8m0={use_ue8m0}")

    # zero_copy reads the buffer, not x (upstream passes the same data both ways)
    _, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, N, E, use_fp8=False)
    buffer.get_next_low_latency_combine_buffer(handle).fill_(1)
    combined, _, _ = buffer.low_latency_combine(torch.zeros(L, R * N, H, dtype=torch.bfloat16), topk_idx,
                                                topk_weights, handle, zero_copy=True)
    ref = topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1, keepdim=True).expand(N, H)
    check("ll_zero_copy_reads_buffer", _gap(combined.float(), ref) < 1e-5, "combine did not read the buffer")


def _ll_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Upstream's cast back, UE8M0 scales included (int32: four exponent bytes)."""
    if scales.dtype == torch.int32:
        scales = (scales.reshape(-1).view(torch.uint8).to(torch.int32) << 23).view(torch.float32)
    return per_token_cast_back(x_fp8, scales.reshape(x_fp8.size(0), -1), dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- V2: ElasticBuffer
def _y(src_global_idx: torch.Tensor, K: int, H: int) -> torch.Tensor:
    """Expert outputs ``[n, K, H]`` bf16 made from the source token's global index, so that any rank
    can build the rows of any token (upstream's ``generate_pre_combine_data`` idea)."""
    seed = (src_global_idx.view(-1, 1) * K + torch.arange(K)).double()            # [n, K]
    return torch.sin(seed.unsqueeze(-1) * 0.37 + torch.arange(1, H + 1).double() * 0.011).to(torch.bfloat16)


def _elastic(check: _Checks, group) -> None:
    """tests/elastic/test_ep.py ``test_dispatch_combine`` (DeepEP V2) on moeflow.ElasticBuffer."""
    rank, R = dist.get_rank(), dist.get_world_size()
    T, H, K, E = 24, 256, 4, 4 * R
    L = E // R
    buffer = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=T, hidden=H, explicitly_destroy=True)
    check("ep_domain", buffer.get_logical_domain_size() == (1, R), f"{buffer.get_logical_domain_size()}")
    N = max(1, T - rank)
    torch.manual_seed(300 + rank)
    scores = torch.rand(N, E) + 0.1
    topk_weights, topk_idx = torch.topk(scores, K, dim=-1, largest=True, sorted=False)
    topk_idx = topk_idx.to(deep_ep.topk_idx_t)
    masked = torch.rand(N, K) < 0.1
    topk_idx.masked_fill_(masked, -1)
    topk_weights.masked_fill_(topk_idx < 0, 0)

    # Reference: every rank's tokens, ids and weights (all_gather, padded to T)
    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        pad = torch.zeros(T, *t.shape[1:], dtype=t.dtype)
        pad[:N] = t
        out = [torch.empty_like(pad) for _ in range(R)]
        dist.all_gather(out, pad, group=group)
        return out
    n_all = [max(1, T - r) for r in range(R)]
    idx_all, w_all = gather(topk_idx), gather(topk_weights)
    here = [(idx_all[r][:n_all[r]] // L == rank) & (idx_all[r][:n_all[r]] >= 0) for r in range(R)]
    ref_src = torch.cat([r * T + here[r].any(1).nonzero().flatten() for r in range(R)])       # sorted
    ref_idx = torch.cat([torch.where(here[r], idx_all[r][:n_all[r]] - rank * L, -1)[here[r].any(1)] for r in range(R)])
    ref_w = torch.cat([w_all[r][:n_all[r]][here[r].any(1)] for r in range(R)]).masked_fill(ref_idx < 0, 0)
    ref_counts = [(ref_idx == i).sum().item() for i in range(L)]
    ref_per_rank = [int(here[r].any(1).sum()) for r in range(R)]
    M = ref_src.numel()

    modes = [(1, 4, 0, 0, 0, 0, True), (0, 1, 1, 1, 1, 0, True), (1, 1, 0, 2, 0, 1, False), (0, 4, 1, 0, 1, 1, False)]
    for do_handle_copy, alignment, fp8, num_bias, with_prev, async_, do_cpu_sync in modes:
        x_bf16 = torch.randn(N, H, dtype=torch.bfloat16)
        x = _fp8(x_bf16) if fp8 else x_bf16
        x_all = gather(per_token_cast_back(*x, dtype=torch.bfloat16) if fp8 else x_bf16)
        ref_x = torch.cat([x_all[r][:n_all[r]][here[r].any(1)] for r in range(R)])
        biases = tuple(torch.randn(N, H, dtype=torch.bfloat16) for _ in range(num_bias))
        bias = None if num_bias == 0 else biases[0] if num_bias == 1 else biases
        args = dict(x=x, topk_idx=topk_idx, topk_weights=topk_weights, num_max_tokens_per_rank=T, num_experts=E,
                    expert_alignment=alignment, async_with_compute_stream=async_, do_handle_copy=do_handle_copy,
                    do_cpu_sync=do_cpu_sync)
        prev = dict(previous_event=buffer.capture()) if with_prev else {}
        recv_x, recv_idx, recv_w, handle, event = buffer.dispatch(**args, **prev)
        event.current_stream_wait() if async_ else ()
        ex_x, ex_idx, ex_w, ex_handle, _ = buffer.dispatch(**args, do_expand=True, use_tma_aligned_col_major_sf=True)
        cached_x, cached_idx, _, cached_handle, _ = buffer.dispatch(x=x, handle=handle, **prev)
        cex_x, _, cex_w, _, _ = buffer.dispatch(x=x, topk_weights=topk_weights, handle=ex_handle, do_zero_padding=True)
        stats = torch.zeros(L, dtype=torch.int)
        buffer.dispatch(**args, cumulative_local_expert_recv_stats=stats)

        check("ep_handle_copy", (topk_idx.data_ptr() != handle.topk_idx.data_ptr()) == bool(do_handle_copy), "copy")
        check("ep_handle_copy", handle.topk_idx.data_ptr() == cached_handle.topk_idx.data_ptr(), "cached")
        check("ep_num_recv_tokens", handle.num_recv_tokens == ex_handle.num_recv_tokens == M
              and handle.psum_num_recv_tokens_per_scaleup_rank[-1].item() == M, "M")
        rows = M if do_cpu_sync else R * T
        recv_bf16 = _bf16(recv_x)
        check("ep_rows", recv_bf16.size(0) == rows and recv_idx.size(0) == rows and recv_w.size(0) == rows,
              f"{recv_bf16.size(0)} rows, want {rows}")
        check("ep_rows", ex_idx is None and ex_handle.recv_src_metadata.size(0) == rows, "expanded")
        order = torch.sort(handle.recv_src_metadata[:M, 0]).indices
        check("ep_recv_src_token_idx", torch.equal(handle.recv_src_metadata[:M, 0][order], ref_src.int()), "src idx")
        check("ep_recv_src_token_idx", torch.equal(torch.sort(ex_handle.recv_src_metadata[:M, 0]).values,
                                                   ref_src.int()), "expanded src idx")
        for i in range(L):
            check("ep_expert_counts", stats[i].item() == ref_counts[i], f"stats {i}")
            aligned = -(-ref_counts[i] // alignment) * alignment
            check("ep_expert_counts", handle.num_recv_tokens_per_expert_list[i] == aligned, f"list {i}")
            psum = [0] + handle.psum_num_recv_tokens_per_expert.tolist()
            check("ep_expert_counts", psum[i + 1] - psum[i] == aligned, f"psum {i}")
            ex_psum = [0] + ex_handle.psum_num_recv_tokens_per_expert.tolist()
            check("ep_expert_counts", ex_psum[i + 1] - -(-ex_psum[i] // alignment) * alignment == ref_counts[i],
                  f"expanded psum {i}")
        scaleup = [0] + handle.psum_num_recv_tokens_per_scaleup_rank.tolist()
        for j in range(R):
            check("ep_scaleup_psum", scaleup[j + 1] - scaleup[j] == ref_per_rank[j], f"scaleup {j}")

        # Data, bitwise, in source order; expanded rows folded back (every copy of a row equal)
        check("ep_dispatch_data", torch.equal(recv_bf16[:M][order], ref_x), "recv_x")
        check("ep_dispatch_data", torch.equal(recv_idx[:M][order], ref_idx), "recv_topk_idx")
        check("ep_dispatch_data", torch.equal(recv_w[:M][order].masked_fill(ref_idx < 0, 0), ref_w), "weights")
        slots = ex_handle.recv_src_metadata[:M, 2:].long()
        ex_bf16 = _bf16(ex_x)
        for i, k in (slots >= 0).nonzero().tolist():
            check("ep_expanded_data", torch.equal(ex_bf16[slots[i, k]], recv_bf16[i]) and
                  ex_w[slots[i, k]].item() == recv_w[i, k].item(), f"row {i} entry {k}")
        if fp8:
            check("ep_expanded_data", ex_x[1].stride(0) == 1, "scales not column-major")
        valid = slots[slots >= 0]
        check("ep_cached", torch.equal(_bf16(cached_x), recv_bf16) and torch.equal(cached_idx, recv_idx), "plain")
        check("ep_cached", torch.equal(_bf16(cex_x)[valid], ex_bf16[valid]) and torch.equal(cex_w[valid], ex_w[valid]),
              "expanded")
        for i in range(L):
            start = ex_handle.psum_num_recv_tokens_per_expert[i].item()
            end = -(-start // alignment) * alignment
            zeros = (_bf16(cex_x)[start:end] == 0).all().item() and (cex_w[start:end] == 0).all().item()
            check("ep_zero_padding", zeros, f"padding of expert {i}")

        # Combine: each received row's outputs summed over its local experts; sources sum over ranks
        src = handle.recv_src_metadata[:M, 0].long()
        y = _y(src, K, H)                                               # [M, K, H]
        y[recv_idx[:M] < 0] = 0
        x_combine = torch.zeros(rows, H, dtype=torch.bfloat16)
        x_combine[:M] = y.float().sum(1).to(torch.bfloat16)
        ex_src = ex_handle.recv_src_metadata[:M, 0].long()
        ex_y = _y(ex_src, K, H)
        x_expanded = torch.zeros(ex_handle.num_expanded_tokens, H, dtype=torch.bfloat16)
        for i, k in (slots >= 0).nonzero().tolist():
            x_expanded[slots[i, k]] = ex_y[i, k]
        combine_prev = dict(previous_event=buffer.capture()) if with_prev else {}
        combined, combined_w, event = buffer.combine(x_combine, handle, topk_weights=recv_w, bias=bias,
                                                     async_with_compute_stream=async_, **combine_prev)
        event.current_stream_wait() if async_ else ()
        reduced, reduced_w, _ = buffer.combine(x_expanded, ex_handle, topk_weights=ex_w, bias=bias)
        own = _y(rank * T + torch.arange(N), K, H).float()
        own[topk_idx < 0] = 0
        ref = own.sum(1)
        for bi in (() if bias is None else bias if isinstance(bias, tuple) else (bias,)):
            ref = ref + bi.float()
        for name, got in (("ep_combine", combined), ("ep_combine_expanded", reduced)):
            gap = _gap(got.float(), ref)
            check(name, gap < 1e-5, f"gap {gap}")
        check("ep_combine_topk_weights", torch.equal(combined_w, topk_weights), "plain")
        check("ep_combine_topk_weights", torch.equal(reduced_w, topk_weights), "expanded")

    # allow_multiple_reduction=False: the expanded combine's partial sums travel in fp32 (twice
    # the bytes), rounded once at the source
    single = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=T, allow_multiple_reduction=False)
    wire = []
    for b in (buffer, single):
        b._buffer.counters.reset()
        got, _, _ = b.combine(x_expanded, ex_handle)
        wire.append(b._buffer.counters.wire_bytes("combine"))
        check("ep_single_reduction", got.dtype == torch.bfloat16 and _gap(got.float(), own.sum(1)) < 1e-5, "result")
    check("ep_single_reduction", wire[1] == 2 * wire[0] > 0, f"combine bytes {wire}")

    for call in (lambda: buffer.pp_send(torch.zeros(1), 0), lambda: buffer.all_gather(torch.zeros(1)),
                 lambda: buffer.engram_fetch(torch.zeros(1))):
        check.raises("ep_unsupported_raise", NotImplementedError, call, "")
    buffer.barrier()
    buffer.destroy()


# ----------------------------------------------------------------------------- DeepEP surface
def _surface(check: _Checks, group) -> None:
    """test_loop's constructor (DeepEP V1's positional order) and what moeflow refuses, clearly."""
    R = dist.get_world_size()
    # group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
    # allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric, explicitly_destroy
    b = deep_ep.Buffer(group, int(2e9), 0, False, 1, True, False, True, True)
    check("constructor", (b.group, b.num_nvl_bytes, b.low_latency_mode, b.explicitly_destroy, b.group_size)
          == (group, int(2e9), False, True, R), "positional parameters out of DeepEP's order")
    check.raises("one_node_internode_raises", ValueError, lambda: b.internode_dispatch(torch.zeros(1, 128)),
                 "ranks_per_node")
    b.destroy()
    check.raises("unsupported_raise", NotImplementedError, lambda: deep_ep.Buffer(group, enable_shrink=True),
                 "PeerFailureError")
    check.raises("unsupported_raise", NotImplementedError, lambda: deep_ep.Buffer(None, comm=object()), "group")
    ll = deep_ep.Buffer(group, 0, 1 << 20, low_latency_mode=True, num_qps_per_rank=4)
    for call, mention in ((lambda: ll.get_comm_stream(), "async_finish"),
                          (lambda: ll.get_local_buffer_tensor(torch.bfloat16), "allocate"),
                          (lambda: ll.low_latency_update_mask_buffer(0, True), "new_group"),
                          (lambda: ll.low_latency_query_mask_buffer(torch.zeros(R, dtype=torch.int)), "new_group"),
                          (lambda: ll.low_latency_clean_mask_buffer(), "new_group")):
        check.raises("unsupported_raise", NotImplementedError, call, mention)
    x, idx = torch.zeros(2, 128, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.int64)
    check.raises("unsupported_raise", NotImplementedError, lambda: ll.low_latency_dispatch(
        x, idx, 2, R, dispatch_wait_recv_cost_stats=torch.zeros(R, R, dtype=torch.int64)), "PeerFailureError")


def _conformance():
    check = _Checks()
    group = dist.new_group(list(range(dist.get_world_size())))
    # test_loop with test_ll_compatibility: one Buffer for normal and low-latency calls
    buffer = deep_ep.Buffer(group, int(2e9), 0, low_latency_mode=True, num_qps_per_rank=1,
                            explicitly_destroy=True, allow_mnnvl=False, use_fabric=False)
    _intranode(check, buffer, group)
    buffer.clean_low_latency_buffer(16, 512, 6 * dist.get_world_size())
    _low_latency(check, buffer, group)
    buffer.destroy()
    if dist.get_world_size() == 4:
        _internode(check, group)
    _elastic(check, group)
    _surface(check, group)
    return check.results


@functools.lru_cache(maxsize=None)
def _records(R: int) -> list:
    return spawn(_conformance, R, timeout_s=240)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda R: f"{R}ranks")
def records(request):
    # pytest sets a parametrized module fixture up again each time the test order switches its
    # parameter (in random order: 38 times for this module, each a full run); one run per R
    return request.param, _records(request.param)


def _expect(records, name: str):
    R, per_rank = records
    for rank, results in enumerate(per_rank):
        assert name in results, f"{UPSTREAM} check {name!r} never ran on rank {rank} of {R}"
        n, failures = results[name]
        assert n > 0 and not failures, f"{name} failed on rank {rank} of {R} ({len(failures)} of {n}): {failures[:3]}"


# test_intranode.py test_main, in upstream order
def test_get_dispatch_layout_matches_reference(records):
    _expect(records, "get_dispatch_layout")


def test_dispatch_recv_rows_equal_global_count(records):
    _expect(records, "dispatch_recv_rows")


def test_dispatch_per_expert_list_with_and_without_topk(records):
    _expect(records, "dispatch_expert_counts")


def test_check_data_by_rank_prefix_matrix(records):
    _expect(records, "dispatch_rank_prefix_matrix")


def test_handle_unpacks_as_intranode_6_tuple(records):
    _expect(records, "handle_tuple")


def test_recv_topk_idx_local_and_counted(records):
    _expect(records, "recv_topk_idx")


def test_recv_topk_weights_check_data(records):
    _expect(records, "recv_topk_weights")


def test_num_worst_tokens_pads_to_exactly_w_rows(records):
    _expect(records, "num_worst_tokens")


def test_num_worst_tokens_below_received_rows_raises_on_every_rank(records):
    _expect(records, "num_worst_tokens_too_small")


def test_cached_dispatch_check_data(records):
    _expect(records, "cached_dispatch")


def test_combine_sums_copies(records):
    _expect(records, "combine")


def test_combine_topk_weights(records):
    _expect(records, "combine_topk_weights")


def test_tuning_configs_change_no_result(records):
    _expect(records, "config_tuning")


# test_low_latency.py test_main (after clean_low_latency_buffer on the same Buffer, as
# test_intranode.py's test_ll_compatibility does)
def test_ll_handle_unpacks_as_5_tuple(records):
    _expect(records, "ll_handle_tuple")


def test_ll_fp8_scales_column_major_and_ue8m0_packed(records):
    _expect(records, "ll_scales_layout")
    _expect(records, "ll_static_path")


def test_ll_cumulative_local_expert_recv_stats(records):
    _expect(records, "ll_recv_stats")


def test_ll_layout_range_counts(records):
    _expect(records, "ll_layout_range")


def test_ll_recv_count_equals_global_selections(records):
    _expect(records, "ll_recv_count")


def test_ll_received_data_and_src_info(records):
    _expect(records, "ll_recv_data")


def test_ll_combine_weighted_sum(records):
    _expect(records, "ll_combine")


def test_ll_combine_zero_copy(records):
    _expect(records, "ll_combine_zero_copy")
    _expect(records, "ll_zero_copy_reads_buffer")


# test_internode.py: check_data(recv_x, handle[-4]) on two nodes
def test_internode_handle_recv_gbl_rank_prefix_sum(records):
    if records[0] != 4:
        pytest.skip("two nodes of two ranks need 4 ranks")
    for name in ("internode_layout", "internode_handle", "internode_recv_gbl_rank_prefix_sum",
                 "internode_num_worst_tokens", "internode_combine", "internode_entry_points"):
        _expect(records, name)


# DeepEP V2: tests/elastic/test_ep.py test_dispatch_combine, on moeflow.ElasticBuffer
@pytest.mark.parametrize("name", ["ep_domain", "ep_handle_copy", "ep_num_recv_tokens", "ep_rows",
                                  "ep_recv_src_token_idx", "ep_expert_counts", "ep_scaleup_psum", "ep_dispatch_data",
                                  "ep_expanded_data", "ep_cached", "ep_zero_padding", "ep_combine",
                                  "ep_combine_expanded", "ep_combine_topk_weights", "ep_single_reduction",
                                  "ep_unsupported_raise"])
def test_elastic_buffer_v2(records, name):
    _expect(records, name)


# test_loop and the rest of deep_ep.Buffer's public surface
def test_constructor_takes_deep_ep_v1_positional_order(records):
    _expect(records, "constructor")


def test_unsupported_calls_raise_not_implemented_saying_what_to_use(records):
    _expect(records, "unsupported_raise")


def test_internode_entry_points_need_several_nodes(records):
    _expect(records, "one_node_internode_raises")


def test_config_defaults_and_checks_follow_deep_ep():
    c = deep_ep.Config(24, 8, 256)
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (24, 8, 256, 6, 258)  # 6s
    assert deep_ep.Config(24, 8, 512, 16, 120).num_max_rdma_chunked_recv_tokens == 128  # rounded up to 16s
    with pytest.raises(ValueError, match="num_max_nvl_chunked_send_tokens"):
        deep_ep.Config(24, 256, 256)
    with pytest.raises(ValueError, match="at most half"):
        deep_ep.Config(24, 8, 256, 16, 16)
    assert c.get_nvl_buffer_size_hint(7168 * 2, 8) == 0 and c.get_rdma_buffer_size_hint(7168 * 2, 16) == 0


def test_static_helpers():
    assert deep_ep.topk_idx_t is torch.int64
    assert deep_ep.Buffer.is_sm90_compiled() is True
    old = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(32)
        assert deep_ep.Buffer.num_sms == 32 and deep_ep.Buffer.get_dispatch_config(8).num_sms == 32
        with pytest.raises(ValueError, match="even"):
            deep_ep.Buffer.set_num_sms(23)
    finally:
        deep_ep.Buffer.set_num_sms(old)
    ev = deep_ep.Buffer.capture()
    assert isinstance(ev, deep_ep.EventOverlap) and not ev.is_pending()


def _ll_memory():
    R = dist.get_world_size()
    T, H, E, K = 8, 256, 4 * R, 3
    buffer = deep_ep.Buffer(low_latency_mode=True)
    g = torch.Generator().manual_seed(dist.get_rank())
    # distinct experts per token, as torch.topk gives them (randint repeated one now and then,
    # which low-latency mode now refuses)
    x, idx = torch.randn(T, H, generator=g).bfloat16(), torch.rand(T, E, generator=g).argsort(1)[:, :K]
    for fp8 in (False, True):
        for _ in range(2):  # two alternating sets
            recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, E, use_fp8=fp8)
            y = (per_token_cast_back(recv_x[0].flatten(0, 1), recv_x[1].flatten(0, 1)).view(recv_x[0].shape)
                 if fp8 else recv_x).bfloat16()
            buffer.low_latency_combine(y, idx, torch.rand(T, K), handle)
    pools = buffer._low_latency._pools  # configuration -> [turn, buffer set, buffer set]

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    dispatch = sorted((key[1].fp8, sets[1:]) for key, sets in pools.items() if key[0] == "dispatch")
    held = [sum(nbytes([*vars(s).values(), *(s.cast or ())]) for s in sets) for _, sets in dispatch]
    combine = sum(nbytes(s) for key, sets in pools.items() if key[0] == "combine" for s in sets[1:])
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E, num_topk=K)
    return held, combine, hint


def test_low_latency_rdma_size_hint_is_what_low_latency_mode_keeps():
    (held_bf16, held_fp8), combine, hint = spawn(_ll_memory, 2, timeout_s=60)[0]
    assert hint == max(held_bf16, held_fp8) + combine
