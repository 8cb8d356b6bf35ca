"""``vqkit compare``: the params that differ between MLflow runs and their final metrics,
as a table (text, markdown, CSV or JSON), a plot of metrics over steps and a stacked grid of
the same test images reconstructed by each run.

Runs are given by full id, any unique id prefix or run name; a sweep's parent run stands
for its children; ``--experiment`` takes every run of an experiment (sweep parents left out).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

from vqkit.commands._table import table
from vqkit.errors import Problem, VqkitError, suggest

DEFAULT_METRICS = "eval/psnr,eval/ssim,eval/lpips,eval/fd_vgg16_relu5_3,loss/total,codebook/usage,codebook/perplexity,codebook/resets"
#: Metrics logged per interval whose sum over the run is what a reader wants.
COUNTERS = ("codebook/resets",)
#: Params that name or describe a run without changing it: never "differing".
IGNORED_PARAMS = ("tracking.run_name", "tracking.description")
#: Metric name fragments where higher is better (everything else: lower is better).
HIGHER_IS_BETTER = ("psnr", "ssim", "usage", "perplexity", "accuracy", "acc", "f1", "auc", "best/")
#: With more runs than this, the table has one row per run (else one column per run).
COLUMNS_UP_TO = 3
FORMATS = ("table", "markdown", "csv", "json")


def metric_direction(key: str) -> str:
    """``"max"`` for metrics where higher is better (PSNR, SSIM, code usage, perplexity),
    else ``"min"`` (losses, LPIPS, dead codes, times)."""
    k = key.lower()
    if "dead" in k or "loss" in k or "lpips" in k or k.startswith("time/"):
        return "min"
    return "max" if any(f in k for f in HIGHER_IS_BETTER) else "min"


def best_run(runs: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The run with the best final value of ``metric`` (direction from its name)."""
    have = [r for r in runs if metric in r["metrics"] and not math.isnan(r["metrics"][metric])]
    if not have:
        return None
    pick = max if metric_direction(metric) == "max" else min
    return pick(have, key=lambda r: r["metrics"][metric])


# =========================================================================== the table
@dataclasses.dataclass
class Comparison:
    """Runs (in display order) with the params shown and metric values per run."""

    runs: list[dict[str, Any]]
    params: list[str]
    metrics: list[str]  # column labels: a counter is shown as "<key> (total)"
    values: list[dict[str, Any]]  # per run: {label: value} for params and metrics


def _metric_label(key: str) -> str:
    return f"{key} (total)" if key in COUNTERS else key


def _param(run: dict[str, Any], key: str) -> str | None:
    value = run["params"].get(key)
    return None if value in ("{}", "[]") else value  # an empty block says nothing


def differing_params(runs: Sequence[dict[str, Any]], all_params: bool = False) -> list[str]:
    keys = sorted({k for r in runs for k in r["params"] if k not in IGNORED_PARAMS})
    keys = [k for k in keys if any(_param(r, k) is not None for r in runs)]
    if all_params or len(runs) == 1:
        return keys
    return [k for k in keys if len({_param(r, k) for r in runs}) > 1]


def runs_table(uri: str, runs: Sequence[dict[str, Any]], metrics: Sequence[str], *, sort: str | None = None,
               reverse: bool = False, all_params: bool = False) -> Comparison:
    """Build the comparison of ``runs``: differing params, the final value of each metric
    (the total for counters), sorted by ``sort`` (best first) when given."""
    from vqkit.tracking import metric_history

    params = differing_params(runs, all_params)
    values = []
    for r in runs:
        row: dict[str, Any] = {k: _param(r, k) for k in params}
        for m in metrics:
            if m not in r["metrics"]:
                row[_metric_label(m)] = None
            elif m in COUNTERS:
                row[_metric_label(m)] = sum(v for _, v in metric_history(uri, r["run_id"], m))
            else:
                row[_metric_label(m)] = r["metrics"][m]
        values.append(row)
    order = list(range(len(runs)))
    if sort:
        label = _metric_label(sort)
        sign = -1.0 if metric_direction(sort) == "max" else 1.0
        if reverse:
            sign = -sign

        def key(i):  # ties: by run name, then id (the same order whatever order the runs came in)
            v = values[i][label]
            return (v is None or math.isnan(v), sign * v if v is not None and not math.isnan(v) else 0.0,
                    runs[i]["run_name"] or "", runs[i]["run_id"])

        order.sort(key=key)
    return Comparison([runs[i] for i in order], params, [_metric_label(m) for m in metrics],
                      [values[i] for i in order])


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _run_label(r: dict[str, Any]) -> str:
    return f"{r['run_name'] or ''} {r['run_id'][:8]}".strip()


