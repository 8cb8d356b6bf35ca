"""Sweeps: which combinations run (the *search*) and where they run (the *launcher*).

A sweep is a grid of recipe keys (``--grid KEY=V1,V2`` or a recipe's ``sweep.grid``); every
combination is a *child*: an ordinary ``vqkit train RECIPE --set ...`` run, named for its grid
values (``reset=jukebox K=1024``) and nested under one MLflow parent run.

Two seams, each a component kind with its own hook (``vqkit components searches|launchers``):

* search (:class:`vqkit.interfaces.Search`): which combinations of the sweep's *space*
  (``sweep.grid``/``--grid`` choices, ``sweep.space``/``--space`` choices and ranges) run.
  Built-ins ``grid`` and ``random`` (vqkit/components/searches.py); ``optuna`` is a plugin.
* launcher (:class:`vqkit.interfaces.Launcher`): where the :class:`ChildJob` s (a command
  line and its environment) run. Built-in ``local`` (vqkit/components/launchers.py,
  ``jobs`` at a time, CPU threads split); ``ray`` and ``submitit`` are plugins.

:func:`plan_sweep` validates every child recipe before anything runs and reports every
problem at once. The MLflow side (parent run, skipping finished children, resuming
interrupted ones, the summary) is in :mod:`vqkit.commands.sweep`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import yaml

from vqkit.errors import Problem, VqkitError

__all__ = [
    "ChildSpec",
    "ChildJob",
    "SweepPlan",
    "child_spec",
    "parse_space",
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


def child_spec(index: int, values: Mapping[str, Any], base_overrides: Sequence[str] = (),
               base_run_name: str | None = None) -> ChildSpec:
    """The child of one combination: named for its values, its recipe = the sweep's
    overrides, then the values, then its run name (and no sweep block)."""
    name = values_name(values)
    if base_run_name:
        name = f"{base_run_name} {name}"
    sets = [f"{k}={json.dumps(v)}" for k, v in values.items()]
    run_name = f"tracking.run_name={json.dumps(name)}"
    return ChildSpec(index, name, dict(values), (*base_overrides, *sets, run_name, "sweep=null"))


def expand_grid(grid: Mapping[str, Sequence[Any]], base_overrides: Sequence[str] = (),
                base_run_name: str | None = None) -> list[ChildSpec]:
    """Every combination of ``grid`` (last key fastest), each named for its values."""
    keys = list(grid)
    return [child_spec(i, dict(zip(keys, combo)), base_overrides, base_run_name)
            for i, combo in enumerate(itertools.product(*(grid[k] for k in keys)))]


def parse_space(texts: Iterable[str]) -> dict[str, Any]:
    """``['train.lr={low: 1e-4, high: 1e-2, log: true}', 'reset.name=[none, random]']`` ->
    ``{key: spec}`` (YAML; a list is a list of choices), as in a recipe's ``sweep.space``."""
    space: dict[str, Any] = {}
    problems = []
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            problems.append(Problem(f"--space expects KEY.PATH=SPEC ([v1, v2] or {{low: L, high: H, log: true}}), "
                                    f"got {text!r}"))
            continue
        try:
            space[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problems.append(Problem(f"--space {key}: {raw!r} is not valid YAML ({str(exc).splitlines()[0]})"))
    if problems:
        raise VqkitError(problems)
    return space


# =========================================================================== planning
@dataclasses.dataclass
class SweepPlan:
    """A validated sweep: the search and its space, the children known up front (every child
    of a static search such as grid or random; none for an adaptive one) and their recipes,
    where they run and log, what is summarized."""

    recipe_path: str
    base_overrides: list[str]
    grid: dict[str, list[Any]]  # the choices of the space (grid search: the whole space)
    children: list[ChildSpec]
    recipes: list[Any]  # vqkit.recipe.Recipe, one per child
    jobs: int
    metrics: list[str]
    name: str
    base: Any  # the base recipe (sweep block included)
    space: dict[str, Any] = dataclasses.field(default_factory=dict)  # key -> vqkit.interfaces.Dimension
    search: Any = None  # ComponentEntry of the search
    search_params: Any = None
    launcher: Any = None  # ComponentEntry of the launcher
    launcher_params: Any = None
    objective: Any = None  # vqkit.interfaces.Objective
    budget: int | None = None
    seed: int = 0
    static_id: str | None = None  # identity of an adaptive sweep (its children are not known yet)

    @property
    def sweep_id(self) -> str:
        """Identifies the sweep in MLflow: the same recipe, space, search and overrides give the
        same id (the launcher and --jobs do not count: a sweep may move between them)."""
        if self.static_id is not None:
            return self.static_id
        text = "\n".join(r.sha256() for r in self.recipes)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def adaptive(self) -> bool:
        return bool(self.search is not None and self.search.cls.adaptive)

    def make_search(self, state_dir: Path | None = None):
        """A fresh instance of the search (state kept in ``state_dir``)."""
        return self.search.cls(self.search_params, space=self.space, objective=self.objective,
                               budget=self.budget, seed=self.seed, state_dir=state_dir)

    def make_launcher(self, out: TextIO | None = None):
        return self.launcher.cls(self.launcher_params, jobs=self.jobs, out=out)

    def child(self, index: int, values: Mapping[str, Any]) -> ChildSpec:
        return child_spec(index, values, self.base_overrides, self.base.model.tracking.run_name)


def _sweep_locations(recipe_path: str, block: str) -> dict[str, tuple[int, int]]:
    """Line and column of each ``sweep.<block>`` key in the recipe file (best effort)."""
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
    _, grid = child(sweep, block)
    out = {}
    if isinstance(grid, yaml.MappingNode):
        for k, _ in grid.value:
            out[str(k.value)] = (k.start_mark.line + 1, k.start_mark.column + 1)
    return out


def _grid_locations(recipe_path: str) -> dict[str, tuple[int, int]]:
    return _sweep_locations(recipe_path, "grid")


def _flag_overrides(search: str | None, launcher: str | None, budget: int | None,
                    objective: str | None) -> list[str]:
    """``vqkit sweep`` flags as ``--set sweep.*`` overrides of the recipe's sweep block."""
    out = []
    if search:
        out.append(f"sweep.search.name={json.dumps(search)}")
    if launcher:
        out.append(f"sweep.launcher.name={json.dumps(launcher)}")
    if budget is not None:
        out.append(f"sweep.budget={int(budget)}")
    if objective:
        metric, _, direction = objective.partition(":")
        out.append(f"sweep.objective.metric={json.dumps(metric)}")
        if direction:
            out.append(f"sweep.objective.direction={json.dumps(direction)}")
    return out


def _dimension(spec: Any):
    from vqkit.interfaces import Dimension

    return Dimension(choices=tuple(spec.choices)) if spec.choices is not None else Dimension(
        low=spec.low, high=spec.high, log=spec.log, integer=spec.integer)


def plan_sweep(recipe_path: str, grid_texts: Sequence[str] = (), overrides: Sequence[str] = (),
               jobs: int | None = None, metrics: Sequence[str] | None = None, *,
               space_texts: Sequence[str] = (), search: str | None = None, launcher: str | None = None,
               budget: int | None = None, objective: str | None = None) -> SweepPlan:
    """Read the recipe and the space (the recipe's ``sweep`` block, then ``--grid`` and
    ``--space``), check it against the search, and validate the children's recipes: every
    child of a static search (grid, random), every choice and both ends of every range for an
    adaptive one. Raises one :class:`VqkitError` with every problem of every child, each
    saying which children it concerns and where it comes from."""
    from pydantic import ValidationError

    from vqkit.interfaces import Objective
    from vqkit.plugins import get_registry
    from vqkit.recipe import DimensionSpec, SweepConfig, load_recipe

    flags = _flag_overrides(search, launcher, budget, objective)
    try:  # --set sweep.launcher.params.x=... applies after --launcher
        base = load_recipe(recipe_path, [*flags, *overrides])
    except VqkitError as exc:  # a problem with a flag's value names the flag
        flag_of = {"sweep.search.name": "--search", "sweep.launcher.name": "--launcher", "sweep.budget": "--budget",
                   "sweep.objective.metric": "--objective", "sweep.objective.direction": "--objective"}
        given = {text.partition("=")[0] for text in overrides}
        raise VqkitError([dataclasses.replace(p, file=flag_of[p.path]) if p.file == "--set" and p.path in flag_of
                          and p.path not in given else p for p in exc.problems]) from None
    cfg = base.model.sweep or SweepConfig()
    cli_grid = parse_grid(grid_texts)
    cli_space = parse_space(space_texts)
    locations = _grid_locations(recipe_path)
    space_locations = _sweep_locations(recipe_path, "space")
    problems = []
    specs: dict[str, Any] = {k: DimensionSpec(choices=v) if v else None for k, v in cfg.grid.items()}
    specs.update(cfg.space)
    from_recipe = {k for k in specs if k not in cli_grid and k not in cli_space}
    for key, values in cli_grid.items():
        specs[key] = DimensionSpec(choices=values) if values else None
    for key, raw in cli_space.items():
        try:
            specs[key] = DimensionSpec.model_validate(raw)
        except ValidationError as exc:
            specs[key] = None
            for err in exc.errors():
                problems.append(Problem(f"--space {key}: {err['msg'].removeprefix('Value error, ')}"))

    def where(key: str) -> Problem:
        if key in from_recipe:
            if key in cfg.space:
                line, col = space_locations.get(key, (None, None))
                return Problem("", path=f"sweep.space.{key}", file=recipe_path, line=line, col=col)
            return _where(key, from_recipe, locations, recipe_path)
        return Problem("", file=f"--{'space' if key in cli_space else 'grid'} {key}")

    for key, spec in specs.items():
        if spec is None and key in cli_grid or (spec is None and key in cfg.grid and key in from_recipe):
            problems.append(dataclasses.replace(where(key), message="the grid needs at least one value"))
    if not specs:
        problems.append(Problem(f"nothing to sweep: give --grid KEY.PATH=V1,V2 (or --space KEY.PATH=SPEC) or a "
                                f"`sweep: {{grid: ...}}` block in {recipe_path}"))
    if problems:
        raise VqkitError(problems)
    space = {k: _dimension(s) for k, s in specs.items()}
    registry = get_registry()
    search_entry = registry.get("searches", cfg.search.name)
    launcher_entry = registry.get("launchers", cfg.launcher.name)
    search_params = _params(base, ("sweep", "search"), search_entry)
    launcher_params = _params(base, ("sweep", "launcher"), launcher_entry)
    for key, text in search_entry.cls.space_problems(space).items():
        problems.append(dataclasses.replace(where(key), message=f"{text} [search {search_entry.name!r}]"))
    if problems:
        raise VqkitError(problems)
    jobs = jobs if jobs is not None else cfg.jobs
    if jobs < 1:
        raise VqkitError(Problem(f"--jobs must be >= 1, got {jobs}"))
    metrics = list(metrics) if metrics else list(cfg.metrics)
    direction = cfg.objective.direction
    if direction is None:
        from vqkit.commands.compare import metric_direction

        direction = metric_direction(cfg.objective.metric)
    goal = Objective(cfg.objective.metric, direction)
    if goal.metric not in metrics:
        metrics = [goal.metric, *metrics]
    grid = {k: list(d.choices) for k, d in space.items() if d.is_choice}
    labels = grid_labels(list(space))
    name = f"{base.model.name} sweep " + " x ".join(labels[k] for k in space)
    if search_entry.name != "grid":
        name += f" ({search_entry.name})"
    plan = SweepPlan(recipe_path, list(overrides), grid, [], [], jobs, metrics, name, base, space=space,
                     search=search_entry, search_params=search_params, launcher=launcher_entry,
                     launcher_params=launcher_params, objective=goal, budget=cfg.budget, seed=base.model.seed)
    # every choice and both ends of every range (the other keys at their first value): all an
    # adaptive search can choose from, and the ends of the ranges a random search draws from
    firsts = {k: d.edges()[0] for k, d in space.items()}
    probes = [dict(firsts)]
    for key, d in space.items():
        probes += [{**firsts, key: v} for v in d.edges()[1:]]
    if plan.adaptive:  # the children are chosen while the sweep runs
        _validate_children(plan, [plan.child(i, v) for i, v in enumerate(probes)], where)
        plan.static_id = _adaptive_id(plan, recipe_path, overrides)
        return plan
    trials = plan.make_search().ask(None)
    children = [plan.child(t.number, t.values) for t in trials]
    if not children:
        raise VqkitError(Problem(f"search {search_entry.name!r} chose no combination of the space"))
    plan.children = children
    ranged = any(not d.is_choice for d in space.values())
    extra = [plan.child(len(children) + i, v) for i, v in enumerate(probes)] if ranged else []
    plan.recipes = _validate_children(plan, [*children, *extra], where)[: len(children)]
    names = [c.name for c in children]
    if len(set(names)) != len(names):
        raise VqkitError(Problem("the grid gives two children the same values: " + ", ".join(
            sorted({n for n in names if names.count(n) > 1}))))
    return plan


def _params(base: Any, path: tuple[str, str], entry: Any) -> Any:
    try:
        return base.params_of(*path)
    except KeyError:  # the block was not written: the defaults
        return entry.cls.Params()


def _validate_children(plan: SweepPlan, children: Sequence[ChildSpec], where: Callable[[str], Problem]) -> list[Any]:
    """Load every child's recipe; raise every problem at once, located and saying which
    children it concerns."""
    from vqkit.recipe import load_recipe

    recipes: list[Any] = []
    found: dict[str, tuple[Problem, list[str]]] = {}
    for child in children:
        try:
            recipes.append(load_recipe(plan.recipe_path, list(child.overrides)))
        except VqkitError as exc:
            recipes.append(None)
            for p in exc.problems:
                p = _locate(p, plan.space, where)
                found.setdefault(str(p), (p, []))[1].append(child.name)
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
    return recipes


def _locate(p: Problem, space: Mapping[str, Any], where: Callable[[str], Problem]) -> Problem:
    """A problem caused by a value of the space points at the ``--grid``/``--space`` option
    or the recipe's ``sweep.grid``/``sweep.space`` key instead of at ``--set``."""
    if p.file != "--set":
        return p
    for key in space:
        if p.path == key or p.path.startswith(key + "."):
            w = where(key)
            return dataclasses.replace(p, file=w.file, line=w.line, col=w.col)
    return p


def _adaptive_id(plan: SweepPlan, recipe_path: str, overrides: Sequence[str]) -> str:
    from vqkit.recipe import load_recipe

    recipe = load_recipe(recipe_path, [*overrides, "sweep=null"])
    ident = {"recipe": recipe.sha256(), "space": {k: d.to_json() for k, d in plan.space.items()},
             "search": plan.search.name, "params": plan.search_params.model_dump(mode="json"),
             "objective": dataclasses.asdict(plan.objective), "budget": plan.budget}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _where(key: str, from_recipe: set[str], locations: dict[str, tuple[int, int]], recipe_path: str) -> Problem:
    if key in from_recipe:
        line, col = locations.get(key, (None, None))
        return Problem("", path=f"sweep.grid.{key}", file=recipe_path, line=line, col=col)
    return Problem("", file=f"--grid {key}")


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


def __getattr__(name: str):
    # the local launcher is a component now (vqkit/components/launchers.py)
    if name == "LocalLauncher":
        from vqkit.components.launchers import LocalLauncher

        return LocalLauncher
    raise AttributeError(name)
