"""Expert-parallelize a Hugging Face Qwen3-MoE model.

    python examples/hf_expert_parallel.py                          # 2 local Gloo ranks
    torchrun --nproc-per-node 2 examples/hf_expert_parallel.py     # torchrun's ranks (NCCL on GPUs)

Each rank builds the same tiny random Qwen3-MoE (same seed; with a real checkpoint every rank
would call ``from_pretrained``), keeps an unmodified copy, and replaces the MoE blocks by moeflow
layers holding half of the experts each. Both models then run this rank's own batch: the logits
agree to float32 rounding, although half of each token's experts now live on the other rank.
"""

import copy
import sys

import torch
import torch.distributed as dist
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import moeflow
from moeflow.integrations.hf import expert_parallelize


def main():
    rank = dist.get_rank()
    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    torch.manual_seed(0)                                   # the same weights on every rank
    reference = Qwen3MoeForCausalLM(config).eval()
    model = expert_parallelize(copy.deepcopy(reference))  # experts 0-3 on rank 0, 4-7 on rank 1 (of 2)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    reference.to(device), model.to(device)

    torch.manual_seed(100 + rank)                          # each rank its own batch
    input_ids = torch.randint(0, config.vocab_size, (2, 16)).to(device)
    with torch.no_grad():
        expected = reference(input_ids).logits
        logits = model(input_ids).logits
    layers = [m for m in model.modules() if isinstance(m, moeflow.MoELayer)]
    L = layers[0].num_local_experts
    diff = (logits - expected).abs().max().item()
    return (f"rank {rank}: {len(layers)} MoE layers, experts {rank * L}-{(rank + 1) * L - 1} of "
            f"{config.num_experts} here; max |logit difference| vs the unmodified model {diff:.2e}")


if __name__ == "__main__":
    for line in moeflow.parallel.run(main, 2):  # under torchrun: its ranks; else 2 local ones
        # one write per line (print writes the newline apart when Python is unbuffered): under
        # torchrun the workers of a node share one stdout, and their lines must not run together
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
