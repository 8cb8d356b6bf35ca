"""Benchmark vqkit's ``vq`` quantizer against its peers, measured in one process.

For every grid point (K codes, D dims, N = B*h*w vectors) and EMA off/on it times one
training step of the quantizer (forward, then backward of ``sum(quantized * g)`` plus
the weighted losses) for

* ``vqkit``: :class:`vqkit.components.vq.VectorQuantizer`;
* ``vqp``: ``vector_quantize_pytorch.VectorQuantize`` (straight-through estimator,
  ``rotation_trick=False``; EMA off = ``learnable_codebook=True, ema_update=False``);
* ``taming``: a taming-transformers-style quantizer written here from the VQ-VAE
  formulas (full distance matrix ``||z||^2 + ||e||^2 - 2 z e^T``, argmin, embedding
  look-up, one-hot EMA statistics);
* ``cdist``: ``torch.cdist`` + ``argmin`` under ``no_grad``, then the same look-up,
  losses and (index_add) EMA statistics.

Runs are interleaved (one step of each method per round) and the median of the rounds
is reported, with: the ratio to vector-quantize-pytorch (``x`` = times faster), the
share of the matrix-multiply bound (``2 N K D`` flops at the peak fp32 GEMM rate: a
2048^3 matmul timed in every round of the point, interleaved with the methods, so a shared
machine's load moves the bound and the methods alike; a 4096^3 matmul is also timed at the
start and end of the run), and the peak extra memory of one step (CPU:
sum of the allocations and frees recorded by the torch profiler, ``profile_memory``;
CUDA: ``max_memory_allocated``), above the inputs already allocated.

Correctness in the same run (EMA off): vqkit's indices against a float64 brute force
(differences allowed only for ties within float32 rounding) and its gradients (encoder
input and code-book) against a plain-autograd straight-through reference.

Then k-means: vqkit's :func:`vqkit.ops.kmeans` against vector-quantize-pytorch's
``kmeans`` (what its ``kmeans_init`` runs), same data, k and iterations, inertia of the
returned centroids computed the same way for both.

Usage::

    python benchmarks/quantizer.py            # full grid, N = 16384
    python benchmarks/quantizer.py --quick    # small grid, fewer rounds
    tox -e bench                              # installs the peers (extra "bench"), runs --quick
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.components.vq import VectorQuantizer
from vqkit.ops import inertia as vq_inertia
from vqkit.ops import kmeans as vq_kmeans
from vqkit.runtime import keep_freed_memory

MiB = 1 << 20
FULL_GRID = [(512, 64), (512, 256), (1024, 64), (1024, 256), (8192, 64), (8192, 256)]
QUICK_GRID = [(512, 64), (1024, 256), (8192, 64)]


# --------------------------------------------------------------------------- machine
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return (
        f"{name}; {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}; device {device}"
    )


def peak_gemm_flops(device: torch.device, size: int = 4096, repeats: int = 5) -> float:
    """fp32 flop/s of a ``size``^3 matmul (median of ``repeats``)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device)
    b = torch.randn(size, size, generator=g).to(device)
    times = []
    for i in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times)


