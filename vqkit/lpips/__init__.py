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
import torch.nn.functional as F

from vqkit.errors import VqkitError
from vqkit.lpips.model import LPIPS
from vqkit.lpips.nets import BACKBONES
from vqkit.lpips.weights import NETS, backbone_path, cache_dir, fetch_command

__all__ = ["LPIPS", "LPIPSMetric", "lpips_metric", "min_size", "NETS", "backbone_path", "cache_dir", "fetch_command"]


def min_size(net: str) -> int:
    """Smallest image side the ``net`` backbone accepts (alex: 31, vgg: 16)."""
    return BACKBONES[net].min_size


class LPIPSMetric:
    """Callable ``(x, y) -> (B,)`` LPIPS distances for evaluation.

    ``x``, ``y``: float ``(B, C, H, W)`` in ``[-1, 1]``, ``C`` in ``{1, 3}``, on any
    device (the network follows the inputs' device). Returns detached float32 ``(B,)``
    on that device; computed under ``torch.no_grad()``. With ``resize`` set, both
    images are first resized (bilinear) to ``resize x resize``.
    """

    def __init__(self, model: LPIPS, resize: int | None = None):
        self.model = model
        self.net = model.net
        self.resize = resize

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.model.shift.device != x.device:
            self.model.to(x.device)
        with torch.no_grad():
            if self.resize is not None:
                size = (self.resize, self.resize)
                x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
                y = F.interpolate(y.float(), size=size, mode="bilinear", align_corners=False)
            return self.model(x, y)


def lpips_metric(net: str = "alex", weights: str | os.PathLike | None = None, resize: int | None = None) -> LPIPSMetric:
    """LPIPS with the pretrained ``net`` backbone as an evaluation function.

    ``resize``: resize images to ``resize x resize`` first; needed when they are smaller
    than :func:`min_size` (e.g. 28x28 Fashion-MNIST with ``alex``: use 32), otherwise
    the call raises :class:`VqkitError`.

    Raises :class:`vqkit.errors.VqkitError` naming ``vqkit weights fetch lpips --net NET``
    when the converted backbone (``weights``, default the cache file) is missing.
    Build it once per run: loading VGG16 reads ~60 MB.
    """
    if resize is not None and resize < min_size(net):
        raise VqkitError(f"lpips: resize {resize} is below the {net} minimum of {min_size(net)}")
    return LPIPSMetric(LPIPS.pretrained(net, weights), resize)
