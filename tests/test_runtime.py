"""Process-wide settings of ``vqkit train`` (vqkit.runtime)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from vqkit.runtime import KEEP_FREED_MEMORY_ENV, keep_freed_memory

# Page faults per step of a quantizer forward + backward, in a fresh process.
FAULTS = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from vqkit.runtime import keep_freed_memory
applied = keep_freed_memory()
from vqkit.ops import straight_through_vq
g = torch.Generator().manual_seed(0)
z = torch.randn(8, 128, 32, 32, generator=g).requires_grad_()
codes = torch.randn(256, 128, generator=g).requires_grad_()
up = torch.randn(8, 128, 32, 32, generator=g)
def step():
    z.grad = codes.grad = None
    out = straight_through_vq(z, codes)
    ((out.quantized * up).sum() + out.codebook_loss + out.commitment_loss).backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"applied": applied, "faults_per_step": (after - before) / 8}))
"""


def faults(env_value: str) -> dict:
    import os

    env = {**os.environ, KEEP_FREED_MEMORY_ENV: env_value}
    proc = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (Linux)")
def test_keep_freed_memory_removes_the_page_faults_of_repeated_steps():
    kept, default = faults("1"), faults("0")
    assert kept["applied"] is True and default["applied"] is False
    # a step touches ~12 MiB of fresh tensors (3,000 pages): with glibc's defaults most of
    # them are handed back to the kernel at free and fault again the next step
    assert default["faults_per_step"] > 1000, default
    assert kept["faults_per_step"] < 0.25 * default["faults_per_step"], (kept, default)


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
