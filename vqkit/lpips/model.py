"""The LPIPS distance (Zhang et al. 2018, version 0.1) as a frozen torch module."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.errors import VqkitError
from vqkit.lpips.nets import BACKBONES, build_backbone
from vqkit.lpips.weights import NET_TITLES, load_backbone_state, load_linear_weights

__all__ = ["LPIPS", "SHIFT", "SCALE", "normalize_channels"]

#: LPIPS scaling layer: inputs in [-1, 1] become ``(x - SHIFT) / SCALE`` per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


def normalize_channels(f: torch.Tensor) -> torch.Tensor:
    """Scale each spatial position of ``f`` ``(B, C, H, W)`` to unit L2 norm over ``C``.

    Equal to LPIPS's ``f / (||f|| + 1e-10)`` to float32 precision, written as
    ``f * rsqrt(||f||^2 + 1e-20)`` so that an all-zero position (common after a ReLU)
    has a finite gradient instead of the 0/0 of ``sqrt``'s derivative.
    """
    return f * torch.rsqrt(f.square().sum(dim=1, keepdim=True) + _EPS * _EPS)


def _freeze(module: nn.Module) -> None:
    """Turn every parameter of ``module`` into a non-persistent buffer: the weights
    still move with ``.to()``, but are not in ``parameters()`` (so no optimizer can
    pick them up), never require grad, and are not written to ``state_dict()``."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            delattr(sub, name)
            sub.register_buffer(name, p.detach().clone(), persistent=False)


class LPIPS(nn.Module):
    """LPIPS distance between two batches of images, always frozen and in eval mode.

    Built with :meth:`pretrained` (ImageNet backbone from the converted file) or
    :meth:`random_backbone` (seeded random backbone, for tests and ablations). The
    linear layers are always LPIPS v0.1's, from torchmetrics' files.

    The module has no parameters and an empty ``state_dict()``: weights are
    non-persistent buffers (see :func:`_freeze`), so trainers cannot optimize or
    checkpoint them by accident. Gradients flow to the *inputs* only.

    ``forward(x, y, spatial=False)``: ``x``, ``y`` float ``(B, C, H, W)`` in ``[-1, 1]``,
    ``C`` in ``{1, 3}`` (1 channel is replicated to RGB), ``H, W >= min_size``
    (alex: 31, vgg: 16). Returns float32 ``(B,)`` distances (>= 0, 0 for identical
    images), or ``(B, 1, H, W)`` distance maps when ``spatial`` (their spatial mean is
    not exactly the scalar distance, as in the reference implementation). Runs in
    float32 with autocast disabled.
    """

    def __init__(self, net: str, backbone_state: dict[str, torch.Tensor] | None, seed: int = 0):
        super().__init__()
        if net not in BACKBONES:
            raise VqkitError(f"lpips: unknown net {net!r} (valid: {', '.join(BACKBONES)})")
        self.net = net
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = build_backbone(net)
        if backbone_state is not None:
            self.backbone.load_state_dict(backbone_state, strict=True)
        self.pretrained_backbone = backbone_state is not None
        self.linear = nn.ModuleList()
        for w in load_linear_weights(net):
            conv = nn.Conv2d(w.shape[1], 1, kernel_size=1, bias=False)
            with torch.no_grad():
                conv.weight.copy_(w)
            self.linear.append(conv)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        _freeze(self)
        super().train(False)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def pretrained(cls, net: str = "alex", weights: str | os.PathLike | None = None) -> "LPIPS":
        """LPIPS with the converted ImageNet backbone (``weights`` or the cache file);
        raises :class:`VqkitError` naming ``vqkit weights fetch lpips`` when missing."""
        return cls(net, load_backbone_state(net, weights))

    @classmethod
    def random_backbone(cls, net: str = "alex", seed: int = 0) -> "LPIPS":
        """LPIPS on a randomly initialised backbone (PyTorch default init, ``seed``)."""
        return cls(net, None, seed=seed)

    @property
    def min_size(self) -> int:
        return BACKBONES[self.net].min_size

    def train(self, mode: bool = True) -> "LPIPS":
        """Ignored: LPIPS stays in eval mode."""
        return super().train(False)

    def extra_repr(self) -> str:
        kind = "pretrained" if self.pretrained_backbone else "random"
        return f"net={self.net!r}, backbone={kind}"

    # -- computation ------------------------------------------------------------------
    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape != y.shape:
            raise ValueError(f"lpips: images must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"lpips: expected (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise VqkitError(
                f"lpips: {NET_TITLES[self.net]} needs images of at least {self.min_size}x{self.min_size}, "
                f"got {x.shape[-2]}x{x.shape[-1]}; "
                + ("use net: vgg (>= 16) or set params.resize" if self.net != "vgg" and min(x.shape[-2:]) >= 16
                   else "set params.resize (or use larger images)")
            )

    def forward(self, x: torch.Tensor, y: torch.Tensor, spatial: bool = False) -> torch.Tensor:
        self._check(x, y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            both = torch.cat([x, y]).float()
            if both.shape[1] == 1:
                both = both.expand(-1, 3, -1, -1)
            feats = self.backbone((both - self.shift) / self.scale)
            n = x.shape[0]
            total = None
            for f, lin in zip(feats, self.linear):
                f = normalize_channels(f)
                d = lin((f[:n] - f[n:]).square())  # (B, 1, h, w)
                if spatial:
                    d = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
                else:
                    d = d.mean(dim=(2, 3))  # (B, 1)
                total = d if total is None else total + d
        assert total is not None
        return total if spatial else total[:, 0]