def render(comp: Comparison, fmt: str = "table") -> str:
    """The comparison as ``table`` (plain text), ``markdown``, ``csv`` or ``json``."""
    if fmt == "json":
        out = [
            {"run_id": r["run_id"], "run_name": r["run_name"], "status": r["status"],
             "params": {k: v[k] for k in comp.params}, "metrics": {k: v[k] for k in comp.metrics}}
            for r, v in zip(comp.runs, comp.values)
        ]
        return json.dumps(out, indent=2)
    per_run = fmt == "csv" or len(comp.runs) > COLUMNS_UP_TO
    if per_run:
        headers = ["run", "id", "status", *comp.params, *comp.metrics]
        rows = [[r["run_name"] or "", r["run_id"][:8], r["status"], *[_fmt(v[k]) for k in comp.params + comp.metrics]]
                for r, v in zip(comp.runs, comp.values)]
    else:
        headers = ["", *[_run_label(r) for r in comp.runs]]
        rows = [["status", *[r["status"] for r in comp.runs]]]
        if not comp.params and len(comp.runs) > 1:
            rows.append(["(params)", *["identical" for _ in comp.runs]])
        rows += [[k, *[_fmt(v[k]) for v in comp.values]] for k in comp.params + comp.metrics]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        esc = [[str(c).replace("|", "\\|") for c in row] for row in [headers, *rows]]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
        return "\n".join(lines)
    return table(headers, rows)


# =========================================================================== plots
#: line styles and (hollow) markers of the runs in a plot: runs with identical results stay
#: visible (a line drawn exactly over another differs in dashes and markers); 12 distinct pairs
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "x")


def run_style(i: int) -> tuple[str, str]:
    """``(linestyle, marker)`` of the ``i``-th run of a plot."""
    return LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)]


