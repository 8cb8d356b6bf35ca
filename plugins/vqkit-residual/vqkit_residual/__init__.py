"""vqkit plugin: residual vector quantization, the quantizer ``residual``.

Residual VQ (Juang & Gray 1982; SoundStream, Zeghidour et al. 2021): ``S`` vector
quantizers in sequence, stage ``s`` quantizing what the stages before it left over. The
stages are vqkit's own ``vq`` quantizers (:class:`vqkit.components.vq.VectorQuantizer`:
the chunked exact search of :mod:`vqkit.ops.search`, EMA, k-means initialisation), so
every ``vq`` option except ``cosine`` applies to each stage.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

import vqkit
from vqkit.components.vq import VectorQuantizer
from vqkit.interfaces import Quantizer, QuantizerOutput

__version__ = "0.1.0"
__all__ = ["ResidualVQ", "ResidualVQParams", "__version__"]


class ResidualVQParams(VectorQuantizer.Params):
    stages: int = Field(2, ge=1, le=64, description="Number of vq stages S, each with its own code-book of codebook_size codes.")
    shared_reset: bool = Field(
        False, description="Code-book resets: false, one reset policy per stage (its own statistics, dead codes "
        "judged within the stage, replacements drawn from the stage's residuals); true, one policy for all "
        "stages (the S x K codes judged together, replacements drawn from every stage's residuals).")

    @model_validator(mode="after")
    def _no_cosine(self) -> "ResidualVQParams":
        if self.cosine:
            raise ValueError("cosine is not supported by residual VQ (residuals are not unit vectors)")
        return self


class ResidualVQ(Quantizer):
    """Residual VQ: S vq stages, each quantizing the residual the previous stages left.

    Constructed as ``ResidualVQ(params, dim=D)``; every stage is a ``vq`` quantizer with
    ``K = codebook_size`` codes of dimension ``D`` and the same options.

    ``forward(z)``: ``z`` float ``(B, D, h, w)`` (computed in float32) returns a
    :class:`~vqkit.interfaces.QuantizerOutput` with

    * ``quantized``: ``(B, D, h, w)`` in ``z``'s dtype, the sum of the stages' codes
      ``e_0[i_0] + e_1[i_1] + ...`` added in stage order, bit for bit
      ``decode_indices(indices)``; its gradient reaches ``z`` unchanged (straight-through);
    * ``indices``: int64 ``(B, S, h, w)``, stage ``s`` in ``[:, s]``, values in ``[0, K)``;
    * ``losses``: ``{"codebook", "commitment"}``, each the sum over stages of that stage's
      ``vq`` term on its residual ``r_s = z - sum_{t<s} sg[e_t]`` (``{"commitment"}`` only
      with ``ema``); the commitment gradient of every stage reaches ``z``;
    * ``stats``: ``perplexity`` (mean over stages), ``stage<s>/perplexity``, and
      ``stage<s>/rel_error``, ``||r_{s+1}||^2 / ||z||^2`` (the energy left after stage ``s``).

    A multi-code-book quantizer (``multi_codebook = True``, ``num_codebooks = S``):
    ``codebook(stage)``, ``replace_codes(idx, vectors, stage)``
    and ``code_parameters(stage)`` act on one stage; :meth:`stage_inputs` gives the
    residuals the stages quantized, which the trainer feeds to one reset policy per stage
    or, with ``shared_reset``, to one policy over all stages (``shared_reset = True``: the
    trainer numbers code ``k`` of stage ``s`` as ``s * K + k``).
    """

    Params = ResidualVQParams
    multi_codebook = True

    def __init__(self, params: ResidualVQParams | None = None, *, dim: int):
        super().__init__()
        self.params = p = params if params is not None else self.Params()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        stage_params = VectorQuantizer.Params(**p.model_dump(exclude={"stages", "shared_reset"}))
        self.stages = torch.nn.ModuleList(VectorQuantizer(stage_params, dim=dim) for _ in range(p.stages))
        self.dim = dim
        self.codebook_size = p.codebook_size
        self.num_codebooks = p.stages
        self.shared_reset = p.shared_reset

    # ------------------------------------------------------------------ code-books
    def _stage(self, stage: int) -> VectorQuantizer:
        if not 0 <= int(stage) < self.num_codebooks:
            raise IndexError(f"stage {stage} out of range [0, {self.num_codebooks})")
        return self.stages[int(stage)]

    def codebook(self, stage: int | None = None) -> torch.Tensor:
        """Codes ``(K, D)`` of one stage (detached, including a pending EMA update);
        ``stage=None``: all stages, ``(S, K, D)``."""
        if stage is None:
            return torch.stack([s.codebook() for s in self.stages])
        return self._stage(stage).codebook()

    def replace_codes(self, idx: torch.Tensor, vectors: torch.Tensor, stage: int = 0) -> None:
        """Set codes ``idx`` (int64 ``(n,)``) of ``stage`` to ``vectors`` ``(n, D)`` (in the
        space of that stage's input, the residual); with EMA their statistics restart at
        cluster size 1 and sum = the vector."""
        self._stage(stage).replace_codes(idx, vectors)

    def code_parameters(self, stage: int | None = None) -> list[torch.nn.Parameter]:
        """The learned code-book of ``stage`` (``[]`` with EMA); ``None``: of every stage."""
        if stage is None:
            return [param for s in self.stages for param in s.code_parameters()]
        return self._stage(stage).code_parameters()

    def loss_weights(self) -> dict[str, float]:
        return self.stages[0].loss_weights()

    # ------------------------------------------------------------------ forward / decode
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"residual expects latents (B, {self.dim}, h, w), got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            x = z.float()
            residual = x
            total: torch.Tensor | None = None
            indices, terms, stats = [], {}, {}
            energy = x.detach().square().sum().clamp(min=1e-30)
            perplexities = []
            for s, stage in enumerate(self.stages):
                out = stage(residual)
                code = out.quantized.detach()  # exactly stage.decode_indices(out.indices)
                total = code if total is None else total + code
                residual = residual - code
                indices.append(out.indices)
                for name, value in out.losses.items():
                    terms[name] = value if name not in terms else terms[name] + value
                perplexities.append(out.stats["perplexity"])
                stats[f"stage{s}/perplexity"] = out.stats["perplexity"]
                stats[f"stage{s}/rel_error"] = float(residual.detach().square().sum() / energy)
            # value: the sum of the codes exactly (x - sg[x] is +-0); gradient: identity to z
            quantized = total + (x - x.detach())
            idx = torch.stack(indices, dim=1)
        stats["perplexity"] = sum(perplexities) / len(perplexities)
        if quantized.dtype != z.dtype:
            quantized = quantized.to(z.dtype)
        return QuantizerOutput(quantized=quantized, indices=idx, losses=terms, stats=stats)

    def _check_indices(self, indices: torch.Tensor) -> None:
        if indices.dim() != 4 or indices.shape[1] != self.num_codebooks:
            raise ValueError(f"residual expects indices (B, {self.num_codebooks}, h, w), got {tuple(indices.shape)}")

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 ``(B, S, h, w)`` -> float32 ``(B, D, h, w)``: the stages' codes summed in
        stage order, bit for bit the ``quantized`` of the forward that gave the indices."""
        self._check_indices(indices)
        total = None
        for s, stage in enumerate(self.stages):
            code = stage.decode_indices(indices[:, s])
            total = code if total is None else total + code
        return total

    @torch.no_grad()
    def stage_inputs(self, z: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        """The residual each stage quantized, float32 ``(B, D, h, w)`` per stage: ``z``,
        ``z - e_0[i_0]``, ... (the same values as in the forward that gave ``indices``)."""
        self._check_indices(indices)
        residual = z.detach().float()
        inputs = []
        for s, stage in enumerate(self.stages):
            inputs.append(residual)
            if s + 1 < self.num_codebooks:
                residual = residual - stage.decode_indices(indices[:, s])
        return inputs


@vqkit.hookimpl
def vqkit_register_quantizers(register):
    register("residual", ResidualVQ)
