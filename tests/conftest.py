"""Suite-wide settings."""

from __future__ import annotations

import os

import torch

# One thread per test process (and the subprocesses tests start): on a 2-core machine shared
# with other work, two OpenMP threads per process make small ops wait on descheduled peers
# (the kill-and-resume test: 75 s with two threads under load, 7 s with one).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
