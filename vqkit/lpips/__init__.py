"""LPIPS (learned perceptual image patch similarity) implemented in vqkit.

* :class:`LPIPS` - the frozen distance module (AlexNet or VGG16 backbone in plain torch,
  LPIPS v0.1 linear layers from the files torchmetrics ships);
* :func:`lpips_metric` - a ready evaluation function for trainers (``eval/lpips``);
* :mod:`vqkit.lpips.weights` - cache locations and safe loading;
* :mod:`vqkit.lpips.convert` - conversion of published backbone weights
  (``vqkit weights fetch lpips``).

The recipe-facing perceptual loss is the ``lpips`` component in
:mod:`vqkit.components.lpips`.
"""
from __future__ import annotations

import os

import torch

from vqkit.lpips.model import LPIPS
from vqkit.lpips.weights import NETS, backbone_path, cache_dir, fetch_command

__all__ = ["LPIPS", "LPIPSMetric", "lpips_metric", "NETS", "backbone_path", "cache_dir", "fetch_command"]


class LPIPSMetric:
    """Callable ``(x, y) -> (B,)`` LPIPS distances for evaluation.

    ``x``, ``y``: float ``(B, C, H, W)`` in ``[-1, 1]``, ``C`` in ``{1, 3}``, on any
    device (the network follows the inputs' device). Returns detached float32 ``(B,)``
    on that device; computed under ``torch.no_grad()``.
    """

    def __init__(self, model: LPIPS):
        self.model = model
        self.net = model.net

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.model.shift.device != x.device:
            self.model.to(x.device)
        with torch.no_grad():
            return self.model(x, y)


def lpips_metric(net: str = "alex", weights: str | os.PathLike | None = None) -> LPIPSMetric:
    """LPIPS with the pretrained ``net`` backbone as an evaluation function.

    Raises :class:`vqkit.errors.VqkitError` naming ``vqkit weights fetch lpips --net NET``
    when the converted backbone (``weights``, default the cache file) is missing.
    Build it once per run: loading VGG16 reads ~60 MB.
    """
    return LPIPSMetric(LPIPS.pretrained(net, weights))
