"""EWA and NoLoCo/DiLoCo on a GPU (skipped without one): everything lives on the model's device, low-precision weights
get fp32 slow weights, and the per-step updates never wait on the host."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightavg.ewa import mixtures, share_all, to_dense, to_moe
from weightavg.optim import DiLoCo, NoLoCo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


class Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def test_ewa_on_the_device_without_host_syncs() -> None:
    model = nn.Sequential(Block(), Block()).cuda().to(torch.bfloat16)
    to_moe(model)
    layer = mixtures(model)[0]
    assert all(stack.device == torch.device("cuda", torch.cuda.current_device()) for stack in layer.stacks())
    x = torch.randn(4, 9, 16, device="cuda", dtype=torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    assert layer._generator is not None and layer._generator.device.type == "cuda"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        share_all(model, 0.3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    model.eval()
    with torch.no_grad():
        mixed = model(x)
        to_dense(model)
        assert next(model.parameters()).device.type == "cuda"
        torch.testing.assert_close(model(x), mixed)


@pytest.mark.parametrize("wrapper", [NoLoCo, DiLoCo])
def test_outer_steps_on_the_device_in_fp32_without_host_syncs(wrapper: type[NoLoCo] | type[DiLoCo]) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).cuda().to(torch.bfloat16)
    opt = wrapper(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=1)
    for tensor in opt.averager.averaged_tensors().values():
        assert tensor.device.type == "cuda" and tensor.dtype == torch.float32
    model(torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)).float().pow(2).mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.replica.sync()  # one process: no exchange; the outer arithmetic alone
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.traffic.syncs == 1
