"""Would vqkit's search gain from oneDNN's fp32 matmul? The measurement behind the
"bound and the BLAS" section of docs/performance.md.

On some CPUs (AMD Zen 4 here) torch's BLAS (MKL) runs fp32 GEMMs about 20% below
oneDNN's matmul on a pre-packed operand (``torch.ops.mkldnn._linear_pointwise``, an op
torch ships for its compiler). oneDNN wants the rows of a score tile contiguous, and the
encoder's latents are channel-first, so using it costs a transposed copy of every image.
This script times, interleaved in one process (medians of the repeats), for latents
``(B, D, 32, 32)`` and ``K`` codes:

* ``vqkit forward``: :func:`vqkit.ops.search._quantize` (search, look-up, squared error);
* ``oneDNN forward``: the same forward with oneDNN tiles (per-image transposed copy, one
  packed-code matmul per image and code tile, the same argmax, look-up and squared error),
  checked to give the same indices;
* the parts: ``torch`` tile GEMMs, oneDNN tile GEMMs, the transposed copies, and the
  argmax of each one's output;
* the 2048^3 rates of ``torch.mm``, oneDNN and (for the bf16 estimate) bf16 ``torch.mm``.

Usage::

    python benchmarks/onednn_tiles.py --k 512 --d 256 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from quantizer import onednn_linear_works  # benchmarks/quantizer.py, next to this script

from vqkit.ops import search as S
from vqkit.runtime import keep_freed_memory


class OneDnnForward:
    """vqkit's channel-first forward with the score tiles on oneDNN (one image per tile)."""

    def __init__(self, codes: torch.Tensor, plane: int):
        k, d = codes.shape
        _, self.kc = S.plane_tile_shape(plane, k, codes.device)
        self.k = k
        self.codes_t = codes.t().contiguous()
        self.half_sq = codes.square().sum(1).mul_(-0.5)
        pack = torch.ops.mkldnn._reorder_linear_weight
        self.packed = [pack(codes[a : a + self.kc].contiguous(), plane) for a in range(0, k, self.kc)]

    def tiles(self, rows: torch.Tensor):
        for p, w in enumerate(self.packed):
            a = p * self.kc
            yield a, torch.ops.mkldnn._linear_pointwise(rows, w, self.half_sq[a : a + self.kc], "none", [], "")

    def __call__(self, z: torch.Tensor):
        b, d, h, w = z.shape
        planes = z.reshape(b, d, h * w)
        rows = torch.empty(h * w, d)
        indices = torch.empty(b, h * w, dtype=torch.int64)
        quantized = torch.empty(b, d, h * w)
        dbuf = torch.empty(d, h * w)
        sq = torch.empty(b)
        for i in range(b):
            rows.copy_(planes[i].t())
            best_val = best_idx = None
            for a, tile in self.tiles(rows):
                val, idx = S._tile_argmax(tile)
                idx += a
                if best_val is None:
                    best_val, best_idx = val, idx
                else:
                    better = val > best_val
                    best_idx = torch.where(better, idx, best_idx)
                    best_val = torch.maximum(best_val, val)
            indices[i] = best_idx
            torch.index_select(self.codes_t, 1, best_idx, out=quantized[i])
            torch.sub(quantized[i], planes[i], out=dbuf)
            torch.dot(dbuf.view(-1), dbuf.view(-1), out=sq[i])
        return indices, quantized.view(b, d, h, w), sq.sum()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--images", type=int, default=16, help="images of 32x32 latents (N = 1024 per image)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if not onednn_linear_works():
        raise SystemExit("oneDNN's packed linear is not available in this torch build")
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    b, k, d, plane = args.images, args.k, args.d, 32 * 32
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(b, d, 32, 32, generator=gen)
    codes = torch.randn(k, d, generator=gen)
    planes = z.reshape(b, d, plane)
    onednn = OneDnnForward(codes, plane)
    codes_t, half_sq, kc = onednn.codes_t, onednn.half_sq, onednn.kc
    rows = [planes[i].t().contiguous() for i in range(b)]
    mkl_tiles = [torch.addmm(half_sq[a : a + kc], rows[0], codes_t[:, a : a + kc]) for a in range(0, k, kc)]
    dnn_tiles = [t for _, t in onednn.tiles(rows[0])]
    tile_buf = torch.empty(plane, kc)
    same = torch.equal(S._quantize(z, codes, None)[0], onednn(z)[0])

    def torch_gemms():
        for i in range(b):
            for a in range(0, k, kc):
                torch.addmm(half_sq[a : a + kc], planes[i].t(), codes_t[:, a : a + kc], out=tile_buf[:, : min(kc, k - a)])

    def onednn_gemms():
        for i in range(b):
            for _ in onednn.tiles(rows[i]):
                pass

    def argmax_of(tiles):
        def run():
            for _ in range(b):
                for t in tiles:
                    S._tile_argmax(t)
        return run

    big = torch.randn(2048, 2048, generator=gen)
    big_packed = torch.ops.mkldnn._reorder_linear_weight(big.t().contiguous(), 2048)
    big16 = big.bfloat16()
    rows_buf = torch.empty(plane, d)
    fns = {
        "vqkit forward": lambda: S._quantize(z, codes, None),
        "oneDNN forward": lambda: onednn(z),
        "torch tile GEMMs": torch_gemms,
        "oneDNN tile GEMMs": onednn_gemms,
        "transposed copies": lambda: [rows_buf.copy_(planes[i].t()) for i in range(b)],
        "argmax, torch tiles": argmax_of(mkl_tiles),
        "argmax, oneDNN tiles": argmax_of(dnn_tiles),
        "2048^3 torch.mm": lambda: torch.mm(big, big),
        "2048^3 oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(big, big_packed, None, "none", [], ""),
        "2048^3 bf16 torch.mm": lambda: torch.mm(big16, big16),
    }
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(
        f"K={k} D={d} N={b * plane}, torch threads {torch.get_num_threads()}, {kc} codes per tile; "
        f"same indices: {same}"
    )
    print(f"{'part':22} {'median ms':>10} {'min ms':>8}")
    for name, ts in times.items():
        med, low = statistics.median(ts) * 1e3, min(ts) * 1e3
        extra = f"   {2 * 2048**3 / statistics.median(ts) / 1e9:6.1f} GFLOP/s" if name.startswith("2048") else ""
        print(f"{name:22} {med:10.2f} {low:8.2f}{extra}")
    print("(the argmax rows take one image's tiles, once per image, from the first image's output)")


if __name__ == "__main__":
    main()
