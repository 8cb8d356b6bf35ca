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

Two regularisers of the discriminator, added to its loss (off by default; the recipe's
``discriminator.r1`` and ``discriminator.lecam``):

* R1 (Mescheder et al., 2018, "Which training methods for GANs do actually converge?"):
  ``γ/2 · E_x ‖∇_x ΣD(x)‖²`` on real images, ``ΣD(x)`` the sum of an image's logits (one
  logit per image for a global discriminator, every patch's for a PatchGAN);
  :func:`r1_penalty` returns the expectation, the caller multiplies by ``γ/2``.
* LeCam (Tseng et al., 2021, "Regularizing Generative Adversarial Networks under Limited
  Data"): ``E[relu(D(x) − α_fake)²] + E[relu(α_real − D(x̂))²]``, ``α`` exponential moving
  averages of the discriminator's mean logits on real and fake images
  (:class:`LeCamAnchors`, state that a checkpoint keeps); :func:`lecam_penalty`. The
  one-sided (``relu``) form is the authors' released code's.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GAN_LOSSES",
    "GanLoss",
    "LeCamAnchors",
    "adaptive_weight",
    "discriminator_loss",
    "generator_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "lecam_penalty",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "r1_penalty",
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


def r1_penalty(real: torch.Tensor, logits_real: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """``E_i ‖∇_{x_i} Σ D(x_i)‖²``: the mean over the batch of the squared norm of each real
    image's gradient of the sum of its logits, differentiable (``create_graph``), float32.

    ``real`` must require grad and ``logits_real = D(real)`` be computed from it. ``scale``:
    the gradient scaler's scale under fp16 mixed precision; the gradient is taken of the
    scaled sum and divided by it (PyTorch's recipe for gradient penalties with a scaler).
    """
    s = 1.0 if scale is None else scale
    (grad,) = torch.autograd.grad(logits_real.float().sum() * s, real, create_graph=True)
    grad = grad.float() / s
    return grad.pow(2).reshape(grad.shape[0], -1).sum(dim=1).mean()


def lecam_penalty(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, anchor_real: torch.Tensor, anchor_fake: torch.Tensor
) -> torch.Tensor:
    """``mean(relu(D(x) − α_fake)²) + mean(relu(α_real − D(x̂))²)``: keeps the logits on real
    images from rising above the fake anchor and those on fakes from falling below the
    real anchor (the anchors are detached)."""
    real_term = F.relu(logits_real.float() - anchor_fake.detach()).pow(2).mean()
    fake_term = F.relu(anchor_real.detach() - logits_fake.float()).pow(2).mean()
    return real_term + fake_term


class LeCamAnchors(nn.Module):
    """LeCam's anchors: exponential moving averages of the discriminator's mean logit on real
    (``real``) and fake (``fake``) images, as float32 buffers (saved in checkpoints through
    :meth:`state_dict`). The first :meth:`update` sets them to its values; later ones move
    them by ``1 − decay``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, mean_real: torch.Tensor, mean_fake: torch.Tensor, decay: float) -> None:
        """Fold in this step's mean logits (0-dim; the caller averages them over the ranks
        of a process group first, so every rank holds the same anchors)."""
        d = decay if int(self.updates) > 0 else 0.0
        self.real.mul_(d).add_(mean_real.detach().float(), alpha=1.0 - d)
        self.fake.mul_(d).add_(mean_fake.detach().float(), alpha=1.0 - d)
        self.updates.add_(1)
