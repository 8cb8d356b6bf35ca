"""Sweeps: which combinations run (the *search*) and where they run (the *launcher*).

A sweep is a grid of recipe keys (``--grid KEY=V1,V2`` or a recipe's ``sweep.grid``); every
combination is a *child*: an ordinary ``vqkit train RECIPE --set ...`` run, named for its grid
values (``reset=jukebox K=1024``) and nested under one MLflow parent run.

Two small seams, kept apart so other searches (random, optuna) and launchers (ray,
submitit) can be added without touching the rest:

* search: :func:`expand_grid` turns a grid into :class:`ChildSpec` s (name + overrides);
* launcher: :class:`LocalLauncher` runs :class:`ChildJob` s (a command line and its
  environment) as subprocesses on this machine, ``jobs`` at a time, CPU threads split.

:func:`plan_sweep` validates every child recipe before anything runs and reports every
problem at once. The MLflow side (parent run, skipping finished children, resuming
interrupted ones, the summary) is in :mod:`vqkit.commands.sweep`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import yaml

from vqkit.errors import Problem, VqkitError

__all__ = [
    "ChildSpec",
    "ChildJob",
    "SweepPlan",
    "LocalLauncher",
    "parse_grid",
    "expand_grid",
    "grid_labels",
    "format_value",
    "overrides_name",
    "plan_sweep",
]

#: Short labels for the last part of common recipe keys, used in run names.
ALIASES = {
    "codebook_size": "K",
    "latent_dim": "D",
    "batch_size": "bs",
    "channels": "ch",
    "weight": "w",
    "start_step": "start",
}
#: Key prefixes that never name a run (they do not change what is trained).
UNNAMED_PREFIXES = ("tracking.", "sweep")


# =========================================================================== naming
def _label_parts(key: str) -> list[str]:
    """``reset.name`` -> ``['reset']``; ``quantizer.params.codebook_size`` ->
    ``['quantizer', 'K']``: the key without ``params``, a trailing ``name`` naming its block."""
    parts = [p for p in key.split(".") if p != "params"]
    if len(parts) > 1 and parts[-1] == "name":
        parts = parts[:-1]
    if parts:
        parts[-1] = ALIASES.get(parts[-1], parts[-1])
    return parts


def grid_labels(keys: Sequence[str]) -> dict[str, str]:
    """A short, unique label for each key: its last part (aliased), with more of the path
    only where two keys would otherwise share a label."""
    parts = {k: _label_parts(k) for k in keys}
    depth = {k: 1 for k in keys}
    while True:
        labels = {k: ".".join(parts[k][-depth[k]:]) for k in keys}
        clashes = [k for k in keys if list(labels.values()).count(labels[k]) > 1 and depth[k] < len(parts[k])]
        if not clashes:
            return labels
        for k in clashes:
            depth[k] += 1


def format_value(value: Any) -> str:
    """A grid value as it appears in a run name: ``1024``, ``0.001``, ``jukebox``,
    ``[32,64]``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def values_name(values: Mapping[str, Any]) -> str:
    """``{'reset.name': 'jukebox', 'quantizer.params.codebook_size': 1024}`` ->
    ``reset=jukebox K=1024``."""
    labels = grid_labels(list(values))
    return " ".join(f"{labels[k]}={format_value(v)}" for k, v in values.items())


def overrides_name(recipe_name: str, overrides: Iterable[str]) -> str:
    """The run name of ``vqkit train RECIPE --set ...``: the recipe name followed by what
    the overrides change (``quickstart steps=300 lr=0.001``); tracking keys are left out."""
    from vqkit.recipe import parse_override

    values: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(str(p) for p in path)
        if not key.startswith(UNNAMED_PREFIXES):
            values[key] = value
    return f"{recipe_name} {values_name(values)}" if values else recipe_name


# =========================================================================== the search seam
@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """One combination: its position, run name, grid values and the ``--set`` overrides
    (the sweep's own, then the grid values) that make its recipe."""

    index: int
    name: str
    values: dict[str, Any]
    overrides: tuple[str, ...]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes: ``a,[1,2],'x,y'``."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def parse_grid(texts: Iterable[str]) -> dict[str, list[Any]]:
    """``['reset.name=none,jukebox', 'quantizer.params.codebook_size=256,1024']`` ->
    ``{key: [values]}`` (values parsed as YAML, like ``--set``)."""
    grid: dict[str, list[Any]] = {}
    problems = []
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            problems.append(Problem(f"--grid expects KEY.PATH=V1,V2[,...], got {text!r}"))
            continue
        values = []
        for item in _split_top_level(raw):
            try:
                values.append(yaml.safe_load(item) if item.strip() else None)
            except yaml.YAMLError as exc:
                problems.append(Problem(f"--grid {key}: {item!r} is not valid YAML ({str(exc).splitlines()[0]})"))
        if key in grid:
            problems.append(Problem(f"--grid {key} is given twice"))
        grid[key] = values
    if problems:
        raise VqkitError(problems)
    return grid