# --------------------------------------------------------------------------- peers
class TamingStyle(nn.Module):
    """VQ-VAE quantizer written the way taming-transformers-style code does it.

    Full distance matrix ``||z||^2 + ||e||^2 - 2 z e^T`` (N, K), argmin, embedding look-up,
    loss ``||sg[z_q] - z||^2 * beta + ||z_q - sg[z]||^2``, straight-through ``z + sg[z_q - z]``;
    with EMA the statistics come from one-hot encodings ``(N, K)`` as in the VQ-VAE paper's
    appendix (``N_i``, ``m_i = sum_j onehot_ji z_j``, Laplace-smoothed ``N_i``).
    """

    def __init__(self, k: int, d: int, beta: float, ema: bool, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.k, self.d, self.beta, self.ema, self.decay, self.eps = k, d, beta, ema, decay, eps
        self.embedding = nn.Embedding(k, d)
        self.embedding.weight.data.uniform_(-1.0 / k, 1.0 / k)
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.zeros(k))
            self.register_buffer("embed_avg", self.embedding.weight.data.clone())

    def forward(self, z: torch.Tensor):
        z = z.permute(0, 2, 3, 1).contiguous()
        zf = z.view(-1, self.d)
        w = self.embedding.weight
        d = zf.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * zf @ w.t()
        idx = d.argmin(1)
        zq = self.embedding(idx).view(z.shape)
        if self.ema:
            loss = self.beta * F.mse_loss(zq.detach(), z)
            if self.training:
                with torch.no_grad():
                    onehot = F.one_hot(idx, self.k).type(zf.dtype)
                    self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                    self.embed_avg.mul_(self.decay).add_(onehot.t() @ zf, alpha=1 - self.decay)
                    n = self.cluster_size.sum()
                    size = (self.cluster_size + self.eps) / (n + self.k * self.eps) * n
                    w.copy_(self.embed_avg / size.unsqueeze(1))
        else:
            loss = self.beta * F.mse_loss(zq.detach(), z) + F.mse_loss(zq, z.detach())
        zq = z + (zq - z).detach()
        return zq.permute(0, 3, 1, 2).contiguous(), loss, idx


class CdistArgmin(nn.Module):
    """``torch.cdist`` + ``argmin`` (no_grad) search, index look-up, the two VQ losses,
    ``bincount`` / ``index_add_`` EMA statistics."""

    def __init__(self, k: int, d: int, beta: float, ema: bool, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.k, self.d, self.beta, self.ema, self.decay, self.eps = k, d, beta, ema, decay, eps
        self.weight = nn.Parameter(torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k), requires_grad=not ema)
        if ema:
            self.register_buffer("cluster_size", torch.zeros(k))
            self.register_buffer("embed_avg", self.weight.data.clone())

    def forward(self, z: torch.Tensor):
        b, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, d)
        with torch.no_grad():
            idx = torch.cdist(zf, self.weight).argmin(1)
        zq = self.weight[idx]
        loss = self.beta * F.mse_loss(zf, zq.detach())
        if not self.ema:
            loss = loss + F.mse_loss(zq, zf.detach())
        elif self.training:
            with torch.no_grad():
                self.cluster_size.mul_(self.decay).add_(torch.bincount(idx, minlength=self.k), alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).index_add_(0, idx, zf, alpha=1 - self.decay)
                n = self.cluster_size.sum()
                size = (self.cluster_size + self.eps) / (n + self.k * self.eps) * n
                self.weight.copy_(self.embed_avg / size.unsqueeze(1))
        zq = zf + (zq - zf).detach()
        return zq.view(b, h, w, d).permute(0, 3, 1, 2), loss, idx


def make_vqp(k: int, d: int, beta: float, ema: bool):
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(
        dim=d,
        codebook_size=k,
        accept_image_fmap=True,
        commitment_weight=beta,
        decay=0.99,
        ema_update=ema,
        learnable_codebook=not ema,
        rotation_trick=False,
        kmeans_init=False,
        threshold_ema_dead_code=0,
    )


def have_vqp() -> bool:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- steps
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def vqkit_step(q: VectorQuantizer) -> Step:
    weights = q.loss_weights()

    def step(z, g):
        out = q(z)
        loss = (out.quantized * g).sum() + sum(weights[k] * v for k, v in out.losses.items())
        loss.backward()
        return out.indices

    return step


def tuple_step(m: nn.Module) -> Step:
    def step(z, g):
        quantized, loss, idx = m(z)
        ((quantized * g).sum() + loss.sum()).backward()
        return idx

    return step


