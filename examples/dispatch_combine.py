"""DeepEP-style dispatch and combine.

    python examples/dispatch_combine.py                            # 2 local Gloo ranks
    torchrun --nproc-per-node 2 examples/dispatch_combine.py       # torchrun's ranks (NCCL on GPUs)

Each rank routes its tokens to top-2 of 8 experts (split over the ranks), dispatches them, runs a
toy "expert" on what arrived, and combines the results back onto the tokens.
"""

import sys

import torch
import torch.distributed as dist

import moeflow


def main():
    rank = dist.get_rank()
    buffer = moeflow.Buffer(dist.group.WORLD)  # was: deep_ep.Buffer(group, num_nvl_bytes, ...)
    num_experts, num_tokens, hidden = 8, 6, 128
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    torch.manual_seed(rank)
    x = torch.randn(num_tokens, hidden).bfloat16().to(device)                       # [N, H]
    topk_weights, topk_idx = torch.rand(num_tokens, num_experts).to(device).topk(2)  # [N, K] float32, int64

    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = \
        buffer.dispatch(x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
                        topk_weights=topk_weights)

    # A toy expert layer: scale each received row by the sum of its local expert weights.
    expert_out = recv_x * recv_topk_weights.sum(1, keepdim=True).to(recv_x.dtype)

    combined_x, _, event = buffer.combine(expert_out, handle)           # [N, H]
    expected = x.float() * topk_weights.sum(1, keepdim=True)
    err = (combined_x.float() - expected).abs().max().item()
    return (f"rank {rank}: received {recv_x.shape[0]} rows, per local expert "
            f"{num_recv_tokens_per_expert_list}; combine error vs dense {err:.3f} (bf16)")


if __name__ == "__main__":
    for line in moeflow.parallel.run(main, 2):  # under torchrun: its ranks; else 2 local ones
        # one write per line (print writes the newline apart when Python is unbuffered): under
        # torchrun the workers of a node share one stdout, and their lines must not run together
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
