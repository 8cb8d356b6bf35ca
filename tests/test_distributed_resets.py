"""Code-book resets under DDP: 2 processes, gloo on CPU.

Each rank trains the same tiny model on different data; the reset policy plans on rank 0
and the plan is broadcast. After every reset the code-books (and the monitor's counts)
must be bit-identical on both ranks.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from vqkit.plugins import get_registry
from vqkit.recipe import ResetRef
from vqkit.telemetry import CodebookMonitor
from vqkit.testing.reset_contracts import ToyQuantizer
from vqkit.train.codebook import CodebookManager
from vqkit.train.distributed import DistContext

WORLD = 2
STEPS = 24
EVERY = 4
K, D = 64, 4
POLICIES = ("random", "jukebox", "kmeans")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Net(torch.nn.Module):
    """1x1-conv encoder + toy quantizer; returns (z, indices, loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Conv2d(3, D, 1)
        self.quantizer = ToyQuantizer(K, D, init=torch.randn(K, D) * 0.01)  # collapses without resets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        out = self.quantizer(z)
        return z, out.indices, out.losses["codebook"] + 0.25 * out.losses["commitment"]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        dist = DistContext(rank, WORLD, rank, torch.device("cpu"), True)
        for name in POLICIES:
            _train(rank, dist, name, out_dir)
    finally:
        torch_dist.destroy_process_group()


def _train(rank: int, dist: DistContext, policy_name: str, out_dir: str) -> None:
    torch.manual_seed(0)  # same initial model on every rank
    net = _Net()
    quantizer = net.quantizer
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    policy_cls = get_registry().get("reset_policies", policy_name).cls
    policy = policy_cls(policy_cls.Params(), codebook_size=K, dim=D, seed=123 + rank)  # rank 0 decides
    manager = CodebookManager(
        quantizer, policy, ResetRef(name=policy_name, every=EVERY), CodebookMonitor(K, 4096), dist
    )
    data = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
    resets = []
    for step in range(STEPS):
        x = torch.randn(4, 3, 4, 4, generator=data) * (1 + rank)
        z, indices, loss = ddp(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n = manager.after_step(step, z.detach(), indices, [opt])
        if n:
            resets.append((step, n))
            books = dist.all_gather_cat(quantizer.codebook()[None])
            assert torch.equal(books[0], books[1]), f"code-books diverged after the reset at step {step}"
            counts = dist.all_gather_cat(manager.monitor.counts()[None])
            assert torch.equal(counts[0], counts[1]), "monitors saw different data"
    state = {
        "codebook": quantizer.codebook().clone(),
        "resets": resets,
        "events": manager.monitor.reset_events,
    }
    torch.save(state, os.path.join(out_dir, f"{policy_name}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Train once per policy on 2 ranks (one process pair for all policies)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("policy_name", POLICIES)
def test_codebooks_identical_on_both_ranks_after_every_reset(results, policy_name):
    r0 = torch.load(results / f"{policy_name}-rank0.pt", weights_only=True)
    r1 = torch.load(results / f"{policy_name}-rank1.pt", weights_only=True)
    assert r0["resets"], f"{policy_name}: no reset happened in {STEPS} steps"
    assert r0["resets"] == r1["resets"] and r0["events"] == r1["events"]
    assert torch.equal(r0["codebook"], r1["codebook"])
