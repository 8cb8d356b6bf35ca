"""Convolutional ResNet-style encoder and decoder (``conv``), VQGAN-like but small.

Geometry
--------
``factor`` is the spatial downsampling factor, a power of two; the encoder makes
``n = log2(factor)`` stride-2 downsamples, so it works on several *resolution levels*:
level 0 is the image resolution and level ``k`` the resolution after ``k`` downsamples
(``n + 1`` levels in all).

``channels`` gives the width of each level, **anchored at the image resolution**:

* encoder: ``channels[0]`` is the width at the input resolution, ``channels[k]`` the
  width after ``k`` downsamples;
* decoder: listed from low to high resolution, so ``channels[-1]`` is the width at the
  output resolution and the list is the encoder's reversed for a mirror image;
* a list shorter than ``n + 1`` is extended at its deep (low-resolution) end by
  repeating its deepest width; a longer list is an error.

So ``channels: [64, 128]`` with ``factor: 8`` means widths 64, 128, 128, 128 at
resolutions H, H/2, H/4, H/8; the mirrored decoder ``channels: [128, 64]`` means
128, 128, 128, 64 at H/8, H/4, H/2, H.

Layers (encoder): 3×3 conv in; per level ``num_res_blocks`` residual blocks, then a
stride-2 3×3 conv between levels; one residual block at the lowest resolution
(optionally with self-attention); norm, activation, 3×3 conv to ``latent_dim``.
The decoder is the mirror image with nearest-neighbour ×2 upsampling + 3×3 conv and a
final linear 3×3 conv (no ``tanh``: outputs are trained towards ``[-1, 1]``).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from vqkit import hookimpl
from vqkit.errors import VqkitError
from vqkit.interfaces import Decoder, Encoder, Params

__all__ = ["ConvDecoder", "ConvEncoder", "ResBlock", "level_widths"]

NormName = Literal["group", "batch", "none"]
ActivationName = Literal["silu", "relu", "gelu", "leaky_relu"]


# --------------------------------------------------------------------------- building blocks
def make_norm(kind: str, channels: int, groups: int = 32) -> nn.Module:
    """A normalization layer over ``channels`` feature maps.

    ``group`` uses ``gcd(groups, channels)`` groups so any width works.
    """
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


def make_activation(kind: str) -> nn.Module:
    if kind == "silu":
        return nn.SiLU()
    if kind == "relu":
        return nn.ReLU()
    if kind == "gelu":
        return nn.GELU()
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.2)
    raise ValueError(f"unknown activation {kind!r}")


class ResBlock(nn.Module):
    """``x + conv(act(norm(conv(act(norm(x))))))`` with a 1×1 projection when widths differ.

    ``(B, c_in, h, w) -> (B, c_out, h, w)``.
    """

    def __init__(self, c_in: int, c_out: int, norm: str, activation: str):
        super().__init__()
        self.body = nn.Sequential(
            make_norm(norm, c_in),
            make_activation(activation),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            make_norm(norm, c_out),
            make_activation(activation),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection, ``(B, c, h, w)``."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.norm = make_norm(norm, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        y = y.squeeze(1).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(y)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then 3×3 conv: ``(B, c, h, w) -> (B, c, 2h, 2w)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(width: int, params: _CommonParams) -> nn.Sequential:
    layers: list[nn.Module] = [ResBlock(width, width, params.norm, params.activation)]
    if params.attention:
        layers += [
            SelfAttention(width, params.norm),
            ResBlock(width, width, params.norm, params.activation),
        ]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- geometry
def level_widths(channels: list[int], factor: int, *, reverse: bool = False) -> list[int]:
    """Width of every resolution level, from the image resolution downwards.

    ``channels`` is anchored at the image resolution (``reverse=True``: given from low to
    high resolution, as the decoder lists it). Missing deep levels repeat the deepest
    width. Raises ``ValueError`` when ``channels`` has more entries than levels.
    """
    levels = int(math.log2(factor)) + 1
    widths = list(reversed(channels)) if reverse else list(channels)
    if len(widths) > levels:
        raise ValueError(
            f"channels has {len(widths)} entries but factor {factor} gives only {levels} "
            f"resolution levels (1 + log2(factor)); give at most {levels} widths or "
            f"raise factor"
        )
    return widths + [widths[-1]] * (levels - len(widths))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


class _CommonParams(Params):
    num_res_blocks: int = Field(1, ge=1, le=8, description="Residual blocks per resolution level.")
    norm: NormName = Field(
        "group",
        description="Normalization in residual blocks: group (GroupNorm, up to 32 groups), "
        "batch (BatchNorm2d) or none.",
    )
    activation: ActivationName = Field("silu", description="Activation function.")
    attention: bool = Field(
        False, description="Add a self-attention block at the lowest resolution (VQGAN's mid block)."
    )

    @field_validator("channels", check_fields=False)
    @classmethod
    def _positive_widths(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("channels must list at least one width")
        bad = [c for c in v if c < 1]
        if bad:
            raise ValueError(f"channel widths must be positive integers, got {bad}")
        return v


# --------------------------------------------------------------------------- encoder
class ConvEncoder(Encoder):
    """ResNet-style convolutional encoder: (B, C, H, W) -> (B, latent_dim, H/factor, W/factor).

    Input float32 in ``[-1, 1]`` with ``H`` and ``W`` divisible by ``factor``; other sizes
    raise :class:`vqkit.errors.VqkitError`. Output is an unbounded float latent.
    """

    class Params(_CommonParams):
        factor: int = Field(
            4,
            description="Spatial downsampling factor, a power of two (4: 128x128 -> 32x32, "
            "8: 128x128 -> 16x16); log2(factor) stride-2 downsamples.",
        )
        channels: list[int] = Field(
            [32, 64],
            description="Width of each resolution level from the input resolution down; "
            "at most 1 + log2(factor) entries, a shorter list repeats its last width.",
        )
        latent_dim: int = Field(64, ge=1, description="Latent channels D of the output.")

        @field_validator("factor")
        @classmethod
        def _power_of_two(cls, v: int) -> int:
            if not _is_power_of_two(v):
                raise ValueError(f"factor must be a power of two (1, 2, 4, 8, 16, ...), got {v}")
            return v

        @field_validator("channels")
        @classmethod
        def _channels_fit_factor(cls, v: list[int], info: ValidationInfo) -> list[int]:
            factor = info.data.get("factor")
            if factor is not None:  # absent when factor itself is invalid
                level_widths(v, factor)
            return v

    def __init__(self, params: Params | None = None, *, in_channels: int):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        self.in_channels = in_channels
        self.latent_dim = p.latent_dim
        self.factor = p.factor
        widths = level_widths(p.channels, p.factor)

        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        c = widths[0]
        for level, width in enumerate(widths):
            stage: list[nn.Module] = []
            for _ in range(p.num_res_blocks):
                stage.append(ResBlock(c, width, p.norm, p.activation))
                c = width
            if level < len(widths) - 1:
                stage.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            self.down.append(nn.Sequential(*stage))
        self.mid = _mid(c, p)
        self.head = nn.Sequential(
            make_norm(p.norm, c),
            make_activation(p.activation),
            nn.Conv2d(c, p.latent_dim, 3, padding=1),
        )

    def check_input_size(self, height: int, width: int) -> None:
        """Raise :class:`VqkitError` unless an image of ``height × width`` fits ``factor``."""
        if height % self.factor or width % self.factor:
            ok = [f for f in (1, 2, 4, 8, 16, 32) if height % f == 0 and width % f == 0]
            raise VqkitError(
                f"encoder 'conv': image size {height}x{width} (HxW) is not divisible by "
                f"factor {self.factor}; resize or crop the images to a multiple of "
                f"{self.factor}, or use a factor that divides both sides "
                f"(possible: {', '.join(map(str, ok))})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float ``(B, C, H, W)`` -> ``(B, latent_dim, H/factor, W/factor)``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"encoder 'conv' expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        self.check_input_size(x.shape[-2], x.shape[-1])
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        return self.head(self.mid(h))


# --------------------------------------------------------------------------- decoder
class ConvDecoder(Decoder):
    """ResNet-style convolutional decoder: (B, D, h, w) -> (B, C, h*factor, w*factor).

    Mirror of the ``conv`` encoder; linear output (no ``tanh``), trained towards ``[-1, 1]``.
    """

    class Params(_CommonParams):
        channels: list[int] = Field(
            [64, 32],
            description="Width of each resolution level from low to high resolution (the "
            "encoder's list reversed); a shorter list than 1 + log2(factor) repeats its "
            "first (lowest-resolution) width.",
        )

    def __init__(
        self,
        params: Params | None = None,
        *,
        out_channels: int,
        latent_dim: int,
        factor: int,
    ):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        if not _is_power_of_two(factor):
            raise VqkitError(f"decoder 'conv': factor must be a power of two, got {factor}")
        try:
            widths = level_widths(p.channels, factor, reverse=True)  # image resolution first
        except ValueError as exc:
            raise VqkitError(f"decoder 'conv': {exc} (factor comes from the encoder)") from None
        widths = widths[::-1]  # lowest resolution first
        self.out_channels = out_channels
        self.latent_dim = latent_dim
        self.factor = factor

        c = widths[0]
        self.conv_in = nn.Conv2d(latent_dim, c, 3, padding=1)
        self.mid = _mid(c, p)
        self.up = nn.ModuleList()
        for level, width in enumerate(widths):
            stage: list[nn.Module] = []
            for _ in range(p.num_res_blocks):
                stage.append(ResBlock(c, width, p.norm, p.activation))
                c = width
            if level < len(widths) - 1:
                stage.append(Upsample(c))
            self.up.append(nn.Sequential(*stage))
        self.head = nn.Sequential(make_norm(p.norm, c), make_activation(p.activation))
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` float ``(B, latent_dim, h, w)`` -> ``(B, out_channels, h*factor, w*factor)``."""
        if z.ndim != 4 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"decoder 'conv' expects (B, {self.latent_dim}, h, w), got {tuple(z.shape)}"
            )
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            h = stage(h)
        return self.conv_out(self.head(h))

    def last_layer_weight(self) -> torch.Tensor:
        """Weight ``(C, c_last, 3, 3)`` of the final convolution (adaptive GAN weight)."""
        return self.conv_out.weight


@hookimpl
def vqkit_register_encoders(register):
    register("conv", ConvEncoder)


@hookimpl
def vqkit_register_decoders(register):
    register("conv", ConvDecoder)
