"""Where one step of vqkit's quantizer spends its time, against its matrix-multiply bound.

Times, interleaved in one process (minimum and median of the repeats):

* ``step``: forward + backward of ``sum(quantized * g)`` plus both VQ losses
  (:func:`vqkit.ops.straight_through_vq`, code-book trained by gradient: EMA off);
* ``forward``: the search, look-up and squared error alone (no autograd);
* ``search``: the tiled search alone (score tiles + row-wise argmax);
* ``tile GEMMs``: only the ``addmm``/``baddbmm`` of the tiles, same shapes;
* ``argmax``: only the row-wise argmax of those tiles (vqkit's lanes scheme), next to
  two references on the same tiles: ``amax only`` (values, no index) and ``torch.max``
  (values and indices in one call);
* ``code sums``: the per-code sums of the latents (code-book gradient / EMA statistics);
* ``harness``: ``sum(z * g)`` and its backward, the part of ``step`` every method pays;
* ``bound``: ``2 N K D`` flops at the rate of a 2048^3 matmul timed in the same rounds;
* the minor page faults of each step (fresh memory touched: see ``--system-malloc``).

Usage::

    python benchmarks/quantizer_breakdown.py --k 512 --d 256 --threads 1
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from vqkit.ops import search as S
from vqkit.ops import straight_through_vq
from vqkit.runtime import keep_freed_memory


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--images", type=int, default=16, help="images of latents (N = size^2 per image)")
    ap.add_argument("--size", type=int, default=32, help="height and width of an image's latents")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--system-malloc", action="store_true", help="leave glibc's allocator settings alone")
    ap.add_argument("--images-per-tile", type=int, default=None,
                    help="whole images per batched tile GEMM (default: vqkit's choice, vqkit.ops.search.IMAGES_PER_TILE)")
    args = ap.parse_args(argv)
    S.IMAGES_PER_TILE = args.images_per_tile
    kept = False if args.system_malloc else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    b, k, d, h, w = args.images, args.k, args.d, args.size, args.size
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(b, d, h, w, generator=gen).requires_grad_()
    codes = torch.randn(k, d, generator=gen).requires_grad_()
    g = torch.randn(b, d, h, w, generator=gen)
    zd, cd = z.detach(), codes.detach()
    codes_t = cd.t().contiguous()
    half_sq = cd.square().sum(1).mul(-0.5)
    planes = zd.reshape(b, d, h * w)
    rows, kc = S.plane_tile_shape(h * w, k, zd.device)
    group = S._images_per_tile(b, h * w, k, rows, kc, zd.device, None)
    tiles = [
        (i, min(i + group, b), a, min(a + kc, k)) for i in range(0, b, group) for a in range(0, k, kc)
    ]
    tile = torch.empty(group, h * w, kc)
    work = S._workspace(zd, k, rows, kc)
    some_indices = torch.randint(0, k, (b, h * w), generator=gen)
    big = torch.randn(2048, 2048, generator=gen)
    big_out = torch.empty(2048, 2048)

    def step():
        z.grad = codes.grad = None
        out = straight_through_vq(z, codes)
        ((out.quantized * g).sum() + out.codebook_loss + 0.25 * out.commitment_loss).backward()

    def gemms():
        for i, j, a, e in tiles:
            torch.baddbmm(
                half_sq[a:e], planes[i:j].transpose(1, 2), codes_t[:, a:e].expand(j - i, d, e - a),
                out=tile[: j - i, :, : e - a],
            )

    def reduce_tiles(fn):
        def run():
            for i, j, a, e in tiles:
                fn(tile[: j - i, :, : e - a].reshape(-1, e - a))
        return run

    def harness():
        z.grad = None
        (z * g).sum().backward()

    fns = {
        "step": step,
        "forward": lambda: S._quantize(zd, cd, None),
        "search": lambda: [S._scores_max(planes[i].t(), codes_t, half_sq, kc, 0, h * w, work) for i in range(b)],
        "tile GEMMs": gemms,
        "argmax": reduce_tiles(S._tile_argmax),
        "amax only": reduce_tiles(lambda t: t.amax(1)),
        "torch.max": reduce_tiles(lambda t: torch.max(t, 1)),
        "code sums": lambda: S.code_sums(zd, some_indices, k),
        "harness": harness,
        "peak 2048^3": lambda: torch.mm(big, big, out=big_out),
    }
    channel_first = S._channel_first_plan(zd)
    if not channel_first:  # small images are searched as flattened rows: the tile parts would not apply
        for name in ("search", "tile GEMMs", "argmax", "amax only", "torch.max"):
            del fns[name]
    times = {name: [] for name in fns}
    faults = []
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in fns.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            if name == "step":
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    peak = 2 * 2048**3 / statistics.median(times["peak 2048^3"])
    bound_ms = 2 * b * h * w * k * d / peak * 1e3
    print(
        f"K={k} D={d} N={b * h * w}, torch threads {torch.get_num_threads()}, "
        f"allocator {'keeps freed memory' if kept else 'system defaults'}; "
        + (f"tiles {group} image(s) x {h * w} rows x {kc} codes" if channel_first else
           f"latents of {h}x{w} are searched as flattened rows (search parts not split)")
    )
    print(f"peak {peak / 1e9:.1f} GFLOP/s (2048^3 matmul, median) -> bound {bound_ms:.1f} ms")
    print(f"{'part':12} {'min ms':>8} {'median ms':>10}")
    for name, ts in times.items():
        if name != "peak 2048^3":
            print(f"{name:12} {min(ts) * 1e3:8.1f} {statistics.median(ts) * 1e3:10.1f}")
    print(f"page faults per step: median {statistics.median(faults):.0f}, max {max(faults)}")
    step_med = statistics.median(times["step"]) * 1e3
    print(f"step at {100 * bound_ms / step_med:.0f}% of the bound (median), "
          f"{100 * bound_ms / (min(times['step']) * 1e3):.0f}% (min)")


if __name__ == "__main__":
    main()
