"""The VQ autoencoder: encoder -> quantizer -> decoder.

Build one from a recipe with :meth:`VQModel.from_recipe` or from a trained checkpoint with
:meth:`VQModel.from_checkpoint`::

    model, recipe = VQModel.from_checkpoint("runs/<run>/checkpoints/final.pt")
    indices = model.encode(x).indices          # int64 (B, h, w)
    images = model.decode_indices(indices)     # float32 (B, C, H, W), about [-1, 1]
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from vqkit.errors import VqkitError
from vqkit.interfaces import Decoder, Encoder, Quantizer, QuantizerOutput

if TYPE_CHECKING:  # pragma: no cover
    from vqkit.recipe import Recipe

__all__ = ["VQModel"]


class VQModel(nn.Module):
    """Encoder, quantizer and decoder with the shapes agreed between them.

    ``forward(x)``: ``x`` float32 ``(B, C, H, W)`` in ``[-1, 1]``, ``H`` and ``W`` divisible
    by :attr:`factor`; returns ``(reconstruction, quantizer_output, z_e)`` where
    ``reconstruction`` is float32 ``(B, C, H, W)`` (unbounded, trained towards ``[-1, 1]``),
    ``quantizer_output`` a :class:`~vqkit.interfaces.QuantizerOutput` (``quantized``
    ``(B, D, H/f, W/f)``, ``indices`` int64 ``(B, H/f, W/f)``) and ``z_e`` the encoder
    output ``(B, D, H/f, W/f)``.
    """

    def __init__(self, encoder: Encoder, quantizer: Quantizer, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder

    # -- shapes ------------------------------------------------------------------------
    @property
    def factor(self) -> int:
        """Spatial downsampling factor ``f``."""
        return int(self.encoder.factor)

    @property
    def latent_dim(self) -> int:
        """Latent channels ``D``."""
        return int(self.encoder.latent_dim)

    @property
    def codebook_size(self) -> int:
        """Number of codes ``K``."""
        return int(self.quantizer.codebook_size)

    # -- the model -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput, torch.Tensor]:
        z_e = self.encoder(x)
        out = self.quantizer(z_e)
        reconstruction = self.decoder(out.quantized)
        return reconstruction, out, z_e

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        """Quantize images: ``x`` ``(B, C, H, W)`` -> :class:`QuantizerOutput`."""
        return self.quantizer(self.encoder(x))

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``(B, D, h, w)`` -> images ``(B, C, h*f, w*f)``."""
        return self.decoder(quantized)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices int64 ``(B, h, w)`` -> images ``(B, C, h*f, w*f)``."""
        return self.decoder(self.quantizer.decode_indices(indices))

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_recipe(cls, recipe: "Recipe", channels: int) -> "VQModel":
        """A freshly initialised model for images with ``channels`` channels."""
        from vqkit.train.build import build_model

        return build_model(recipe, channels)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> tuple["VQModel", "Recipe"]:
        """Rebuild the model of a vqkit checkpoint (components come from the registry,
        so the plugins that trained it must be installed). Returns ``(model, recipe)``;
        the model is in eval mode."""
        from vqkit.recipe import MODEL_BLOCKS, recipe_from_dict
        from vqkit.train.build import missing_plugin_error
        from vqkit.train.checkpoint import load_checkpoint

        state = load_checkpoint(path)
        try:  # the model needs its data, encoder, quantizer and decoder only (not the reset policy)
            recipe = recipe_from_dict(state["recipe"], source=f"{path}#recipe", components=MODEL_BLOCKS)
        except VqkitError as exc:
            raise missing_plugin_error(exc, state) from None
        model = cls.from_recipe(recipe, int(state["channels"]))
        model.load_state_dict(state["model"])
        return model.to(map_location).eval(), recipe
