"""GAN objectives and the adaptive generator weight, as pure functions.

Logits are unbounded discriminator outputs of any shape (e.g. PatchGAN's ``(B, 1, h, w)``);
every loss averages over all elements and returns a 0-dim tensor. Positive logits mean
"real". The discriminator losses carry a factor 1/2 (VQGAN's convention), so a
discriminator that outputs 0 everywhere has hinge loss 1 and non-saturating loss ln 2.

=================  ============================================  ==========================
loss               discriminator                                 generator
=================  ============================================  ==========================
``hinge``          ½·(E[relu(1 − D(x))] + E[relu(1 + D(x̂))])      −E[D(x̂)]
``non-saturating`` ½·(E[softplus(−D(x))] + E[softplus(D(x̂))])    E[softplus(−D(x̂))]
=================  ============================================  ==========================

(``softplus(−l) = −log σ(l)``: the non-saturating pair is the logistic GAN loss.)
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "GAN_LOSSES",
    "GanLoss",
    "adaptive_weight",
    "discriminator_loss",
    "generator_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
]

GanLoss = Literal["hinge", "non-saturating"]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½·(mean(relu(1 − real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−mean(fake)."""
    return -logits_fake.mean()


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½·(mean(softplus(−real)) + mean(softplus(fake))): binary cross-entropy on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """mean(softplus(−fake)) = −mean(log σ(fake))."""
    return F.softplus(-logits_fake).mean()


GAN_LOSSES = {
    "hinge": (hinge_d_loss, hinge_g_loss),
    "non-saturating": (non_saturating_d_loss, non_saturating_g_loss),
}


def _pair(kind: str):
    try:
        return GAN_LOSSES[kind]
    except KeyError:
        raise ValueError(
            f"unknown GAN loss {kind!r} (valid: {', '.join(sorted(GAN_LOSSES))})"
        ) from None


def discriminator_loss(kind: GanLoss, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator objective named ``kind`` (``hinge`` or ``non-saturating``)."""
    return _pair(kind)[0](logits_real, logits_fake)


def generator_loss(kind: GanLoss, logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator (adversarial) objective named ``kind``."""
    return _pair(kind)[1](logits_fake)


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max: float = 1e4,  # noqa: A002 - the name the trainer uses
    scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """VQGAN's adaptive generator weight ``‖∇_w rec‖ / (‖∇_w g‖ + 1e-4)``, clamped to
    ``[0, max]`` and detached.

    ``w`` is ``last_layer_weight`` (the decoder's final weight); both losses must be 0-dim
    and depend on it. Gradients are taken with ``torch.autograd.grad`` (graphs retained,
    nothing accumulated into ``.grad``), their norms in float32. The caller multiplies the
    result by the configured discriminator weight.

    ``scale``: the gradient scaler's scale under mixed precision. The gradients are then
    taken of ``scale * rec`` and ``scale * g`` (so fp16 backward passes do not underflow
    to 0, as the trainer's own backward does not) and the weight is
    ``‖∇(s·rec)‖ / (‖∇(s·g)‖ + s·1e-4)``, the same value. A non-finite ratio (the scaled
    gradients overflowed: the scaler skips that step) gives 0.
    """
    if last_layer_weight is None:
        raise ValueError(
            "adaptive_weight needs the decoder's last layer weight; this decoder's "
            "last_layer_weight() returned None (disable the adaptive weight)"
        )
    s = 1.0 if scale is None else scale
    (rec_grad,) = torch.autograd.grad(rec_loss * s, last_layer_weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss * s, last_layer_weight, retain_graph=True)
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4 * s)
    weight = torch.nan_to_num(weight, nan=0.0, posinf=max)
    return weight.clamp(0.0, max).detach()
