"""vqkit plugin: finite scalar quantization, the quantizer ``fsq``.

Mentzer, Minnen, Agustsson, Tschannen, "Finite Scalar Quantization: VQ-VAE Made Simple"
(ICLR 2024, arXiv:2309.15505). Each of ``d = len(levels)`` channels is bounded to
``levels[i]`` values and rounded; the code-book is the implicit grid of
``K = prod(levels)`` points, so there is nothing to learn in it, no code-book or
commitment loss, and no dead code to reset.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field, field_validator
from torch import nn

import vqkit
from vqkit.errors import VqkitError
from vqkit.interfaces import Params, Quantizer, QuantizerOutput

__version__ = "0.1.0"
__all__ = ["FSQ", "FSQParams", "MAX_CODEBOOK_SIZE", "__version__"]

#: Largest implicit code-book accepted (usage counters and plots are ``(K,)``).
MAX_CODEBOOK_SIZE = 1 << 20


class FSQParams(Params):
    levels: list[Annotated[int, Field(ge=2)]] = Field(
        [8, 5, 5, 5],
        min_length=1,
        description="Number of values of each quantized channel; the code-book is their product "
        "(the paper's choices: [8,6,5] = 240, [8,5,5,5] = 1000, [7,5,5,5,5] = 4375, "
        "[8,8,8,6,5] = 15360, [8,8,8,5,5,5] = 64000).",
    )
    projections: bool | None = Field(
        None,
        description="Learned linear maps latent_dim -> len(levels) before the rounding and back "
        "after it. null: only when the encoder's latent_dim differs from len(levels); true: "
        "always; false: never (latent_dim must then equal len(levels)).",
    )
    bound_eps: float = Field(
        1e-3,
        gt=0.0,
        lt=0.1,
        description="Slack of the tanh bound: channel i is squashed into (L_i - 1)(1 + eps)/2 "
        "around its centre, so rounding can reach every one of its L_i values.",
    )

    @field_validator("levels")
    @classmethod
    def _not_too_many_codes(cls, levels: list[int]) -> list[int]:
        k = math.prod(levels)
        if k > MAX_CODEBOOK_SIZE:
            raise ValueError(f"prod(levels) = {k} codes; at most {MAX_CODEBOOK_SIZE} are supported")
        return levels


class _RoundST(torch.autograd.Function):
    """``round(x)`` forward (``-0.0`` made ``+0.0``), identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x).add_(0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class FSQ(Quantizer):
    """Finite scalar quantization: bounded per-channel rounding, implicit code-book (Mentzer et al. 2023).

    Constructed as ``FSQ(params, dim=D)``; ``K = prod(levels)``, ``d = len(levels)``.

    ``forward(z)``: ``z`` float ``(B, D, h, w)`` (computed in float32, autocast off) returns
    a :class:`~vqkit.interfaces.QuantizerOutput` with

    * ``quantized``: ``(B, D, h, w)`` in ``z``'s dtype: ``out(grid(indices))`` where
      ``grid`` maps a code to its ``d`` channel values ``(digit_i - L_i // 2) / (L_i // 2)``
      in ``[-1, 1]`` and ``out`` is the output projection (identity without projections);
      bit for bit ``decode_indices(indices)``. Gradients pass the rounding unchanged
      (straight-through) and flow through the tanh bound and both projections;
    * ``indices``: int64 ``(B, h, w)``, ``sum_i digit_i * prod(levels[:i])``;
    * ``losses``: none (``{}``): FSQ has no code-book or commitment term;
    * ``stats``: ``usage`` (fraction of the K codes used by the batch) and ``perplexity``.

    Channel ``i`` of the (projected) latent is bounded as
    ``tanh(x + atanh(o / a)) * a - o`` with ``a = (L_i - 1)(1 + eps) / 2`` and ``o = 0.5``
    for even ``L_i`` (else 0), then rounded to one of ``L_i`` integers.

    The code-book is fixed: :meth:`replace_codes` raises ``NotImplementedError`` and the
    class declares it (``fixed_codebook = True``), so recipes must use ``reset: none``.
    """

    Params = FSQParams
    #: The implicit grid cannot be changed: no resets (read by vqkit's recipe checks).
    fixed_codebook = True

    def __init__(self, params: FSQParams | None = None, *, dim: int):
        super().__init__()
        self.params = p = params if params is not None else self.Params()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        levels = list(p.levels)
        d = len(levels)
        use_proj = (dim != d) if p.projections is None else p.projections
        if not use_proj and dim != d:
            raise VqkitError(
                f"fsq: the encoder's latent_dim is {dim} but levels has {d} entries; with "
                "projections: false they must be equal (or set projections: null)"
            )
        self.dim = dim
        self.codebook_size = math.prod(levels)
        self.levels_dim = d
        lv = torch.tensor(levels, dtype=torch.float32)
        basis = torch.tensor([math.prod(levels[:i]) for i in range(d)], dtype=torch.int64)
        half_width = torch.tensor([lvl // 2 for lvl in levels], dtype=torch.float32)
        amplitude = (lv - 1) * (1 + p.bound_eps) / 2
        offset = torch.where(torch.tensor(levels) % 2 == 0, 0.5, 0.0)
        # persistent=False: these are functions of the params, not state to checkpoint
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_width", half_width, persistent=False)
        self.register_buffer("_amplitude", amplitude, persistent=False)
        self.register_buffer("_offset", offset, persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / amplitude), persistent=False)
        self.project_in = nn.Linear(dim, d) if use_proj else None
        self.project_out = nn.Linear(d, dim) if use_proj else None

    # ------------------------------------------------------------------ the grid
    def _bound(self, x: torch.Tensor) -> torch.Tensor:
        """Channel-last ``(..., d)`` -> each channel in ``(-a - o, a - o)``."""
        return torch.tanh(x + self._shift) * self._amplitude - self._offset

    def _digits_to_indices(self, digits: torch.Tensor) -> torch.Tensor:
        return (digits.to(torch.int64) * self._basis).sum(-1)

    def _indices_to_grid(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 ``(...)`` -> float32 ``(..., d)`` channel values in ``[-1, 1]``."""
        digits = torch.div(indices.unsqueeze(-1), self._basis, rounding_mode="floor") % self._levels
        return (digits.to(torch.float32) - self._half_width) / self._half_width

    def _to_latent(self, grid: torch.Tensor) -> torch.Tensor:
        """Channel-last grid values ``(B, h, w, d)`` -> latents ``(B, D, h, w)`` float32."""
        grid = grid.contiguous()
        out = self.project_out(grid) if self.project_out is not None else grid
        return out.permute(0, 3, 1, 2).contiguous()

    def codebook(self) -> torch.Tensor:
        """All K codes ``(K, D)`` float32 as the decoder receives them (after the output
        projection), detached; row ``k`` is the value of index ``k``."""
        with torch.no_grad():
            return self.decode_indices(torch.arange(self.codebook_size, device=self._basis.device).view(1, 1, -1))[0, :, 0].T.contiguous()

    def replace_codes(self, idx: torch.Tensor, vectors: torch.Tensor) -> None:
        raise NotImplementedError("fsq: the code-book is a fixed grid; codes cannot be replaced (use reset: none)")

    # ------------------------------------------------------------------ forward / decode
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"fsq expects latents (B, {self.dim}, h, w), got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            x = z.float().permute(0, 2, 3, 1)
            if self.project_in is not None:
                x = self.project_in(x)
            rounded = _RoundST.apply(self._bound(x))
            grid = rounded / self._half_width
            indices = self._digits_to_indices(rounded.detach() + self._half_width)
            quantized = self._to_latent(grid)
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).to(torch.float32)
        if quantized.dtype != z.dtype:
            quantized = quantized.to(z.dtype)
        return QuantizerOutput(quantized=quantized, indices=indices, losses={}, stats=_usage_stats(counts))

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 ``(B, h, w)`` -> float32 ``(B, D, h, w)``, bit for bit the ``quantized`` of
        the forward that produced the indices (same grid values, same projection)."""
        if indices.dim() != 3:
            raise ValueError(f"decode_indices expects indices (B, h, w), got {tuple(indices.shape)}")
        indices = indices.to(device=self._basis.device, dtype=torch.int64)
        with torch.autocast(indices.device.type, enabled=False):
            return self._to_latent(self._indices_to_grid(indices))


def _usage_stats(counts: torch.Tensor) -> dict[str, float]:
    """``usage`` (fraction of codes hit) and ``perplexity`` (``exp`` entropy) of one batch."""
    total = counts.sum().clamp(min=1.0)
    p = counts / total
    return {
        "usage": float((counts > 0).float().mean()),
        "perplexity": float(torch.exp(-torch.special.xlogy(p, p).sum())),
    }


@vqkit.hookimpl
def vqkit_register_quantizers(register):
    register("fsq", FSQ)
