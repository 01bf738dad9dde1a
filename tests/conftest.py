"""Suite-wide settings."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch

from mapnet_experiments.data import registries

# One thread per test process (and the subprocesses tests start): on a 2-core machine shared
# with other work, two OpenMP threads per process make small ops wait on descheduled peers
# (the kill-and-resume test: 75 s with two threads under load, 7 s with one).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# The eager generation passes everywhere (and the subprocesses tests start): compiling a kernel
# for each model size would add seconds per test and run a C++ compiler. tests/test_fused.py
# compares the compiled passes to these, bit for bit, choosing its mode itself.
os.environ["MAPNET_FUSION"] = "eager"


@pytest.fixture
def registries_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fetcher cut off: urllib fails as an unreachable host does, and running a registry
    client (pip, npm, apt-get) fails the test."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    def no_tools(cmd: list[str], *args: object, **kwargs: object) -> None:
        raise AssertionError(f"test tried to run {cmd}")

    monkeypatch.setattr(registries.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(registries, "run_tool", no_tools)
