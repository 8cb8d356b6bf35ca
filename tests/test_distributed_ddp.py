"""Two gloo processes (one spawn for all scenarios): the pieces of the trainer where ranks
must agree.

* the discriminator's optimizer step with a gradient scaler (the CPU ``GradScaler``
  stands in for CUDA's) when only one rank's gradients overflow;
* the non-finite check before a checkpoint, which every rank must make together;
* the ``vq`` k-means initialisation, which must give every rank the same code-book
  before its first search;
* LeCam's anchors, moved by logits averaged over the ranks.
"""
from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from vqkit import gan
from vqkit.components.patchgan import PatchGAN
from vqkit.components.vq import VectorQuantizer
from vqkit.train import objective
from vqkit.train.distributed import DistContext

WORLD = 2

TINY_RECIPE = {
    "vqkit": 1, "name": "ddp-save", "seed": 0,
    "data": {"name": "fashion-mnist", "params": {"image_size": 16, "fit": "resize", "limit": 32}},
    "encoder": {"name": "conv", "params": {"channels": [4, 4], "factor": 4, "latent_dim": 4}},
    "quantizer": {"name": "vq", "params": {"codebook_size": 8}},
    "decoder": {"name": "conv", "params": {"channels": [4, 4]}},
    "losses": [{"name": "pixel-l1"}],
    "train": {"steps": 2, "batch_size": 4, "device": "cpu"},
    "eval": {"num_samples": 4, "batch_size": 4},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- scenarios
def _disc_scaler(rank: int, dist: DistContext, out: str) -> None:
    """Rank 1's gradients hold inf: both ranks must skip the step and halve the scale."""
    torch.manual_seed(0)
    disc = PatchGAN(PatchGAN.Params(n_layers=1, channels=4), channels=1)
    params = [p for p in disc.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    start = [p.detach().clone() for p in params]
    history = []
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)
        real, fake = torch.rand(2, 1, 12, 12, generator=g) * 2 - 1, torch.rand(2, 1, 12, 12, generator=g) * 2 - 1
        opt.zero_grad(set_to_none=True)
        d_loss = objective.discriminator_objective(disc, "hinge", real, fake).total
        scaler.scale(d_loss).backward()
        if step == 0 and rank == 1:
            params[0].grad.view(-1)[0] = float("inf")  # an fp16 overflow on one rank only
        objective.optimizer_step(opt, params, scaler, clip=1.0, dist=dist, average=params)
        history.append(([p.detach().clone() for p in params], float(scaler.get_scale())))
    torch.save({"start": start, "history": history}, os.path.join(out, f"disc-rank{rank}.pt"))


def _save_check(rank: int, dist: DistContext, out: str) -> None:
    """Rank 0's weights are NaN: ``save`` must raise on every rank (a rank that returned
    would wait for rank 0 at its next collective forever)."""
    from vqkit.recipe import recipe_from_dict
    from vqkit.train.loop import NonFiniteLoss
    from vqkit.train.trainer import Trainer

    trainer = Trainer(recipe_from_dict(TINY_RECIPE), quiet=True)
    trainer._setup()
    if rank == 0:
        with torch.no_grad():
            next(trainer.family.model.decoder.parameters()).view(-1)[0] = float("nan")
    try:
        trainer.save()
        outcome = "returned"
    except NonFiniteLoss:
        outcome = "raised"
    torch.save(outcome, os.path.join(out, f"save-rank{rank}.pt"))


def _kmeans_init(rank: int, dist: DistContext, out: str) -> None:
    """Each rank's first batch differs; the k-means code-book must not."""
    results = {}
    for ema in (False, True):
        torch.manual_seed(0)
        q = VectorQuantizer(
            VectorQuantizer.Params(codebook_size=8, kmeans_init=True, kmeans_iters=5, ema=ema), dim=4
        ).train()
        z = _kmeans_batch(rank)
        o = q(z)
        results[ema] = {
            "state": {k: v.clone() for k, v in q.state_dict().items()},
            "codebook": q.codebook(),
            "decoded": q.decode_indices(o.indices),
            "quantized": o.quantized.detach().clone(),
        }
    torch.save(results, os.path.join(out, f"kmeans-rank{rank}.pt"))


def _lecam(rank: int, dist: DistContext, out: str) -> None:
    """Each rank's images differ; LeCam's anchors (moved by the mean logits) must not."""
    torch.manual_seed(0)
    disc = PatchGAN(PatchGAN.Params(n_layers=1, channels=4), channels=1)
    anchors = gan.LeCamAnchors()
    seen = []
    for step in range(3):
        real, fake = _lecam_batch(rank, step)
        d = objective.discriminator_objective(disc, "hinge", real, fake, lecam=0.5, anchors=anchors,
                                              lecam_decay=0.9, reduce=dist.all_reduce_mean)
        seen.append(torch.stack([disc(real).mean(), disc(fake).mean()]).detach())
        d.total.backward()  # the penalty is differentiable on every rank
    torch.save({"anchors": anchors.state_dict(), "means": seen}, os.path.join(out, f"lecam-rank{rank}.pt"))


def _lecam_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.rand(2, 1, 12, 12, generator=g) * 2 - 1, torch.rand(2, 1, 12, 12, generator=g) - 1


def _kmeans_batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(50 + rank)
    centres = torch.randn(8, 4, generator=g) * 5
    rows = centres[torch.randint(0, 8, (3 * 16,), generator=g)] + 0.1 * torch.randn(3 * 16, 4, generator=g)
    return rows.T.reshape(4, 3, 4, 4).permute(1, 0, 2, 3).contiguous()  # (3, 4, 4, 4)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        dist = DistContext(rank, WORLD, rank, torch.device("cpu"), True)
        for scenario in (_disc_scaler, _kmeans_init, _lecam, _save_check):  # _save_check last: it may desync
            scenario(rank, dist, out)
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def _load(results, name: str, rank: int):
    return torch.load(results / f"{name}-rank{rank}.pt", weights_only=True)


# ----------------------------------------------------------------------------- tests
@pytest.mark.xdist_group("torchrun")
def test_discriminator_step_with_a_scaler_agrees_when_one_rank_overflows(results):
    r0, r1 = _load(results, "disc", 0), _load(results, "disc", 1)
    (w0, scale0), (w1, scale1) = r0["history"][0], r1["history"][0]
    for a, b, start in zip(w0, w1, r0["start"]):
        assert bool(torch.isfinite(a).all()), "rank 0 stepped with the averaged inf gradients"
        assert torch.equal(a, b) and torch.equal(a, start), "the step after an overflow must be skipped on every rank"
    assert scale0 == scale1 == 512.0
    (w0, scale0), (w1, scale1) = r0["history"][1], r1["history"][1]
    assert scale0 == scale1 == 512.0
    for a, b in zip(w0, w1):  # the next step is taken, identically
        assert torch.equal(a, b)
    assert any(not torch.equal(a, s) for a, s in zip(w0, r0["start"]))


@pytest.mark.xdist_group("torchrun")
def test_nonfinite_weights_stop_every_rank_before_a_checkpoint(results):
    assert [_load(results, "save", r) for r in range(WORLD)] == ["raised", "raised"]


@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("ema", [False, True])
def test_kmeans_init_is_one_codebook_fitted_on_all_ranks_batches(results, ema):
    r0, r1 = _load(results, "kmeans", 0)[ema], _load(results, "kmeans", 1)[ema]
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert torch.equal(r0["codebook"], r1["codebook"])
    for r in (r0, r1):
        assert torch.equal(r["decoded"], r["quantized"])
    # the same code-book as one process k-means-initialised on both batches (rank order)
    torch.manual_seed(0)
    single = VectorQuantizer(
        VectorQuantizer.Params(codebook_size=8, kmeans_init=True, kmeans_iters=5, ema=False), dim=4
    ).train()
    single(torch.cat([_kmeans_batch(0), _kmeans_batch(1)]))
    if not ema:
        torch.testing.assert_close(r0["codebook"], single.codebook())
    else:
        torch.testing.assert_close(r0["state"]["embed"], single.codebook())


@pytest.mark.xdist_group("torchrun")
def test_lecam_anchors_are_the_same_on_every_rank(results):
    r0, r1 = _load(results, "lecam", 0), _load(results, "lecam", 1)
    for key in r0["anchors"]:
        assert torch.equal(r0["anchors"][key], r1["anchors"][key]), key
    # the moving average, decay 0.9, of the mean logits averaged over both ranks
    want = None
    for m0, m1 in zip(r0["means"], r1["means"]):
        mean = (m0 + m1) / 2
        want = mean if want is None else 0.9 * want + 0.1 * mean
    torch.testing.assert_close(torch.stack([r0["anchors"]["real"], r0["anchors"]["fake"]]), want)
    assert int(r0["anchors"]["updates"]) == 3
