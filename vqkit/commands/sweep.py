"""``vqkit sweep``: train every combination of a grid as child runs of one MLflow run.

The grid is expanded and every child recipe validated first (:func:`vqkit.sweep.plan_sweep`).
The parent run is found again by its ``vqkit.sweep.id`` tag, so rerunning the same command
skips children that finished, resumes interrupted ones from their checkpoint and starts the
rest. When all are done the parent gets a summary: the best child per chosen metric (tags
``vqkit.sweep.best.<metric>``, metrics ``best/<metric>``) and ``summary.md`` / ``summary.csv``.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

from vqkit.errors import Problem, VqkitError

PARENT_TAG = "mlflow.parentRunId"
ID_TAG = "vqkit.sweep.id"
ROLE_TAG = "vqkit.sweep.role"


def configure_sweep(p) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML (its `sweep:` block, if any, is the default grid)")
    p.add_argument("--grid", dest="grid", action="append", default=[], metavar="KEY.PATH=V1,V2",
                   help="values to try for a recipe key (YAML, comma-separated); repeatable: every "
                        "combination is trained")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key in every child (value parsed as YAML); repeatable")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="children trained side by side, CPU threads split between them "
                        "(default: the recipe's sweep.jobs, else 1)")
    p.add_argument("--metric", dest="metrics", action="append", default=None, metavar="METRIC",
                   help="metric of the summary's best child (repeatable; default: the recipe's "
                        "sweep.metrics, else eval/psnr)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the children, train nothing")


def run_sweep(args) -> int:
    from vqkit.sweep import plan_sweep

    plan = plan_sweep(args.recipe, args.grid, args.overrides, args.jobs, args.metrics)
    if args.dry_run:
        for child in plan.children:
            print(f"{child.index + 1}/{len(plan.children)}  {child.name}")
        print(f"vqkit: {len(plan.children)} children valid; nothing trained (--dry-run)")
        return 0
    return Sweep(plan).run()


class Sweep:
    """Runs a :class:`~vqkit.sweep.SweepPlan` through a launcher, tracked in MLflow."""

    def __init__(self, plan, launcher=None, out=None, err=None):
        from vqkit.sweep import LocalLauncher
        from vqkit.tracking import resolve_tracking_uri

        self.plan = plan
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.launcher = launcher or LocalLauncher(plan.jobs, out=self.out)
        tc = plan.recipes[0].model.tracking
        self.uri = resolve_tracking_uri(tc.uri)
        self.experiment = tc.experiment
        self.output_dir = Path(tc.output_dir).resolve()

    # ------------------------------------------------------------------ parent run
    def _parent(self):
        from vqkit import __version__
        from vqkit.tracking import DESCRIPTION_TAG, Tracker, context_tags, search_runs

        plan = self.plan
        found = self._search(f"tags.`{ID_TAG}` = '{plan.sweep_id}' and tags.`{ROLE_TAG}` = 'parent'")
        resume_id = found[0]["run_id"] if found else None
        tracker = Tracker(self.uri, self.experiment, plan.name, stderr=self.err)
        run_id = tracker.start(resume_run_id=resume_id)
        if run_id is None:
            raise VqkitError(f"vqkit sweep needs its MLflow tracking store to name the children's parent run, "
                             f"and {self.uri} is unreachable")
        tracker.attach(self.output_dir / run_id)
        tracker.log_params({
            **{f"sweep.grid.{k}": v for k, v in plan.grid.items()},
            "sweep.recipe": plan.recipe_path,
            "sweep.overrides": list(plan.base_overrides),
            "sweep.children": len(plan.children),
            "sweep.jobs": plan.jobs,
        })
        tags = {ID_TAG: plan.sweep_id, ROLE_TAG: "parent", "vqkit.version": __version__,
                **context_tags(plan.recipe_path, "vqkit sweep")}
        description = plan.base.model.tracking.description
        tags[DESCRIPTION_TAG] = (description + "\n\n" if description else "") + self._describe()
        tracker.set_tags(tags)
        recipe = tracker.run_dir / "recipe.yaml"
        recipe.write_text(plan.base.to_yaml(), encoding="utf-8")
        tracker.log_artifact(recipe)
        tracker.flush()
        return tracker, resume_id is not None

    def _describe(self) -> str:
        plan = self.plan
        grid = ", ".join(f"`{k}` in {v}" for k, v in plan.grid.items())
        return f"Sweep of `{plan.recipe_path}` over {grid}: {len(plan.children)} children."

    def _search(self, filter_string: str) -> list[dict[str, Any]]:
        from vqkit.tracking import search_runs

        try:
            return search_runs(self.uri, self.experiment, filter_string)
        except VqkitError as exc:
            if "no MLflow experiment" in str(exc):
                return []
            raise

    # ------------------------------------------------------------------ children
    def _jobs(self, parent_id: str) -> tuple[list, list[str]]:
        """The child jobs still to run, and the names of those already finished."""
        from vqkit.sweep import ChildJob, train_argv
        from vqkit.tracking import delete_run

        plan = self.plan
        existing: dict[str, dict[str, Any]] = {}
        for run in self._search(f"tags.`{PARENT_TAG}` = '{parent_id}'"):  # newest first
            existing.setdefault(run["tags"].get("vqkit.recipe_sha256", ""), run)
        jobs, done = [], []
        log_dir = self.output_dir / parent_id / "children"
        for child, recipe in zip(plan.children, plan.recipes):
            run = existing.get(recipe.sha256())
            resume = None
            if run is not None and run["status"] == "FINISHED":
                done.append(child.name)
                continue
            if run is not None and run["tags"].get("vqkit.last_checkpoint"):
                resume = run["run_id"]
                print(f"vqkit: sweep: {child.name}: resuming run {resume[:8]} from its checkpoint",
                      file=self.err)
            elif run is not None:  # stopped before its first checkpoint: start it again
                delete_run(self.uri, run["run_id"])
            argv = train_argv(plan.recipe_path, child.overrides, parent_id, resume)
            jobs.append(ChildJob(child.name, argv, log=log_dir / f"{child.index:03d}.log"))
        return jobs, done

    def run(self) -> int:
        plan = self.plan
        tracker, reopened = self._parent()
        parent_id = tracker.run_id
        jobs, done = self._jobs(parent_id)
        n = len(plan.children)
        print(f"vqkit: sweep {plan.name!r}: {n} children, MLflow run {parent_id} (experiment "
              f"{self.experiment!r}) in {self.uri}", file=self.err)
        if done:
            print(f"vqkit: sweep: {len(done)} of {n} already finished, skipped: " + ", ".join(done), file=self.err)
        status = "FAILED"
        failed: list[tuple[str, int]] = []

        def on_done(job, code):
            if code != 0:
                failed.append((job.name, code))
            print(f"vqkit: sweep: {job.name}: " + ("finished" if code == 0 else f"exit code {code}"),
                  file=self.err, flush=True)

        previous = _sigterm_as_interrupt()
        try:
            self.launcher.launch(jobs, on_done)
            status = "FINISHED" if not failed else "FAILED"
        except KeyboardInterrupt:
            status = "KILLED"
            print("vqkit: sweep interrupted; run the same command again to resume it", file=self.err)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if status != "KILLED":
                self._summarize(tracker, parent_id)
            tracker.finish(status)
        if failed:
            raise VqkitError(Problem(f"sweep: {len(failed)} of {n} children failed: " + ", ".join(
                f"{name!r} (exit code {code})" for name, code in failed)
                + f"; their output is in {self.output_dir / parent_id / 'children'}"))
        from vqkit.tracking import ui_command

        print(f"vqkit: compare them with: vqkit compare {parent_id[:8]} --sort {plan.metrics[0]}", file=self.out)
        print(f"vqkit: see them in MLflow's UI: {ui_command(self.uri)}", file=self.out, flush=True)
        return 0

    # ------------------------------------------------------------------ summary
    def _summarize(self, tracker, parent_id: str) -> None:
        from vqkit.commands.compare import best_run, render, runs_table

        children = self._search(f"tags.`{PARENT_TAG}` = '{parent_id}'")
        if not children:
            return
        metrics = list(dict.fromkeys([*self.plan.metrics, "eval/psnr", "eval/ssim", "codebook/usage",
                                      "codebook/resets"]))
        metrics = [m for m in metrics if any(m in r["metrics"] for r in children)]
        table = runs_table(self.uri, children, metrics, sort=self.plan.metrics[0]
                           if any(self.plan.metrics[0] in r["metrics"] for r in children) else None)
        folder = self.output_dir / parent_id
        for fmt, name in (("markdown", "summary.md"), ("csv", "summary.csv")):
            path = folder / name
            path.write_text(render(table, fmt) + "\n", encoding="utf-8")
            tracker.log_artifact(path)
        print(render(table, "table"), file=self.out)
        tags, best_metrics = {}, {}
        for metric in self.plan.metrics:
            best = best_run(children, metric)
            if best is None:
                continue
            tags[f"vqkit.sweep.best.{metric}"] = f"{best['run_name']} ({best['run_id']})"
            best_metrics[f"best/{metric}"] = best["metrics"][metric]
            print(f"vqkit: sweep: best {metric}: {best['run_name']} ({best['metrics'][metric]:.4g})", file=self.out)
        tracker.set_tags(tags)
        if best_metrics:
            tracker.log_metrics(best_metrics, step=0)


def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)
