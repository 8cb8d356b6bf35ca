"""The training objective the trainer composes (vqkit.train.objective), checked against a
computation by hand with fixed weights and inputs: the weights of the recipe's losses, β
on the commitment term, the adaptive GAN weight, start steps, where gradients go, and the
adaptive weight under fp16 with a gradient scaler."""
from __future__ import annotations

import pytest
import torch

from vqkit import gan
from vqkit.recipe import recipe_from_dict
from vqkit.train import objective
from vqkit.train.build import build_all, loss_keys

BETA, W_L1, W_L2, W_GAN = 0.3, 1.5, 0.5, 0.8
L2_START, GAN_START = 3, 2

RECIPE = {
    "vqkit": 1, "name": "objective", "seed": 0,
    "data": {"name": "fashion-mnist", "params": {"image_size": 16, "fit": "resize", "limit": 8}},
    "encoder": {"name": "conv", "params": {"channels": [8, 8], "factor": 4, "latent_dim": 4}},
    "quantizer": {"name": "vq", "params": {"codebook_size": 16, "beta": BETA}},
    "decoder": {"name": "conv", "params": {"channels": [8, 8]}},
    "losses": [{"name": "pixel-l1", "weight": W_L1}, {"name": "pixel-l2", "weight": W_L2, "start_step": L2_START}],
    "discriminator": {"name": "patchgan", "params": {"n_layers": 1, "channels": 8}, "loss": "hinge",
                      "weight": W_GAN, "start_step": GAN_START, "adaptive_weight": True},
    "train": {"steps": 10, "batch_size": 4, "device": "cpu"},
}


@pytest.fixture
def parts():
    """The trainer's components built from the recipe, with fixed weights and a batch."""
    torch.manual_seed(0)
    recipe = recipe_from_dict(RECIPE)
    built = build_all(recipe)
    model, disc = built.model.train(), built.discriminator.train()
    with torch.no_grad():  # spread the codes so that several are used
        q = model.quantizer
        q.replace_codes(torch.arange(16), torch.randn(16, 4, generator=torch.Generator().manual_seed(1)) * 0.1)
    for p in disc.parameters():
        p.requires_grad_(False)  # the trainer freezes it for the generator pass
    losses = list(zip(loss_keys(recipe.model.losses), recipe.model.losses, built.losses))
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return recipe, model, disc, losses, x


def _by_hand(model, disc, x, step):
    """The objective written out: returns (total, named parts)."""
    recon, out, z = model(x)
    q = model.quantizer.decode_indices(out.indices)
    rec = W_L1 * (recon - x).abs().mean()
    if step >= L2_START:
        rec = rec + W_L2 * (recon - x).square().mean()
    codebook = (q - z.detach()).square().mean()  # value of sg[z] - e
    commitment = (z - q).square().mean()
    total = rec + codebook + BETA * commitment
    parts = {"codebook": codebook, "commitment": commitment}
    if step >= GAN_START:
        g = -disc(recon).mean()
        w = model.decoder.last_layer_weight()
        (gr,) = torch.autograd.grad(rec, w, retain_graph=True)
        (gg,) = torch.autograd.grad(g, w, retain_graph=True)
        lam = (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4).detach()
        total = total + lam * W_GAN * g
        parts.update(g=g, lam=lam)
    return total, parts


@pytest.mark.parametrize("step", [0, GAN_START, L2_START, 9])
def test_total_is_the_weighted_sum_computed_by_hand(parts, step):
    recipe, model, disc, losses, x = parts
    got = objective.generator_objective(model, x, step, losses, discriminator=disc, gan_ref=recipe.model.discriminator)
    want, hand = _by_hand(model, disc, x, step)
    torch.testing.assert_close(got.total, want, rtol=1e-5, atol=1e-6)
    expected_keys = {"loss/pixel-l1", "loss/codebook", "loss/commitment", "loss/total"}
    if step >= L2_START:
        expected_keys.add("loss/pixel-l2")
    if step >= GAN_START:
        expected_keys |= {"loss/gan_g", "gan/adaptive_weight"}
        torch.testing.assert_close(got.terms["gan/adaptive_weight"], hand["lam"], rtol=1e-4, atol=0)
        torch.testing.assert_close(got.terms["loss/gan_g"], hand["g"])
    assert set(got.terms) == expected_keys, "a start_step was not honoured"
    torch.testing.assert_close(got.terms["loss/commitment"], hand["commitment"])  # logged unweighted
    assert model.quantizer.loss_weights()["commitment"] == BETA


