"""Sample quality: the Fréchet distance on VGG16 features (:mod:`vqkit.metrics`, the same
distance ``vqkit eval`` reports as ``eval/fd_vgg16_relu5_3``) between samples of the prior
and the autoencoder's reconstructions of as many test images.

Against reconstructions, not the raw test images: the prior can at best reproduce the
distribution of decoded codes, so this isolates the prior's share of the error from the
autoencoder's. Class-conditional priors are sampled with the labels of those test images, so
both sets have the same class mix.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["FD_KEY", "feature_distance", "sample_feature_distance"]

#: metric key logged on the prior's run
FD_KEY = "prior/fd_vgg16_relu5_3"


@torch.no_grad()
def feature_distance(a: torch.Tensor, b: torch.Tensor, device: torch.device | str = "cpu",
                     batch_size: int = 250) -> float:
    """Fréchet distance on VGG16 ``relu5_3`` features between image sets ``a`` and ``b``
    (float ``(N, C, H, W)`` in ``[-1, 1]``, same ``N``)."""
    from vqkit.metrics import FD_METRIC, METRICS, MetricSet

    ms = MetricSet([FD_METRIC], device=device)
    for start in range(0, a.shape[0], batch_size):
        ms.update(a[start:start + batch_size].to(device), b[start:start + batch_size].to(device))
    return float(ms.compute()[METRICS[FD_METRIC].key])


@torch.no_grad()
def sample_feature_distance(family: Any, n: int, batch_size: int = 250) -> dict[str, float]:
    """``{FD_KEY: value}`` for ``n`` samples of a training family's prior (seeded by the
    recipe seed) against reconstructions of the first ``n`` test images."""
    ec = family.cfg.eval
    test = family.codes.test[:n]
    labels = family.codes.test_labels[:n] if family.num_classes > 0 else None
    device = family.device
    g = torch.Generator(device=device).manual_seed(int(family.cfg.seed) + 1)
    family.prior.eval()
    samples, recons = [], []
    for start in range(0, test.shape[0], batch_size):
        m = min(batch_size, test.shape[0] - start)
        lab = labels[start:start + m].to(device) if labels is not None else None
        codes = family.prior.sample(m, lab, temperature=ec.temperature, top_k=ec.top_k, top_p=ec.top_p,
                                    generator=g)
        samples.append(family.ae.decode_indices(codes).float().cpu())
        recons.append(family.ae.decode_indices(test[start:start + m].to(device)).float().cpu())
    family.prior.train()
    return {FD_KEY: feature_distance(torch.cat(samples), torch.cat(recons), device)}
