"""Train a small MoE language model with FSDP2 over a (dp, ep) device mesh.

    python examples/train_fsdp.py                                  # 4 local Gloo ranks: 2 dp x 2 ep
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 examples/train_fsdp.py          # 2 nodes (NCCL on GPUs)

The routed experts are split over the ``ep`` ranks; ``moeflow.parallelize`` applies FSDP2 to
the experts over the ``dp`` ranks holding the same shard and to everything else over all ranks.
Every rank trains on its own batches; nothing is synchronised by hand. Each rank prints its
loss before and after, and a checksum of its expert bias (the same on every rank).
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import moeflow


class Block(nn.Module):
    def __init__(self, dim, mesh):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.moe = moeflow.MoELayer(dim, 32, num_experts=8, num_topk=2, num_shared_experts=1, group=mesh,
                                    score_func="sigmoid", bias_update_rate=1e-2)

    def forward(self, x):
        return x + self.moe(self.norm(x))


class TinyLM(nn.Module):
    def __init__(self, dim, mesh):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.blocks = nn.ModuleList(Block(dim, mesh) for _ in range(2))
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def main():
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dp = 2 if world % 2 == 0 and world >= 4 else 1
    mesh = init_device_mesh(device.type, (dp, world // dp), mesh_dim_names=("dp", "ep"))
    torch.manual_seed(0)                        # the same global weights on every rank, any layout
    with device:
        model = moeflow.parallelize(TinyLM(64, mesh), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    moe_layers = [m for m in model.modules() if isinstance(m, moeflow.MoELayer)]
    g = torch.Generator().manual_seed(rank)     # each rank its own batches
    losses = []
    for step in range(30):
        # counting sequences from random starts: the next byte is the last one + 1
        seq = (torch.randint(0, 256, (4, 1), generator=g) + torch.arange(33)) % 256
        x, y = seq[:, :-1].to(device), seq[:, 1:].to(device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss = loss + sum(m.last_router_output.loss for m in moe_layers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for m in moe_layers:
            m.router.update_bias()              # once per step: bias and load statistics
        losses.append(loss.item())
    bias = sum(float(m.router.expert_bias.abs().sum()) for m in moe_layers)
    return (f"rank {rank} of {world} ({dp} dp x {world // dp} ep): loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"expert bias checksum {bias:.6f}")


if __name__ == "__main__":
    for line in moeflow.parallel.run(main, 4):  # under torchrun: its ranks; else 4 local ones
        # one write per line (print writes the newline apart when Python is unbuffered): under
        # torchrun the workers of a node share one stdout, and their lines must not run together
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
