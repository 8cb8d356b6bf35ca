"""The built-in vector quantizer ``vq`` (VQ-VAE, van den Oord et al. 2017).

Each latent vector ``z`` (a pixel of the ``(B, D, h, w)`` encoder output) is replaced by
its nearest code ``e`` of a ``(K, D)`` code-book. Training signal:

* straight-through estimator: the decoder's gradient w.r.t. the quantized latents is
  passed unchanged to ``z``;
* code-book loss ``mean((sg[z] - e)^2)`` (gradient to the codes only);
* commitment loss ``mean((z - sg[e])^2)`` (gradient to the encoder only), weighted by
  ``beta`` in :meth:`VectorQuantizer.loss_weights`.

Options: EMA code-book updates instead of the code-book loss, cosine (l2-normalized)
codes and latents, k-means initialisation on the first training batch. The search, the
look-up and both losses run in float32 (autocast is switched off inside) through the
chunked kernels of :mod:`vqkit.ops`, which never build an ``(N, K)`` tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vqkit import hookimpl
from vqkit.interfaces import Params, Quantizer, QuantizerOutput
from vqkit.ops.kmeans import kmeans
from vqkit.ops.search import code_sums, straight_through_vq

__all__ = ["VectorQuantizer"]

#: eps of the l2 normalisation in cosine mode.
_NORM_EPS = 1e-12


class VectorQuantizer(Quantizer):
    """Nearest-code vector quantizer with straight-through gradients (VQ-VAE).

    Constructed as ``VectorQuantizer(params, dim=D)``.

    ``forward(z)``: ``z`` float ``(B, D, h, w)`` (any dtype; computed in float32) returns a
    :class:`~vqkit.interfaces.QuantizerOutput` with

    * ``quantized``: ``(B, D, h, w)`` in ``z``'s dtype and memory layout, values exactly
      ``decode_indices(indices)``;
    * ``indices``: int64 ``(B, h, w)``;
    * ``losses``: ``{"codebook", "commitment"}`` unweighted means over all elements
      (``{"commitment"}`` only when ``ema`` is on);
    * ``stats``: ``{"perplexity"}``, ``exp`` of the entropy of the batch's code usage.

    With ``cosine`` the latents and the codes are l2-normalized along ``D`` before the
    search, so ``quantized`` and :meth:`codebook` are unit vectors.

    With ``ema`` the code-book is a buffer updated from the batch statistics (cluster
    sizes ``N_k`` and sums ``m_k``, decay ``ema_decay``, Laplace smoothing ``ema_eps``):
    ``e_k = m_k / N_k``. The statistics of a training batch are accumulated in its
    forward; the codes are recomputed from them at the start of the next forward (or by
    :meth:`replace_codes`, or when a state dict is loaded), so ``quantized`` always equals
    ``decode_indices(indices)`` (:meth:`decode_indices` looks up the codes the latest
    forward searched, in train and eval mode) and the sequence of code-books seen by the
    batches is that of the usual EMA algorithm. :meth:`codebook` always shows the codes
    after the latest update.

    With ``kmeans_init`` the code-book is set by k-means (k-means++ seeding, ``kmeans_iters``
    Lloyd iterations) on the first training batch; the buffer ``kmeans_done`` records it,
    so it happens once and survives checkpoints. Its randomness comes from the global
    torch generator (one draw), so it is reproducible under a fixed seed. Under
    ``torch.distributed`` the first batches of all ranks are gathered, rank 0 fits and
    broadcasts the result, so every rank starts from the same code-book before its first
    search.

    Latents with NaN or infinite values raise ``FloatingPointError`` (before any state
    changes); in training under ``torch.distributed`` the check is collective, so every
    rank raises together (the trainer turns it into its non-finite stop).
    """

    class Params(Params):
        codebook_size: int = Field(512, ge=1, description="Number of codes K.")
        beta: float = Field(
            0.25, ge=0.0, description="Weight of the commitment loss ||z - sg[e]||^2 (VQ-VAE's beta)."
        )
        ema: bool = Field(
            False,
            description="Update the code-book by exponential moving averages of the assigned "
            "latents (no code-book loss term; codes are not optimizer parameters).",
        )
        ema_decay: float = Field(0.99, gt=0.0, lt=1.0, description="Decay of the EMA statistics.")
        ema_eps: float = Field(
            1e-5, gt=0.0, description="Laplace smoothing of the EMA cluster sizes (avoids division by zero)."
        )
        cosine: bool = Field(
            False,
            description="l2-normalize latents and codes (cosine-similarity search; quantized "
            "latents are unit vectors).",
        )
        kmeans_init: bool = Field(
            False, description="Initialise the code-book by k-means on the first training batch (once)."
        )
        kmeans_iters: int = Field(10, ge=0, description="Lloyd iterations of the k-means initialisation.")
        chunk_size: int | None = Field(
            None,
            ge=1,
            description="Score elements (rows x codes) per search tile; null picks a fast default "
            "for the device (4 MiB tiles on CPU, 64 MiB on accelerators). Memory of the "
            "search is one tile whatever the batch and code-book sizes.",
        )

    def __init__(self, params: "VectorQuantizer.Params | None" = None, *, dim: int):
        super().__init__()
        self.params = p = params if params is not None else self.Params()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.codebook_size = k = p.codebook_size
        self.dim = dim
        init = torch.empty(k, dim).uniform_(-1.0 / k, 1.0 / k)
        if p.cosine:
            init = F.normalize(init, dim=1, eps=_NORM_EPS)
        if p.ema:
            self.register_buffer("embed", init)
            self.register_buffer("ema_cluster_size", torch.ones(k))
            self.register_buffer("ema_embed_sum", init.clone())
            self.register_buffer("ema_pending", torch.zeros((), dtype=torch.bool))
        else:
            self.embed = nn.Parameter(init)
        self.register_buffer("kmeans_done", torch.tensor(not p.kmeans_init))
        self.register_load_state_dict_pre_hook(_drop_legacy_keys)
        self.register_load_state_dict_post_hook(_apply_pending_after_load)

    # ------------------------------------------------------------------ code-book views
    def _codes(self) -> torch.Tensor:
        """Codes used by the search ``(K, D)`` float32 (differentiable w.r.t. ``embed``)."""
        if self.params.cosine and not self.params.ema:
            return F.normalize(self.embed, dim=1, eps=_NORM_EPS)
        return self.embed

    def _ema_codes(self) -> torch.Tensor:
        """Codes recomputed from the EMA statistics ``(K, D)``."""
        size = self.ema_cluster_size
        total = size.sum()
        smoothed = (size + self.params.ema_eps) / (total + self.codebook_size * self.params.ema_eps) * total
        codes = self.ema_embed_sum / smoothed.unsqueeze(1)
        if self.params.cosine:
            codes = F.normalize(codes, dim=1, eps=_NORM_EPS)
        return codes

    @torch.no_grad()
    def _apply_pending_ema(self) -> None:
        if self.params.ema and bool(self.ema_pending):
            self.embed.copy_(self._ema_codes())
            self.ema_pending.fill_(False)

    def codebook(self) -> torch.Tensor:
        """The codes ``(K, D)`` float32, detached, in encoder-output space (unit vectors
        with ``cosine``), including an EMA update not yet applied."""
        with torch.no_grad():
            if self.params.ema and bool(self.ema_pending):
                return self._ema_codes()
            return self._codes().detach().clone()

    def code_parameters(self) -> list[nn.Parameter]:
        """``[embed]`` (rows = codes) when the code-book is learned; ``[]`` with EMA."""
        return [] if self.params.ema else [self.embed]

    def to_code_space(self, z: torch.Tensor) -> torch.Tensor:
        """Flattened latents ``(N, D)`` as the search compares them with the codes:
        float32, l2-normalized with ``cosine``."""
        x = z.float()
        return F.normalize(x, dim=1, eps=_NORM_EPS) if self.params.cosine else x

    def loss_weights(self) -> dict[str, float]:
        weights = {"commitment": float(self.params.beta)}
        if not self.params.ema:
            weights["codebook"] = 1.0
        return weights

    # ------------------------------------------------------------------ forward
    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, D, h, w)`` any float dtype -> float32 (l2-normalized with ``cosine``)."""
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"vq expects latents (B, {self.dim}, h, w), got {tuple(z.shape)}")
        x = z.float()
        if self.params.cosine:
            x = F.normalize(x, dim=1, eps=_NORM_EPS)
        return x

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            x = self._prepare(z)
            self._apply_pending_ema()
            if self.training and not bool(self.kmeans_done):
                self._check_finite(x, x.detach().sum())  # k-means must not see them
                self._kmeans_init(x.detach().permute(0, 2, 3, 1).reshape(-1, self.dim))
            step = straight_through_vq(x, self._codes(), self.params.chunk_size)
            # the squared error is non-finite iff a latent (or a code) is: a free test
            self._check_finite(x, step.commitment_loss.detach())
            if self.training and self.params.ema:
                with torch.no_grad():
                    self._ema_accumulate(code_sums(x.detach(), step.indices, self.codebook_size), step.counts)
        quantized = step.quantized
        if quantized.dtype != z.dtype:
            quantized = quantized.to(z.dtype)
        losses = {"commitment": step.commitment_loss}
        if not self.params.ema:
            losses["codebook"] = step.codebook_loss
        return QuantizerOutput(
            quantized=quantized,
            indices=step.indices,
            losses=losses,
            stats={"perplexity": _perplexity(step.counts)},
        )

    @torch.no_grad()
    def _check_finite(self, x: torch.Tensor, probe: torch.Tensor) -> None:
        """Raise ``FloatingPointError`` if ``probe`` (a 0-dim sum over the latents ``x``,
        non-finite when one of them is) is not finite: the search would silently give NaN
        latents code 0. Collective in distributed training (every rank raises, none waits
        in a collective). A full element-wise test only runs to word the error."""
        bad = ~torch.isfinite(probe)
        if self.training and _distributed():
            flag = bad.float().reshape(1)
            torch.distributed.all_reduce(flag)
            bad = flag[0] > 0
        if not bool(bad):
            return
        n = int((~torch.isfinite(x)).sum())
        if bool(torch.isfinite(probe)):
            what = "another process's latents are NaN or infinite"
        elif n:
            what = f"{n} of {x.numel()} latent values are NaN or infinite"
        elif not bool(torch.isfinite(self._codes()).all()):
            what = "the code-book holds NaN or infinite values"
        else:
            what = f"the latents are too large for float32 (max |z| = {float(x.abs().max()):.3g})"
        raise FloatingPointError(
            f"vq: {what}; the encoder output diverged or its input holds NaN/inf"
        )

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 ``(B, h, w)`` -> float32 ``(B, D, h, w)``, bit for bit the ``quantized`` of
        the forward that produced the indices (the codes the latest forward searched: an EMA
        update of a training forward is not applied here, in train or eval mode, but by the
        next forward)."""
        if indices.dim() != 3:
            raise ValueError(f"decode_indices expects indices (B, h, w), got {tuple(indices.shape)}")
        b, h, w = indices.shape
        codes = self._codes().detach()
        flat = codes.index_select(0, indices.reshape(-1).to(device=codes.device, dtype=torch.int64))
        return flat.view(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ code-book updates
    @torch.no_grad()
    def _ema_accumulate(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        if _distributed():
            # every rank's batch feeds the EMA, and the code-books stay identical
            stats = torch.cat([sums.float(), counts.float().unsqueeze(1)], dim=1)
            torch.distributed.all_reduce(stats)
            sums, counts = stats[:, :-1], stats[:, -1]
        decay = self.params.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        self.ema_pending.fill_(True)

    @torch.no_grad()
    def _kmeans_init(self, x: torch.Tensor) -> None:
        """k-means on the first training batch ``x`` ``(N, D)``; distributed: on the batches
        of all ranks (rank order), fitted on rank 0 and broadcast."""
        seed = int(torch.randint(0, 2**62, (1,)).item())  # drawn on every rank: same RNG streams
        distributed = _distributed()
        if distributed:
            x = _gather_rows(x)
        centroids = torch.empty(self.codebook_size, self.dim, dtype=torch.float32, device=x.device)
        sizes = torch.empty(self.codebook_size, dtype=torch.float32, device=x.device)
        if not distributed or torch.distributed.get_rank() == 0:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(seed)
            result = kmeans(x, self.codebook_size, self.params.kmeans_iters, generator, chunk_size=self.params.chunk_size)
            centroids.copy_(result.centroids)
            sizes.copy_(torch.bincount(result.assignments, minlength=self.codebook_size).float().clamp_(min=1.0))
        if distributed:
            torch.distributed.broadcast(centroids, src=0)
            torch.distributed.broadcast(sizes, src=0)
        if self.params.cosine:
            centroids = F.normalize(centroids, dim=1, eps=_NORM_EPS)
        self.embed.copy_(centroids)
        if self.params.ema:
            self.ema_cluster_size.copy_(sizes)
            self.ema_embed_sum.copy_(centroids * sizes.unsqueeze(1))
            self.ema_pending.fill_(False)
        self.kmeans_done.fill_(True)

    @torch.no_grad()
    def replace_codes(self, idx: torch.Tensor, vectors: torch.Tensor) -> None:
        """Set codes ``idx`` (int64 ``(n,)``) to ``vectors`` ``(n, D)`` (encoder-output space;
        normalized with ``cosine``); with EMA, restart their statistics at cluster size 1
        and sum = the vector. A pending EMA update of the other codes is applied first."""
        idx = idx.to(device=self.embed.device, dtype=torch.int64).reshape(-1)
        vectors = vectors.detach().to(device=self.embed.device, dtype=torch.float32).reshape(idx.numel(), self.dim)
        if self.params.cosine:
            vectors = F.normalize(vectors, dim=1, eps=_NORM_EPS)
        self._apply_pending_ema()
        self.embed.index_copy_(0, idx, vectors)
        if self.params.ema:
            self.ema_cluster_size.index_fill_(0, idx, 1.0)
            self.ema_embed_sum.index_copy_(0, idx, vectors)


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows ``(N_r, D)`` of every rank, concatenated in rank order (``N_r`` may differ)."""
    world = torch.distributed.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = x.new_zeros(max(counts), x.shape[1])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def _drop_legacy_keys(module, state_dict, prefix, *args) -> None:
    """Older checkpoints hold a usage counter ``code_counts`` that nothing read (removed;
    the trainer counts usage from the indices, :class:`vqkit.telemetry.CodebookMonitor`)."""
    state_dict.pop(prefix + "code_counts", None)


def _apply_pending_after_load(module: "VectorQuantizer", incompatible_keys) -> None:
    """A loaded model starts from the codes its next forward would use, so that
    ``decode_indices`` of indices from elsewhere (a prior's samples) matches ``forward``."""
    module._apply_pending_ema()


def _perplexity(counts: torch.Tensor) -> float:
    """``exp(entropy)`` of the distribution ``counts / counts.sum()`` (1 for an empty batch)."""
    p = counts / counts.sum().clamp(min=1.0)
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


@hookimpl
def vqkit_register_quantizers(register):
    register("vq", VectorQuantizer)