def test_codebook_gradient_comes_only_from_the_codebook_term(parts):
    recipe, model, disc, losses, x = parts
    embed = model.quantizer.embed
    got = objective.generator_objective(model, x, 9, losses, discriminator=disc, gan_ref=recipe.model.discriminator)
    (only_codebook,) = torch.autograd.grad(got.terms["loss/codebook"], embed, retain_graph=True)
    got.total.backward()
    assert embed.grad is not None and embed.grad.abs().sum() > 0
    torch.testing.assert_close(embed.grad, only_codebook, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in disc.parameters()), "the generator pass trained the discriminator"


def test_discriminator_sees_detached_reconstructions(parts):
    recipe, model, disc, losses, x = parts
    got = objective.generator_objective(model, x, 9, losses, discriminator=disc, gan_ref=recipe.model.discriminator)
    model.zero_grad(set_to_none=True)
    for p in disc.parameters():
        p.requires_grad_(True)
    d_loss = objective.discriminator_objective(disc, "hinge", x, got.reconstruction).total
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters()), "the discriminator's loss reached the autoencoder"
    assert all(p.grad is not None for p in disc.parameters())
    real, fake = disc(x), disc(got.reconstruction.detach())
    torch.testing.assert_close(d_loss, gan.hinge_d_loss(real, fake))


@pytest.mark.parametrize("small", [1e-4, 1e-5])
def test_adaptive_weight_from_scaled_losses_under_fp16(small):
    """Small losses (per-element gradients ~1e-8: large images, small weights) underflow in
    an fp16 backward: the adaptive weight is taken from the scaled losses, as the
    GradScaler scales the backward (the ratio does not depend on the scale). Unscaled, it
    was 27% off (1e-4) or 0 (1e-5)."""
    torch.manual_seed(0)
    recipe = recipe_from_dict({**RECIPE, "losses": [{"name": "pixel-l1", "weight": small}]})
    built = build_all(recipe)
    model, disc = built.model.train(), built.discriminator.train()
    for p in disc.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(small)
    losses = list(zip(loss_keys(recipe.model.losses), recipe.model.losses, built.losses))
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ref = objective.generator_objective(model, x, 9, losses, discriminator=disc, gan_ref=recipe.model.discriminator)
    lam_fp32 = float(ref.terms["gan/adaptive_weight"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with torch.autocast("cpu", dtype=torch.float16):
        got = objective.generator_objective(
            model, x, 9, losses, discriminator=disc, gan_ref=recipe.model.discriminator,
            grad_scale=scaler.scale(torch.ones(())),
        )
    assert got.reconstruction.dtype == torch.float32 and lam_fp32 > 0
    assert float(got.terms["gan/adaptive_weight"]) == pytest.approx(lam_fp32, rel=0.01)


def test_adaptive_weight_of_overflowed_gradients_is_finite():
    w = torch.ones(3, requires_grad=True)
    rec, g = (w * 1e38).sum(), (w * 1e38).sum()
    weight = gan.adaptive_weight(rec, g, w, scale=torch.tensor(1e3))  # scaled gradients are inf
    assert bool(torch.isfinite(weight)) and float(weight) in (0.0, 1e4)


def test_the_trainer_step_logs_this_objective(parts):
    """The trainer's step computes its total with generator_objective: the logged
    ``loss/total`` equals the hand computation on the weights before the step."""
    import copy

    from vqkit.train.trainer import Trainer

    recipe = parts[0]
    trainer = Trainer(recipe, quiet=True)
    trainer._setup()
    family = trainer.family
    x = parts[4]
    for step in (0, GAN_START, L2_START):
        model, disc = copy.deepcopy(family.model), copy.deepcopy(family.disc)
        for p in disc.parameters():
            p.requires_grad_(False)
        want, _ = _by_hand(model, disc, x, step)
        terms = family.train_step(x, step)
        torch.testing.assert_close(terms["loss/total"], want.detach(), rtol=1e-5, atol=1e-6)
        assert ("loss/gan_d" in terms) == (step >= GAN_START)
