"""vq against fsq against residual VQ at equal bits per image (docs/quantizers.md).

Every configuration is trained by ``vqkit train`` (a subprocess: the normal path, nothing
special-cased) from the same base recipe, with only the quantizer swapped (the plugin
recipes in ``plugins/vqkit-fsq/recipes`` and ``plugins/vqkit-residual/recipes``) and the
same shortened schedule, then evaluated by ``vqkit eval --json`` on the test split::

    python benchmarks/quantizers.py                           # both data sets, 600 steps each
    python benchmarks/quantizers.py --steps 100 --datasets fashion-mnist --configs vq-256,fsq-8.6.5

Needs both plugin distributions installed (``make setup`` does it). Runs one training at
a time; prints one row per (data set, quantizer): code-book, bits per latent and per image,
PSNR / SSIM / code usage / perplexity on the first ``--eval-samples`` test images, the
median training step time and its ratio to vq's, and the wall time of the ``vqkit train``
process. ``--quantizer-time ROUNDS`` trains nothing and times the quantizers alone (forward
and backward on one batch of latents, interleaved), as ratios to vq's. With ``--out DIR`` every finished row is kept in ``DIR/rows.json`` and an
invocation with the same settings reuses it instead of training again (so an interrupted
comparison resumes, and configurations can be added later); ``--set KEY=VALUE`` adds an
override to every configuration (part of the settings a row is kept under).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VQKIT = [sys.executable, "-m", "vqkit.cli"]

#: data set -> (base recipe, fsq recipe, residual recipe) (same encoder, decoder, losses, schedule)
DATASETS = {
    "fashion-mnist": ("recipes/quickstart.yaml", "plugins/vqkit-fsq/recipes/quickstart-fsq.yaml",
                      "plugins/vqkit-residual/recipes/quickstart-residual.yaml"),
    "natural-patches": ("recipes/natural-patches.yaml", "plugins/vqkit-fsq/recipes/natural-patches-fsq.yaml",
                        "plugins/vqkit-residual/recipes/natural-patches-residual.yaml"),
}

#: config -> (which recipe of DATASETS, overrides, codes per code-book, code-books)
CONFIGS = {
    "vq-256": (0, [], 256, 1),
    "fsq-8.6.5": (1, ["quantizer.params.levels=[8, 6, 5]"], 240, 1),
    "fsq-4.4.4.4": (1, ["quantizer.params.levels=[4, 4, 4, 4]"], 256, 1),
    "residual-2x16": (2, ["quantizer.params.stages=2", "quantizer.params.codebook_size=16"], 16, 2),
}


def schedule(steps: int, eval_samples: int) -> list[str]:
    """The same shortened schedule for every configuration (resets stop at 80 %)."""
    return [
        f"train.steps={steps}",
        f"train.warmup_steps={min(50, steps // 10)}",
        "train.log_every=25",
        f"train.eval_every={steps}",
        f"train.image_every={steps}",
        f"train.checkpoint_every={steps}",
        f"reset.stop_step={int(steps * 0.8)}",
        f"eval.num_samples={eval_samples}",
    ]


def latents_per_image(recipe: str) -> int:
    from vqkit.recipe import load_recipe

    r = load_recipe(str(ROOT / recipe), [])
    size = r.params_of("data").image_size
    h, w = (size, size) if isinstance(size, int) else size
    factor = r.params_of("encoder").factor
    return (h // factor) * (w // factor)


def step_times(uri: str, run_id: str) -> list[float]:
    from mlflow import MlflowClient

    return [m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "time/step_s")]


def run_one(dataset: str, config: str, steps: int, eval_samples: int, out: Path, threads: int,
            common: list[str]) -> dict:
    which, extra, k, s = CONFIGS[config]
    recipe = DATASETS[dataset][which]
    uri = f"sqlite:///{out / 'mlflow.db'}"
    sets = schedule(steps, eval_samples) + common + extra + [
        f"tracking.run_name={dataset}-{config}",
        f"tracking.uri={uri}",
        f"tracking.experiment=quantizers-{dataset}",
        f"tracking.output_dir={out / 'runs'}",
    ]
    cmd = VQKIT + ["train", str(ROOT / recipe), "--quiet"]
    for text in sets:
        cmd += ["--set", text]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{dataset} {config}: vqkit train failed ({proc.returncode}):\n{proc.stderr[-3000:]}{proc.stdout[-2000:]}")
    found = re.search(r"MLflow run ([0-9a-f]{32})", proc.stdout + proc.stderr)
    run_dir = re.search(r"run dir (\S+?);", proc.stdout)
    if not found or not run_dir:
        sys.exit(f"{dataset} {config}: no run id / run dir in the output of vqkit train:\n{proc.stdout[-2000:]}")
    ev = subprocess.run(VQKIT + ["eval", run_dir.group(1), "--json", "--num-samples", str(eval_samples)],
                        capture_output=True, text=True, env=env, cwd=out)
    if ev.returncode != 0:
        sys.exit(f"{dataset} {config}: vqkit eval failed:\n{ev.stderr[-3000:]}")
    result = json.loads(ev.stdout)
    times = step_times(uri, found.group(1))
    bits = s * math.log2(k)
    return {
        "dataset": dataset,
        "quantizer": config,
        "codes": f"{k}" if s == 1 else f"{s}x{k}",
        "bits_per_latent": bits,
        "bits_per_image": bits * latents_per_image(recipe),
        "psnr": result.get("eval/psnr"),
        "ssim": result.get("eval/ssim"),
        "usage": result.get("eval/usage"),
        "perplexity": result.get("eval/perplexity"),
        "step_ms": 1000 * statistics.median(times) if times else float("nan"),
        "train_wall_s": wall,
        "run_id": found.group(1),
        "threads": threads,
        "finished_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def row_key(dataset: str, config: str, steps: int, eval_samples: int, common: list[str]) -> str:
    return json.dumps([dataset, config, steps, eval_samples, common])


def time_quantizers(dataset: str, configs: list[str], repeats: int, threads: int, batch: int) -> str:
    """Forward + backward of each quantizer alone on the latents of one batch of ``dataset``'s
    recipe (random ``(batch, D, h, w)``), interleaved round by round so that a change of
    machine load hits every quantizer alike; minimum and median per quantizer and their
    ratios to vq's."""
    import torch

    from vqkit.plugins import get_registry
    from vqkit.recipe import load_recipe

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    quantizers = {}
    for config in configs:
        which, extra, _, _ = CONFIGS[config]
        recipe = load_recipe(str(ROOT / DATASETS[dataset][which]), extra)
        entry = get_registry().get("quantizers", recipe.model.quantizer.name)
        dim = recipe.params_of("encoder").latent_dim
        quantizers[config] = entry.cls(recipe.params_of("quantizer"), dim=dim).train()
    side = latents_per_image(DATASETS[dataset][0]) ** 0.5
    z = torch.randn(batch, dim, int(side), int(side))
    times: dict[str, list[float]] = {c: [] for c in configs}
    for rnd in range(repeats + 3):
        for config, q in quantizers.items():
            x = z.clone().requires_grad_(True)
            t0 = time.perf_counter()
            out = q(x)
            weights = q.loss_weights()
            total = out.quantized.square().mean() + sum(weights.get(k, 1.0) * v for k, v in out.losses.items())
            total.backward()
            if rnd >= 3:  # 3 warm-up rounds
                times[config].append(time.perf_counter() - t0)
    # the minimum is the cost with the least interference from other processes; the median
    # is shown beside it
    base_min, base_med = min(times[configs[0]]), statistics.median(times[configs[0]])
    lines = [f"quantizer alone, forward + backward on {tuple(z.shape)} latents ({dataset} recipe), "
             f"{repeats} interleaved rounds, {threads} thread(s)",
             f"| quantizer | min ms | min / {configs[0]} | median ms | median / {configs[0]} |", "|---|---|---|---|---|"]
    for config in configs:
        lo, med = min(times[config]), statistics.median(times[config])
        lines.append(f"| {config} | {1000 * lo:.2f} | {lo / base_min:.2f} | {1000 * med:.2f} | {med / base_med:.2f} |")
    return "\n".join(lines)


