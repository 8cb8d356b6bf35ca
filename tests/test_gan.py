"""GAN objectives, the adaptive weight, the ``patchgan`` discriminator and the
``discriminator-features`` perceptual loss."""
from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from vqkit.components.conv import ConvDecoder
from vqkit.components.disc_features import DiscriminatorFeatures, frozen_features
from vqkit.components.patchgan import PatchGAN
from vqkit.errors import VqkitError
from vqkit.gan import (
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from vqkit.interfaces import Discriminator
from vqkit.plugins import build_registry


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


# --------------------------------------------------------------------------- losses
def test_hinge_values():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # relu(1 - real) = [0, .5] -> .25 ; relu(1 + fake) = [0, 1.5] -> .75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    zeros = torch.zeros(3, 1, 2, 2)
    assert hinge_d_loss(zeros, zeros).item() == pytest.approx(1.0)
    # a confident, correct discriminator has zero hinge loss
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_non_saturating_values():
    real = torch.tensor([3.0, -1.0])
    fake = torch.tensor([-1.0, 2.0])
    expected_d = 0.5 * (
        (softplus(-3.0) + softplus(1.0)) / 2 + (softplus(-1.0) + softplus(2.0)) / 2
    )
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    expected_g = (softplus(1.0) + softplus(-2.0)) / 2  # -log sigmoid(fake)
    assert non_saturating_g_loss(fake).item() == pytest.approx(expected_g, rel=1e-6)
    zeros = torch.zeros(5)
    assert non_saturating_d_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    assert non_saturating_g_loss(zeros).item() == pytest.approx(math.log(2))
    # it equals binary cross-entropy with real = 1, fake = 0
    bce = 0.5 * (
        F.binary_cross_entropy_with_logits(real, torch.ones(2))
        + F.binary_cross_entropy_with_logits(fake, torch.zeros(2))
    )
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(bce.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["hinge", "non-saturating"])
def test_generator_loss_pushes_fake_logits_up(kind):
    fake = torch.tensor([-0.5, 0.3], requires_grad=True)
    generator_loss(kind, fake).backward()
    assert (fake.grad < 0).all()
    real = torch.tensor([0.2, -0.1], requires_grad=True)
    fake = torch.tensor([-0.5, 0.3], requires_grad=True)
    discriminator_loss(kind, real, fake).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()


def test_dispatch_and_unknown_kind():
    real, fake = torch.randn(4), torch.randn(4)
    assert torch.equal(discriminator_loss("hinge", real, fake), hinge_d_loss(real, fake))
    assert torch.equal(generator_loss("non-saturating", fake), non_saturating_g_loss(fake))
    with pytest.raises(ValueError, match="unknown GAN loss 'wgan' \\(valid: hinge, non-saturating\\)"):
        discriminator_loss("wgan", real, fake)


# --------------------------------------------------------------------------- adaptive weight
def test_adaptive_weight_matches_hand_computation():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    a = torch.tensor([3.0, 0.0, 4.0])
    b = torch.tensor([1.0, 1.0, 2.0])
    rec = (w * a).sum()  # d/dw = a, norm 5
    g = (w**2 * b).sum()  # d/dw = 2 w b = [2, -4, 2], norm sqrt(24)
    out = adaptive_weight(rec, g, w)
    assert out.item() == pytest.approx(5.0 / (math.sqrt(24.0) + 1e-4), rel=1e-6)
    assert not out.requires_grad and out.ndim == 0
    assert w.grad is None  # nothing accumulated
    rec.backward()  # graphs were retained for the real backward pass
    assert torch.equal(w.grad, a)


def test_adaptive_weight_is_clamped():
    w = nn.Parameter(torch.ones(2))
    rec = (w * 1e3).sum()
    g = (w * 0.0).sum()  # zero gradient: ratio 1e3*sqrt(2) / 1e-4 is huge
    assert adaptive_weight(rec, g, w).item() == 1e4
    assert adaptive_weight(rec, g, w, max=7.0).item() == 7.0


def test_adaptive_weight_with_the_conv_decoder():
    torch.manual_seed(0)
    dec = ConvDecoder(ConvDecoder.Params(channels=[8]), out_channels=3, latent_dim=4, factor=2)
    d = PatchGAN(PatchGAN.Params(n_layers=1, channels=4), channels=3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    y = dec(torch.randn(2, 4, 4, 4))
    rec = (y - x).abs().mean()
    g = hinge_g_loss(d(y))
    weight = adaptive_weight(rec, g, dec.last_layer_weight())
    w = dec.last_layer_weight()
    (gr,) = torch.autograd.grad(rec, w, retain_graph=True)
    (gg,) = torch.autograd.grad(g, w, retain_graph=True)
    assert weight.item() == pytest.approx((gr.norm() / (gg.norm() + 1e-4)).item(), rel=1e-5)
    assert 0 < weight.item() < 1e4
    with pytest.raises(ValueError, match="last_layer_weight"):
        adaptive_weight(rec, g, None)


# --------------------------------------------------------------------------- patchgan
@pytest.mark.parametrize(
    ("n_layers", "size", "logits"),
    [(3, (32, 32), (2, 2)), (3, (64, 48), (6, 4)), (2, (28, 28), (5, 5)), (1, (8, 16), (2, 6))],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_patchgan_logits_and_features(n_layers, size, logits, channels):
    d = PatchGAN(PatchGAN.Params(n_layers=n_layers, channels=8), channels=channels)
    x = torch.rand(2, channels, *size) * 2 - 1
    out = d(x)
    assert out.shape == (2, 1, *logits)
    feats = d.features(x)
    assert len(feats) == n_layers + 1
    assert [f.shape[1] for f in feats] == [8 * min(2**k, 8) for k in range(n_layers + 1)]
    assert all(f.shape[0] == 2 for f in feats)
    assert (feats[0].shape[-1] * 2) == size[1]
    # features are taken after LeakyReLU(0.2): no value below 0.2 * min of the pre-activation
    assert all((f >= 0).any() and (f < 0).any() for f in feats)


def test_patchgan_default_params_and_too_small_input():
    d = PatchGAN(PatchGAN.Params(), channels=3)
    assert d.min_size == 24
    assert d(torch.zeros(1, 3, 24, 24)).shape == (1, 1, 1, 1)
    with pytest.raises(VqkitError, match="n_layers=3 needs images of at least 24x24 px.*got 16x16"):
        d(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        d(torch.zeros(1, 1, 32, 32))


def test_patchgan_dcgan_init():
    torch.manual_seed(0)
    d = PatchGAN(PatchGAN.Params(norm="batch"), channels=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    big = max(convs, key=lambda m: m.weight.numel())
    assert big.weight.mean().abs() < 1e-3
    assert big.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(m.bias is None or not m.bias.any() for m in convs)
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3
    scale = torch.cat([m.weight.detach() for m in norms])
    assert scale.mean().item() == pytest.approx(1.0, abs=0.01)
    assert 0.01 < scale.std().item() < 0.03
    # inner convs carry no bias when a norm follows; with norm=none they do
    assert sum(m.bias is None for m in convs) == 3
    plain = PatchGAN(PatchGAN.Params(norm="none"), channels=3)
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("norm", ["group", "batch", "instance", "none"])
def test_patchgan_norms_train_and_backprop(norm):
    torch.manual_seed(0)
    d = PatchGAN(PatchGAN.Params(n_layers=2, channels=8, norm=norm), channels=3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    discriminator_loss("hinge", d(x), d(-x)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


def test_patchgan_learns_to_separate():
    torch.manual_seed(0)
    d = PatchGAN(PatchGAN.Params(n_layers=1, channels=8), channels=1)
    opt = torch.optim.Adam(d.parameters(), lr=5e-3, betas=(0.5, 0.999))
    real = torch.rand(8, 1, 8, 8) * 2 - 1
    fake = torch.zeros(8, 1, 8, 8)  # flat images
    first = discriminator_loss("non-saturating", d(real), d(fake)).item()
    for _ in range(15):
        loss = discriminator_loss("non-saturating", d(real), d(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(2), abs=0.05)  # DCGAN init: logits near 0
    assert loss.item() < 0.2
    assert d(real).mean() > 0 > d(fake).mean()


# --------------------------------------------------------------------------- disc-features
def _small_d(norm: str = "group") -> PatchGAN:
    torch.manual_seed(0)
    return PatchGAN(PatchGAN.Params(n_layers=2, channels=8, norm=norm), channels=3)


def _images():
    torch.manual_seed(1)
    recon = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    return recon, target


def test_disc_features_declares_its_contract():
    assert DiscriminatorFeatures.needs_discriminator is True
    assert DiscriminatorFeatures.input_range == (-1.0, 1.0)
    loss = DiscriminatorFeatures(DiscriminatorFeatures.Params(), channels=3)
    assert list(loss.parameters()) == []


def test_disc_features_grad_reaches_reconstruction_not_discriminator():
    d = _small_d()
    d.out.weight.requires_grad_(False)  # a partly frozen discriminator keeps its flags
    flags = {n: p.requires_grad for n, p in d.named_parameters()}
    recon, target = _images()
    target.requires_grad_()
    loss = DiscriminatorFeatures(DiscriminatorFeatures.Params(), channels=3)(recon, target, d)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and loss.item() > 0
    loss.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert target.grad is None  # target features are detached
    assert all(p.grad is None for p in d.parameters())
    assert {n: p.requires_grad for n, p in d.named_parameters()} == flags
    # the discriminator still trains normally afterwards
    discriminator_loss("hinge", d(target), d(recon.detach())).backward()
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)


def test_disc_features_value_matches_manual_computation():
    d = _small_d()
    recon, target = _images()
    with torch.no_grad():
        fr, ft = d.features(recon), d.features(target)
    all_l1 = sum(F.l1_loss(a, b) for a, b in zip(fr, ft))
    loss = DiscriminatorFeatures(DiscriminatorFeatures.Params(), channels=3)
    assert loss(recon, target, d).item() == pytest.approx(all_l1.item(), rel=1e-5)
    chosen = DiscriminatorFeatures(
        DiscriminatorFeatures.Params(distance="l2", layers=[0, -1], layer_weights=[1.0, 0.5]),
        channels=3,
    )
    expected = F.mse_loss(fr[0], ft[0]) + 0.5 * F.mse_loss(fr[-1], ft[-1])
    assert chosen(recon, target, d).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss(target, target, d).item() == 0.0


def test_disc_features_normalize_compares_unit_feature_vectors():
    d = _small_d()
    recon, target = _images()
    with torch.no_grad():
        fr, ft = d.features(recon), d.features(target)
    unit = lambda t: t / torch.sqrt((t * t).sum(dim=1, keepdim=True) + 1e-10)  # noqa: E731
    expected = sum(F.l1_loss(unit(a), unit(b)) for a, b in zip(fr, ft))
    loss = DiscriminatorFeatures(DiscriminatorFeatures.Params(normalize=True), channels=3)
    assert loss(recon, target, d).item() == pytest.approx(expected.item(), rel=1e-5)
    # scaling the last block's norm (gamma and beta; LeakyReLU is positively homogeneous)
    # scales its features 10x: the same distance normalized, 10x larger unnormalized
    raw = DiscriminatorFeatures(DiscriminatorFeatures.Params(layers=[-1]), channels=3)
    norm = DiscriminatorFeatures(DiscriminatorFeatures.Params(layers=[-1], normalize=True), channels=3)
    before = raw(recon, target, d).item(), norm(recon, target, d).item()
    with torch.no_grad():
        for p in d.blocks[-1].parameters():
            if p.dim() == 1:
                p.mul_(10.0)
    after = raw(recon, target, d).item(), norm(recon, target, d).item()
    assert after[0] > 5 * before[0]
    assert after[1] == pytest.approx(before[1], rel=1e-3)
    assert loss(target, target, d).item() == 0.0


def test_disc_features_does_not_touch_batchnorm_statistics():
    d = _small_d("batch").train()
    before = {n: b.clone() for n, b in d.named_buffers()}
    recon, target = _images()
    DiscriminatorFeatures(DiscriminatorFeatures.Params(), channels=3)(recon, target, d).backward()
    for n, b in d.named_buffers():
        assert torch.equal(b, before[n]), n
    d(target)  # an ordinary forward does update them: the check above can fail
    assert not torch.equal(d.blocks[1][1].running_mean, before["blocks.1.1.running_mean"])


class _Exploding(PatchGAN):
    def features(self, x):
        feats = super().features(x)
        raise RuntimeError("boom after %d blocks" % len(feats))


def test_disc_features_leaves_discriminator_intact_on_exception():
    d = _Exploding(PatchGAN.Params(n_layers=1, channels=4), channels=3)
    d.blocks[0][0].bias.requires_grad_(False)
    params = dict(d.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    recon, target = _images()
    with pytest.raises(RuntimeError, match="boom"):
        DiscriminatorFeatures(DiscriminatorFeatures.Params(), channels=3)(recon, target, d)
    after = dict(d.named_parameters())
    assert after.keys() == params.keys()
    assert all(after[n] is params[n] for n in params)  # the module's own tensors are back
    assert {n: p.requires_grad for n, p in after.items()} == flags
    d.out(d.blocks[1](d.blocks[0](recon))).sum().backward()
    assert d.out.weight.grad is not None


def test_disc_features_is_reentrant():
    """A discriminator whose features themselves use frozen_features (nested calls)."""

    class Nested(PatchGAN):
        def features(self, x):
            if getattr(self, "_inner", False):
                return super().features(x)
            self._inner = True
            try:
                inner = frozen_features(self, x)
            finally:
                self._inner = False
            return [f + g for f, g in zip(super().features(x), inner)]

    d = Nested(PatchGAN.Params(n_layers=1, channels=4), channels=3)
    params = dict(d.named_parameters())
    recon, target = _images()
    loss = DiscriminatorFeatures(DiscriminatorFeatures.Params(), channels=3)(recon, target, d)
    loss.backward()
    assert recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())
    assert all(dict(d.named_parameters())[n] is p for n, p in params.items())


def test_disc_features_errors():
    recon, target = _images()
    loss = DiscriminatorFeatures(DiscriminatorFeatures.Params(), channels=3)
    with pytest.raises(VqkitError, match="needs a discriminator: add a `discriminator:` section"):
        loss(recon, target, None)
    wrong = DiscriminatorFeatures(DiscriminatorFeatures.Params(layers=[0, 5]), channels=3)
    with pytest.raises(VqkitError, match=r"layers \[5\] do not exist; the discriminator gives 3"):
        wrong(recon, target, _small_d())
    weights = DiscriminatorFeatures(DiscriminatorFeatures.Params(layer_weights=[1.0]), channels=3)
    with pytest.raises(VqkitError, match="layer_weights has 1 entries but 3 layers"):
        weights(recon, target, _small_d())
    with pytest.raises(ValidationError, match="give one weight per layer"):
        DiscriminatorFeatures.Params(layers=[0, 1], layer_weights=[1.0])
    with pytest.raises(ValidationError, match="duplicates"):
        DiscriminatorFeatures.Params(layers=[1, 1])
    with pytest.raises(ValidationError, match="distance"):
        DiscriminatorFeatures.Params(distance="cosine")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_disc_features_under_ddp():
    """With a DDP-wrapped discriminator the term gives D no gradient, and the next
    discriminator step through DDP still works (the reducer is not confused)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(_small_d())
        recon, target = _images()
        loss = DiscriminatorFeatures(DiscriminatorFeatures.Params(), channels=3)(recon, target, ddp)
        loss.backward()
        assert recon.grad.abs().sum() > 0
        assert all(p.grad is None for p in ddp.parameters())
        discriminator_loss("hinge", ddp(target), ddp(recon.detach())).backward()
        assert all(p.grad is not None for p in ddp.parameters())
    finally:
        dist.destroy_process_group()


def test_registered_through_the_entry_points():
    registry = build_registry()
    assert registry.get("discriminators", "patchgan").cls is PatchGAN
    assert registry.get("perceptual_losses", "discriminator-features").cls is DiscriminatorFeatures
    assert issubclass(PatchGAN, Discriminator)
