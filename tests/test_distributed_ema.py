"""Under DDP the `vq` EMA code-book is fed by every rank's batch and stays identical."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from vqkit.components.vq import VectorQuantizer


def _make() -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(VectorQuantizer.Params(codebook_size=16, ema=True), dim=4).train()


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        q = _make()
        q(_batch(rank))
        torch.save({k: v.clone() for k, v in q.state_dict().items()}, f"{out}/rank{rank}.pt")
        torch_dist.barrier()  # no rank tears gloo down while the other is still in a collective (SIGABRT)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.xdist_group("torchrun")
def test_ema_uses_all_ranks_and_codebooks_agree(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # the same as one process seeing both ranks' batches at once
    single = _make()
    single(torch.cat([_batch(0), _batch(1)]))
    for key in ("ema_cluster_size", "ema_embed_sum"):
        assert torch.equal(r0[key], r1[key]), key
        torch.testing.assert_close(r0[key], single.state_dict()[key])
