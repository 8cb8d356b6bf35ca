"""The autoencoder's training objective and optimizer step, as functions.

:meth:`vqkit.train.autoencoder.AutoencoderFamily.train_step` calls them once per step;
tests call them alone, with fixed weights and inputs (``tests/test_objective.py``).

Generator objective at step ``s`` (:func:`generator_objective`)::

    total = sum_i  w_i * loss_i(convert(recon), convert(x))          losses with s >= start_step_i
          + sum_k  quantizer.loss_weights()[k] * out.losses[k]        (1.0 when not listed)
          + lambda * w_gan * g_loss(D(recon))                         with a discriminator, s >= its start_step

``lambda`` is VQGAN's adaptive weight (:func:`vqkit.gan.adaptive_weight`, taken from the
gradients of the *scaled* losses under mixed precision) or 1. The discriminator's loss
(:func:`discriminator_objective`) sees the reconstructions detached, and may carry the R1
and LeCam regularisers (:mod:`vqkit.gan`).
:func:`optimizer_step` averages gradients that no DDP wrapper averaged while they are
still scaled, then unscales, clips and steps, so every rank of a process group agrees on
whether the gradient scaler skips the step.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vqkit import gan
from vqkit.interfaces import QuantizerOutput
from vqkit.train.distributed import DistContext

__all__ = [
    "DiscriminatorObjective",
    "GeneratorObjective",
    "average_gradients",
    "component_stats",
    "convert_range",
    "discriminator_objective",
    "generator_objective",
    "optimizer_step",
]


def convert_range(x: torch.Tensor, input_range: tuple[float, float]) -> torch.Tensor:
    """Map images from ``[-1, 1]`` to ``input_range`` (identity for ``(-1, 1)``)."""
    lo, hi = float(input_range[0]), float(input_range[1])
    if (lo, hi) == (-1.0, 1.0):
        return x
    return (x + 1.0) * ((hi - lo) / 2.0) + lo


def component_stats(component: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A component's declared stats (:meth:`vqkit.interfaces.ReportsStats.stats`) as 0-dim
    float32 terms ``<prefix>/<stat>`` (logged like the loss terms)."""
    stats = getattr(component, "stats", None)
    if stats is None:
        return {}
    return {f"{prefix}/{name}": torch.as_tensor(float(value), dtype=torch.float32) for name, value in stats().items()}


