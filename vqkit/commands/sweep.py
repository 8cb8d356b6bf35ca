"""``vqkit sweep``: train the combinations a search chooses as child runs of one MLflow run.

The space is read and checked, and the children's recipes validated, first
(:func:`vqkit.sweep.plan_sweep`). The parent run is found again by its ``vqkit.sweep.id``
tag, so rerunning the same command skips children that finished (or were pruned), resumes
interrupted ones from their checkpoint and starts the rest; an adaptive search keeps its
state in the parent's run folder and continues. Children run through the sweep's launcher
(``local``, or a plugin such as ``ray`` or ``submitit``), each one tagged with its trial
number (``vqkit.sweep.trial``). When all are done the parent gets a summary: the best child
per chosen metric (tags ``vqkit.sweep.best.<metric>``, metrics ``best/<metric>``),
``summary.md`` / ``summary.csv``, the space (``space.json``, params ``sweep.space.*``) and the
objective over trials (``objective.png``, ``trials.csv``).
"""
from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import Any

from vqkit.errors import Problem, VqkitError
from vqkit.runtime import sigterm_as_interrupt
from vqkit.train.trial import PRUNED_TAG, TRIAL_TAG

PARENT_TAG = "mlflow.parentRunId"
ID_TAG = "vqkit.sweep.id"
ROLE_TAG = "vqkit.sweep.role"


def configure_sweep(p) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML (its `sweep:` block, if any, is the default)")
    p.add_argument("--grid", dest="grid", action="append", default=[], metavar="KEY.PATH=V1,V2",
                   help="values to try for a recipe key (YAML, comma-separated); repeatable: every "
                        "combination is trained (by the grid search); a value may be a whole block, "
                        "e.g. 'quantizer={name: fsq, params: {levels: [8,6,5]}},{name: vq}'")
    p.add_argument("--link", dest="link", action="append", default=[], metavar="KEY,KEY[,...]",
                   help="grid keys whose values vary together (the i-th value of each, zipped, not "
                        "crossed), e.g. --link quantizer,reset; repeatable")
    p.add_argument("--space", dest="space", action="append", default=[], metavar="KEY.PATH=SPEC",
                   help="a key of the search space, SPEC in YAML: [V1, V2] (choices) or "
                        "{low: L, high: H, log: true, integer: false} (a range); repeatable")
    p.add_argument("--search", metavar="NAME", default=None,
                   help="which combinations run: grid, random, or a plugin's (`vqkit components searches`; "
                        "default: the recipe's sweep.search, else grid)")
    p.add_argument("--budget", type=int, default=None, metavar="N",
                   help="number of trials (default: the recipe's sweep.budget, else the search's own)")
    p.add_argument("--objective", metavar="METRIC[:max|min]", default=None,
                   help="what the search optimizes (default: the recipe's sweep.objective, else eval/psnr)")
    p.add_argument("--launcher", metavar="NAME", default=None,
                   help="where children run: local, or a plugin's (`vqkit components launchers`; "
                        "default: the recipe's sweep.launcher, else local)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key in every child (value parsed as YAML); repeatable; "
                        "sweep.* keys set the sweep block, e.g. sweep.launcher.params.address=...")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="children in flight at once; local: trained side by side, CPU threads split "
                        "(default: the recipe's sweep.jobs, else 1)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train each child with N processes (data-parallel, `vqkit train --nproc`); a search "
                        "that prunes stops all of a child's processes together")
    p.add_argument("--metric", dest="metrics", action="append", default=None, metavar="METRIC",
                   help="metric of the summary's best child (repeatable; default: the recipe's "
                        "sweep.metrics, else eval/psnr)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the children, train nothing")


