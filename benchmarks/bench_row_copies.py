"""The combine's row copies on CPU, one thread: this rank's own rows placed into a fresh output
(``index_copy_``, and the gather ``moeflow.comm.route._place_rows`` uses instead), then with the
other rank's rows summed onto them by ``index_add_`` (before), against the whole two-source sum
as the combine does it now (``moeflow.comm.route._Sum``: span by span, one copy or one
two-input add each, every row read once), at ``moeflow bench``'s shape (4096 tokens, hidden
2048, bf16; each token's copy present with probability 0.995, as with top-8 of 64 experts on 2
ranks). Thread CPU time, median of 30, so another job on the machine adds little.

Run: python benchmarks/bench_row_copies.py
"""

from __future__ import annotations

import time

import torch

from moeflow.commands import speed_words
from moeflow.comm.route import _place_rows, _Sum


def _median_ms(fn, reps: int = 30) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return sorted(times)[reps // 2] * 1e3


def main() -> None:
    torch.set_num_threads(1)
    T, H = 4096, 2048
    g = torch.Generator().manual_seed(0)
    own_idx = (torch.rand(T, generator=g) > 0.005).nonzero().flatten()
    peer_idx = (torch.rand(T, generator=g) > 0.005).nonzero().flatten()
    own = torch.randn(own_idx.numel(), H, generator=g).bfloat16()
    peer = torch.randn(peer_idx.numel(), H, generator=g).bfloat16()

    def index_copy():  # what the combine did before: zero the rows no copy goes to, scatter as wide words
        out = torch.empty(T, H, dtype=torch.bfloat16)
        missing = torch.ones(T, dtype=torch.bool)
        missing[own_idx] = False
        out.index_fill_(0, missing.nonzero().flatten(), 0)
        out.view(torch.int64).index_copy_(0, own_idx, own.view(torch.int64))

    def gather():
        _place_rows(torch.empty(T, H, dtype=torch.bfloat16), own_idx, own)

    a, b = torch.empty(T, H, dtype=torch.bfloat16), torch.empty(T, H, dtype=torch.bfloat16)
    a.zero_().view(torch.int64).index_copy_(0, own_idx, own.view(torch.int64))
    _place_rows(b, own_idx, own)
    assert torch.equal(a, b), "the gather must place the same rows"
    def place_and_add():  # what the combine did before: own rows placed, the peer's index_add_-ed
        fresh = torch.empty(T, H, dtype=torch.bfloat16)
        _place_rows(fresh, own_idx, own)
        fresh.index_add_(0, peer_idx, peer)
        return fresh

    def spans():  # own rows while the peer's travel, then the rest, into a fresh output
        total = _Sum(torch.empty(T, H, dtype=torch.bfloat16), [own_idx, peer_idx], (), [0], {torch.bfloat16})
        assert total.spans is not None
        total.own([own, peer])
        total.rest([own, peer])
        return total.out

    assert torch.equal(place_and_add().view(torch.int16), spans().view(torch.int16)), "both must sum alike"

    rows = [("own rows, zero + index_copy_ (older)", _median_ms(index_copy)),
            ("own rows, gather (_place_rows)", _median_ms(gather)),
            ("own placed + peer index_add_ (before)", _median_ms(place_and_add)),
            ("both, span by span (_Sum, now)", _median_ms(spans))]
    mib = T * H * 2 / 2**20
    print(f"combine row copies, {T} x {H} bf16 ({mib:.0f} MiB output), one thread, thread CPU time (median of 30)")
    for name, ms in rows:
        print(f"  {name:40s} {ms:6.2f} ms")
    print(f"  gather vs index_copy_: {speed_words(rows[1][1], rows[0][1])}")
    print(f"  span by span vs placed + index_add_: {speed_words(rows[3][1], rows[2][1])}")


if __name__ == "__main__":
    main()
