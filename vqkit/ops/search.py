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
    "nearest_two_codes",
    "code_sums",
    "straight_through_vq",
    "VQStep",
]

#: Score elements (rows x codes) of one tile on CPU: 1 Mi floats = 4 MiB (whole 32x32
#: images by 1024 codes); measured best of 2^17..2^20 on the benchmark grid.
CPU_TILE_ELEMENTS = 1 << 20
#: Score elements of one tile on accelerators (64 MiB of float32): large tiles keep the
#: device busy; the bound on extra memory stays independent of N and K.
DEVICE_TILE_ELEMENTS = 1 << 24
#: Most codes in one CPU tile; larger code-books are split and the best of the parts kept.
CPU_MAX_TILE_CODES = 1024
#: Channel-first search: take whole images as tile rows when at least this many codes fit.
MIN_PLANE_TILE_CODES = 128
WHOLE_PLANES = True


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

    Ties go to the lowest code, like ``torch.max``: the lane search prefers the lowest
    *lane*, which is the lowest code only when one lane holds the best score, so rows where
    several lanes do (duplicate codes) are searched again with ``torch.max`` (a check on
    the ``(n, g)`` lane maxima; rows without such a tie cost nothing more).
    """
    n, w = tile.shape
    g = _lanes(w)
    if g == 0:
        return torch.max(tile, 1)
    groups = tile.view(n, w // g, g)
    lane_best = groups.amax(1)
    best, lane = lane_best.max(1)
    column = groups.gather(2, lane.view(n, 1, 1).expand(n, w // g, 1))
    group = column.view(n, w // g).argmax(1)
    index = torch.add(lane, group, alpha=g)
    tied = torch.nonzero(lane_best.eq_(best.unsqueeze(1)).sum(1) > 1).flatten()
    if tied.numel():
        index[tied] = tile.index_select(0, tied).argmax(1)
    return best, index


def plane_tile_shape(plane: int, k: int, device: torch.device, chunk_size: int | None = None) -> tuple[int, int]:
    """Tile ``(rows, codes)`` for images of ``plane`` positions searched channel-first.

    Whole planes (contiguous slices, no copies) when a tile of at least
    :data:`MIN_PLANE_TILE_CODES` codes by ``plane`` rows fits the tile budget; otherwise
    :func:`tile_shape`.
    """
    if chunk_size is None:
        chunk_size = CPU_TILE_ELEMENTS if device.type == "cpu" else DEVICE_TILE_ELEMENTS
    budget = max(int(chunk_size), 1)
    if WHOLE_PLANES and plane * min(k, MIN_PLANE_TILE_CODES) <= budget:
        codes = min(k, CPU_MAX_TILE_CODES if device.type == "cpu" else k, max(budget // plane, 1))
        if codes < k:
            codes = max(MIN_PLANE_TILE_CODES, codes // MIN_PLANE_TILE_CODES * MIN_PLANE_TILE_CODES)
        return plane, codes
    return tile_shape(plane, k, device, chunk_size)


def _score_tiles(xs: torch.Tensor, codes_t: torch.Tensor, half_sq: torch.Tensor, kc: int, work: dict[str, torch.Tensor]):
    """Yield ``(first code, tile)`` for the code tiles of ``kc`` codes: ``tile`` is the
    contiguous ``(n, codes)`` score block ``xs . e - ||e||^2 / 2``, written into the
    workspace (so it is overwritten by the next one)."""
    n, k = xs.shape[0], codes_t.shape[1]
    for a in range(0, k, kc):
        b = min(a + kc, k)
        tile = torch.addmm(half_sq[a:b], xs, codes_t[:, a:b], out=work["tile"][:n, : b - a])
        yield a, (tile if b - a == tile.stride(0) else tile.contiguous())


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
    tiles = _score_tiles(x[start:stop], codes_t, half_sq, kc, work)
    if kc >= codes_t.shape[1]:
        return _tile_argmax(next(tiles)[1])
    parts = -(-codes_t.shape[1] // kc)
    vals = work["vals"][:parts, :n]
    idxs = work["idxs"][:parts, :n]
    for p, (_, tile) in enumerate(tiles):
        vals[p], idxs[p] = _tile_argmax(tile)
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
        Ties (equal scores, e.g. duplicate codes) go to the lowest index.
    """
    indices, scores, _ = _search_rows(x, codes, chunk_size, runner_up=False)
    return indices, scores


@torch.no_grad()
def _search_rows(x: torch.Tensor, codes: torch.Tensor, chunk_size: int | None, runner_up: bool):
    """Row-tiled search behind :func:`nearest_codes` and :func:`nearest_two_codes`:
    ``(indices, scores, second)``, ``second`` None unless ``runner_up``."""
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
        second = torch.empty(n, dtype=torch.float32, device=x.device) if runner_up else None
        for s in range(0, n, rows):
            e = min(s + rows, n)
            if runner_up:
                scores[s:e], indices[s:e], second[s:e] = _scores_top2(x, codes_t, half_sq, kc, s, e, work)
            else:
                scores[s:e], indices[s:e] = _scores_max(x, codes_t, half_sq, kc, s, e, work)
        return indices, scores, second