def run_sweep(args) -> int:
    from vqkit.sweep import plan_sweep

    plan = plan_sweep(args.recipe, args.grid, args.overrides, args.jobs, args.metrics,
                      space_texts=getattr(args, "space", ()), search=getattr(args, "search", None),
                      launcher=getattr(args, "launcher", None), budget=getattr(args, "budget", None),
                      objective=getattr(args, "objective", None), link_texts=getattr(args, "link", ()))
    plan.nproc = getattr(args, "nproc", 1)
    if plan.nproc < 1:
        raise VqkitError(Problem(f"--nproc must be >= 1, got {plan.nproc}"))
    if args.dry_run:
        if plan.adaptive:
            dims = ", ".join(f"{k} {d.to_json()}" for k, d in plan.space.items())
            print(f"search {plan.search.name!r} chooses up to {plan.budget or 'its default number of'} "
                  f"trials from: {dims}")
            print("vqkit: the space is valid (every choice and both ends of every range); nothing trained "
                  "(--dry-run)")
            return 0
        for child in plan.children:
            print(f"{child.index + 1}/{len(plan.children)}  {child.name}")
        print(f"vqkit: {len(plan.children)} children valid; nothing trained (--dry-run)")
        return 0
    return Sweep(plan).run()


def _outcome(run: dict[str, Any] | None, metric: str):
    """How a child run ended, for its search (``None``: not ended, e.g. interrupted or lost)."""
    from vqkit.interfaces import TrialOutcome

    if run is None:
        return None
    value = run["metrics"].get(metric)
    value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    if PRUNED_TAG in run["tags"]:
        return TrialOutcome("pruned", value, int(run["tags"][PRUNED_TAG]))
    if run["status"] == "FINISHED":
        return TrialOutcome("finished", value)
    if run["status"] == "FAILED" and "vqkit.failure" in run["tags"]:
        return TrialOutcome("failed", value)
    return None


