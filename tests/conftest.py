"""Shared fixtures: registries with test plugins, isolated from the process-wide one."""
from __future__ import annotations

import os

import pytest
import torch

from vqkit import plugins

# The suite runs as 2 xdist workers on 2 cores: one intra-op thread per worker (and per
# subprocess the tests start) avoids oversubscription, which made tiny-model steps ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def use_registry():
    """Install a registry for the duration of a test: ``use_registry(build_registry(...))``."""
    previous = plugins._REGISTRY

    def install(registry):
        plugins.set_registry(registry)
        return registry

    yield install
    plugins.set_registry(previous)
