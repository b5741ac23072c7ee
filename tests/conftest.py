"""Test session setup: one CPU thread (small tensors run faster and the 2-core machine stays responsive); no test may
leave a torch.distributed process group behind (later single-process tests would run as rank 0 of a world), and the
launch variables a Lightning launcher writes into ``os.environ`` (MASTER_PORT, WORLD_SIZE, ...) are put back after
each test, so a later test's processes pick their own."""

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

torch.set_num_threads(1)

LAUNCH_VARIABLES = ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def isolated_distributed_state() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("the test left a torch.distributed process group initialised")