def fmt_table(rows: list[dict]) -> str:
    head = ["data set", "quantizer", "codes", "bits/latent", "bits/image", "PSNR dB", "SSIM", "usage",
            "perplexity", "step ms", "step / vq", "train wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["dataset"]: r["step_ms"] for r in rows if r["quantizer"] == "vq-256"}

    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    for r in rows:
        ratio = r["step_ms"] / base[r["dataset"]] if r["dataset"] in base else None
        lines.append("| " + " | ".join([
            r["dataset"], r["quantizer"], r["codes"], f(r["bits_per_latent"], ".2f"), f(r["bits_per_image"], ".0f"),
            f(r["psnr"], ".2f"), f(r["ssim"], ".3f"), f(r["usage"], ".3f"), f(r["perplexity"], ".1f"),
            f(r["step_ms"], ".0f"), f(ratio, ".2f"), f(r["train_wall_s"], ".0f"),
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, of: " + ", ".join(DATASETS))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=600, help="training steps per configuration")
    ap.add_argument("--eval-samples", type=int, default=1000, help="test images evaluated")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each training")
    ap.add_argument("--out", default=None, help="folder for the MLflow store and run dirs (default: a temporary one, removed)")
    ap.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every configuration, e.g. train.batch_size=32 (repeatable)")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    ap.add_argument("--quantizer-time", type=int, default=0, metavar="ROUNDS",
                    help="instead of training: time each quantizer alone (forward + backward), ROUNDS interleaved rounds")
    ap.add_argument("--batch", type=int, default=64, help="batch of the --quantizer-time latents")
    args = ap.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    configs = [c for c in args.configs.split(",") if c]
    for name, valid in ((datasets, DATASETS), (configs, CONFIGS)):
        bad = [n for n in name if n not in valid]
        if bad:
            ap.error(f"unknown {bad[0]!r} (valid: {', '.join(valid)})")
    if args.quantizer_time:
        if "vq-256" in configs:  # the reference first
            configs = ["vq-256"] + [c for c in configs if c != "vq-256"]
        for dataset in datasets:
            print(time_quantizers(dataset, configs, args.quantizer_time, args.threads, args.batch))
        return 0
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vqkit-quantizers-"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    kept_path = out / "rows.json"
    kept = json.loads(kept_path.read_text()) if kept_path.is_file() else {}
    rows = []
    try:
        for dataset in datasets:
            for config in configs:
                key = row_key(dataset, config, args.steps, args.eval_samples, args.common)
                if key in kept:
                    row = kept[key]
                    print(f"{dataset} {config}: kept from {kept_path} ({row['finished_utc']})", file=sys.stderr)
                else:
                    row = run_one(dataset, config, args.steps, args.eval_samples, out, args.threads, args.common)
                    if kept_path.is_file():  # rows another invocation kept meanwhile
                        kept = {**json.loads(kept_path.read_text()), **kept}
                    kept[key] = row
                    kept_path.write_text(json.dumps(kept, indent=1))
                print(f"{dataset} {config}: PSNR {row['psnr']:.2f} dB, {row['train_wall_s']:.0f} s", file=sys.stderr, flush=True)
                rows.append(row)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    extra = f", overrides {' '.join(args.common)}" if args.common else ""
    print(f"{args.steps} steps per configuration, eval on the first {args.eval_samples} test images{extra}")
    print(fmt_table(rows))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
