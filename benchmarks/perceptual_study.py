"""Loss study: pixel-only against learned and pretrained perceptual losses on real photographs.

The four losses (``pixel``, ``lpips``, ``disc-features``, ``disc-features-lpips``) share
data, model, code-book, reset policy, seed and steps and differ only in their losses (and
the PatchGAN where they call for it): they are the children of one sweep,
``vqkit sweep recipes/perceptual/study.yaml`` (experiment ``perceptual``); with ``--tune``
also the tuning sweep of the discriminator-feature recipe,
``vqkit sweep recipes/perceptual/tune-disc-features.yaml`` (experiment
``perceptual-tuning``). Then every saved checkpoint of the study's runs (the final one of
the tuning runs) is evaluated with the same metrics (``vqkit.metrics``: PSNR, SSIM,
LPIPS-AlexNet, the VGG16 Fréchet distance) on

* ``in-source``: the recipes' test split: crops of 2 wallpaper photographs held out from
  training (Debian ``plasma-workspace-wallpapers``);
* ``out-of-source``: crops of 4 of scikit-image's photographs (astronaut, chelsea, coffee,
  motorcycle), a source not used in training at all.

and, as the classic-codec peers, JPEG and WebP (Pillow) at the bits per pixel of the VQ
code (latent positions x log2(code-book size) / pixels; the codes are not entropy-coded):
the test crops are tiled into one mosaic (headers amortised; the 64-px crops align with
JPEG's 8/16-px blocks and WebP's 16-px macroblocks) and encoded at the highest quality
whose file fits that budget.

With ``--long``, the study at five times the length instead,
``vqkit sweep recipes/perceptual/long.yaml`` (experiment ``perceptual-long``: the four
losses with the discriminator features as tuned, that tuning with weight 0.1, and seeds 1
and 2 of pixel-only and the tuned features, 1500 steps each), written under
``<out>/long/``, with ``seeds.md`` (mean and spread over the three seeds, and the paired
per-seed differences). Every run is evaluated on the same test crops (the data's seed 0),
whatever its own seed. ``--long`` also runs the regularisation round,
``vqkit sweep recipes/perceptual/long-regularised.yaml`` (the tuned features with the
PatchGAN regularised by LeCam or R1, same experiment and length) and a second round,
``long-round2.yaml`` (weaker regularisers, seed 1 of the two LPIPS rows) and a third,
``long-round3.yaml`` (seed 2 of the two LPIPS rows), a fourth, ``long-round4.yaml``
(a later start, a fixed adversarial weight) and a fifth, ``long-round5.yaml`` (seeds 1 and
2 of weight 0.1 on the tuned features); their final
checkpoints are compared with pixel-only and the unregularised tuned run in
``regularised.md``, and seed repeats (``<run>-seed<N>``) join ``seeds.md``.

Written under ``--out``: ``results.json`` (every number, run ids, wall times), ``table.md``,
``tuning.md``, ``curves.png`` (metrics over steps per loss), ``grid-in-source.png`` and
``grid-out-of-source.png`` (the same test crops reconstructed by each final model and the
codecs). Every evaluation is also logged into its run under the study's own prefix,
``study/<test set>/<metric>`` at the checkpoint's step (never ``eval/*``, which are the
recipe's own evaluation settings; a (key, step) already in the run is not logged again), so
``vqkit compare PARENT_RUN --metrics study/in-source/lpips --plot OUT.png`` shows them over
steps.

Reproduce (from the repository root; needs ``apt-get install plasma-workspace-wallpapers``
and ``vqkit weights fetch lpips``)::

    python benchmarks/perceptual_study.py --tune        # runs (or resumes) the sweeps, then evaluates
    python benchmarks/perceptual_study.py --no-train    # evaluate the runs that exist so far
    python benchmarks/perceptual_study.py --long --steps 500 1000 1500   # the 1500-step study + regularisation round

Runs are tracked in ``<work>/mlflow.db`` (``--work``, default ``runs/bench-perceptual``);
``vqkit compare --experiment perceptual --tracking-uri sqlite:///<work>/mlflow.db`` shows them.
Evaluations are cached in ``<out>/evals/<variant>-<step>-<test set>.json``, so several
processes can evaluate side by side (``--variants``, ``--steps``, ``--tests``) and a
``--report-only`` call then writes the table and the figures. Runs trained and evaluated on
another machine (whose store is gone) join a report from the ``results.json`` written then:
``--previous docs/perceptual/long/results.json`` (their numbers as evaluated then; the grids,
which need every final checkpoint, are left as they are).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "perceptual"
VARIANTS = ("pixel", "lpips", "disc-features", "disc-features-lpips")
LABELS = {
    "pixel": "pixel L1",
    "lpips": "L1 + LPIPS + GAN",
    "disc-features": "L1 + disc. features + GAN",
    "disc-features-lpips": "L1 + LPIPS + disc. features + GAN",
}
COLOURS = {"pixel": "tab:gray", "lpips": "tab:blue", "disc-features": "tab:orange", "disc-features-lpips": "tab:green",
           "long-pixel": "tab:gray", "long-lpips": "tab:blue", "long-disc-features-tuned": "tab:orange",
           "long-disc-features-tuned-lpips": "tab:green", "long-disc-features-tuned-w0.1": "tab:red"}
#: the long study's children (recipes/perceptual/long.yaml): label; seed repeats are
#: evaluated at their final checkpoint only and summarised in seeds.md
LONG_LABELS = {
    "long-pixel": "pixel L1",
    "long-lpips": "L1 + LPIPS + GAN",
    "long-disc-features-tuned": "L1 + disc. features (normalized) + GAN",
    "long-disc-features-tuned-lpips": "L1 + LPIPS + disc. features (normalized) + GAN",
    "long-disc-features-tuned-w0.1": "L1 + 0.1 x disc. features (normalized) + GAN",
}
#: the regularisation round (recipes/perceptual/long-regularised.yaml, then its seed repeats)
REGULARISED_RECIPES = ("long-regularised.yaml", "long-round2.yaml", "long-round3.yaml", "long-round4.yaml",
                       "long-round5.yaml")
#: labels of the children of REGULARISED_RECIPES that change something other than R1/LeCam
ROUND_LABELS = {"long-tuned-start300": "tuned features, discriminator and features from step 300",
                "long-tuned-fixed-weight": "tuned features, fixed GAN weight (no adaptive weight)"}
#: seed repeats: base run -> its repeats (seed 0 is the base run); more are read from the
#: children of REGULARISED_RECIPES named ``<base>-seed<N>``
LONG_SEEDS = {"long-pixel": ["long-pixel-seed1", "long-pixel-seed2"],
              "long-disc-features-tuned": ["long-disc-features-tuned-seed1", "long-disc-features-tuned-seed2"]}
#: further paired differences in seeds.md (run − other, same seed), besides each run − pixel
PAIRED = [("long-disc-features-tuned-lpips", "long-lpips")]
METRICS = ["psnr", "ssim", "lpips", "fd_vgg16_relu5_3"]
#: the out-of-source test set: scikit-image photographs (none of them is in the training data)
OUT_OF_SOURCE = {"name": "natural-patches", "params": {
    "image_size": None, "patches_per_image": 256, "train_images": ["rocket"],  # image_size: the recipe's
    "test_images": ["astronaut", "chelsea", "coffee", "motorcycle_left"]}}
GRID_ITEMS = 10
CODECS = {"jpeg": "JPEG (Pillow, 4:2:0)", "webp": "WebP (Pillow, method 6)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS,
                   help="study runs to evaluate (none: with --tune, only the tuning runs)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-perceptual", help="run dirs and the MLflow store")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "perceptual", help="where results and figures go")
    p.add_argument("--no-train", action="store_true", help="only evaluate the runs that exist")
    p.add_argument("--tune", action="store_true", help="also run and evaluate the tuning sweep")
    p.add_argument("--long", action="store_true",
                   help="the 1500-step study (recipes/perceptual/long.yaml) instead; results under <out>/long")
    p.add_argument("--tune-runs", nargs="+", default=None, metavar="NAME",
                   help="with --tune: evaluate only these tuning runs (default: all)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per child (default: the sweep's split)")
    p.add_argument("--steps", nargs="+", type=int, default=None,
                   help="evaluate only the checkpoints of these steps (default: every saved checkpoint)")
    p.add_argument("--tests", nargs="+", default=["in-source", "out-of-source"], choices=["in-source", "out-of-source"])
    p.add_argument("--num-samples", type=int, default=512,
                   help="test crops per evaluation, spread over the split's photographs (>= 512 for the FD)")
    p.add_argument("--report-only", action="store_true", help="no evaluation: write the table and figures")
    p.add_argument("--previous", type=Path, default=None, metavar="RESULTS_JSON",
                   help="a results.json written before (e.g. on another machine, whose store is gone): runs "
                        "not in this store are taken from it as they were evaluated then, and the grids "
                        "(which need every final checkpoint) are left as they are")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- runs
def find_run(uri: str, variant: str, experiment: str = "perceptual") -> dict | None:
    """The newest non-deleted run of ``variant`` in ``experiment`` (FINISHED preferred): a
    sweep child named ``run_name=<variant> ...`` or a plain ``vqkit train`` run named
    ``<variant>`` (study variants are prefixed ``perceptual-``)."""
    from vqkit.errors import VqkitError
    from vqkit.tracking import search_runs

    name = f"perceptual-{variant}" if experiment == "perceptual" else variant
    try:
        runs = search_runs(uri, experiment)
    except VqkitError:
        return None
    runs = [r for r in runs if r["run_name"] == name or r["run_name"].startswith(f"run_name={name} ")]
    finished = [r for r in runs if r["status"] == "FINISHED"]
    return (finished or runs or [None])[0]


def tuning_variants(recipe: Path = RECIPES / "tune-disc-features.yaml") -> list[str]:
    """The run names of the tuning sweep's children, in its order."""
    import yaml

    return list(yaml.safe_load(recipe.read_text())["sweep"]["grid"]["tracking.run_name"])


