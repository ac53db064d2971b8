"""Test-wide settings."""

import torch

# The test models are tiny: one intra-op thread is many times faster than several threads
# fighting over two CPU cores (and keeps timings stable when tests share the machine).
torch.set_num_threads(1)