def _scores_top2(
    x: torch.Tensor,
    codes_t: torch.Tensor,
    half_sq: torch.Tensor,
    kc: int,
    start: int,
    stop: int,
    work: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`_scores_max` plus the second-best score of each row: the winner's
    entry of the tile is overwritten with ``-inf`` and a values-only ``amax`` (cheap)
    gives the runner-up. ``-inf`` when there is only one code."""
    best = index = second = None
    for a, tile in _score_tiles(x[start:stop], codes_t, half_sq, kc, work):
        val, idx = _tile_argmax(tile)
        if tile.shape[1] > 1:
            runner = tile.scatter_(1, idx.unsqueeze(1), float("-inf")).amax(1)
        else:
            runner = torch.full_like(val, float("-inf"))
        idx += a
        if best is None:
            best, index, second = val, idx, runner
            continue
        better = val > best  # ties stay with the earlier (lower) index
        second = torch.where(better, torch.maximum(best, runner), torch.maximum(second, val))
        index = torch.where(better, idx, index)
        best = torch.maximum(best, val)
    return best, index, second


@torch.no_grad()
def nearest_two_codes(
    x: torch.Tensor, codes: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`nearest_codes` that also returns the runner-up's score.

    Returns:
        ``(indices, scores, second)``: ``second[i]`` is the best score of any code other
        than ``indices[i]`` (``-inf`` when ``K == 1``). The k-means iterations use it as
        a bound that lets them skip rows whose assignment cannot change.
    """
    return _search_rows(x, codes, chunk_size, runner_up=True)


#: Spatial positions per image from which latents are searched in place, channel-first
#: (no transposed copy of the batch); smaller images are flattened to rows first.
MIN_PLANE = 256
#: Code-books of at least this many elements (K * D) are summed row-wise in :func:`code_sums`.
LARGE_CODEBOOK_ELEMENTS = 1 << 21


def _channel_first_plan(z: torch.Tensor) -> bool:
    """Whether ``z`` ``(B, D, h, w)`` is processed image by image in its channel-first
    layout (True) or as flattened ``(B*h*w, D)`` rows (False: channels-last input, where
    rows are a free view, or small images, where a copy is cheap)."""
    b, d, h, w = z.shape
    if z.permute(0, 2, 3, 1).is_contiguous():
        return False
    return h * w >= MIN_PLANE


#: Whole images per score tile in the channel-first search (None: from the tile budget).
IMAGES_PER_TILE: int | None = None


def _images_per_tile(b: int, plane: int, k: int, rows: int, kc: int, device: torch.device, chunk_size) -> int:
    """Images searched together in one batched GEMM (when whole images and all codes fit a
    tile): as many as the tile budget allows, times the CPU threads, so that every thread
    gets whole images (a one-off A/B with 2 threads measured 25% at K = 1024, D = 256;
    reruns of ``benchmarks/quantizer_breakdown.py --images-per-tile`` were within noise;
    neutral with 1 thread; docs/performance.md)."""
    if rows < plane or kc < k:
        return 1
    if IMAGES_PER_TILE is not None:
        return max(1, min(b, IMAGES_PER_TILE))
    if chunk_size is None:
        chunk_size = CPU_TILE_ELEMENTS if device.type == "cpu" else DEVICE_TILE_ELEMENTS
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return max(1, min(b, max(1, int(chunk_size) // (plane * k)) * threads))


@torch.no_grad()
def _quantize(z: torch.Tensor, codes: torch.Tensor, chunk_size: int | None):
    """Search, look-up and squared error of latents ``z`` ``(B, D, h, w)``.

    Returns ``(indices (B, h*w), quantized (B, D, h, w), sq_error)``, ``quantized`` in the
    memory layout of ``z``. Per chunk: one tile search and a look-up written straight into
    the output layout; the squared error ``sum((quantized - z)^2)`` is summed while the
    data is in cache, from explicit differences (no cancellation).
    """
    b, d, h, w = z.shape
    k, plane = codes.shape[0], h * w
    codes = codes.contiguous()
    codes_t = codes.t().contiguous()
    half_sq = codes.square().sum(1).mul_(-0.5)
    indices = torch.empty(b, plane, dtype=torch.int64, device=z.device)
    if _channel_first_plan(z):
        rows, kc = plane_tile_shape(plane, k, z.device, chunk_size)
        planes = z.reshape(b, d, plane)
        quantized = torch.empty(b, d, plane, dtype=torch.float32, device=z.device)
        dbuf = torch.empty(d, plane, dtype=torch.float32, device=z.device)
        sq = torch.empty(b, dtype=torch.float32, device=z.device)
        group = _images_per_tile(b, plane, k, rows, kc, z.device, chunk_size)
        if group > 1:
            # several whole images per tile: one batched GEMM (parallel over the images)
            tile = torch.empty(group, plane, k, dtype=torch.float32, device=z.device)
            for i in range(0, b, group):
                j = min(i + group, b)
                t = torch.baddbmm(half_sq, planes[i:j].transpose(1, 2), codes_t.expand(j - i, d, k), out=tile[: j - i])
                _, idx = _tile_argmax(t.view(-1, k))
                indices[i:j] = idx.view(j - i, plane)
                for m in range(i, j):
                    torch.index_select(codes_t, 1, indices[m], out=quantized[m])
                    torch.sub(quantized[m], planes[m], out=dbuf)
                    torch.dot(dbuf.view(-1), dbuf.view(-1), out=sq[m])
            return indices, quantized.view(b, d, h, w), sq.sum()
        work = _workspace(z, k, rows, kc)
        if rows < plane:  # chunks are strided slices: look up into a contiguous buffer, then copy
            qbuf = torch.empty(d * rows, dtype=torch.float32, device=z.device)
        for i in range(b):
            for s in range(0, plane, rows):
                e = min(s + rows, plane)
                xs = planes[i, :, s:e]
                _, idx = _scores_max(xs.t(), codes_t, half_sq, kc, 0, e - s, work)
                indices[i, s:e] = idx
                if rows >= plane:
                    torch.index_select(codes_t, 1, idx, out=quantized[i])
                else:
                    quantized[i, :, s:e] = torch.index_select(codes_t, 1, idx, out=qbuf[: d * (e - s)].view(d, e - s))
            # squared error of the image while it is in cache; no (N, D) difference is kept
            torch.sub(quantized[i], planes[i], out=dbuf)
            torch.dot(dbuf.view(-1), dbuf.view(-1), out=sq[i])
        sq_error = sq.sum()
        return indices, quantized.view(b, d, h, w), sq_error
    x = z.permute(0, 2, 3, 1).reshape(b * plane, d)
    n_all = x.shape[0]
    rows, kc = tile_shape(n_all, k, z.device, chunk_size)
    work = _workspace(z, k, rows, kc)
    flat_idx = indices.view(-1)
    quantized = torch.empty(n_all, d, dtype=torch.float32, device=z.device)
    dbuf = torch.empty(rows * d, dtype=torch.float32, device=z.device)
    sq_error = torch.zeros((), dtype=torch.float32, device=z.device)
    for s in range(0, n_all, rows):
        e = min(s + rows, n_all)
        _, idx = _scores_max(x, codes_t, half_sq, kc, s, e, work)
        flat_idx[s:e] = idx
        q = torch.index_select(codes, 0, idx, out=quantized[s:e])
        dd = torch.sub(q, x[s:e], out=dbuf[: (e - s) * d].view(e - s, d)).view(-1)
        sq_error += torch.dot(dd, dd)
    out = quantized.view(b, h, w, d).permute(0, 3, 1, 2)
    if not z.permute(0, 2, 3, 1).is_contiguous():
        out = out.contiguous()  # keep the input's layout (small images: cheap)
    return indices, out, sq_error


@torch.no_grad()
def code_sums(z: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """Per-code sums of latents: ``(K, D)`` with row ``j`` the sum of the vectors of ``z``
    ``(B, D, h, w)`` whose index (``indices`` int64 ``(B, h, w)`` or ``(B, h*w)``) is ``j``.
    Channel-first latents are summed in place (``index_add_`` along the code axis of a
    ``(D, K)`` accumulator), so no transposed copy of the batch is made."""
    b, d, h, w = z.shape
    z = z.float()
    indices = indices.reshape(b, h * w)
    if _channel_first_plan(z):
        planes = z.reshape(b, d, h * w)
        if k * d < LARGE_CODEBOOK_ELEMENTS:  # accumulator in cache: add along the code axis
            sums_t = torch.zeros(d, k, dtype=torch.float32, device=z.device)
            for i in range(b):
                sums_t.index_add_(1, indices[i], planes[i])
            return sums_t.t()
        # large code-book: transpose one image at a time (in cache) and add whole rows
        sums = torch.zeros(k, d, dtype=torch.float32, device=z.device)
        rows = torch.empty(h * w, d, dtype=torch.float32, device=z.device)
        for i in range(b):
            sums.index_add_(0, indices[i], rows.copy_(planes[i].t()))
        return sums
    x = z.permute(0, 2, 3, 1).reshape(-1, d)
    return torch.zeros(k, d, dtype=torch.float32, device=z.device).index_add_(0, indices.reshape(-1), x)


#: Elements per chunk of the element-wise passes of the backward (1 MiB of float32).
ELEMENTWISE_CHUNK = 1 << 18


def _images_per_chunk(z: torch.Tensor) -> int:
    """How many images of ``z`` ``(B, ...)`` make one cache-sized element-wise chunk."""
    per_image = max(z[0].numel(), 1)
    return max(1, min(z.shape[0], ELEMENTWISE_CHUNK // per_image))


@dataclasses.dataclass(frozen=True)
class VQStep:
    """Result of :func:`straight_through_vq`.

    quantized: float32 ``(B, D, h, w)``, the codes of the latents (forward value bit-exact
        ``codes[indices]``, same memory layout as the input); its gradient is passed to
        ``z`` unchanged (straight-through).
    indices: int64 ``(B, h, w)``.
    counts: float32 ``(K,)``, how many latents chose each code.
    codebook_loss: ``mean((sg[z] - e)^2)``: gradient to the codes only.
    commitment_loss: ``mean((z - sg[e])^2)``: gradient to ``z`` only.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class _StraightThroughVQ(torch.autograd.Function):
    """Search, look-up, straight-through output and both VQ loss terms in one node.

    Saves only what exists anyway (the input ``z``, the output ``q``, the indices and the
    counts): ``dL/dz = g + c_commit * 2 (z - q) / numel`` is computed a few images at a
    time (``z``, ``q`` and ``g`` read once) and
    ``dL/de_k = c_codebook * 2 (counts_k e_k - sum_{i: idx_i = k} z_i) / numel`` one
    ``index_add_`` over ``z``, so no ``(N, D)`` tensor is kept between the passes.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, codes: torch.Tensor, chunk_size: int | None):
        indices, quantized, sq_error = _quantize(z, codes, chunk_size)
        b, d, h, w = z.shape
        counts = torch.bincount(indices.view(-1), minlength=codes.shape[0]).to(torch.float32)
        mse = sq_error / z.numel()
        ctx.save_for_backward(z, codes, quantized, indices, counts)
        ctx.mark_non_differentiable(indices, counts)
        return quantized, indices.view(b, h, w), counts, mse, mse.clone()

    @staticmethod
    def backward(ctx, g_q, _g_idx, _g_counts, g_codebook, g_commit):
        z, codes, quantized, indices, counts = ctx.saved_tensors
        scale = 2.0 / z.numel()
        grad_z = grad_codes = None
        if ctx.needs_input_grad[0]:
            if g_commit is None:
                grad_z = torch.zeros_like(z) if g_q is None else g_q
            else:
                # d commitment / dz = 2 (z - q) / numel, a few images at a time: the
                # difference stays in cache and z, q and g are each read once
                coef = g_commit * scale  # a 0-dim tensor: no device sync
                grad_z = torch.empty_like(z)
                step = _images_per_chunk(z)
                buf = torch.empty_like(z[:step])
                for i in range(0, z.shape[0], step):
                    j = min(i + step, z.shape[0])
                    diff = torch.sub(z[i:j], quantized[i:j], out=buf[: j - i])
                    if g_q is None:
                        torch.mul(diff, coef, out=grad_z[i:j])
                    else:
                        torch.addcmul(g_q[i:j], diff, coef, out=grad_z[i:j])
        if ctx.needs_input_grad[1] and g_codebook is not None:
            # d codebook / de_k = 2 sum_{i: idx_i = k} (e_k - z_i) / numel
            grad_codes = code_sums(z, indices, codes.shape[0]).neg_()
            grad_codes.addcmul_(counts.unsqueeze(1), codes).mul_(g_codebook * scale)
        return grad_z, grad_codes, None


def straight_through_vq(z: torch.Tensor, codes: torch.Tensor, chunk_size: int | None = None) -> VQStep:
    """Vector-quantize latents ``z`` with a straight-through gradient.

    Args:
        z: float32 ``(B, D, h, w)`` (any memory layout); gradients flow to it through
            ``quantized`` (identity) and the commitment loss.
        codes: float32 ``(K, D)``; gradients flow to it through the code-book loss only.
        chunk_size: score elements per search tile (``None``: device default).
    """
    if z.dim() != 4 or codes.dim() != 2 or z.shape[1] != codes.shape[1]:
        raise ValueError(f"expected z (B, D, h, w) and codes (K, D), got {tuple(z.shape)} and {tuple(codes.shape)}")
    if z.dtype != torch.float32 or codes.dtype != torch.float32:
        raise TypeError(f"quantization runs in float32; got z {z.dtype}, codes {codes.dtype}")
    with torch.autocast(z.device.type, enabled=False):
        quantized, indices, counts, cb, cm = _StraightThroughVQ.apply(z, codes, chunk_size)
    return VQStep(quantized, indices, counts, cb, cm)
