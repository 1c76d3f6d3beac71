"""What issue 14's checks cost, each against the same run without it (interleaved, medians).

    python3 benchmarks/bench_checks.py [--ranks 2] [--tokens 4096] [--hidden 2048] [--experts 64]
                                       [--topk 8] [--reps 20] [--steps 20]

1. Per dispatch: ``Buffer(check_layout=True)`` (a fresh dispatch checks that
   ``num_tokens_per_expert`` counts ``topk_idx``: one bincount, inside the host sync the id check
   makes anyway) against ``check_layout=False``: get_dispatch_layout + dispatch + combine, bf16,
   the same Buffer with the flag switched between rounds. The other per-call agreement (hidden,
   dtype, experts, top-k) rides in the count exchange's columns and has no off switch; the
   once-only checks (Buffer options, MoE layer sizes, weights) run at construction.
2. Per training step: the demo's step (moeflow demo's model, FSDP2 as the demo applies it) with
   the training loop's guards around forward, backward and the optimizer and the loss sum
   through the loop's Transport, against the same step with no guards and a bare
   ``dist.all_reduce``: the same model, steps alternating.

Each time is the slowest rank's per round, then the median over rounds; CPU time (the rank
process's, Gloo's threads included) beside wall time, since it moves less on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeflow import Buffer, spawn


def _timed(fn) -> tuple[float, float]:
    dist.barrier()  # every rank starts together: the time covers the work, not a peer's lateness
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _dispatch_rank(N: int, H: int, E: int, K: int, reps: int) -> dict:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N, H, generator=g).bfloat16()
    idx = torch.rand(N, E, generator=g).topk(K, dim=1).indices
    buffer = Buffer()

    def round_trip():
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                     num_tokens_per_expert=per_expert, topk_idx=idx)
        buffer.combine(recv_x, handle)

    out = {True: ([], []), False: ([], [])}
    for it in range(reps + 2):
        for on in ((True, False) if it % 2 else (False, True)):  # each goes first every other round
            buffer.check_layout = on  # one Buffer: nothing else differs between the two
            wall, cpu = _timed(round_trip)
            if it >= 2:
                out[on][0].append(wall)
                out[on][1].append(cpu)
    # the check alone: the id check with and without the counts (CPU time, median of 200)
    per_expert = buffer.get_dispatch_layout(idx, E)[2]
    alone = [_cpu_median(lambda: buffer._check.topk_idx("dispatch", idx, N, E, num_tokens_per_expert=counts))
             for counts in (per_expert, None)]
    return {"on": out[True], "off": out[False], "alone": alone}


def _cpu_median(fn, n: int = 200) -> float:
    times = []
    for _ in range(n):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def _step_rank(steps: int) -> dict:
    from moeflow.comm.transport import ProcessGroupTransport
    from moeflow.demo import DemoConfig, build

    rank = dist.get_rank()
    cfg = DemoConfig()
    model, device = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    loop = ProcessGroupTransport(None, name="training loop")
    g = torch.Generator().manual_seed(rank)

    def step(watched: bool):
        guard = loop.guard if watched else (lambda kind: contextlib.nullcontext())
        data = torch.randint(0, 256, (cfg.batch_size, cfg.seq_len + 1), generator=g)
        x, y = data[:, :-1], data[:, 1:]
        with guard("forward"):  # as moeflow.demo.train's step
            loss = F.cross_entropy(model(x).view(-1, 256), y.reshape(-1))
            aux = sum(layer.last_router_output.loss for layer in model.moe_layers())
        opt.zero_grad(set_to_none=True)
        with guard("backward"):
            (loss + aux).backward()
        with guard("optimizer"):
            opt.step()
        for layer in model.moe_layers():
            layer.router.update_bias()
        loss_sum = loss.detach().reshape(1)
        if watched:
            loop.all_reduce(loss_sum, kind="loss")
        else:
            dist.all_reduce(loss_sum)

    out = {True: ([], []), False: ([], [])}
    for it in range(steps + 2):
        for watched in ((True, False) if it % 2 else (False, True)):
            wall, cpu = _timed(lambda: step(watched))
            if it >= 2:
                out[watched][0].append(wall)
                out[watched][1].append(cpu)

    def empty_guard():
        with loop.guard("empty"):
            pass

    # the step's 3 guards alone: empty guarded blocks against empty blocks (CPU time, median of 200)
    alone = [3 * _cpu_median(empty_guard), 3 * _cpu_median(lambda: None)]
    return {"on": out[True], "off": out[False], "alone": alone}


def _medians(per_rank: list[dict], key: str) -> tuple[float, float]:
    n = len(per_rank[0][key][0])
    return tuple(statistics.median(max(r[key][k][i] for r in per_rank) for i in range(n)) for k in (0, 1))


def _report(what: str, per_rank: list[dict], alone: str) -> None:
    (on_w, on_c), (off_w, off_c) = _medians(per_rank, "on"), _medians(per_rank, "off")
    with_, without = (max(r["alone"][i] for r in per_rank) for i in (0, 1))
    print(f"  {what}")
    print(f"    with the check   {on_w * 1e3:8.2f} ms wall {on_c * 1e3:8.2f} ms CPU")
    print(f"    without          {off_w * 1e3:8.2f} ms wall {off_c * 1e3:8.2f} ms CPU")
    print(f"    cost             {(on_w / off_w - 1) * 100:+7.1f} % wall {(on_c / off_c - 1) * 100:+7.1f} % CPU")
    print(f"    {alone}: {with_ * 1e6:.1f} us CPU against {without * 1e6:.1f} us without: "
          f"{(with_ - without) / off_c * 100:.2f} % of the CPU time without")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    print(f"{args.ranks} Gloo ranks x 1 thread; load average {load0:.1f} on {os.cpu_count()} cores")
    per_rank = spawn(_dispatch_rank, args.ranks, args.tokens, args.hidden, args.experts, args.topk, args.reps,
                     timeout_s=3600, threads_per_rank=1)
    _report(f"layout check per dispatch: layout + dispatch + combine, {args.tokens} tokens/rank, hidden "
            f"{args.hidden} bf16, {args.experts} experts top-{args.topk}, median of {args.reps}", per_rank,
            "the id check alone, with the counts and without")
    per_rank = spawn(_step_rank, args.ranks, args.steps, timeout_s=3600, threads_per_rank=1)
    _report(f"training loop's guards per demo step (3 guards + the loss sum through a Transport), median of "
            f"{args.steps} steps", per_rank, "the 3 guards alone (empty blocks)")
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