@dataclasses.dataclass
class GeneratorObjective:
    """What :func:`generator_objective` computed.

    total: 0-dim float32, differentiable (backward it).
    terms: named 0-dim float32 terms, unweighted: ``<loss key>`` per active recipe loss,
        ``loss/<name>`` per quantizer term, ``loss/gan_g`` and ``gan/adaptive_weight`` (the
        detached ``lambda``) when the adversarial term is on, and ``loss/total``; and the
        declared stats of the losses (``losses/<name>/<stat>``, ``<name>`` the loss key
        without ``loss/``) and, with the adversarial term, of the discriminator
        (``discriminator/<stat>``), read right after their forward.
    reconstruction: float32 ``(B, C, H, W)``, attached to the graph.
    output: the quantizer's output; latents: the encoder output ``z_e``.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    reconstruction: torch.Tensor
    output: QuantizerOutput
    latents: torch.Tensor


def generator_objective(
    model: nn.Module,
    x: torch.Tensor,
    step: int,
    losses: Sequence[tuple[str, Any, nn.Module]],
    *,
    forward: Callable[[torch.Tensor], tuple] | None = None,
    discriminator: nn.Module | None = None,
    gan_ref: Any = None,
    grad_scale: torch.Tensor | None = None,
) -> GeneratorObjective:
    """The generator's objective of one batch ``x`` (float32 ``(B, C, H, W)`` in ``[-1, 1]``).

    Args:
        model: the :class:`~vqkit.model.VQModel` (its quantizer's ``loss_weights()`` and its
            decoder's ``last_layer_weight()`` are read).
        step: the 0-based optimizer step (decides which ``start_step`` s have passed).
        losses: ``(key, ref, module)`` per recipe loss; ``ref.weight``, ``ref.start_step``.
        forward: the callable that runs the model (the DDP wrapper); default ``model``.
        discriminator: the discriminator (the caller freezes its parameters), given to
            losses with ``needs_discriminator`` and used for the adversarial term.
        gan_ref: the recipe's ``discriminator`` block (``loss``, ``weight``,
            ``start_step``, ``adaptive_weight``); ``None``: no adversarial term.
        grad_scale: the gradient scaler's current scale (0-dim tensor) under mixed
            precision: the adaptive weight is taken from the scaled losses' gradients, so
            fp16 gradients do not underflow. ``None``: scale 1.

    Any autocast context is the caller's. A quantizer's ``FloatingPointError`` (non-finite
    latents) propagates.
    """
    run = forward if forward is not None else model
    terms: dict[str, torch.Tensor] = {}
    recon, out, z_e = run(x)
    recon32 = recon.float()
    rec_total = recon32.new_zeros(())
    for key, ref, loss_fn in losses:
        if step < ref.start_step:
            continue
        rng = getattr(loss_fn, "input_range", (-1.0, 1.0))
        value = loss_fn(
            convert_range(recon32, rng),
            convert_range(x, rng),
            discriminator=discriminator if getattr(loss_fn, "needs_discriminator", False) else None,
        ).float()
        terms[key] = value
        terms.update(component_stats(loss_fn, "losses/" + key.removeprefix("loss/")))
        rec_total = rec_total + ref.weight * value
    total = rec_total
    weights = model.quantizer.loss_weights()
    for key, value in out.losses.items():
        value = value.float()
        terms[f"loss/{key}"] = value
        total = total + float(weights.get(key, 1.0)) * value
    if discriminator is not None and gan_ref is not None and step >= gan_ref.start_step:
        logits_fake = discriminator(recon32)
        g_loss = gan.generator_loss(gan_ref.loss, logits_fake.float())
        terms["loss/gan_g"] = g_loss
        terms.update(component_stats(discriminator, "discriminator"))
        factor = torch.ones((), device=x.device)
        last = model.decoder.last_layer_weight()
        if gan_ref.adaptive_weight and last is not None and rec_total.requires_grad:
            factor = gan.adaptive_weight(rec_total, g_loss, last, scale=grad_scale).detach()
            terms["gan/adaptive_weight"] = factor
        total = total + gan_ref.weight * factor * g_loss
    terms["loss/total"] = total
    return GeneratorObjective(total, terms, recon32, out, z_e)


@dataclasses.dataclass
class DiscriminatorObjective:
    """What :func:`discriminator_objective` computed.

    total: 0-dim float32, differentiable in the discriminator's parameters (backward it).
    terms: 0-dim detached float32 terms, unweighted: ``loss/gan_d`` (the GAN loss alone),
        ``gan/logits_real`` and ``gan/logits_fake`` (mean logits), ``loss/gan_r1`` (the
        expectation of R1) on steps that apply R1, ``loss/gan_lecam`` and
        ``gan/lecam_anchor_real``/``gan/lecam_anchor_fake`` with LeCam.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def discriminator_objective(
    discriminator: nn.Module,
    kind: str,
    real: torch.Tensor,
    reconstruction: torch.Tensor,
    *,
    r1: float = 0.0,
    lecam: float = 0.0,
    anchors: gan.LeCamAnchors | None = None,
    lecam_decay: float = 0.99,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grad_scale: torch.Tensor | None = None,
) -> DiscriminatorObjective:
    """The discriminator's loss ``kind`` on real images vs the reconstructions, which it
    sees detached (no gradient reaches the autoencoder), plus its regularisers::

        total = d_loss(D(x), D(x̂)) + r1 · E‖∇_x ΣD(x)‖² + lecam · R_LC(D(x), D(x̂); α)

    Args:
        r1: the R1 term's weight on this step (the recipe's ``γ/2``, times ``r1_every`` on
            the steps that apply it, 0 on the others).
        lecam: LeCam's weight; ``anchors`` (:class:`vqkit.gan.LeCamAnchors`) are updated
            with this step's mean logits (decay ``lecam_decay``) before the penalty uses them.
        reduce: averages a tensor over the ranks of a process group (the mean logits that
            move the anchors), so every rank holds the same anchors; ``None``: one process.
        grad_scale: the gradient scaler's scale under fp16 mixed precision (R1's gradient).
    """
    if r1 > 0:
        real = real.detach().requires_grad_(True)
    logits_real = discriminator(real)
    logits_fake = discriminator(reconstruction.detach())
    d_loss = gan.discriminator_loss(kind, logits_real.float(), logits_fake.float())
    means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
    if reduce is not None:
        means = reduce(means)
    terms = {"loss/gan_d": d_loss.detach(), "gan/logits_real": means[0], "gan/logits_fake": means[1]}
    total = d_loss
    if r1 > 0:
        penalty = gan.r1_penalty(real, logits_real, scale=grad_scale)
        terms["loss/gan_r1"] = penalty.detach()
        total = total + r1 * penalty
    if lecam > 0:
        if anchors is None:
            raise ValueError("LeCam needs its anchors (vqkit.gan.LeCamAnchors)")
        anchors.update(means[0], means[1], lecam_decay)
        penalty = gan.lecam_penalty(logits_real, logits_fake, anchors.real, anchors.fake)
        terms["loss/gan_lecam"] = penalty.detach()
        terms["gan/lecam_anchor_real"] = anchors.real.detach().clone()
        terms["gan/lecam_anchor_fake"] = anchors.fake.detach().clone()
        total = total + lecam * penalty
    return DiscriminatorObjective(total, terms)


def average_gradients(params: Sequence[nn.Parameter], dist: DistContext | None) -> None:
    """All-reduce-mean the gradients of ``params`` in one flat buffer (for parameters no
    DDP wrapper averages); a no-op outside a process group."""
    if dist is None or not dist.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = dist.all_reduce_mean(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def optimizer_step(
    opt: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    scaler: torch.amp.GradScaler,
    clip: float | None,
    dist: DistContext | None = None,
    average: Sequence[nn.Parameter] = (),
    check_norm: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """One optimizer step from the (scaled) gradients already in ``.grad``.

    ``average``: parameters whose gradients are averaged over the ranks here (no DDP
    wrapper did it). Then, with ``clip``, the gradients are unscaled and their norm clipped
    (``check_norm(norm)`` is called before the step when the scaler is off, so a non-finite
    norm can stop the run); ``scaler.step`` skips the step when the scaler found inf/NaN.
    Returns the gradient norm before clipping (``None`` without ``clip``).
    """
    # averaged while still scaled: an overflow on one rank is then inf/NaN on every rank,
    # so every rank's scaler skips the step and lowers its scale alike (unscaling first
    # would record "found inf" on the overflowing rank only)
    average_gradients(average, dist)
    norm = None
    if clip is not None:
        if scaler.is_enabled():
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if not scaler.is_enabled() and check_norm is not None:
            check_norm(norm)
    scaler.step(opt)
    scaler.update()
    return norm.detach() if norm is not None else None
