"""Loss study: pixel-only against learned and pretrained perceptual losses on real photographs.

The four recipes of ``recipes/perceptual/`` (``pixel``, ``lpips``, ``disc-features``,
``disc-features-lpips``) share data, model, code-book, reset policy, seed and steps and
differ only in their losses (and the PatchGAN where they call for it). Each is an ordinary
``vqkit train`` run in experiment ``perceptual``. Then every saved checkpoint of every run
is evaluated with the same metrics (``vqkit.metrics``: PSNR, SSIM, LPIPS-AlexNet, the VGG16
Fréchet distance) on

* ``in-source``: the recipes' test split: crops of 2 wallpaper photographs held out from
  training (Debian ``plasma-workspace-wallpapers``);
* ``out-of-source``: crops of 4 of scikit-image's photographs (astronaut, chelsea, coffee,
  motorcycle), a source not used in training at all.

Written under ``--out``: ``results.json`` (every number, run ids, wall times), ``table.md``,
``curves.png`` (metrics over steps per loss), ``grid-in-source.png`` and
``grid-out-of-source.png`` (the same test crops reconstructed by each final model). The
final metrics are also written back into each run (``vqkit eval RUN``).

Reproduce (from the repository root; needs ``apt-get install plasma-workspace-wallpapers``
and ``vqkit weights fetch lpips``)::

    python benchmarks/perceptual_study.py --jobs 4          # trains what is missing, then evaluates
    python benchmarks/perceptual_study.py --no-train        # evaluate the runs that exist so far

Runs are tracked in ``<work>/mlflow.db`` (``--work``, default ``runs/bench-perceptual``);
``vqkit compare --experiment perceptual --tracking-uri sqlite:///<work>/mlflow.db`` shows them.
Evaluations are cached in ``<out>/evals/<variant>-<step>-<test set>.json``, so several
processes can evaluate side by side (``--variants``, ``--steps``, ``--tests``) and a
``--report-only`` call then writes the table and the figures.
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
COLOURS = {"pixel": "tab:gray", "lpips": "tab:blue", "disc-features": "tab:orange", "disc-features-lpips": "tab:green"}
METRICS = ["psnr", "ssim", "lpips", "fd_vgg16_relu5_3"]
#: the out-of-source test set: scikit-image photographs (none of them is in the training data)
OUT_OF_SOURCE = {"name": "natural-patches", "params": {
    "image_size": 32, "patches_per_image": 256, "train_images": ["rocket"],
    "test_images": ["astronaut", "chelsea", "coffee", "motorcycle_left"]}}
GRID_ITEMS = 12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-perceptual", help="run dirs and the MLflow store")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "perceptual", help="where results and figures go")
    p.add_argument("--no-train", action="store_true", help="only evaluate the runs that exist")
    p.add_argument("--jobs", type=int, default=1, help="train this many variants side by side (1 thread each)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every run (repeatable); changes the recipe, so new runs")
    p.add_argument("--steps", nargs="+", type=int, default=None,
                   help="evaluate only the checkpoints of these steps (default: every saved checkpoint)")
    p.add_argument("--tests", nargs="+", default=["in-source", "out-of-source"], choices=["in-source", "out-of-source"])
    p.add_argument("--num-samples", type=int, default=1024, help="test crops per evaluation (>= 512 for the FD)")
    p.add_argument("--report-only", action="store_true", help="no evaluation: write the table and figures")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- runs
def find_run(uri: str, variant: str) -> dict | None:
    """The newest non-deleted run of ``variant`` in experiment ``perceptual`` (FINISHED preferred)."""
    from vqkit.errors import VqkitError
    from vqkit.tracking import search_runs

    try:
        runs = search_runs(uri, "perceptual")
    except VqkitError:
        return None
    runs = [r for r in runs if r["run_name"] == f"perceptual-{variant}"]
    finished = [r for r in runs if r["status"] == "FINISHED"]
    return (finished or runs or [None])[0]


def train_missing(args, uri: str) -> None:
    todo = [v for v in args.variants if (find_run(uri, v) or {}).get("status") != "FINISHED"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    running: list[tuple[str, subprocess.Popen]] = []
    vqkit = [sys.executable, "-m", "vqkit.cli"]
    while todo or running:
        while todo and len(running) < args.jobs:
            v = todo.pop(0)
            run = find_run(uri, v)
            cmd = vqkit + ["train", str(RECIPES / f"{v}.yaml"), "--quiet"]
            if run is not None and run["status"] != "FINISHED":
                cmd = vqkit + ["train", "--resume", run["run_id"], "--quiet"]  # continue an interrupted run
            for o in args.overrides:
                cmd += ["--set", o]
            print(f"train {v}: {' '.join(cmd[2:])}", flush=True)
            running.append((v, subprocess.Popen(cmd, cwd=args.work, env=env)))
        time.sleep(5)
        for v, proc in list(running):
            if proc.poll() is not None:
                running.remove((v, proc))
                if proc.returncode != 0:
                    raise SystemExit(f"training {v} failed (exit {proc.returncode})")


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


class Evaluator:
    """One MetricSet per test set (the real images' Fréchet statistics computed once)."""

    def __init__(self):
        self.sets: dict[str, tuple] = {}

    def test_set(self, name: str, recipe):
        if name not in self.sets:
            from vqkit.metrics import MetricSet
            from vqkit.recipe import recipe_from_dict
            from vqkit.train.build import build_datasets

            if name == "out-of-source":
                d = recipe.to_dict()
                d["data"] = OUT_OF_SOURCE
                recipe = recipe_from_dict(d, "out-of-source")
            _, test = build_datasets(recipe)
            self.sets[name] = (test, MetricSet(METRICS, cache_real=True))
        return self.sets[name]

    def __call__(self, checkpoint: Path, test_name: str, num_samples: int) -> dict:
        from vqkit.model import VQModel
        from vqkit.train.trainer import evaluate

        model, recipe = VQModel.from_checkpoint(checkpoint)
        test, metric_set = self.test_set(test_name, recipe)
        n = min(num_samples, len(test))
        t0 = time.perf_counter()
        result = evaluate(model, test, n, 128, METRICS, "cpu", metric_set)
        result["eval_seconds"] = time.perf_counter() - t0
        result["num_samples"] = n
        return result


def grid(runs: dict, step: int, test_name: str, evaluator: Evaluator, path: Path) -> None:
    import torch
    from PIL import Image, ImageDraw

    from vqkit.model import VQModel

    rows, labels = [], []
    for v, info in runs.items():
        model, recipe = VQModel.from_checkpoint(info["checkpoints"][str(step)])
        test, _ = evaluator.test_set(test_name, recipe)
        idx = torch.linspace(0, len(test) - 1, GRID_ITEMS).round().long()
        x = test.get_batch(idx)
        if not rows:
            rows.append(x)
            labels.append("original")
        with torch.no_grad():
            rows.append(model(x)[0].clamp(-1, 1))
        labels.append(LABELS[v])
    scale, pad, label_w = 4, 2, 230
    n, _, h, w = rows[0].shape
    img = Image.new("RGB", (label_w + n * (w * scale + pad), len(rows) * (h * scale + pad)), "white")
    draw = ImageDraw.Draw(img)
    for r, (row, label) in enumerate(zip(rows, labels)):
        y = r * (h * scale + pad)
        draw.text((4, y + h * scale // 2 - 6), label, fill="black")
        arr = ((row + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            img.paste(tile, (label_w + i * (w * scale + pad), y))
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
                    ax.plot(*zip(*pts), marker="o", label=LABELS[v], color=COLOURS[v])
            ax.set_title(f"{title}, {test_name} test")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def common_step(results: dict) -> int | None:
    """The largest step evaluated on both test sets for every run."""
    sets = [set(info["evals"].get(t, {})) for info in results["runs"].values() for t in ("in-source", "out-of-source")]
    common = set.intersection(*sets) if sets else set()
    return max(map(int, common)) if common else None


def table(results: dict, step: int) -> str:
    lines = []
    for test_name in ("in-source", "out-of-source"):
        n = next(iter(results["runs"].values()))["evals"][test_name][str(step)]["num_samples"]
        lines += [f"**{test_name} test**, step {step}, {n} crops", "",
                  "| loss | PSNR (dB) ↑ | SSIM ↑ | LPIPS-AlexNet ↓ | FD VGG16 relu5_3 ↓ | code usage | perplexity | train wall time |",
                  "|---|---|---|---|---|---|---|---|"]
        for v, info in results["runs"].items():
            e = info["evals"][test_name][str(step)]
            wall = f"{info['wall_s'] / 60:.0f} min" if info.get("wall_s") else f"not finished ({info['status']})"
            lines.append(f"| {LABELS[v]} | {e['eval/psnr']:.2f} | {e['eval/ssim']:.3f} | {e['eval/lpips']:.4f} | "
                         f"{e['eval/fd_vgg16_relu5_3']:.3f} | {100 * e['eval/usage']:.0f} % | {e['eval/perplexity']:.0f} | {wall} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(args.work / 'mlflow.db').resolve()}"
    if not args.no_train:
        train_missing(args, uri)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from vqkit.tracking import find_run_dir

    # one file per evaluation (several processes may evaluate side by side)
    cache = args.out / "evals"
    cache.mkdir(exist_ok=True)
    evaluator = Evaluator()
    from vqkit.tracking import _client

    results: dict = {"runs": {}}
    for v in args.variants:
        run = find_run(uri, v)
        if run is None:
            print(f"{v}: no run yet", flush=True)
            continue
        run_dir = find_run_dir(run["run_id"], [args.work / "runs"])
        r = _client(uri).get_run(run["run_id"]).info
        info = {"run_id": run["run_id"], "status": run["status"], "evals": {}, "checkpoints": {},
                "wall_s": (r.end_time - r.start_time) / 1000 if r.end_time and run["status"] == "FINISHED" else None}
        for step, ckpt in checkpoints(run_dir):
            info["checkpoints"][str(step)] = str(ckpt)
            for test_name in ("in-source", "out-of-source"):
                f = cache / f"{v}-{step}-{test_name}.json"
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
                    e.update(run_id=run["run_id"], variant=v, model_sha256=digest)
                    f.write_text(json.dumps(e, indent=1, sort_keys=True))
                    print(f"{v} step {step} {test_name}: " + " ".join(f"{k}={e[k]:.4g}" for k in sorted(e) if isinstance(e[k], (int, float))),
                          flush=True)
                if f.is_file():
                    e = json.loads(f.read_text())
                    if e.get("run_id") == run["run_id"]:
                        info["evals"].setdefault(test_name, {})[str(step)] = e
        results["runs"][v] = info
        if run["status"] == "FINISHED" and not args.report_only and not (cache / f"{v}-written-back").exists():
            subprocess.run([sys.executable, "-m", "vqkit.cli", "eval", run["run_id"], "--metrics", ",".join(METRICS),
                            "--num-samples", str(args.num_samples), "--tracking-uri", uri], cwd=args.work, check=True)
            (cache / f"{v}-written-back").touch()
    (args.out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    curves(results, args.out / "curves.png")
    if args.steps is not None and not args.report_only:
        return 0  # a partial evaluation process: the report is written by a --report-only call
    step = common_step(results)
    if step is None:
        print("no step evaluated for every run yet")
        return 0
    (args.out / "table.md").write_text(table(results, step))
    grid(results["runs"], step, "in-source", evaluator, args.out / "grid-in-source.png")
    grid(results["runs"], step, "out-of-source", evaluator, args.out / "grid-out-of-source.png")
    print(table(results, step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
