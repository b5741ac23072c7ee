"""Test session setup: one CPU thread (small tensors run faster and the 2-core machine stays responsive)."""

import torch

torch.set_num_threads(1)