class Sweep:
    """Runs a :class:`~vqkit.sweep.SweepPlan` through its search and launcher, tracked in MLflow."""

    def __init__(self, plan, launcher=None, out=None, err=None):
        from vqkit.tracking import resolve_tracking_uri

        self.plan = plan
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.launcher = launcher
        tc = (plan.recipes[0] if plan.recipes else plan.base).model.tracking
        self.uri = resolve_tracking_uri(tc.uri)
        self.experiment = tc.experiment
        self.output_dir = Path(tc.output_dir).resolve()

    # ------------------------------------------------------------------ parent run
    def _parent(self):
        from vqkit import __version__
        from vqkit.tracking import DESCRIPTION_TAG, Tracker, context_tags

        plan = self.plan
        found = []
        for ident in dict.fromkeys((plan.sweep_id, plan.legacy_sweep_id)):  # or a parent made by an earlier vqkit
            found = found or self._search(f"tags.`{ID_TAG}` = '{ident}' and tags.`{ROLE_TAG}` = 'parent'")
        resume_id = found[0]["run_id"] if found else None
        tracker = Tracker(self.uri, self.experiment, plan.name, stderr=self.err)
        run_id = tracker.start(resume_run_id=resume_id)
        if run_id is None:
            raise VqkitError(f"vqkit sweep needs its MLflow tracking store to name the children's parent run, "
                             f"and {self.uri} is unreachable")
        tracker.attach(self.output_dir / run_id)
        params = {
            **{f"sweep.grid.{k}": v for k, v in plan.grid.items()},
            **{f"sweep.space.{k}": json.dumps(d.to_json()) for k, d in plan.space.items() if not d.is_choice},
            "sweep.recipe": plan.recipe_path,
            "sweep.overrides": list(plan.base_overrides),
            "sweep.search": plan.search.name,
            "sweep.objective": f"{plan.objective.metric}:{plan.objective.direction}",
        }
        if plan.links:
            params["sweep.link"] = [list(keys) for keys in plan.links.values()]
        if plan.children:
            params["sweep.children"] = len(plan.children)
        if plan.budget is not None:
            params["sweep.budget"] = plan.budget
        tracker.log_params(params)
        tags = {ID_TAG: plan.sweep_id, ROLE_TAG: "parent", "vqkit.version": __version__,
                "vqkit.sweep.launcher": plan.launcher.name, "vqkit.sweep.jobs": str(plan.jobs),
                **context_tags(plan.recipe_path, "vqkit sweep")}
        description = plan.base.model.tracking.description
        tags[DESCRIPTION_TAG] = (description + "\n\n" if description else "") + self._describe()
        tracker.set_tags(tags)
        recipe = tracker.run_dir / "recipe.yaml"
        recipe.write_text(plan.base.to_yaml(), encoding="utf-8")
        tracker.log_artifact(recipe)
        space = tracker.run_dir / "space.json"
        space.write_text(json.dumps({
            "search": {"name": plan.search.name, "params": plan.search_params.model_dump(mode="json")},
            "space": {k: d.to_json() for k, d in plan.space.items()},
            "objective": {"metric": plan.objective.metric, "direction": plan.objective.direction},
            "budget": plan.budget,
        }, indent=2, default=str) + "\n", encoding="utf-8")
        tracker.log_artifact(space)
        tracker.flush()
        return tracker, resume_id is not None

    def _describe(self) -> str:
        plan = self.plan
        dims = ", ".join(f"`{k}` in {list(d.choices)}" if d.is_choice else
                         f"`{k}` in [{d.low:g}, {d.high:g}]" + (" (log)" if d.log else "")
                         for k, d in plan.space.items())
        if plan.children:
            return f"Sweep of `{plan.recipe_path}` over {dims}: {len(plan.children)} children."
        return (f"Sweep of `{plan.recipe_path}` over {dims}: search `{plan.search.name}`, "
                f"{plan.objective.direction} `{plan.objective.metric}`"
                + (f", {plan.budget} trials." if plan.budget else "."))

    def _search(self, filter_string: str) -> list[dict[str, Any]]:
        from vqkit.tracking import search_runs

        try:
            return search_runs(self.uri, self.experiment, filter_string)
        except VqkitError as exc:
            if "no MLflow experiment" in str(exc):
                return []
            raise

    def _children(self, parent_id: str) -> dict[str, dict[str, Any]]:
        """The newest child run of each trial number."""
        out: dict[str, dict[str, Any]] = {}
        for run in self._search(f"tags.`{PARENT_TAG}` = '{parent_id}'"):  # newest first
            out.setdefault(run["tags"].get(TRIAL_TAG, ""), run)
        return out

    # ------------------------------------------------------------------ children
    def _job(self, trial, child, run: dict[str, Any] | None, parent_id: str):
        """The job that trains (or resumes) ``trial``'s child."""
        from vqkit.sweep import ChildJob, train_argv
        from vqkit.tracking import delete_run
        from vqkit.train.trial import channel_env

        plan = self.plan
        resume = None
        run_dir = self.output_dir / run["run_id"] if run is not None else None
        if run is not None and run["tags"].get("vqkit.last_checkpoint"):
            resume = run["run_id"]
        elif run_dir is not None and any((run_dir / "checkpoints").glob("*.pt")):
            # lost before its tracker sent the checkpoint's tag (a killed worker): its run dir has it
            resume = str(run_dir)
        elif run is not None:  # stopped before its first checkpoint: start it again
            delete_run(self.uri, run["run_id"])
        if resume is not None:
            print(f"vqkit: sweep: {child.name}: resuming run {run['run_id'][:8]} from its checkpoint", file=self.err)
        argv = train_argv(plan.recipe_path, child.overrides, parent_id, resume, nproc=plan.nproc)
        env = channel_env({TRIAL_TAG: str(trial.number)}, plan.search.name if plan.search.cls.prunes else None,
                          trial.state)
        log = self.output_dir / parent_id / "children" / f"{trial.number:03d}.log"
        return ChildJob(child.name, argv, env, log=log)

    def run(self) -> int:
        from vqkit.interfaces import TrialOutcome
        from vqkit.recipe import load_recipe

        plan = self.plan
        tracker, reopened = self._parent()
        parent_id = tracker.run_id
        search = plan.make_search(self.output_dir / parent_id)
        n = f"{len(plan.children)} children" if plan.children else f"search {plan.search.name!r}"
        print(f"vqkit: sweep {plan.name!r}: {n}, MLflow run {parent_id} (experiment "
              f"{self.experiment!r}) in {self.uri}", file=self.err)
        status = "FAILED"
        failed: list[tuple[str, str]] = []
        done: list[str] = []
        seen = 0
        launcher = None
        previous = sigterm_as_interrupt()
        try:
            launcher = self.launcher or plan.make_launcher(self.out)
            while True:
                trials = search.ask(plan.jobs if plan.adaptive else None)
                if not trials:
                    break
                seen += len(trials)
                existing = self._children(parent_id)
                jobs, asked = [], {}
                for trial in trials:
                    child = plan.child(trial.number, trial.values)
                    run = existing.get(str(trial.number))
                    outcome = _outcome(run, plan.objective.metric)
                    if outcome is not None and outcome.status in ("finished", "pruned"):
                        done.append(child.name + (f" (pruned at step {outcome.step})" if outcome.status == "pruned" else ""))
                        search.tell(trial, outcome)
                        continue
                    if plan.adaptive:  # chosen now: its recipe is checked before it runs
                        try:
                            load_recipe(plan.recipe_path, list(child.overrides))
                        except VqkitError as exc:
                            print(f"vqkit: sweep: {child.name}: not a valid recipe, told to the search as "
                                  f"failed: {exc}", file=self.err)
                            failed.append((child.name, "invalid recipe"))
                            search.tell(trial, TrialOutcome("failed"))
                            continue
                    job = self._job(trial, child, run, parent_id)
                    jobs.append(job)
                    asked[job.name] = trial
                codes: dict[str, int] = {}

                def on_done(job, code, codes=codes, asked=asked):
                    codes[job.name] = code
                    said = "finished" if code == 0 else f"exit code {code}"
                    if code == 0 and plan.search.cls.prunes:  # a pruned child exits 0 too: its run says
                        run = self._children(parent_id).get(str(asked[job.name].number)) or {}
                        step = run.get("tags", {}).get(PRUNED_TAG)
                        said = f"pruned at step {step}" if step is not None else said
                    print(f"vqkit: sweep: {job.name}: {said}", file=self.err, flush=True)

                if jobs:
                    launcher.launch(jobs, on_done)
                    ended = self._children(parent_id)
                    for job in jobs:
                        trial = asked[job.name]
                        outcome = _outcome(ended.get(str(trial.number)), plan.objective.metric)
                        code = codes.get(job.name, -1)
                        if outcome is None or (code != 0 and outcome.status != "failed"):
                            # interrupted or lost (worker gone): not told; a rerun resumes it
                            failed.append((job.name, f"exit code {code}"))
                            continue
                        if outcome.status == "failed":
                            failed.append((job.name, f"exit code {code}"))
                        search.tell(trial, outcome)
                    self._log_search_state(tracker, search)
                if not plan.adaptive:
                    break
            if done:
                how = "finished or pruned" if any(" (pruned at step " in d for d in done) else "finished"
                print(f"vqkit: sweep: {len(done)} of {seen} already {how}, skipped: " + ", ".join(done), file=self.err)
            status = "FINISHED" if not failed else "FAILED"
        except KeyboardInterrupt:
            status = "KILLED"
            print("vqkit: sweep interrupted; run the same command again to resume it", file=self.err)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if launcher is not None and self.launcher is None:
                launcher.close()
            self._log_search_state(tracker, search)  # also when interrupted: the study so far
            if status != "KILLED":
                self._summarize(tracker, parent_id)
            tracker.finish(status)
        if failed:
            raise VqkitError(Problem(f"sweep: {len(failed)} children failed or were lost: " + ", ".join(
                f"{name!r} ({why})" for name, why in failed)
                + f"; their output is in {self.output_dir / parent_id / 'children'}; run the same command "
                  f"again to resume the interrupted ones"))
        from vqkit.tracking import ui_command

        print(f"vqkit: compare them with: vqkit compare {parent_id[:8]} --sort {plan.metrics[0]}", file=self.out)
        print(f"vqkit: see them in MLflow's UI: {ui_command(self.uri)}", file=self.out, flush=True)
        self._print_compare_url(parent_id)
        return 0

    def _print_compare_url(self, parent_id: str) -> None:
        """MLflow's pages of the children: the experiment's run list filtered to them (listed
        flat, by name, on the chart view: the unfiltered list folds them under the parent) and
        the compare-runs page (their params and metrics side by side)."""
        from vqkit.tracking import children_url, compare_url, ui_base

        children = sorted(self._search(f"tags.`{PARENT_TAG}` = '{parent_id}'"),
                          key=lambda r: (r["run_name"] or "", r["run_id"]))
        if children:
            base = ui_base(self.uri)
            charts = children_url(base, children[0]["experiment_id"], parent_id)
            url = compare_url(base, [r["run_id"] for r in children], [r["experiment_id"] for r in children])
            print(f"vqkit: its {len(children)} children in MLflow's UI (charts and images): {charts}", file=self.out)
            print(f"vqkit: their params and metrics side by side: {url}", file=self.out, flush=True)

    def _log_search_state(self, tracker, search) -> None:
        """The search's state files (e.g. the Optuna study) as artifacts ``search/...`` of the
        parent run, replaced by the newest copy each time."""
        try:
            for path in search.artifacts():
                tracker.log_artifact(path, "search")
        except Exception as exc:  # noqa: BLE001 - a full disk, a locked study: the study itself is intact,
            # only its copy is missing; the parent run must still end (this runs in the sweep's finally)
            print(f"vqkit: warning: the search's state was not copied to the parent run: {exc}", file=self.err)
            return
        tracker.flush()

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
        complete = [r for r in children if PRUNED_TAG not in r["tags"] and r["status"] == "FINISHED"]
        tags, best_metrics = {}, {}
        for metric in self.plan.metrics:
            best = best_run(complete, metric) if metric != self.plan.objective.metric else self._best(complete)
            if best is None:
                continue
            tags[f"vqkit.sweep.best.{metric}"] = f"{best['run_name']} ({best['run_id']})"
            best_metrics[f"best/{metric}"] = best["metrics"][metric]
            print(f"vqkit: sweep: best {metric}: {best['run_name']} ({best['metrics'][metric]:.4g})", file=self.out)
        pruned = sum(PRUNED_TAG in r["tags"] for r in children)
        tags["vqkit.sweep.pruned"] = str(pruned)
        tracker.set_tags(tags)
        if best_metrics:
            tracker.log_metrics(best_metrics, step=0)
        for path in self._trials_report(children, folder):
            tracker.log_artifact(path)

    def _best(self, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
        metric = self.plan.objective.metric
        have = [r for r in runs if metric in r["metrics"] and not math.isnan(r["metrics"][metric])]
        if not have:
            return None
        pick = max if self.plan.objective.direction == "max" else min
        return pick(have, key=lambda r: r["metrics"][metric])

    def _trials_report(self, children: list[dict[str, Any]], folder: Path) -> list[Path]:
        """``trials.csv`` (trial, name, state, objective) and ``objective.png``: the objective of
        every trial in trial order, pruned ones marked, and the best so far."""
        import csv

        metric, direction = self.plan.objective.metric, self.plan.objective.direction
        rows = []
        for run in children:
            number = run["tags"].get(TRIAL_TAG)
            if number is None or not number.isdigit():
                continue
            state = ("pruned" if PRUNED_TAG in run["tags"] else
                     {"FINISHED": "finished", "FAILED": "failed"}.get(run["status"], run["status"].lower()))
            rows.append((int(number), run["run_name"], state, run["metrics"].get(metric), run["run_id"]))
        rows.sort()
        if not rows:
            return []
        table = folder / "trials.csv"
        with open(table, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["trial", "run", "state", metric, "run_id"])
            w.writerows(rows)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        best, best_x, best_y = None, [], []
        for state, marker, color in (("finished", "o", "tab:blue"), ("pruned", "x", "tab:orange"),
                                     ("failed", "s", "tab:red")):
            pts = [(t, v) for t, _, s, v, _ in rows if s == state and v is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, label=f"{state} ({len(pts)})", zorder=3)
        for t, _, s, v, _ in rows:
            if s == "finished" and v is not None:
                best = v if best is None else (max(best, v) if direction == "max" else min(best, v))
            if best is not None:
                best_x.append(t)
                best_y.append(best)
        if best_x:
            ax.step(best_x, best_y, where="post", color="tab:green", label="best so far")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{metric} ({direction})")
        ax.set_title(self.plan.name)
        if ax.get_legend_handles_labels()[0]:  # no trial has a value yet: no legend
            ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        plot = folder / "objective.png"
        fig.savefig(plot)
        plt.close(fig)
        return [table, plot]
