"""A test plugin whose components have known param schemas (recipe tests use it so they
do not depend on how the built-ins evolve). The components are never run."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from vqkit import hookimpl
from vqkit.interfaces import Dataset, Decoder, Encoder, Params, Quantizer


class TEncoder(Encoder):
    """Test encoder."""

    class Params(Params):
        channels: list[int] = Field([32, 64], description="channels per level")
        latent_dim: int = Field(16, ge=1, description="D")
        activation: Literal["relu", "silu"] = Field("silu", description="activation")


class TDecoder(Decoder):
    """Test decoder."""

    class Params(Params):
        channels: list[int] = Field([64, 32], description="channels per level")


class TQuantizer(Quantizer):
    """Test quantizer."""

    class Params(Params):
        codebook_size: int = Field(512, ge=2, description="K")
        beta: float = Field(0.25, ge=0, description="commitment weight")


class TDataset(Dataset):
    """Test dataset."""

    class Params(Params):
        root: str = Field(description="folder")
        image_size: int = Field(32, description="size")


@hookimpl
def vqkit_register_encoders(register):
    register("t-conv", TEncoder)


@hookimpl
def vqkit_register_decoders(register):
    register("t-conv", TDecoder)


@hookimpl
def vqkit_register_quantizers(register):
    register("t-vq", TQuantizer)


@hookimpl
def vqkit_register_datasets(register):
    register("t-folder", TDataset)
