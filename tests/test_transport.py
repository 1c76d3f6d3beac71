"""Transport choices that depend on the backend, decided without processes."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from moeflow.comm.transport import host_device, host_driven


def test_small_host_tensors_go_where_the_group_takes_them():
    # plain NCCL has no CPU backend: count tables and agreement rows must travel on the GPU
    nccl = SimpleNamespace(_device_types=[torch.device("cuda")])
    assert host_device(nccl) == torch.device("cuda")
    for types in ([torch.device("cpu")], [torch.device("cpu"), torch.device("cuda")], []):
        assert host_device(SimpleNamespace(_device_types=types)) == torch.device("cpu"), types


def test_the_host_orders_copies_only_for_cpu_tensors():
    assert host_driven(torch.device("cpu"))
    assert not host_driven(torch.device("cuda")) and not host_driven(torch.device("meta"))