def plot_metrics(uri: str, runs: Sequence[dict[str, Any]], metrics: Sequence[str], path: str | Path) -> Path:
    """One panel per metric, its values over steps, one line per run (legend: run names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vqkit.tracking import metric_history

    metrics = list(metrics)
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for i, r in enumerate(runs):
            points = metric_history(uri, r["run_id"], metric)
            if points:
                steps, vals = zip(*points)
                linestyle, marker = run_style(i)
                ax.plot(steps, vals, linestyle=linestyle, marker=marker, markersize=4, fillstyle="none",
                        markevery=max(1, len(points) // 12), label=r["run_name"] or r["run_id"][:8])
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), frameon=False)
    fig.tight_layout(rect=(0, 0.06 if rows == 1 else 0.04, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recon_grid(uri: str, runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The test images (top row) and each run's reconstructions of them at its last logged
    step, one labelled row per run, from the runs' ``grids/recon_<step>.png`` artifacts
    (``images/recon_<step>.png`` in runs logged before the grids moved out of MLflow's
    ``images/`` folder)."""
    from PIL import Image, ImageDraw, ImageFont

    from vqkit.tracking import GRIDS_DIR, MLFLOW_IMAGES_DIR, download_artifact, list_artifacts

    strips: list[tuple[str, Image.Image]] = []
    originals = None
    missing = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(runs):
            pngs = []
            for folder in (GRIDS_DIR, MLFLOW_IMAGES_DIR):  # grids/; images/ in older runs
                pngs = sorted(p for p in list_artifacts(uri, r["run_id"], folder)
                              if Path(p).name.startswith("recon_") and p.endswith(".png"))
                if pngs:
                    break
            if not pngs:
                missing.append(_run_label(r))
                continue
            local = download_artifact(uri, r["run_id"], pngs[-1], Path(tmp) / str(i))
            with Image.open(local) as im:
                im = im.convert("RGB")
            # the grid is symmetric: originals in the top half, reconstructions below
            top = im.crop((0, 0, im.width, im.height // 2))
            bottom = im.crop((0, im.height - im.height // 2, im.width, im.height))
            if originals is None:
                originals = top
            step = Path(pngs[-1]).stem.split("_")[-1].lstrip("0") or "0"
            strips.append((f"{r['run_name'] or r['run_id'][:8]} (step {step})", bottom))
    if missing:
        raise VqkitError(f"--grid: no reconstruction images (grids/recon_*.png) in run(s) {', '.join(missing)}")
    assert originals is not None
    rows = [("test images", originals), *strips]
    font = ImageFont.load_default(size=16)
    label_w = 16 + max(int(font.getlength(text)) for text, _ in rows)
    width = label_w + max(im.width for _, im in rows)
    height = sum(im.height for _, im in rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for text, im in rows:
        sheet.paste(im, (label_w, y))
        draw.text((8, y + im.height // 2), text, fill="black", font=font, anchor="lm")
        y += im.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# =========================================================================== the command
def configure_compare(p) -> None:
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run ids, unique run-id prefixes or run names (a sweep's parent run: its children)")
    p.add_argument("--experiment", help="compare every run of this MLflow experiment")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated metrics shown, final values; counters summed (default: those of "
                        f"{DEFAULT_METRICS} the runs have)")
    p.add_argument("--sort", metavar="METRIC", help="order runs by this metric, best first (higher is better "
                   "for psnr/ssim/usage/perplexity, lower for the rest)")
    p.add_argument("--reverse", action="store_true", help="with --sort: worst first")
    p.add_argument("--all-params", action="store_true", help="show every param, not only those that differ")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--plot", metavar="OUT.png", help="also plot the metrics over steps, one line per run")
    p.add_argument("--grid", metavar="OUT.png",
                   help="also stack the runs' reconstructions of the same test images, labelled")


def select_runs(uri: str, refs: Sequence[str], experiment: str | None) -> list[dict[str, Any]]:
    """Runs named by ``refs`` (a sweep parent expands to its children), else every run of
    ``experiment`` that is not a sweep parent."""
    from vqkit.commands.sweep import PARENT_TAG, ROLE_TAG
    from vqkit.tracking import resolve_runs, search_runs

    if refs:
        runs = []
        for r in resolve_runs(uri, refs, experiment):
            if r["tags"].get(ROLE_TAG) == "parent":
                children = search_runs(uri, None, f"tags.`{PARENT_TAG}` = '{r['run_id']}'")
                runs += sorted(children, key=lambda c: c["start_time"] or 0)
            else:
                runs.append(r)
        seen: set[str] = set()
        return [r for r in runs if not (r["run_id"] in seen or seen.add(r["run_id"]))]
    runs = [r for r in search_runs(uri, experiment) if r["tags"].get(ROLE_TAG) != "parent"]
    return sorted(runs, key=lambda r: r["start_time"] or 0)


def run_compare(args) -> int:
    from vqkit.tracking import resolve_tracking_uri

    if not args.runs and not args.experiment:
        raise VqkitError(Problem("vqkit compare: give RUN... (ids, id prefixes, names) or --experiment NAME"))
    fmt = "json" if args.json else args.format
    uri = resolve_tracking_uri(args.tracking_uri)
    runs = select_runs(uri, args.runs, args.experiment)
    if not runs:
        where = f"experiment {args.experiment!r}" if args.experiment else "the given sweep"
        raise VqkitError(f"no runs found in {where} at {uri}")
    available = sorted({k for r in runs for k in r["metrics"]})
    problems = []
    if args.metrics is None:
        metrics = [m for m in DEFAULT_METRICS.split(",") if m in available]
    else:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        for m in metrics:
            if m not in available:
                problems.append(Problem(f"--metrics: no run has a metric {m!r}" + suggest(m, available)))
    if args.sort and args.sort not in available:
        problems.append(Problem(f"--sort: no run has a metric {args.sort!r}" + suggest(args.sort, available)))
    if problems:
        raise VqkitError(problems)
    if args.sort and args.sort not in metrics:
        metrics.insert(0, args.sort)
    comp = runs_table(uri, runs, metrics, sort=args.sort, reverse=args.reverse, all_params=args.all_params)
    print(render(comp, fmt))
    try:
        if args.plot:
            shown = [m for m in metrics if m not in COUNTERS] or metrics
            if not shown:
                raise VqkitError("--plot: the runs have no metrics to plot")
            print(f"vqkit: wrote {plot_metrics(uri, comp.runs, shown, args.plot)}", file=_stderr())
        if args.grid:
            print(f"vqkit: wrote {recon_grid(uri, comp.runs, args.grid)}", file=_stderr())
    except OSError as exc:
        raise VqkitError(f"cannot write {exc.filename or 'the image'}: {exc.strerror or exc}") from None
    return 0


def _stderr():
    import sys

    return sys.stderr
