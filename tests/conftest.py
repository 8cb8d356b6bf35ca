"""Shared fixtures: registries with test plugins, isolated from the process-wide one."""
from __future__ import annotations

import pytest

from vqkit import plugins


@pytest.fixture
def use_registry():
    """Install a registry for the duration of a test: ``use_registry(build_registry(...))``."""
    previous = plugins._REGISTRY

    def install(registry):
        plugins.set_registry(registry)
        return registry

    yield install
    plugins.set_registry(previous)
