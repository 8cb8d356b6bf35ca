"""Code-book reset comparison: the same model trained with ``none``, ``random``, ``kmeans``
and ``jukebox`` resets on natural-image crops and Fashion-MNIST (same steps, same seed).

Each run is an ordinary ``vqkit train`` of ``recipes/codebook/<dataset>-<policy>.yaml``
(tracked in MLflow). Afterwards the script writes, under ``--out``:

* ``results.json`` – one record per run (all numbers below, plus run ids); a re-run of
  some datasets/policies replaces only their records;
* ``table.md`` – the comparison table: final code usage in the training window (%),
  perplexity, dead codes, test-set code usage (%), test PSNR / SSIM, wall time;
* ``<dataset>-usage.png`` – usage over time of the four policies (from the checkpoints'
  monitor history), resets marked;
* ``<dataset>-<policy>-hist.png`` – the usage histogram of each run (the run's own plot).

Reproduce (from the repository root)::

    python benchmarks/codebook.py                      # everything, ~25-40 min on 2 CPU cores
    python benchmarks/codebook.py --steps 200 --datasets fashion-mnist   # quick look

Runs are tracked in ``<work>/mlflow.db`` (``--work``, default ``runs/bench-codebook``, git-ignored);
``vqkit compare`` or the MLflow UI show them side by side.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "codebook"
DATASETS = ("natural-patches", "fashion-mnist")
POLICIES = ("none", "random", "kmeans", "jukebox")
COLOURS = {"none": "tab:gray", "random": "tab:orange", "kmeans": "tab:green", "jukebox": "tab:blue"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--steps", type=int, default=None, help="override train.steps of every recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every run (repeatable)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "codebook", help="where results and plots go")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-codebook",
                   help="run dirs and the MLflow store")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return p.parse_args(argv)


def run_one(dataset: str, policy: str, args: argparse.Namespace) -> dict:
    import torch

    from vqkit.recipe import load_recipe
    from vqkit.train.trainer import train

    path = RECIPES / f"{dataset}-{policy}.yaml"
    overrides = [
        f"tracking.uri=sqlite:///{(args.work / 'mlflow.db').resolve()}",
        f"tracking.output_dir={(args.work / 'runs').resolve()}",
        "tracking.experiment=codebook-resets",
    ]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
        overrides.append(f"train.eval_every={args.steps}")
    overrides += args.overrides
    recipe = load_recipe(path, overrides)
    t0 = time.perf_counter()
    result = train(recipe, quiet=True)
    seconds = time.perf_counter() - t0
    m = result.metrics
    state = torch.load(result.checkpoint, weights_only=True, map_location="cpu")
    monitor = state["codebook"]["monitor"]
    k = int(monitor["codebook_size"])
    record = {
        "dataset": dataset,
        "policy": policy,
        "recipe": str(path.relative_to(ROOT)),
        "steps": result.step,
        "codebook_size": k,
        "usage": m.get("codebook/usage"),
        "perplexity": m.get("codebook/perplexity"),
        "dead": m.get("codebook/dead"),
        "test_usage": m.get("eval/usage"),
        "test_perplexity": m.get("eval/perplexity"),
        "psnr": m.get("eval/psnr"),
        "ssim": m.get("eval/ssim"),
        "codes_reset": int(sum(n for _, n in monitor["reset_events"])),
        "seconds": seconds,
        "run_id": result.run_id,
        "history": monitor["history"],
        "reset_events": monitor["reset_events"],
    }
    hist = Path(result.run_dir) / "plots" / "codebook_usage_hist.png"
    if hist.exists():
        shutil.copyfile(hist, args.out / f"{dataset}-{policy}-hist.png")
    return record


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_table(records: list[dict], out: Path) -> str:
    lines = [
        "| data | reset | usage % (train window) | perplexity | dead codes | test usage % | test PSNR (dB) | test SSIM | codes reset | time (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['dataset']} | {r['policy']} | {_fmt(100 * r['usage'] if r['usage'] is not None else None, '.1f')} "
            f"| {_fmt(r['perplexity'], '.0f')} | {_fmt(r['dead'], '.0f')} "
            f"| {_fmt(100 * r['test_usage'] if r['test_usage'] is not None else None, '.1f')} "
            f"| {_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.4f')} | {r['codes_reset']} "
            f"| {r['seconds'] / 60:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text, encoding="utf-8")
    return text


def plot_usage(records: list[dict], dataset: str, out: Path) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in records if r["dataset"] == dataset]
    if not rows:
        return None
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for r in rows:
        h = r["history"]
        colour = COLOURS.get(r["policy"])
        ax1.plot(h["step"], [100 * u for u in h["usage"]], label=r["policy"], color=colour)
        ax2.plot(h["step"], h["perplexity"], label=r["policy"], color=colour)
    k = rows[0]["codebook_size"]
    ax1.set_ylim(0, 102)
    ax1.set_xlabel("step")
    ax1.set_ylabel("code usage % (window of 65536 assignments)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("perplexity")
    ax2.set_yscale("log")
    ax1.set_title(f"{dataset}: usage, K={k}")
    ax2.set_title(f"{dataset}: perplexity (max {k})")
    ax1.legend(loc="lower right")
    fig.tight_layout()
    path = out / f"{dataset}-usage.png"
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    # a partial re-run (e.g. --policies kmeans) replaces only its own rows of the table
    records: list[dict] = []
    if results_path.exists():
        records = json.loads(results_path.read_text(encoding="utf-8"))
    for dataset in args.datasets:
        for policy in args.policies:
            print(f"== {dataset} / {policy}", file=sys.stderr, flush=True)
            rec = run_one(dataset, policy, args)
            records = [r for r in records if (r["dataset"], r["policy"]) != (dataset, policy)] + [rec]
            records.sort(key=lambda r: (DATASETS.index(r["dataset"]), POLICIES.index(r["policy"])))
            print(
                f"   usage {100 * (rec['usage'] or 0):.1f}%  dead {rec['dead']}  "
                f"psnr {rec['psnr']}  ssim {rec['ssim']}  {rec['seconds'] / 60:.1f} min",
                file=sys.stderr, flush=True,
            )
            results_path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    for dataset in DATASETS:
        plot_usage(records, dataset, args.out)
    print(write_table(records, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
