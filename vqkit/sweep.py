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
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import yaml

from vqkit import yamlsafe
from vqkit.errors import Problem, VqkitError, closest
from vqkit.interfaces import Launcher

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
    "train_argv",
    "child_environment",
    "run_child",
    "SchedulerLauncher",
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
    ``['quantizer', 'K']``: the key without ``params``, a trailing ``name`` naming its block,
    a list index joined to its list (``losses.1.start_step`` -> ``['losses[1]', 'start']``)."""
    parts = [p for p in key.split(".") if p != "params"]
    if len(parts) > 1 and parts[-1] == "name":
        parts = parts[:-1]
    joined: list[str] = []
    for p in parts:
        if p.isdigit() and joined:
            joined[-1] += f"[{p}]"
        else:
            joined.append(p)
    if joined:
        base, bracket, rest = joined[-1].partition("[")
        joined[-1] = ALIASES.get(base, base) + bracket + rest
    return joined


def _min_depth(parts: Sequence[str]) -> int:
    """How many trailing parts a label needs at least: through the last list index, so an
    index is never shown without its list (``losses[1].start``, not ``start`` or ``1.start``)."""
    indexed = [i for i, p in enumerate(parts) if p.endswith("]")]
    return len(parts) - indexed[-1] if indexed else 1


def grid_labels(keys: Sequence[str]) -> dict[str, str]:
    """A short, unique label for each key: its last part (aliased), with more of the path
    where two keys would otherwise share a label, and always through its last list index."""
    parts = {k: _label_parts(k) for k in keys}
    depth = {k: min(_min_depth(parts[k]), len(parts[k])) or 1 for k in keys}
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


_ABSENT = object()


def _leaves(value: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """A mapping as ``{path: leaf}`` (lists are leaves)."""
    if isinstance(value, dict) and value:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, (*prefix, str(k))))
        return out
    return {prefix: value}


def block_label(value: Any, choices: Sequence[Any] = ()) -> str:
    """How one of a key's ``choices`` appears in a run name. Scalars and lists as
    :func:`format_value`; a mapping (a whole block) by what tells it apart from the other
    choices: a component block by its ``name``, followed by the leaves that differ among the
    choices of the same name (``fsq(levels=[8,6,5])``), any other mapping by its differing
    leaves (``{lr=0.001,steps=10}``); never the whole mapping dumped."""
    if not isinstance(value, dict):
        return format_value(value)
    named = isinstance(value.get("name"), str)
    peers = [c for c in choices if isinstance(c, dict) and c != value]
    if named:
        peers = [c for c in peers if c.get("name") == value["name"]]
    mine = _leaves(value)
    theirs = [_leaves(c) for c in peers]
    paths = list(dict.fromkeys([*mine, *(p for t in theirs for p in t)]))
    differ = [p for p in paths if p != ("name",) and any(t.get(p, _ABSENT) != mine.get(p, _ABSENT) for t in theirs)]
    parts = []
    for path in differ:
        label = ".".join(_label_parts(".".join(path))) or "-"
        leaf = mine.get(path, _ABSENT)
        parts.append(f"{label}={'default' if leaf is _ABSENT else format_value(leaf)}")
    if named:
        return value["name"] + (f"({','.join(parts)})" if parts else "")
    return "{" + ",".join(parts) + "}" if parts else format_value(value)


def values_name(values: Mapping[str, Any], choices: Mapping[str, Sequence[Any]] | None = None) -> str:
    """``{'reset.name': 'jukebox', 'quantizer.params.codebook_size': 1024}`` ->
    ``reset=jukebox K=1024``; a whole block by its name (``quantizer=fsq``, see
    :func:`block_label`; ``choices``: each key's values in the sweep)."""
    labels = grid_labels(list(values))
    choices = choices or {}
    return " ".join(f"{labels[k]}={block_label(v, choices.get(k, ()))}" for k, v in values.items())


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
                values.append(yamlsafe.safe_load(item) if item.strip() else None)
            except yaml.YAMLError as exc:
                problems.append(Problem(f"--grid {key}: {item!r} is not valid YAML ({str(exc).splitlines()[0]})"))
        if key in grid:
            problems.append(Problem(f"--grid {key} is given twice"))
        grid[key] = values
    if problems:
        raise VqkitError(problems)
    return grid


def parse_links(texts: Iterable[str]) -> list[tuple[str, ...]]:
    """``['quantizer,reset']`` -> ``[('quantizer', 'reset')]``: grid keys whose values vary
    together (``--link``; a recipe's ``sweep.link``)."""
    return [tuple(k.strip() for k in text.split(",") if k.strip()) for text in texts]


#: a grid key whose values name the children themselves
RUN_NAME_KEY = "tracking.run_name"


def child_spec(index: int, values: Mapping[str, Any], base_overrides: Sequence[str] = (),
               base_run_name: str | None = None, choices: Mapping[str, Sequence[Any]] | None = None,
               named_by: Sequence[str] = ()) -> ChildSpec:
    """The child of one combination: named for its values, its recipe = the sweep's
    overrides, then the values, then its run name (and no sweep block). A grid value of
    ``tracking.run_name`` is the child's name, followed by the values of the keys not
    linked with it (``named_by``: the keys of its link group), so names stay unique."""
    if RUN_NAME_KEY in values:
        rest = {k: v for k, v in values.items() if k not in {RUN_NAME_KEY, *named_by}}
        name = " ".join([str(values[RUN_NAME_KEY])] + ([values_name(rest, choices)] if rest else []))
    else:
        name = values_name(values, choices)
        if base_run_name:
            name = f"{base_run_name} {name}"
    sets = [f"{k}={json.dumps(v)}" for k, v in values.items()]
    run_name = f"tracking.run_name={json.dumps(name)}"
    return ChildSpec(index, name, dict(values), (*base_overrides, *sets, run_name, "sweep=null"))


def expand_grid(grid: Mapping[str, Sequence[Any]], base_overrides: Sequence[str] = (),
                base_run_name: str | None = None) -> list[ChildSpec]:
    """Every combination of ``grid`` (last key fastest), each named for its values."""
    keys = list(grid)
    return [child_spec(i, dict(zip(keys, combo)), base_overrides, base_run_name, grid)
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
            space[key] = yamlsafe.safe_load(raw)
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
    nproc: int = 1  # processes of each child (vqkit train --nproc: data-parallel children)
    static_id: str | None = None  # identity of an adaptive sweep (its children are not known yet)
    static_legacy_id: str | None = None  # the same, as earlier versions computed it (legacy_sweep_id)
    #: linked keys: a key of ``space`` ("quantizer+reset") -> the grid keys it stands for; its
    #: choices are mappings {grid key: value} (the keys' values zipped)
    links: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def sweep_id(self) -> str:
        """Identifies the sweep in MLflow: the same recipe, space, search and overrides give the
        same id (the launcher and --jobs do not count: a sweep may move between them)."""
        if self.static_id is not None:
            return self.static_id
        text = "\n".join(r.identity() for r in self.recipes)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def legacy_sweep_id(self) -> str:
        """The id earlier vqkit versions gave the same sweep (from the fully normalized
        recipes, so any key added since changes it): a rerun finds a parent made by them."""
        if self.static_id is not None:
            return self.static_legacy_id or self.static_id
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
        """The child of a search's values (a linked key's choice spread over its keys)."""
        named_by = next((keys for keys in self.links.values() if RUN_NAME_KEY in keys), ())
        return child_spec(index, unlink(values, self.links), self.base_overrides,
                          self.base.model.tracking.run_name, self.grid, named_by)


def unlink(values: Mapping[str, Any], links: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """A search's values with each linked key replaced by the grid keys it stands for."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in links:
            out.update({k: value[k] for k in links[key]})
        else:
            out[key] = value
    return out


def link_key(keys: Sequence[str]) -> str:
    """The key of a linked group in the search's space: ``quantizer+reset``."""
    return "+".join(keys)


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
               budget: int | None = None, objective: str | None = None,
               link_texts: Sequence[str] = ()) -> SweepPlan:
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
    grid = {k: list(d.choices) for k, d in space.items() if d.is_choice}  # per recipe key, before linking
    keys = list(space)
    space, links = _link_space(space, cfg.link, parse_links(link_texts), link_texts, recipe_path)

    def where_space(key: str) -> Problem:  # a linked key is located at its first grid key
        return where(links[key][0] if key in links else key)

    registry = get_registry()
    search_entry = registry.get("searches", cfg.search.name)
    launcher_entry = registry.get("launchers", cfg.launcher.name)
    search_params = _params(base, ("sweep", "search"), search_entry)
    launcher_params = _params(base, ("sweep", "launcher"), launcher_entry)
    for key, text in search_entry.cls.space_problems(space).items():
        problems.append(dataclasses.replace(where_space(key), message=f"{text} [search {search_entry.name!r}]"))
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
    labels = grid_labels(keys)
    name = f"{base.model.name} sweep " + " x ".join("+".join(labels[k] for k in links.get(key, (key,)))
                                                    for key in space)
    if search_entry.name != "grid":
        name += f" ({search_entry.name})"
    plan = SweepPlan(recipe_path, list(overrides), grid, [], [], jobs, metrics, name, base, space=space,
                     search=search_entry, search_params=search_params, launcher=launcher_entry,
                     launcher_params=launcher_params, objective=goal, budget=cfg.budget, seed=base.model.seed,
                     links=links)
    # every choice and both ends of every range (the other keys at their first value): all an
    # adaptive search can choose from, and the ends of the ranges a random search draws from
    firsts = {k: d.edges()[0] for k, d in space.items()}
    probes = [dict(firsts)]
    for key, d in space.items():
        probes += [{**firsts, key: v} for v in d.edges()[1:]]
    if plan.adaptive:  # the children are chosen while the sweep runs
        _validate_children(plan, [plan.child(i, v) for i, v in enumerate(probes)], where, keys)
        plan.static_id, plan.static_legacy_id = _adaptive_id(plan, recipe_path, overrides)
        return plan
    trials = plan.make_search().ask(None)
    children = [plan.child(t.number, t.values) for t in trials]
    if not children:
        raise VqkitError(Problem(f"search {search_entry.name!r} chose no combination of the space"))
    plan.children = children
    ranged = any(not d.is_choice for d in space.values())
    extra = [plan.child(len(children) + i, v) for i, v in enumerate(probes)] if ranged else []
    plan.recipes = _validate_children(plan, [*children, *extra], where, keys)[: len(children)]
    names = [c.name for c in children]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        repeated = [k for k, d in space.items() if d.is_choice and len(
            {json.dumps(c, sort_keys=True, default=str) for c in d.choices}) < len(d.choices)]
        if repeated:  # located at the key whose list repeats a value
            raise VqkitError([dataclasses.replace(where_space(k), message="a value is given twice, so two children "
                                                  f"would be the same: {', '.join(twice)}") for k in repeated])
        raise VqkitError(Problem("the grid gives two children the same values: " + ", ".join(twice)))
    return plan


def _params(base: Any, path: tuple[str, str], entry: Any) -> Any:
    try:
        return base.params_of(*path)
    except KeyError:  # the block was not written: the defaults
        return entry.cls.Params()


def _validate_children(plan: SweepPlan, children: Sequence[ChildSpec], where: Callable[[str], Problem],
                       keys: Sequence[str]) -> list[Any]:
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
                p = _locate(p, keys, where)
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


def _locate(p: Problem, space: Sequence[str], where: Callable[[str], Problem]) -> Problem:
    """A problem caused by a value of the space points at the ``--grid``/``--space`` option
    or the recipe's ``sweep.grid``/``sweep.space`` key instead of at ``--set``."""
    if p.file != "--set":
        return p
    for key in space:
        if p.path == key or p.path.startswith(key + "."):
            w = where(key)
            return dataclasses.replace(p, file=w.file, line=w.line, col=w.col)
    return p


def _link_locations(recipe_path: str) -> list[tuple[int, int]]:
    """Line and column of each group of the recipe's ``sweep.link`` (best effort)."""
    try:
        node = yaml.compose(Path(recipe_path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return []
    for block in ("sweep", "link"):
        if not isinstance(node, yaml.MappingNode):
            return []
        node = next((v for k, v in node.value if k.value == block), None)
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [(item.start_mark.line + 1, item.start_mark.column + 1) for item in node.value]


def _link_space(space: dict[str, Any], recipe_links: Sequence[Sequence[str]], flag_links: Sequence[tuple[str, ...]],
                flag_texts: Sequence[str], recipe_path: str) -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    """The space with each linked group of grid keys made one key (``quantizer+reset``) whose
    choices are the keys' values zipped: ``{quantizer: v_i, reset: r_i}``. Every problem of
    every group at once, located at its ``sweep.link`` entry or ``--link`` flag."""
    from vqkit.interfaces import Dimension

    lines = _link_locations(recipe_path)
    groups: list[tuple[tuple[str, ...], Problem]] = []
    for i, group in enumerate(recipe_links):
        line, col = lines[i] if i < len(lines) else (None, None)
        groups.append((tuple(group), Problem("", path=f"sweep.link.{i}", file=recipe_path, line=line, col=col)))
    for group, text in zip(flag_links, flag_texts):
        groups.append((group, Problem("", file=f"--link {text}")))
    problems, seen, links = [], {}, {}
    for group, at in groups:
        bad = []
        if len(group) < 2:
            bad.append(f"a link needs two or more grid keys (KEY,KEY[,...]), got {list(group)}")
        for key in group:
            if key not in space:
                close = closest(key, space)
                bad.append(f"{key!r} is not a key of the sweep's grid (give its values in sweep.grid or with "
                           f"--grid {key}=V1,V2)" + (f"; did you mean {close!r}?" if close else ""))
            elif not space[key].is_choice:
                bad.append(f"{key!r} is a range; only lists of values can be linked")
            elif key in seen:
                bad.append(f"{key!r} is linked twice (also with {', '.join(repr(k) for k in seen[key] if k != key)})")
        if not bad:
            sizes = {k: len(space[k].choices) for k in group}
            if len(set(sizes.values())) > 1:
                bad.append("linked keys vary together, so each needs as many values: "
                           + ", ".join(f"{k} has {n}" for k, n in sizes.items()))
        for key in group:
            seen.setdefault(key, group)
        problems += [dataclasses.replace(at, message=m) for m in bad]
        if not bad:
            links[link_key(group)] = group
    if problems:
        raise VqkitError(problems)
    out: dict[str, Any] = {}
    for key, dim in space.items():
        group = next((g for g in links.values() if key in g), None)
        if group is None:
            out[key] = dim
        elif key == group[0]:  # the group takes its first key's place
            zipped = zip(*(space[k].choices for k in group))
            out[link_key(group)] = Dimension(choices=tuple(dict(zip(group, vals)) for vals in zipped))
    return out, links


def _adaptive_id(plan: SweepPlan, recipe_path: str, overrides: Sequence[str]) -> tuple[str, str]:
    """``(id, legacy id)`` of an adaptive sweep (see :attr:`SweepPlan.legacy_sweep_id`)."""
    from vqkit.recipe import load_recipe

    recipe = load_recipe(recipe_path, [*overrides, "sweep=null"])

    def digest(recipe_id: str, search_params: dict) -> str:
        ident = {"recipe": recipe_id, "space": {k: d.to_json() for k, d in plan.space.items()},
                 "search": plan.search.name, "params": search_params,
                 "objective": dataclasses.asdict(plan.objective), "budget": plan.budget}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return (digest(recipe.identity(), plan.search_params.model_dump(mode="json", exclude_defaults=True)),
            digest(recipe.sha256(), plan.search_params.model_dump(mode="json")))


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
               resume: str | None = None, nproc: int = 1) -> tuple[str, ...]:
    """The ``vqkit train`` command of one child (run with this Python; ``nproc > 1``: a
    data-parallel child of ``nproc`` processes, ``vqkit train --nproc``)."""
    argv = [sys.executable, "-m", "vqkit.cli", "train", recipe_path]
    for text in overrides:
        argv += ["--set", text]
    argv += ["--parent-run", parent_run_id]
    if resume:
        argv += ["--resume", resume]
    if nproc > 1:
        argv += ["--nproc", str(int(nproc))]
    return tuple(argv)


# the body of a child wherever a launcher runs it, in a module that imports no torch (a Ray
# worker or a Slurm job unpickles it before the child's own `vqkit train` starts)
from vqkit.launching import child_environment, run_child  # noqa: E402,F401


class SchedulerLauncher(Launcher):
    """Base of a launcher that hands each child to a scheduler (Ray, Slurm, a job queue) and
    waits for it: the job bookkeeping every such launcher needs, written once.

    :meth:`launch` keeps up to ``jobs`` children in flight; gives each the driver's forwarded
    environment (:func:`child_environment`) and working directory; calls ``on_done(job,
    code)`` as each ends, in the calling thread; turns a child whose task or job was lost
    (:meth:`exit_code` raised) into exit code ``-1`` with a line saying why; and on
    ``KeyboardInterrupt`` (or any error) cancels the running children (they get SIGTERM and
    checkpoint), waits up to :attr:`cancel_grace_s` for them and re-raises. A subclass says
    only how to talk to its scheduler:

    * :meth:`submit` ``(job, env, cwd)``: start one child (usually a call of :func:`run_child`
      with ``job.argv``, ``env``, ``cwd``) and return a handle;
    * :meth:`wait` ``(handles, timeout)``: the handles whose children ended (wait at most
      ``timeout`` seconds);
    * :meth:`exit_code` ``(handle, job)``: the ended child's exit code (raise when its task
      or job was lost); keep or echo its output here (:meth:`keep_output`, :meth:`echo`);
    * :meth:`cancel` ``(handle)``: ask a running child to stop.

    ``__init__(params, jobs=, out=)`` is the :class:`~vqkit.interfaces.Launcher`'s.
    """

    #: seconds a cancelled child gets to checkpoint before :meth:`launch` re-raises
    cancel_grace_s: float = 120.0

    def __init__(self, params: Any = None, *, jobs: int = 1, out: TextIO | None = None):
        self.params = params if params is not None else self.Params()
        self.jobs = max(1, int(jobs))
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what a subclass says
    def submit(self, job: ChildJob, env: dict[str, str], cwd: str) -> Any:
        raise NotImplementedError

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        raise NotImplementedError

    def exit_code(self, handle: Any, job: ChildJob) -> int:
        raise NotImplementedError

    def cancel(self, handle: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def echo(self, name: str, text: str) -> None:
        """Print ``text`` as ``[name] line`` lines (thread-safe)."""
        with self._lock:
            for line in text.splitlines():
                print(f"[{name}] {line}", file=self.out, flush=True)

    @staticmethod
    def keep_output(job: ChildJob, text: str) -> None:
        """Append a child's output to its log file (when it has one)."""
        if job.log is not None and text:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "a", encoding="utf-8") as f:
                f.write(text)

    # ------------------------------------------------------------------ the bookkeeping
    def launch(self, jobs: Sequence[ChildJob], on_done: Callable | None = None) -> list[int]:
        import time

        cwd = os.getcwd()
        codes: list[int | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        running: dict[int, Any] = {}  # job index -> handle
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    i = pending.pop(0)
                    running[i] = self.submit(jobs[i], child_environment(jobs[i]), cwd)
                ended = {id(h) for h in self.wait(list(running.values()), 1.0)}
                for i, handle in list(running.items()):
                    if id(handle) not in ended:
                        continue
                    del running[i]
                    job = jobs[i]
                    try:
                        code = int(self.exit_code(handle, job))
                    except Exception as exc:  # the task or job was lost, cancelled, or its node died
                        code = -1
                        first = str(exc).splitlines()[0] if str(exc) else ""
                        self.echo(job.name, f"{type(self).__name__}: the child did not complete: "
                                            f"{type(exc).__name__}: {first}")
                    codes[i] = code
                    if on_done is not None:
                        on_done(job, code)
        except BaseException:
            for handle in running.values():
                try:
                    self.cancel(handle)
                except Exception as exc:  # already gone
                    print(f"vqkit: cannot cancel a child: {exc}", file=self.out, flush=True)
            left = list(running.values())
            deadline = time.monotonic() + self.cancel_grace_s
            while left and time.monotonic() < deadline:
                ended = {id(h) for h in self.wait(left, 1.0)}
                left = [h for h in left if id(h) not in ended]
            raise
        return [int(c) for c in codes]  # type: ignore[arg-type]


def __getattr__(name: str):
    # the local launcher is a component now (vqkit/components/launchers.py)
    if name == "LocalLauncher":
        from vqkit.components.launchers import LocalLauncher

        return LocalLauncher
    raise AttributeError(name)
