"""``vqkit eval``: reconstruction metrics of a trained model on its test split, written
back into its MLflow run.

The metrics are those of :mod:`vqkit.metrics` (``--metrics``, default the recipe's
``eval.metrics``). When the checkpoint belongs to an MLflow run the results are logged
into it as ``eval/<name>`` at the checkpoint's step (the run's last step when given the
run), with tags ``vqkit.eval.num_samples``, ``vqkit.eval.metrics``,
``vqkit.eval.backbones`` and ``vqkit.eval.checkpoint``; ``--no-log`` only prints. With
``--set`` (e.g. other test photographs) nothing is logged either: the run's ``eval/*``
keep meaning its own test split.

No ``(key, step)`` is logged twice: ``eval/<name>`` means the recipe's ``eval.num_samples``
test images (what training logs), so a value the run already has at that step is the same
measurement and is kept (``kept`` in ``--json``); results on another number N of images are
logged as ``eval_n<N>/<name>`` (:func:`run_metric_keys`).
"""
from __future__ import annotations

import json

from vqkit.commands._table import table
from vqkit.commands.train import _add_set, resolve_checkpoint
from vqkit.errors import VqkitError
from vqkit.runtime import cpu_friendly_threads


def configure_eval(p) -> None:
    p.add_argument("target", metavar="RUN_ID_OR_CHECKPOINT", help="MLflow run id (or unique id prefix, or run name), run dir or checkpoint file")
    p.add_argument("--num-samples", type=int, default=None, help="test images (default: the recipe's eval.num_samples)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated: psnr,ssim,lpips,fd_vgg16_relu5_3 (default: the recipe's eval.metrics)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-log", action="store_true", help="only print: do not write the results into the run")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store of the run (default: the one the checkpoint records, else "
                        "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")


def run_eval(args) -> int:
    cpu_friendly_threads()
    from vqkit.metrics import MetricSet, check_metric_names
    from vqkit.model import VQModel
    from vqkit.recipe import MODEL_BLOCKS, recipe_from_dict
    from vqkit.train.build import build_datasets
    from vqkit.train.checkpoint import load_checkpoint
    from vqkit.train.distributed import resolve_device
    from vqkit.train.trainer import evaluate

    if args.num_samples is not None and args.num_samples < 1:
        raise VqkitError(f"--num-samples must be >= 1, got {args.num_samples}")
    path = resolve_checkpoint(args.target, tracking_uri=args.tracking_uri)
    state = load_checkpoint(path)
    device = resolve_device(args.device)
    model, recipe = VQModel.from_checkpoint(path, map_location=device)
    ec = recipe.model.eval
    metrics = check_metric_names(args.metrics.split(",") if args.metrics else ec.metrics)
    if not metrics:
        raise VqkitError("--metrics: name at least one metric")
    data_recipe = recipe_from_dict(state["recipe"], f"{path}#recipe", args.overrides,
                                   components=MODEL_BLOCKS) if args.overrides else recipe
    metric_set = MetricSet(metrics, device=device)  # missing weights stop here, before the data is read
    _, test = build_datasets(data_recipe)
    n = min(args.num_samples or ec.num_samples, len(test))
    result = evaluate(model, test, n, ec.batch_size, metrics, device, metric_set)

    run = state.get("run") or {}
    run_id = run.get("run_id")
    step = int(state.get("step", 0))
    logged_to = None
    keys = run_metric_keys(result, n, min(ec.num_samples, len(test)))
    logged: list[str] = []  # the keys written to the run, and those it already had (kept)
    kept: list[str] = []

    def show(logged_to: str | None, note: str) -> None:
        _print(path, step, n, result, logged_to, note, as_json=args.json,
               data_recipe=data_recipe if args.overrides else None, logged=logged, kept=kept)

    if args.no_log:
        note = "not logged (--no-log)"
    elif args.overrides:
        note = "not logged: evaluated with --set (the run's eval/* are on its own test split)"
    elif not run_id:
        note = "not logged: the checkpoint belongs to no MLflow run"
    else:
        from vqkit.tracking import log_missing_metrics, resolve_tracking_uri

        uri = args.tracking_uri or run.get("tracking_uri") or resolve_tracking_uri(None)
        try:
            had = log_missing_metrics(uri, run_id, {keys[k]: v for k, v in result.items()}, step, {
                "vqkit.eval.num_samples": n,
                "vqkit.eval.metrics": json.dumps(metrics),
                "vqkit.eval.backbones": json.dumps(metric_set.backbones, sort_keys=True),
                "vqkit.eval.checkpoint": json.dumps({"file": path.name, "step": step}),
            })
        except VqkitError:
            show(None, "not logged (see the error below)")
            raise
        logged_to = run_id
        kept = sorted(had)
        logged = sorted(set(keys.values()) - set(had))
        note = f"logged to MLflow run {run_id} at step {step} ({uri})"
        if kept:
            note = (f"{', '.join(logged) or 'nothing new'} logged to MLflow run {run_id} at step {step} ({uri}); "
                    f"already in the run at that step, kept as they are (the same measurement: this checkpoint, "
                    f"{n} test images): {', '.join(kept)}")
    show(logged_to, note)
    return 0


def run_metric_keys(result: dict[str, float], n: int, n_recipe: int) -> dict[str, str]:
    """The run's metric key of each ``eval/<m>`` result: ``eval/<m>`` means the recipe's
    ``eval.num_samples`` test images (what training logs every ``eval_every`` steps); a
    result on another number N of images is ``eval_n<N>/<m>``, so that a key at a step
    always means one measurement."""
    if n == n_recipe:
        return {k: k for k in result}
    return {k: f"eval_n{n}/{k.removeprefix('eval/')}" for k in result}


def _print(path, step: int, n: int, result: dict[str, float], logged_to: str | None, note: str, *,
           as_json: bool, data_recipe=None, logged: list[str], kept: list[str]) -> None:
    """The results as a table and a ``vqkit:`` note, or (``as_json``) one JSON object, with the
    evaluated data block when ``data_recipe`` (evaluated with ``--set``) is given."""
    if as_json:
        out = {"checkpoint": str(path), "step": step, "num_samples": n, **result, "logged_to_run": logged_to,
               "logged": logged, "kept": kept}
        if data_recipe is not None:
            out["data"] = data_recipe.to_dict()["data"]
        print(json.dumps(out, indent=2))
        return
    rows = [("checkpoint", str(path)), ("step", step), ("num_samples", n)]
    rows += [(k, f"{v:.6g}") for k, v in result.items()]
    print(table(["metric", "value"], rows))
    print(f"vqkit: {note}")