def regularised_variants() -> dict[str, str]:
    """The regularisation round's children (both recipes, in order): run name -> label
    (the regulariser and its setting, read from the sweep's grid)."""
    import yaml

    out = {}
    for name in REGULARISED_RECIPES:
        path = RECIPES / name
        if not path.is_file():
            continue
        recipe = yaml.safe_load(path.read_text())
        grid = recipe["sweep"]["grid"]
        fixed = recipe.get("discriminator") or {}

        def value(key: str, i: int, grid=grid, fixed=fixed):
            v = grid.get(f"discriminator.{key}")
            return v[i] if isinstance(v, list) else (v if v is not None else fixed.get(key, 0))

        for i, run in enumerate(grid["tracking.run_name"]):
            if run in ROUND_LABELS:
                out[run] = ROUND_LABELS[run]
                continue
            base, _, seed = run.rpartition("-seed")
            if base and seed.isdigit():
                out[run] = f"{LONG_LABELS.get(base, base)}, seed {seed}"
                continue
            parts = []
            if value("lecam", i):
                parts.append(f"LeCam λ={value('lecam', i)}")
            if value("r1", i):
                parts.append(f"R1 γ={value('r1', i)} every {value('r1_every', i) or 1}")
            out[run] = "tuned features + " + (", ".join(parts) or "no regulariser")
    return out


