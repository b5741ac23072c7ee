"""Test session setup: one CPU thread (small tensors run faster and the 2-core machine stays responsive), and no test
may leave a torch.distributed process group behind (later single-process tests would run as rank 0 of a world)."""

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_leaked_process_group() -> Iterator[None]:
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("the test left a torch.distributed process group initialised")
