"""Chunked exact nearest-code search and the fused straight-through quantization step.

The nearest code of a vector ``x`` among codes ``e_k`` minimises ``||x - e_k||^2``, i.e.
maximises the *score* ``x . e_k - ||e_k||^2 / 2`` (the ``||x||^2`` term is the same for
every code). Scores are computed tile by tile with one ``addmm`` per tile and reduced
with ``max`` immediately, so no ``(N, K)`` tensor ever exists: the extra memory is one
tile (see :func:`tile_shape`) whatever ``N`` and ``K`` are. Tiles small enough to stay in
the CPU's L2 cache make the search run at close to the machine's peak matrix-multiply
rate.

All arithmetic is ``float32`` (autocast is switched off inside), on whatever device the
inputs live on.
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "tile_shape",
    "nearest_codes",
    "quantize_rows",
    "straight_through_vq",
    "VQStep",
]

#: Score elements (rows x codes) of one tile on CPU: 128 Ki floats = 512 KiB, a quarter
#: of a typical L2 cache, so the tile, the rows of ``x`` and the codes stay in cache.
CPU_TILE_ELEMENTS = 1 << 17
#: Score elements of one tile on accelerators (64 MiB of float32): large tiles keep the
#: device busy; the bound on extra memory stays independent of N and K.
DEVICE_TILE_ELEMENTS = 1 << 24
#: Most codes in one CPU tile; larger code-books are split and the best of the parts kept.
CPU_MAX_TILE_CODES = 1024


def tile_shape(n: int, k: int, device: torch.device, chunk_size: int | None = None) -> tuple[int, int]:
    """Rows and codes of one score tile for ``n`` vectors and ``k`` codes.

    ``chunk_size`` is the number of score elements per tile (``None``: a default for the
    device, :data:`CPU_TILE_ELEMENTS` or :data:`DEVICE_TILE_ELEMENTS`).
    """
    if chunk_size is None:
        chunk_size = CPU_TILE_ELEMENTS if device.type == "cpu" else DEVICE_TILE_ELEMENTS
    chunk_size = max(int(chunk_size), 1)
    codes = k if device.type != "cpu" else min(k, CPU_MAX_TILE_CODES)
    codes = max(1, min(codes, chunk_size))
    rows = max(1, min(n, chunk_size // codes))
    return rows, codes


def _lanes(width: int) -> int:
    """Lane count for :func:`_tile_argmax` on a tile ``width`` codes wide (0: plain ``max``)."""
    g = 32 if width < 2048 else 64
    return g if width % g == 0 and width >= 2 * g else 0


def _tile_argmax(tile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``(max, argmax)`` of a contiguous ``(n, w)`` score tile.

    ``torch.max(tile, 1)`` (value and index) costs about ten times a values-only
    ``amax`` on CPU. So the codes are seen as ``G`` groups of ``g`` lanes
    (``code = group * g + lane``): a vectorised ``amax`` over the groups gives each lane's
    best score ``(n, g)``, an index search over those ``g`` values picks the lane, and one
    over the ``G`` scores of that lane (gathered from the tile) picks the group. Only
    ``g + G`` instead of ``w`` elements per row go through the slow indexed reduction.
    """
    n, w = tile.shape
    g = _lanes(w)
    if g == 0:
        return torch.max(tile, 1)
    groups = tile.view(n, w // g, g)
    best, lane = groups.amax(1).max(1)
    column = groups.gather(2, lane.view(n, 1, 1).expand(n, w // g, 1))
    group = column.view(n, w // g).argmax(1)
    return best, group.mul_(g).add_(lane)


def _scores_max(
    x: torch.Tensor,
    codes_t: torch.Tensor,
    half_sq: torch.Tensor,
    kc: int,
    start: int,
    stop: int,
    work: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best score and code index of rows ``start:stop`` of ``x`` against ``codes_t``
    ``(D, K)`` (code tiles of ``kc``; the best of the tiles is kept)."""
    n = stop - start
    k = codes_t.shape[1]
    xs = x[start:stop]
    if kc >= k:
        tile = torch.addmm(half_sq, xs, codes_t, out=work["tile"][:n])
        return _tile_argmax(tile)
    parts = (k + kc - 1) // kc
    vals = work["vals"][:parts, :n]
    idxs = work["idxs"][:parts, :n]
    for p in range(parts):
        a = p * kc
        b = min(a + kc, k)
        tile = torch.addmm(half_sq[a:b], xs, codes_t[:, a:b], out=work["tile"][:n, : b - a])
        if b - a != kc:
            tile = tile.contiguous()
        best, idx = _tile_argmax(tile)
        vals[p] = best
        idxs[p] = idx
    best_val, best_part = torch.max(vals, 0)
    best = idxs.gather(0, best_part.unsqueeze(0)).squeeze(0)
    best += best_part * kc
    return best_val, best


def _workspace(x: torch.Tensor, k: int, rows: int, kc: int) -> dict[str, torch.Tensor]:
    parts = (k + kc - 1) // kc
    work = {"tile": torch.empty(rows, min(kc, k), dtype=torch.float32, device=x.device)}
    if parts > 1:
        work["vals"] = torch.empty(parts, rows, dtype=torch.float32, device=x.device)
        work["idxs"] = torch.empty(parts, rows, dtype=torch.int64, device=x.device)
    return work


def _check(x: torch.Tensor, codes: torch.Tensor) -> None:
    if x.dim() != 2 or codes.dim() != 2 or x.shape[1] != codes.shape[1]:
        raise ValueError(f"expected x (N, D) and codes (K, D), got {tuple(x.shape)} and {tuple(codes.shape)}")
    if x.dtype != torch.float32 or codes.dtype != torch.float32:
        raise TypeError(f"search runs in float32; got x {x.dtype}, codes {codes.dtype}")


@torch.no_grad()
def nearest_codes(
    x: torch.Tensor, codes: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest code (squared Euclidean distance) of every row of ``x``.

    Args:
        x: float32 ``(N, D)``.
        codes: float32 ``(K, D)``.
        chunk_size: score elements per tile (``None``: device default).

    Returns:
        ``(indices, scores)``: int64 ``(N,)`` in ``[0, K)`` and float32 ``(N,)`` with
        ``scores = x . e_idx - ||e_idx||^2 / 2``, so ``||x - e_idx||^2 = ||x||^2 - 2 * scores``.
        Ties go to the lowest index within a tile.
    """
    _check(x, codes)
    with torch.autocast(x.device.type, enabled=False):
        x = x.contiguous()
        codes = codes.contiguous()
        n, k = x.shape[0], codes.shape[0]
        rows, kc = tile_shape(n, k, x.device, chunk_size)
        half_sq = codes.square().sum(1).mul_(-0.5)
        codes_t = codes.t()
        work = _workspace(x, k, rows, kc)
        indices = torch.empty(n, dtype=torch.int64, device=x.device)
        scores = torch.empty(n, dtype=torch.float32, device=x.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            val, idx = _scores_max(x, codes_t, half_sq, kc, s, e, work)
            scores[s:e] = val
            indices[s:e] = idx
        return indices, scores


@torch.no_grad()
def quantize_rows(
    x: torch.Tensor, codes: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Search, look up and sum squared errors in one pass over ``x``, chunk by chunk.

    Args:
        x: float32 ``(N, D)``.
        codes: float32 ``(K, D)``.
        chunk_size: score elements per tile (``None``: device default).

    Returns:
        ``(indices, quantized, sq_error)``: int64 ``(N,)``, float32 ``(N, D)`` equal to
        ``codes[indices]`` bit for bit, and the 0-dim float32 ``sum((quantized - x)^2)``.
        The error is computed from explicit differences (no cancellation), while the rows
        are still in cache.
    """
    _check(x, codes)
    with torch.autocast(x.device.type, enabled=False):
        x = x.contiguous()
        codes = codes.contiguous()
        n, k = x.shape[0], codes.shape[0]
        rows, kc = tile_shape(n, k, x.device, chunk_size)
        half_sq = codes.square().sum(1).mul_(-0.5)
        codes_t = codes.t()
        work = _workspace(x, k, rows, kc)
        indices = torch.empty(n, dtype=torch.int64, device=x.device)
        quantized = torch.empty_like(x)
        diff = torch.empty(rows, x.shape[1], dtype=torch.float32, device=x.device)
        sq_error = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            _, idx = _scores_max(x, codes_t, half_sq, kc, s, e, work)
            indices[s:e] = idx
            q = torch.index_select(codes, 0, idx, out=quantized[s:e])
            d = torch.sub(q, x[s:e], out=diff[: e - s])
            sq_error += torch.dot(d.view(-1), d.view(-1))
        return indices, quantized, sq_error


@dataclasses.dataclass(frozen=True)
class VQStep:
    """Result of :func:`straight_through_vq`.

    quantized: ``(N, D)`` float32, the codes of the rows (forward value, bit-exact
        ``codes[indices]``); its gradient is passed to ``x`` unchanged (straight-through).
    indices: int64 ``(N,)``.
    counts: float32 ``(K,)``, how many rows chose each code.
    codebook_loss: ``mean((sg[x] - e)^2)``: gradient to the codes only.
    commitment_loss: ``mean((x - sg[e])^2)``: gradient to ``x`` only.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class _StraightThroughVQ(torch.autograd.Function):
    """Search, lookup, straight-through output and both VQ loss terms, one node.

    Saves only ``x``, the indices and the counts: the backward pass rebuilds what it
    needs (``sum_i (e_k - x_i)`` over the rows of code ``k`` is ``counts_k e_k - sum_i x_i``)
    so no ``(N, D)`` difference tensor is kept between passes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, chunk_size: int | None):
        indices, quantized, sq_error = quantize_rows(x, codes, chunk_size)
        counts = torch.bincount(indices, minlength=codes.shape[0]).to(torch.float32)
        mse = sq_error / x.numel()
        ctx.save_for_backward(x, codes, indices, counts, quantized)
        ctx.mark_non_differentiable(indices, counts)
        return quantized, indices, counts, mse, mse.clone()

    @staticmethod
    def backward(ctx, g_q, _g_idx, _g_counts, g_codebook, g_commit):
        x, codes, indices, counts, quantized = ctx.saved_tensors
        scale = 2.0 / x.numel()
        grad_x = grad_codes = None
        if ctx.needs_input_grad[0]:
            if g_commit is None:
                grad_x = torch.zeros_like(x) if g_q is None else g_q
            else:
                # d commitment / dx = 2 (x - q) / numel
                coef = g_commit * scale
                grad_x = torch.mul(x, coef) if g_q is None else torch.addcmul(g_q, x, coef)
                grad_x.addcmul_(quantized, -coef)
        if ctx.needs_input_grad[1] and g_codebook is not None:
            # d codebook / de_k = 2 sum_{i: idx_i = k} (e_k - x_i) / numel
            grad_codes = torch.zeros_like(codes).index_add_(0, indices, x, alpha=-1.0)
            grad_codes.addcmul_(counts.unsqueeze(1), codes)
            grad_codes.mul_(g_codebook * scale)
        return grad_x, grad_codes, None


def straight_through_vq(x: torch.Tensor, codes: torch.Tensor, chunk_size: int | None = None) -> VQStep:
    """Vector-quantize the rows of ``x`` with a straight-through gradient.

    Args:
        x: float32 ``(N, D)``; gradients flow to it through ``quantized`` (identity) and
            the commitment loss.
        codes: float32 ``(K, D)``; gradients flow to it through the code-book loss only.
        chunk_size: score elements per search tile (``None``: device default).
    """
    quantized, indices, counts, cb, cm = _StraightThroughVQ.apply(x, codes, chunk_size)
    return VQStep(quantized, indices, counts, cb, cm)