def build_methods(k: int, d: int, beta: float, ema: bool, codes: torch.Tensor, device, with_vqp: bool):
    methods: dict[str, tuple[nn.Module, Step]] = {}
    q = VectorQuantizer(VectorQuantizer.Params(codebook_size=k, beta=beta, ema=ema), dim=d)
    q.replace_codes(torch.arange(k), codes)
    methods["vqkit"] = (q, vqkit_step(q))
    if with_vqp:
        v = make_vqp(k, d, beta, ema)
        with torch.no_grad():
            v._codebook.embed.copy_(codes.unsqueeze(0))
            if ema:
                v._codebook.embed_avg.copy_(codes.unsqueeze(0))
        methods["vqp"] = (v, tuple_step(v))
    t = TamingStyle(k, d, beta, ema)
    c = CdistArgmin(k, d, beta, ema)
    with torch.no_grad():
        t.embedding.weight.copy_(codes)
        c.weight.copy_(codes)
        if ema:
            t.embed_avg.copy_(codes)
            c.embed_avg.copy_(codes)
    methods["taming"] = (t, tuple_step(t))
    methods["cdist"] = (c, tuple_step(c))
    for m, _ in methods.values():
        m.to(device).train()
    return methods


def run_step(step: Step, z: torch.Tensor, g: torch.Tensor, module: nn.Module) -> torch.Tensor:
    z.grad = None
    module.zero_grad(set_to_none=True)
    return step(z, g)


def timed(step: Step, z, g, module, device) -> float:
    sync(device)
    t = time.perf_counter()
    run_step(step, z, g, module)
    sync(device)
    return time.perf_counter() - t


def peak_extra_bytes(step: Step, z, g, module, device) -> int:
    """Peak bytes allocated during one step above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_step(step, z, g, module)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(step, z, g, module)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------- correctness
@torch.no_grad()
def check_indices(x: torch.Tensor, codes: torch.Tensor, idx: torch.Tensor, rows: int = 1024) -> tuple[int, int]:
    """(number of near-ties where idx differs from the float64 brute force, number wrong)."""
    xd, cd = x.double(), codes.double()
    c_sq = cd.square().sum(1)
    ties = wrong = 0
    for s in range(0, x.shape[0], rows):
        xs = xd[s : s + rows]
        d2 = xs.square().sum(1, keepdim=True) + c_sq - 2 * xs @ cd.t()
        ref = d2.argmin(1)
        mine = idx[s : s + rows]
        differ = (ref != mine).nonzero().flatten()
        if differ.numel():
            gap = d2[differ, mine[differ]] - d2[differ, ref[differ]]
            scale = xs[differ].square().sum(1) + c_sq[mine[differ]]
            tie = gap <= 1e-6 * scale
            ties += int(tie.sum())
            wrong += int((~tie).sum())
    return ties, wrong


def check_gradients(k, d, beta, codes, z0, g, device) -> tuple[float, float, tuple[int, int]]:
    """Relative max error of vqkit's gradients (z, code-book) against plain autograd STE."""
    q = VectorQuantizer(VectorQuantizer.Params(codebook_size=k, beta=beta), dim=d).to(device).train()
    q.replace_codes(torch.arange(k, device=device), codes)
    z = z0.clone().requires_grad_()
    idx = vqkit_step(q)(z, g).reshape(-1)
    ties_wrong = check_indices(z0.permute(0, 2, 3, 1).reshape(-1, d), codes, idx)

    e = codes.clone().requires_grad_()
    zr = z0.clone().requires_grad_()
    zf = zr.permute(0, 2, 3, 1).reshape(-1, d)
    qf = e[idx]
    st = zf + (qf - zf).detach()
    gf = g.permute(0, 2, 3, 1).reshape(-1, d)
    ((st * gf).sum() + F.mse_loss(qf, zf.detach()) + beta * F.mse_loss(zf, qf.detach())).backward()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

    return rel(z.grad, zr.grad), rel(q.embed.grad, e.grad), ties_wrong


