"""Process-wide settings of ``vqkit train`` (vqkit.runtime)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from vqkit.runtime import KEEP_FREED_MEMORY_ENV, keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (Linux)")
def test_keep_freed_memory_is_applied_in_a_fresh_process():
    """glibc accepts both settings (its effect on page faults and step time is measured by
    benchmarks/quantizer_breakdown.py, not here: it depends on the heap's layout)."""
    code = "from vqkit.runtime import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k != KEEP_FREED_MEMORY_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(KEEP_FREED_MEMORY_ENV, "0")
    assert keep_freed_memory() is False


def test_vqkit_train_applies_it(monkeypatch):
    import vqkit.commands.train as train_cmd

    calls = []
    monkeypatch.setattr(train_cmd, "keep_freed_memory", lambda: calls.append(1) or True)

    class Args:
        nproc = 0  # rejected right after the process settings are applied

    from vqkit.errors import VqkitError

    with pytest.raises(VqkitError, match="--nproc"):
        train_cmd.run_train(Args())
    assert calls == [1]
