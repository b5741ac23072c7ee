"""The docs' plain training loop, launched by ``torchrun`` (env:// rendezvous): each rank trains on its own data with
``weightavg.optim.NoLoCo`` or ``DiLoCo``, then averages; rank 0 writes what every rank reported as JSON to ARGV[2].
``lcsc``: each rank snapshots with ``weightavg.optim.LCSC(directory=ARGV[2])`` (its own ``rank<N>`` subfolder)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from weightavg.optim import LCSC, DiLoCo, NoLoCo


def snapshots(folder: str) -> None:
    model = torch.nn.Linear(4, 2)
    opt = LCSC(torch.optim.SGD(model.parameters(), lr=0.1), module=model, every_n_steps=2, directory=folder)
    for _ in range(4):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert [s.step for s in opt.store.snapshots] == [2, 4], opt.store.snapshots
    dist.barrier()


def main() -> None:
    torch.set_num_threads(1)
    method, output = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if method == "lcsc":
        snapshots(output)
        dist.destroy_process_group()
        return
    torch.manual_seed(100 + rank)  # different starts: the wrapper's start broadcast must align them
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = NoLoCo(inner, sync_every=5) if method == "noloco" else DiLoCo(inner, sync_every=5)
    start = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(rank)
    for _ in range(20):
        x = torch.randn(32, 8, generator=generator) + rank  # each rank its own data
        torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
        opt.step()
        opt.zero_grad()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt.average_replicas()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    report = {
        "rank": rank,
        "traffic": opt.traffic.as_dict(),
        "start": torch.cat([s.flatten() for s in start]).tolist(),
        "before": before.tolist(),
        "after": after.tolist(),
    }
    reports: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(output, "w") as handle:
            json.dump(reports, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # A gloo worker thread can still be dropping its last reference to the final collective's work (it holds Python
    # tensors, so it needs the GIL) when the interpreter finalizes: that thread then exits inside a noexcept frame and
    # the process aborts ("terminate called without an active exception", pytorch/pytorch#190489). Everything is
    # written and the group destroyed here, so leave without interpreter finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