def run_sweeps(args, uri: str) -> None:
    """Run (or resume: the same command skips finished children) the study's sweep and,
    with ``--tune``, the tuning sweep, one after the other."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    recipes = (["long.yaml", *(r for r in REGULARISED_RECIPES if (RECIPES / r).is_file())] if args.long
               else ["study.yaml"] + (["tune-disc-features.yaml"] if args.tune else []))
    for recipe in recipes:
        cmd = [sys.executable, "-m", "vqkit.cli", "sweep", str(RECIPES / recipe)]
        if args.threads:
            cmd += ["--set", f"sweep.launcher={{name: local, params: {{threads: {args.threads}}}}}"]
        print(" ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=args.work, env=env, check=True)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, file)]`` of a run: every periodic checkpoint and the final one."""
    from vqkit.train.checkpoint import load_checkpoint

    out = {}
    for f in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        out[int(f.stem.split("_")[1])] = f
    final = run_dir / "checkpoints" / "final.pt"
    if final.is_file():
        out[int(load_checkpoint(final)["step"])] = final
    return sorted(out.items())


# ----------------------------------------------------------------------------- evaluation
def model_digest(checkpoint: Path) -> str:
    """SHA-256 of a checkpoint's model weights (names, dtypes, shapes, bytes)."""
    import hashlib

    from vqkit.train.checkpoint import load_checkpoint

    h = hashlib.sha256()
    for k, t in sorted(load_checkpoint(checkpoint)["model"].items()):
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Spread:
    """``n`` items spread evenly over a test split (every ``len // n``-th crop), so a
    subset covers every photograph of a split grouped by photograph."""

    def __init__(self, base, n: int):
        self.base, self.n = base, min(n, len(base))
        self.stride = max(1, len(base) // self.n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.base[i * self.stride]

    def get_batch(self, indices):
        import torch

        return self.base.get_batch(torch.as_tensor(indices, dtype=torch.long) * self.stride)


class Evaluator:
    """One MetricSet per test set (the real images' Fréchet statistics computed once)."""

    def __init__(self):
        self.sets: dict[str, tuple] = {}

    def test_set(self, name: str, recipe):
        if name not in self.sets:
            from vqkit.metrics import MetricSet
            from vqkit.recipe import recipe_from_dict
            from vqkit.train.build import build_datasets

            d = recipe.to_dict()
            d["seed"] = 0  # the same test crops for every run, whatever the run's own seed
            if name == "out-of-source":
                data = json.loads(json.dumps(OUT_OF_SOURCE))
                data["params"]["image_size"] = recipe.model.data.params["image_size"]
                d["data"] = data
            recipe = recipe_from_dict(d, name)
            _, test = build_datasets(recipe)
            self.sets[name] = (test, MetricSet(METRICS, cache_real=True))
        return self.sets[name]

    def __call__(self, checkpoint: Path, test_name: str, num_samples: int) -> dict:
        from vqkit.model import VQModel
        from vqkit.train.trainer import evaluate

        model, recipe = VQModel.from_checkpoint(checkpoint)
        test, metric_set = self.test_set(test_name, recipe)
        test = _Spread(test, num_samples)
        n = len(test)
        t0 = time.perf_counter()
        result = evaluate(model, test, n, 128, METRICS, "cpu", metric_set)
        result["eval_seconds"] = time.perf_counter() - t0
        result["num_samples"] = n
        return result


# ----------------------------------------------------------------------------- classic codecs
def code_bpp(checkpoint: Path) -> float:
    """Bits per pixel of a model's code: code positions per image x log2(code-book size)
    / pixels per image (fixed-length indices, no entropy coding)."""
    import math

    import torch

    from vqkit.model import VQModel

    model, recipe = VQModel.from_checkpoint(checkpoint)
    size = int(recipe.model.data.params["image_size"])
    with torch.no_grad():
        _, out, _ = model.eval()(torch.zeros(1, 3, size, size))
    return out.indices.numel() * math.log2(model.codebook_size) / (size * size)


def _mosaic(arr, cols: int):
    """``(N, H, W, 3)`` uint8 -> one ``(rows*H, cols*W, 3)`` image, row-major."""
    n, h, w, c = arr.shape
    return arr.reshape(n // cols, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(n // cols * h, cols * w, c)


def codec_roundtrip(x, fmt: str, bpp: float) -> tuple:
    """``x`` float ``(N, 3, H, W)`` in [-1, 1] tiled into one mosaic, encoded with Pillow's
    ``fmt`` (jpeg/webp) at the highest quality whose file is at most ``bpp`` bits per pixel,
    decoded and cut back. Returns ``(decoded like x, quality, achieved bpp)``."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    n, _, h, w = x.shape
    cols = max(c for c in range(1, int(n ** 0.5) + 1) if n % c == 0)
    arr = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    img = Image.fromarray(_mosaic(arr, cols))
    pixels = n * h * w

    def encode(q: int) -> bytes:
        buf = io.BytesIO()
        if fmt == "jpeg":
            img.save(buf, "JPEG", quality=q, subsampling="4:2:0", optimize=True)
        else:
            img.save(buf, "WEBP", quality=q, method=6)
        return buf.getvalue()

    lo, hi, best = 1, 100 if fmt == "webp" else 95, None
    while lo <= hi:  # file size grows with quality: the highest quality within the budget
        q = (lo + hi) // 2
        data = encode(q)
        if len(data) * 8 / pixels <= bpp:
            best, lo = (q, data), q + 1
        else:
            hi = q - 1
    if best is None:
        raise SystemExit(f"{fmt}: even quality 1 needs more than {bpp:.3f} bpp")
    q, data = best
    dec = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    rows = n // cols
    tiles = dec.reshape(rows, h, cols, w, 3).transpose(0, 2, 1, 3, 4).reshape(n, h, w, 3)
    y = torch.from_numpy(tiles.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    return y, q, len(data) * 8 / pixels


def evaluate_codec(fmt: str, test, metric_set, num_samples: int, bpp: float) -> dict:
    import torch

    test = _Spread(test, num_samples)
    n = len(test)
    x = test.get_batch(torch.arange(n))
    y, q, achieved = codec_roundtrip(x, fmt, bpp)
    for start in range(0, n, 128):
        metric_set.update(y[start:start + 128], x[start:start + 128])
    return {**metric_set.compute(), "quality": q, "bpp": achieved, "target_bpp": bpp, "num_samples": n}


# ----------------------------------------------------------------------------- figures and tables
def _label(v: str) -> str:
    return LABELS.get(v) or LONG_LABELS.get(v) or CODECS.get(v) or regularised_variants().get(v) or v


def grid(runs: dict, step: int, test_name: str, evaluator: Evaluator, path: Path, bpp: float, num_samples: int) -> None:
    import torch
    from PIL import Image, ImageDraw

    from vqkit.model import VQModel

    rows, labels, x = [], [], None
    for v, info in runs.items():
        model, recipe = VQModel.from_checkpoint(info["checkpoints"][str(step)])
        test = _Spread(evaluator.test_set(test_name, recipe)[0], num_samples)
        if x is None:
            n_eval = len(test)
            idx = torch.linspace(0, n_eval - 1, GRID_ITEMS).round().long()
            x = test.get_batch(idx)
            rows.append(x)
            labels.append("original")
        with torch.no_grad():
            rows.append(model.eval()(x)[0].clamp(-1, 1))
        labels.append(_label(v))
    # the codecs: the same crops, coded inside the mosaic of all evaluated test crops
    full = test.get_batch(torch.arange(n_eval))
    for fmt in CODECS:
        y, q, _ = codec_roundtrip(full, fmt, bpp)
        rows.append(y[idx])
        labels.append(f"{_label(fmt)} q={q}")
    scale, pad = 2, 2
    label_w = max(200, 7 * max(map(len, labels)) + 12)  # Pillow's default font: ~6 px per character
    n, _, h, w = rows[0].shape
    img = Image.new("RGB", (label_w + n * (w * scale + pad), len(rows) * (h * scale + pad)), "white")
    draw = ImageDraw.Draw(img)
    for r, (row, label) in enumerate(zip(rows, labels)):
        y0 = r * (h * scale + pad)
        draw.text((4, y0 + h * scale // 2 - 6), label, fill="black")
        arr = ((row + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            img.paste(tile, (label_w + i * (w * scale + pad), y0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("eval/psnr", "PSNR (dB) ↑"), ("eval/lpips", "LPIPS-AlexNet ↓"), ("eval/fd_vgg16_relu5_3", "FD VGG16 relu5_3 ↓")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for row, test_name in enumerate(("in-source", "out-of-source")):
        for ax, (key, title) in zip(axes[row], keys):
            for v, info in results["runs"].items():
                pts = sorted((int(s), e[key]) for s, e in info["evals"].get(test_name, {}).items())
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=_label(v), color=COLOURS[v])
            for fmt, style in zip(CODECS, ("--", ":")):
                e = results.get("codecs", {}).get(fmt, {}).get(test_name)
                if e:
                    ax.axhline(e[key], color="black", linestyle=style, linewidth=1, label=f"{_label(fmt)}, same bpp")
            ax.set_title(f"{title}, {test_name} test")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def common_step(results: dict) -> int | None:
    """The largest step evaluated on both test sets for every run."""
    sets = [set(info["evals"].get(t, {})) for info in results["runs"].values() for t in ("in-source", "out-of-source")]
    common = set.intersection(*sets) if sets else set()
    return max(map(int, common)) if common else None


HEADER = ["| {what} | PSNR (dB) ↑ | SSIM ↑ | LPIPS-AlexNet ↓ | FD VGG16 relu5_3 ↓ | code usage | bpp | train wall time (steps/s) |",
          "|---|---|---|---|---|---|---|---|"]


def _row(label: str, e: dict, usage: str, bpp: str, wall: str) -> str:
    return (f"| {label} | {e['eval/psnr']:.2f} | {e['eval/ssim']:.3f} | {e['eval/lpips']:.4f} | "
            f"{e['eval/fd_vgg16_relu5_3']:.1f} | {usage} | {bpp} | {wall} |")


def _wall(info: dict, step: int) -> str:
    if not info.get("wall_s"):
        return f"not finished ({info['status']})"
    return f"{info['wall_s'] / 60:.0f} min ({step / info['wall_s']:.3f})"


def table(results: dict, step: int) -> str:
    lines = []
    bpp = results.get("bpp")
    for test_name in ("in-source", "out-of-source"):
        n = next(iter(results["runs"].values()))["evals"][test_name][str(step)]["num_samples"]
        lines += [f"**{test_name} test**, step {step}, {n} crops", "", HEADER[0].format(what="loss"), HEADER[1]]
        for v, info in results["runs"].items():
            e = info["evals"][test_name][str(step)]
            lines.append(_row(_label(v), e, f"{100 * e['eval/usage']:.0f} %", f"{bpp:.4f}", _wall(info, step)))
        for fmt, per in results.get("codecs", {}).items():
            e = per[test_name]
            lines.append(_row(f"{_label(fmt)} q={e['quality']}", e, "–", f"{e['bpp']:.4f}", "–"))
        lines.append("")
    return "\n".join(lines)


def tuning_table(results: dict, step: int) -> str:
    """The tuning runs' final evaluations next to the study's pixel-only and untuned runs."""
    rows = [("pixel L1 (study)", results["runs"].get("pixel")),
            ("disc. features, untuned (study)", results["runs"].get("disc-features"))]
    rows += [(name, info) for name, info in results.get("tuning", {}).items()]
    lines = []
    for test_name in ("in-source", "out-of-source"):
        lines += [f"**{test_name} test**, step {step}", "",
                  "| run | PSNR (dB) ↑ | SSIM ↑ | LPIPS-AlexNet ↓ | FD VGG16 relu5_3 ↓ | code usage | bpp | train wall time (steps/s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, info in rows:
            e = (info or {}).get("evals", {}).get(test_name, {}).get(str(step))
            if e:
                lines.append(_row(label, e, f"{100 * e['eval/usage']:.0f} %", f"{results.get('bpp', 0):.4f}", _wall(info, step)))
        lines.append("")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    import statistics

    if len(values) < 2:
        return f"{values[0]:.4g} (1 seed)" if values else "–"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def seeds_table(results: dict, step: int, seeds: dict[str, list[str]]) -> str:
    """Seeds 0, 1, 2 of each run of ``seeds`` (base -> repeats; pixel-only first) at
    ``step``: mean ± sample standard deviation of each metric, and the paired difference
    (run − pixel, same seed: same initialisation and training crops) per seed."""
    keys = [("eval/psnr", "PSNR (dB)"), ("eval/ssim", "SSIM"), ("eval/lpips", "LPIPS-AlexNet"),
            ("eval/fd_vgg16_relu5_3", "FD VGG16 relu5_3")]
    runs = {**results["runs"], **results.get("regularised", {}), **results["seeds"]}

    def evals(base: str, test_name: str) -> list[dict | None]:
        return [runs.get(v, {}).get("evals", {}).get(test_name, {}).get(str(step)) for v in [base] + seeds[base]]

    lines = []
    for test_name in ("in-source", "out-of-source"):
        lines += [f"**{test_name} test**, step {step}: mean ± standard deviation over the seeds a run has (0, 1, 2: last column)", "",
                  "| run | " + " | ".join(t for _, t in keys) + " | seeds |", "|---|" + "---|" * (len(keys) + 1)]
        per = {base: evals(base, test_name) for base in seeds}
        for base, es in per.items():
            got = [e for e in es if e]
            lines.append(f"| {_label(base)} | " + " | ".join(_mean_sd([e[k] for e in got]) for k, _ in keys)
                         + f" | {len(got)} |")
        for base, other in [(b, "long-pixel") for b in per if b != "long-pixel"] + PAIRED:
            if base not in per or other not in per:
                continue
            a, b = per[base], per[other]
            pairs = [(x, y) for x, y in zip(a, b) if x and y]
            if len(pairs) < 2:
                continue
            vs = "pixel" if other == "long-pixel" else _label(other)
            lines.append(f"| {_label(base)} − {vs}, paired by seed | " + " | ".join(
                _mean_sd([x[k] - y[k] for x, y in pairs]) + " (" + ", ".join(f"{x[k] - y[k]:+.3g}" for x, y in pairs) + ")"
                for k, _ in keys) + f" | {len(pairs)} |")
        lines.append("")
    return "\n".join(lines)


def regularised_table(results: dict, step: int) -> str:
    """The regularisation round's final evaluations (seed 0) next to pixel-only and the
    unregularised tuned features (seed 0), with each run's difference to pixel-only."""
    base = {"long-pixel": results["runs"].get("long-pixel"),
            "long-disc-features-tuned": results["runs"].get("long-disc-features-tuned")}
    rows = [(v, info) for v, info in {**base, **results.get("regularised", {})}.items()
            if info is not None and not v.rsplit("-", 1)[-1].startswith("seed")]
    keys = [("eval/psnr", "{:+.2f}"), ("eval/lpips", "{:+.4f}"), ("eval/fd_vgg16_relu5_3", "{:+.1f}")]
    lines = []
    for test_name in ("in-source", "out-of-source"):
        lines += [f"**{test_name} test**, step {step}, seed 0", "",
                  "| run | PSNR (dB) ↑ | SSIM ↑ | LPIPS-AlexNet ↓ | FD VGG16 relu5_3 ↓ | code usage | "
                  "Δ PSNR | Δ LPIPS | Δ FD (vs pixel) | train wall time (steps/s) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        ref = (base["long-pixel"] or {}).get("evals", {}).get(test_name, {}).get(str(step))
        for v, info in rows:
            e = info.get("evals", {}).get(test_name, {}).get(str(step))
            if not e:
                continue
            deltas = " | ".join(fmt.format(e[k] - ref[k]) if ref else "–" for k, fmt in keys)
            lines.append(f"| {_label(v)} | {e['eval/psnr']:.2f} | {e['eval/ssim']:.3f} | {e['eval/lpips']:.4f} | "
                         f"{e['eval/fd_vgg16_relu5_3']:.1f} | {100 * e['eval/usage']:.0f} % | {deltas} | {_wall(info, step)} |")
        lines.append("")
    return "\n".join(lines)


def collect(args, uri: str, variant: str, experiment: str, cache: Path, evaluator: Evaluator, final_only: bool) -> dict | None:
    """Evaluate (or read from the cache) the checkpoints of one run; ``None`` without a run."""
    from vqkit.tracking import _client, find_run_dir, log_missing_metrics

    run = find_run(uri, variant, experiment)
    if run is None:
        print(f"{variant}: no run yet", flush=True)
        return None
    run_dir = find_run_dir(run["run_id"], [args.work / "runs"])
    client = _client(uri)
    r = client.get_run(run["run_id"]).info
    info = {"run_id": run["run_id"], "status": run["status"], "evals": {}, "checkpoints": {},
            "wall_s": (r.end_time - r.start_time) / 1000 if r.end_time and run["status"] == "FINISHED" else None}
    ckpts = checkpoints(run_dir)
    if final_only and ckpts:
        ckpts = ckpts[-1:]
    prefix = f"tune-{variant}" if experiment == "perceptual-tuning" else variant
    for step, ckpt in ckpts:
        info["checkpoints"][str(step)] = str(ckpt)
        for test_name in ("in-source", "out-of-source"):
            f = cache / f"{prefix}-{step}-{test_name}.json"
            todo = (not args.report_only and test_name in args.tests
                    and (args.steps is None or step in args.steps))
            if not f.is_file() and todo:
                digest = model_digest(ckpt)
                same = [json.loads(g.read_text()) for g in cache.glob(f"*-{test_name}.json")]
                same = [e for e in same if e.get("model_sha256") == digest and e["num_samples"] == args.num_samples]
                if same:  # bit-identical weights (e.g. two recipes before their discriminator starts)
                    e = {**same[0], "identical_to": same[0]["variant"]}
                else:
                    e = evaluator(ckpt, test_name, args.num_samples)
                e.update(run_id=run["run_id"], variant=prefix, model_sha256=digest, step=step)
                f.write_text(json.dumps(e, indent=1, sort_keys=True))
                # into the run under the study's prefix, so `vqkit compare --plot` shows it over steps
                log_missing_metrics(uri, run["run_id"], {
                    f"study/{test_name}/{m}": float(e[f"eval/{m}"]) for m in METRICS}, step)
                print(f"{prefix} step {step} {test_name}: " + " ".join(
                    f"{k}={e[k]:.4g}" for k in sorted(e) if isinstance(e[k], (int, float))), flush=True)
            if f.is_file():
                e = json.loads(f.read_text())
                if e.get("run_id") == run["run_id"]:
                    info["evals"].setdefault(test_name, {})[str(step)] = e
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(args.work / 'mlflow.db').resolve()}"
    if not args.no_train:
        run_sweeps(args, uri)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.long:
        args.out = args.out / "long"
    cache = args.out / "evals"  # one file per evaluation (several processes may evaluate side by side)
    cache.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator()
    results: dict = {"runs": {}, "tuning": {}, "codecs": {}, "seeds": {}, "regularised": {}}
    seeds = dict(LONG_SEEDS)
    if args.long:
        for v in LONG_LABELS:
            info = collect(args, uri, v, "perceptual-long", cache, evaluator, final_only=False)
            if info is not None:
                results["runs"][v] = info
        for repeats in LONG_SEEDS.values():
            for v in repeats:
                info = collect(args, uri, v, "perceptual-long", cache, evaluator, final_only=True)
                if info is not None:
                    results["seeds"][v] = info
        for v in regularised_variants():  # the regularisation round: final checkpoints
            info = collect(args, uri, v, "perceptual-long", cache, evaluator, final_only=True)
            if info is not None:
                results["regularised"][v] = info
            base, _, seed = v.rpartition("-seed")
            if base and seed.isdigit():
                seeds.setdefault(base, []).append(v)
                results["seeds"][v] = results["regularised"].pop(v, None) or {}
    for v in ([] if args.long else args.variants):
        info = collect(args, uri, v, "perceptual", cache, evaluator, final_only=False)
        if info is not None:
            results["runs"][v] = info
    if not args.long and (args.tune or (args.report_only and any(cache.glob("tune-*.json")))):
        for name in tuning_variants():
            if args.tune_runs is not None and name not in args.tune_runs:
                continue
            info = collect(args, uri, name, "perceptual-tuning", cache, evaluator, final_only=True)
            if info is not None:
                results["tuning"][name] = info
    if args.previous is not None:  # runs evaluated before, whose store and checkpoints are elsewhere
        before = json.loads(args.previous.read_text())
        for section in ("runs", "seeds", "regularised", "tuning"):
            for v, info in before.get(section, {}).items():
                if not results[section].get(v) and not (section == "regularised" and results["seeds"].get(v)):
                    results[section][v] = {**info, "from": str(args.previous)}
        # in the order the runs are collected in (the tables list them in that order)
        order = [*LONG_LABELS, *VARIANTS, *(v for vs in LONG_SEEDS.values() for v in vs), *regularised_variants()]
        for section in ("runs", "seeds", "regularised"):
            results[section] = dict(sorted(results[section].items(),
                                           key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
        results["codecs"] = results["codecs"] or before.get("codecs", {})
        if "bpp" in before:
            results["bpp"] = before["bpp"]
    any_ckpt = next((c for info in results["runs"].values() for c in info["checkpoints"].values()
                     if Path(c).is_file()), None)
    if any_ckpt is not None:
        results["bpp"] = code_bpp(Path(any_ckpt))
        from vqkit.model import VQModel

        _, recipe = VQModel.from_checkpoint(Path(any_ckpt))
        for fmt in CODECS:
            for test_name in ("in-source", "out-of-source"):
                f = cache / f"{fmt}-{test_name}.json"
                if not f.is_file() and not args.report_only and test_name in args.tests:
                    test, metric_set = evaluator.test_set(test_name, recipe)
                    e = evaluate_codec(fmt, test, metric_set, args.num_samples, results["bpp"])
                    f.write_text(json.dumps(e, indent=1, sort_keys=True))
                    print(f"{fmt} {test_name}: " + " ".join(f"{k}={e[k]:.4g}" for k in sorted(e)), flush=True)
                if f.is_file():
                    results["codecs"].setdefault(fmt, {})[test_name] = json.loads(f.read_text())
    if args.steps is not None and not args.report_only:
        return 0  # a partial evaluation process: results.json and the report are written by a --report-only call
    (args.out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    curves(results, args.out / "curves.png")
    step = common_step(results)
    if step is None:
        print("no step evaluated for every run yet")
        return 0
    (args.out / "table.md").write_text(table(results, step))
    if args.long:
        (args.out / "seeds.md").write_text(seeds_table(results, step, seeds))
        print(seeds_table(results, step, seeds))
        if results["regularised"]:
            (args.out / "regularised.md").write_text(regularised_table(results, step))
            print(regularised_table(results, step))
    if results["tuning"]:
        (args.out / "tuning.md").write_text(tuning_table(results, step))
        print(tuning_table(results, step))
    missing = [v for v, info in results["runs"].items() if not Path(info["checkpoints"].get(str(step), "")).is_file()]
    for test_name in ("in-source", "out-of-source"):
        if missing:
            print(f"grid-{test_name}.png left as it is: no final checkpoint here for {', '.join(missing)}")
            continue
        grid(results["runs"], step, test_name, evaluator, args.out / f"grid-{test_name}.png", results["bpp"],
             args.num_samples)
    print(table(results, step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