# --------------------------------------------------------------------------- main parts
class PeakGemm:
    """A square fp32 matmul timed as one more "method" of the rounds (the bound's rate).

    The bound uses ``torch.mm`` (the BLAS every method's matmuls run on). On CPU the same
    product is also timed with oneDNN's fp32 matmul on a pre-packed operand (an op torch
    ships for its compiler), which no method uses: it shows how far the BLAS is from what
    this CPU can do (on AMD Zen 4, MKL's sgemm is about 20% slower; docs/performance.md).
    """

    def __init__(self, device: torch.device, size: int = 2048):
        g = torch.Generator(device="cpu").manual_seed(1)
        self.size = size
        self.a = torch.randn(size, size, generator=g).to(device)
        self.b = torch.randn(size, size, generator=g).to(device)
        self.out = torch.empty(size, size, device=device)
        self.device = device
        self.packed = None
        if device.type == "cpu" and onednn_linear_works():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.b.t().contiguous(), size)

    def seconds(self) -> float:
        sync(self.device)
        t = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        sync(self.device)
        return time.perf_counter() - t

    def onednn_seconds(self) -> float | None:
        """Seconds of the same product with oneDNN (None: not on this device or torch)."""
        if self.packed is None:
            return None
        t = time.perf_counter()
        torch.ops.mkldnn._linear_pointwise(self.a, self.packed, None, "none", [], "")
        return time.perf_counter() - t

    def flops(self, seconds: float) -> float:
        return 2 * self.size**3 / seconds