def expand_grid(grid: Mapping[str, Sequence[Any]], base_overrides: Sequence[str] = (),
                base_run_name: str | None = None) -> list[ChildSpec]:
    """Every combination of ``grid`` (last key fastest), each named for its values."""
    keys = list(grid)
    children = []
    for i, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        values = dict(zip(keys, combo))
        name = values_name(values)
        if base_run_name:
            name = f"{base_run_name} {name}"
        sets = [f"{k}={json.dumps(v)}" for k, v in values.items()]
        run_name = f"tracking.run_name={json.dumps(name)}"
        children.append(ChildSpec(i, name, values, (*base_overrides, *sets, run_name, "sweep=null")))
    return children


# =========================================================================== planning
@dataclasses.dataclass
class SweepPlan:
    """A validated sweep: the children and their recipes, where they log, what is summarized."""

    recipe_path: str
    base_overrides: list[str]
    grid: dict[str, list[Any]]
    children: list[ChildSpec]
    recipes: list[Any]  # vqkit.recipe.Recipe, one per child
    jobs: int
    metrics: list[str]
    name: str
    base: Any  # the base recipe (sweep block included)

    @property
    def sweep_id(self) -> str:
        """Identifies the sweep in MLflow: the same recipe, grid and overrides give the same id."""
        text = "\n".join(r.sha256() for r in self.recipes)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _grid_locations(recipe_path: str) -> dict[str, tuple[int, int]]:
    """Line and column of each ``sweep.grid`` key in the recipe file (best effort)."""
    try:
        node = yaml.compose(Path(recipe_path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return {}

    def child(n, name):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if k.value == name:
                    return k, v
        return None, None

    _, sweep = child(node, "sweep")
    _, grid = child(sweep, "grid")
    out = {}
    if isinstance(grid, yaml.MappingNode):
        for k, _ in grid.value:
            out[str(k.value)] = (k.start_mark.line + 1, k.start_mark.column + 1)
    return out


def plan_sweep(recipe_path: str, grid_texts: Sequence[str] = (), overrides: Sequence[str] = (),
               jobs: int | None = None, metrics: Sequence[str] | None = None) -> SweepPlan:
    """Read the recipe and the grid (the recipe's ``sweep`` block, then ``--grid``), expand
    it and validate every child's recipe. Raises one :class:`VqkitError` with every problem
    of every child, each saying which children it concerns and where it comes from."""
    from vqkit.recipe import load_recipe

    base = load_recipe(recipe_path, list(overrides))
    cfg = base.model.sweep
    cli_grid = parse_grid(grid_texts)
    grid: dict[str, list[Any]] = dict(cfg.grid) if cfg is not None else {}
    from_recipe = {k for k in grid if k not in cli_grid}
    grid.update(cli_grid)
    locations = _grid_locations(recipe_path)
    problems = []
    for key, values in grid.items():
        if not values:
            where = _where(key, from_recipe, locations, recipe_path)
            problems.append(dataclasses.replace(where, message="the grid needs at least one value"))
    if not grid:
        problems.append(Problem(f"nothing to sweep: give --grid KEY.PATH=V1,V2 or a `sweep: {{grid: ...}}` "
                                f"block in {recipe_path}"))
    if problems:
        raise VqkitError(problems)
    jobs = jobs if jobs is not None else (cfg.jobs if cfg is not None else 1)
    if jobs < 1:
        raise VqkitError(Problem(f"--jobs must be >= 1, got {jobs}"))
    metrics = list(metrics) if metrics else (list(cfg.metrics) if cfg is not None else ["eval/psnr"])
    children = expand_grid(grid, list(overrides), base.model.tracking.run_name)

    recipes: list[Any] = []
    found: dict[str, tuple[Problem, list[str]]] = {}
    for child in children:
        try:
            recipes.append(load_recipe(recipe_path, list(child.overrides)))
        except VqkitError as exc:
            recipes.append(None)
            for p in exc.problems:
                p = _relocate(p, grid, from_recipe, locations, recipe_path)
                text = str(p)
                found.setdefault(text, (p, []))[1].append(child.name)
    if found:
        out = []
        for p, names in found.values():
            who = "every child" if len(names) == len(children) else "child " + ", ".join(repr(n) for n in names)
            out.append(dataclasses.replace(p, message=f"{p.message} [{who}]"))
        raise VqkitError(out)
    targets = {(r.model.tracking.uri, r.model.tracking.experiment) for r in recipes}
    if len(targets) > 1:
        raise VqkitError(Problem("the children of a sweep must log to one MLflow experiment; the grid "
                                 "changes tracking.uri or tracking.experiment"))
    names = [c.name for c in children]
    if len(set(names)) != len(names):
        raise VqkitError(Problem("the grid gives two children the same values: " + ", ".join(
            sorted({n for n in names if names.count(n) > 1}))))
    labels = grid_labels(list(grid))
    name = f"{base.model.name} sweep " + " x ".join(labels[k] for k in grid)
    return SweepPlan(recipe_path, list(overrides), grid, children, recipes, jobs, metrics, name, base)


def _where(key: str, from_recipe: set[str], locations: dict[str, tuple[int, int]], recipe_path: str) -> Problem:
    if key in from_recipe:
        line, col = locations.get(key, (None, None))
        return Problem("", path=f"sweep.grid.{key}", file=recipe_path, line=line, col=col)
    return Problem("", file=f"--grid {key}")


def _relocate(p: Problem, grid: Mapping[str, Any], from_recipe: set[str],
              locations: dict[str, tuple[int, int]], recipe_path: str) -> Problem:
    """A problem caused by a grid value points at the ``--grid`` option or the recipe's
    ``sweep.grid`` key instead of at ``--set``."""
    if p.file != "--set":
        return p
    for key in grid:
        if p.path == key or p.path.startswith(key + "."):
            where = _where(key, from_recipe, locations, recipe_path)
            return dataclasses.replace(p, file=where.file, line=where.line, col=where.col)
    return p


# =========================================================================== the launcher seam
@dataclasses.dataclass(frozen=True)
class ChildJob:
    """A child ready to run: its name, its command line and extra environment."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    log: Path | None = None  # where its output is kept


def train_argv(recipe_path: str, overrides: Sequence[str], parent_run_id: str,
               resume: str | None = None) -> tuple[str, ...]:
    """The ``vqkit train`` command of one child (run with this Python)."""
    argv = [sys.executable, "-m", "vqkit.cli", "train", recipe_path]
    for text in overrides:
        argv += ["--set", text]
    argv += ["--parent-run", parent_run_id]
    if resume:
        argv += ["--resume", resume]
    return tuple(argv)


class LocalLauncher:
    """Runs child jobs as subprocesses on this machine, ``jobs`` at a time.

    With ``jobs > 1`` each child gets ``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) = the
    threads available (``$OMP_NUM_THREADS``, else the CPU count) divided by ``jobs``. Each
    output line is echoed as ``[name] line`` and kept in the job's log file. On Ctrl-C or
    SIGTERM the running children get SIGTERM (they checkpoint and stop) and the
    interruption is re-raised.
    """

    def __init__(self, jobs: int = 1, out: TextIO | None = None):
        self.jobs = max(1, int(jobs))
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def threads_per_job(self) -> int | None:
        if self.jobs == 1:
            return None
        total = int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
        return max(1, total // self.jobs)

    def launch(self, jobs: Sequence[ChildJob], on_done: Callable[[ChildJob, int], None] | None = None) -> list[int]:
        """Run every job; returns their exit codes (in the order given)."""
        codes: list[int | None] = [None] * len(jobs)
        running: dict[int, tuple[subprocess.Popen, threading.Thread]] = {}
        pending = list(range(len(jobs)))
        threads = self.threads_per_job()
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    i = pending.pop(0)
                    running[i] = self._start(jobs[i], threads)
                for i, (proc, reader) in list(running.items()):
                    if proc.poll() is not None:
                        reader.join()
                        codes[i] = proc.returncode
                        del running[i]
                        if on_done is not None:
                            on_done(jobs[i], proc.returncode)
                time.sleep(0.2)
        except BaseException:
            for proc, _ in running.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc, reader in running.values():
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                reader.join(timeout=5)
            raise
        return [int(c) for c in codes]  # type: ignore[arg-type]

    def _start(self, job: ChildJob, threads: int | None) -> tuple[subprocess.Popen, threading.Thread]:
        env = dict(os.environ)
        env.update(job.env)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(list(job.argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, bufsize=1)
        reader = threading.Thread(target=self._echo, args=(job, proc), daemon=True)
        reader.start()
        return proc, reader

    def _echo(self, job: ChildJob, proc: subprocess.Popen) -> None:
        log = None
        if job.log is not None:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(job.log, "a", encoding="utf-8")
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                with self._lock:
                    print(f"[{job.name}] {line.rstrip()}", file=self.out, flush=True)
                if log is not None:
                    log.write(line)
                    log.flush()
        finally:
            if log is not None:
                log.close()