def onednn_linear_works() -> bool:
    """Whether this torch has oneDNN's packed fp32 linear and it gives ``mm``'s product."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        a, b = torch.randn(33, 20), torch.randn(20, 17)
        w = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), 33)
        out = torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        return torch.allclose(out, a @ b, rtol=1e-4, atol=1e-4)
    except Exception:  # noqa: BLE001 - a private op, missing or changed in this torch
        return False


def bench_point(k, d, n, beta, rounds, device, with_vqp, peak_flops, check=True):
    b = max(1, n // (32 * 32))
    h = w = 32 if n >= 1024 else int(n**0.5)
    gen = torch.Generator().manual_seed(k * 1000 + d)
    z0 = torch.randn(b, d, h, w, generator=gen).to(device)
    g = torch.randn(b, d, h, w, generator=gen).to(device)
    codes = torch.randn(k, d, generator=gen).to(device)
    n = b * h * w
    flops = 2 * n * k * d
    peak = PeakGemm(device)
    peak.seconds()  # warm-up
    peak_times: list[float] = []
    onednn_times: list[float] = []
    rows = []
    checks = None
    if check:
        checks = check_gradients(k, d, beta, codes, z0, g, device)
    for ema in (False, True):
        methods = build_methods(k, d, beta, ema, codes, device, with_vqp)
        z = z0.clone().requires_grad_()
        for module, step in methods.values():  # warm-up
            timed(step, z, g, module, device)
        times: dict[str, list[float]] = {name: [] for name in methods}
        these: list[float] = []
        for _ in range(rounds):
            for name, (module, step) in methods.items():
                times[name].append(timed(step, z, g, module, device))
            these.append(peak.seconds())
            other = peak.onednn_seconds()
            if other is not None:
                onednn_times.append(other)
        peak_times += these
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        bound_ms = flops / peak.flops(statistics.median(these)) * 1e3  # rate of these rounds
        mem = {name: peak_extra_bytes(step, z, g, module, device) for name, (module, step) in methods.items()}
        for name in methods:
            rows.append(
                {
                    "ema": ema,
                    "method": name,
                    "ms": med[name],
                    "vs_vqp": (med["vqp"] / med[name]) if "vqp" in med else float("nan"),
                    "bound": bound_ms / med[name],
                    "mem": mem[name] / MiB,
                }
            )
        del methods
    point_peak = peak.flops(statistics.median(peak_times))
    return {
        "k": k,
        "d": d,
        "n": n,
        "bound_ms": flops / point_peak * 1e3,
        "peak": point_peak,
        "onednn_peak": peak.flops(statistics.median(onednn_times)) if onednn_times else None,
        "rows": rows,
        "checks": checks,
    }


def print_point(res, markdown: bool):
    k, d, n = res["k"], res["d"], res["n"]
    title = (
        f"K={k} D={d} N={n}: bound {res['bound_ms']:.1f} ms "
        f"(peak {res['peak'] / 1e9:.1f} GFLOP/s: 2048^3 torch.mm, median of this point's rounds"
        + (
            f"; oneDNN's fp32 matmul, not used by any method: {res['onednn_peak'] / 1e9:.1f} GFLOP/s)"
            if res.get("onednn_peak")
            else ")"
        )
    )
    if markdown:
        print(f"\n**{title}**\n")
        print("| EMA | method | ms | vs vqp | % of GEMM bound | peak extra MiB |")
        print("|---|---|---:|---:|---:|---:|")
        for r in res["rows"]:
            print(
                f"| {'on' if r['ema'] else 'off'} | {r['method']} | {r['ms']:.1f} | {r['vs_vqp']:.2f}x | "
                f"{100 * r['bound']:.0f}% | {r['mem']:.1f} |"
            )
    else:
        print(f"\n{title}")
        print(f"{'EMA':4} {'method':8} {'ms':>9} {'vs vqp':>8} {'%bound':>7} {'peak MiB':>9}")
        for r in res["rows"]:
            print(
                f"{'on' if r['ema'] else 'off':4} {r['method']:8} {r['ms']:9.1f} {r['vs_vqp']:7.2f}x "
                f"{100 * r['bound']:6.0f}% {r['mem']:9.1f}"
            )
    if res["checks"] is not None:
        gz, ge, (ties, wrong) = res["checks"]
        status = "OK" if wrong == 0 and gz < 1e-4 and ge < 1e-4 else "FAILED"
        print(
            f"{'' if not markdown else '- '}check {status}: indices vs float64 brute force: {wrong} wrong, {ties} "
            f"float32 near-ties; gradients vs reference STE: rel. max error z {gz:.1e}, code-book {ge:.1e}"
        )


def bench_kmeans(n, d, k, iters, rounds, device, with_vqp, markdown: bool):
    print(f"\n{'## ' if markdown else ''}k-means: {k} codes from {n}x{d} vectors, {iters} iterations")
    gen = torch.Generator().manual_seed(7)
    data = {
        "gaussian": torch.randn(n, d, generator=gen),
        "blobs": (torch.randn(4 * k, d, generator=gen) * 2)[torch.randint(0, 4 * k, (n,), generator=gen)]
        + torch.randn(n, d, generator=gen),
    }
    if markdown:
        print("\n| data | method | ms | vs vqp | inertia | inertia vs vqp |")
        print("|---|---|---:|---:|---:|---:|")
    checks = []
    for name, x in data.items():
        x = x.to(device)
        fns: dict[str, Callable[[], torch.Tensor]] = {
            "vqkit": functools.partial(_ours_kmeans, x, k, iters, 0.0),
            "vqkit-tol": functools.partial(_ours_kmeans, x, k, iters, KMEANS_TOL),
        }
        if with_vqp:
            fns["vqp"] = functools.partial(_vqp_kmeans, x, k, iters)
        times: dict[str, list[float]] = {m: [] for m in fns}
        result = {}
        for _ in range(rounds):
            for m, fn in fns.items():
                sync(device)
                t = time.perf_counter()
                with torch.no_grad():
                    result[m] = fn()
                sync(device)
                times[m].append(time.perf_counter() - t)
        med = {m: statistics.median(ts) * 1e3 for m, ts in times.items()}
        inert = {m: vq_inertia(x, c) for m, c in result.items()}
        checks.append((name, _lloyd_check(x, k, iters, result["vqkit"])))
        for m in fns:
            ratio = med["vqp"] / med[m] if "vqp" in med else float("nan")
            rel = inert[m] / inert["vqp"] - 1 if "vqp" in inert else float("nan")
            if markdown:
                print(f"| {name} | {m} | {med[m]:.0f} | {ratio:.2f}x | {inert[m]:.4g} | {100 * rel:+.2f}% |")
            else:
                print(
                    f"{name:9} {m:9} {med[m]:9.0f} ms  {ratio:6.2f}x  inertia {inert[m]:.5g} ({100 * rel:+.2f}% vs vqp)"
                )
    for name, verdict in checks:
        print(
            f"{'- ' if markdown else ''}check {name}: vqkit (moved-centroid steps) vs the same k-means with a full "
            f"search at every step: {verdict}"
        )


def _lloyd_check(x: torch.Tensor, k: int, iters: int, fast: torch.Tensor) -> str:
    """vqkit's k-means (moved-centroid steps) against the same k-means with a full search
    at every step (plain Lloyd): same seeding, so the centroids should be identical."""
    km = importlib.import_module("vqkit.ops.kmeans")  # the module (vqkit.ops.kmeans is also a function name)
    saved = km.MOVED_SHARE
    km.MOVED_SHARE = -1.0  # every step a full search
    try:
        full = _ours_kmeans(x, k, iters, 0.0)
    finally:
        km.MOVED_SHARE = saved
    if torch.equal(full, fast):
        return "identical centroids"
    return f"max centroid difference {float((full - fast).abs().max()):.2e}"


#: relative inertia improvement below which the "vqkit-tol" k-means variant stops early
KMEANS_TOL = 1e-3


def _ours_kmeans(x: torch.Tensor, k: int, iters: int, tol: float) -> torch.Tensor:
    g = torch.Generator(device=x.device).manual_seed(0)
    return vq_kmeans(x, k, iters, g, tol=tol).centroids


def _vqp_kmeans(x: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    from vector_quantize_pytorch.vector_quantize_pytorch import kmeans as vqp_kmeans

    torch.manual_seed(0)
    return vqp_kmeans(x.unsqueeze(0), k, num_iters=iters)[0][0]


def bench_train_step(recipe_path: str, k: int, steps: int, device, markdown: bool):
    """Share of the quantizer in one generator training step of a recipe's model.

    Model, losses and optimizer as in the trainer's generator step (reconstruction losses of
    the recipe on random images of the data set's shape, quantizer terms with
    ``loss_weights()``, backward, Adam). Quantizer time = its forward (module hooks) plus
    its backward (from the gradient reaching ``quantized`` to the gradient of ``z_e``).
    """
    from vqkit.plugins import get_registry
    from vqkit.recipe import load_recipe
    from vqkit.train.build import build_model

    recipe = load_recipe(recipe_path, [f"quantizer.params.codebook_size={k}"])
    data = get_registry().get("datasets", recipe.model.data.name).cls
    item_shape = None
    try:
        ds = data(recipe.params_of("data"), split="train", seed=0)
        item_shape = tuple(ds[0].shape)
    except Exception as exc:  # data set not installed: fall back to the recipe's image size
        print(f"(data set unavailable: {exc}; using (1, 32, 32) images)")
        item_shape = (1, 32, 32)
    model = build_model(recipe, item_shape[0]).to(device).train()
    losses = []
    for i, ref in enumerate(recipe.model.losses):
        cls = get_registry().get("perceptual_losses", ref.name).cls
        losses.append((ref.weight, cls(recipe.params_of("losses", i), channels=item_shape[0]).to(device)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = recipe.model.train.batch_size
    x = (torch.rand(batch, *item_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    qmod = model.quantizer
    marks: dict[str, float] = {}

    def pre(_m, _inp):
        sync(device)
        marks["f0"] = time.perf_counter()

    def post(_m, _inp, out):
        sync(device)
        marks["f1"] = time.perf_counter()
        if out.quantized.requires_grad:
            out.quantized.register_hook(lambda g: marks.__setitem__("b0", time.perf_counter()))

    qmod.register_forward_pre_hook(pre)
    qmod.register_forward_hook(post)
    steps_s, quant_s = [], []
    weights = qmod.loss_weights()
    for i in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        recon, out, z_e = model(x)
        z_e.register_hook(lambda g: marks.__setitem__("b1", time.perf_counter()))
        total = sum(w * fn(recon, x) for w, fn in losses)
        total = total + sum(weights.get(n, 1.0) * v for n, v in out.losses.items())
        total.backward()
        opt.step()
        sync(device)
        t1 = time.perf_counter()
        if i >= 2:
            steps_s.append(t1 - t0)
            quant_s.append((marks["f1"] - marks["f0"]) + (marks["b1"] - marks["b0"]))
    step_ms = statistics.median(steps_s) * 1e3
    q_ms = statistics.median(quant_s) * 1e3
    b, d, h, w = out.quantized.shape
    print(
        f"\n{'## ' if markdown else ''}training step of {recipe_path} with K={k}: batch {batch}, images {item_shape}, "
        f"latents ({d}, {h}, {w}) -> N={b * h * w}"
    )
    print(
        f"{'- ' if markdown else ''}step {step_ms:.1f} ms, quantizer (forward + backward) {q_ms:.1f} ms = "
        f"{100 * q_ms / step_ms:.0f}% of the step (median of {steps})"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid, N=4096, 3 rounds")
    ap.add_argument("--grid", default=None, help="K:D pairs, comma separated (default: the full grid)")
    ap.add_argument("--n", type=int, default=None, help="vectors per batch (default 16384; 4096 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per method (default 7; 3 with --quick)")
    ap.add_argument("--beta", type=float, default=0.25)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-kmeans", action="store_true", help="skip the k-means benchmark")
    ap.add_argument("--only-kmeans", action="store_true", help="only the k-means benchmark")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--train-step", default=None, metavar="RECIPE",
                    help="also measure the quantizer's share of a training step of RECIPE's model (K=8192)")
    ap.add_argument("--only-train-step", action="store_true", help="only the --train-step measurement")
    ap.add_argument(
        "--system-malloc", action="store_true",
        help="leave glibc's allocator settings alone (default: keep freed memory, as `vqkit train` does)",
    )
    args = ap.parse_args(argv)
    kept = False if args.system_malloc else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.n or (4096 if args.quick else 16384)
    rounds = args.rounds or (3 if args.quick else 7)
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.grid:
        grid = [tuple(int(v) for v in p.split(":")) for p in args.grid.split(",")]
    with_vqp = have_vqp()
    torch.manual_seed(0)

    print(("# " if args.markdown else "") + "vqkit quantizer benchmark")
    print(f"machine: {machine(device)}")
    print(
        "allocator: "
        + ("freed memory kept for reuse (vqkit.runtime.keep_freed_memory, as in vqkit train), for every method"
           if kept else "system defaults")
    )
    if not with_vqp:
        print("vector-quantize-pytorch is not installed (pip install -e '.[bench]' or tox -e bench): no ratios")
    peak = peak_gemm_flops(device)
    print(f"peak fp32 GEMM (4096^3 matmul, median of 5): {peak / 1e9:.1f} GFLOP/s")
    print(
        "columns: median ms of one training step (forward + backward), ratio to vector-quantize-pytorch, "
        "share of the bound 2NKD/peak, peak extra memory of one step"
        + (" (torch profiler allocations)" if device.type == "cpu" else " (max_memory_allocated)")
    )
    if args.train_step:
        bench_train_step(args.train_step, 8192, 10 if args.quick else 30, device, args.markdown)
        if args.only_train_step:
            return
    if not args.only_kmeans:
        for k, d in grid:
            res = bench_point(k, d, n, args.beta, rounds, device, with_vqp, peak, check=not args.no_check)
            print_point(res, args.markdown)
    if not args.no_kmeans:
        kn, kk = (4096, 256) if args.quick else (16384, 1024)
        bench_kmeans(kn, 256, kk, 10, 2 if args.quick else 3, device, with_vqp, args.markdown)
    peak2 = peak_gemm_flops(device)
    print(f"\npeak fp32 GEMM at the end of the run: {peak2 / 1e9:.1f} GFLOP/s (start: {peak / 1e9:.1f})")


if __name__ == "__main__":
    main()
