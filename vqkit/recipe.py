"""Recipes: load YAML safely, merge ``extends:``, apply ``--set`` overrides, validate
every block and every component's params, and normalize (defaults filled in).

All problems of a recipe are collected and raised together as one
:class:`~vqkit.errors.VqkitError`, each located as ``file:line:col: key.path: message``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata as md
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from vqkit import yamlsafe
from vqkit.errors import Problem, RecipeWarning, VqkitError, closest, suggest
from vqkit.interfaces import MAX_TRIALS, reject_bool_numbers
from vqkit.plugins import NOUNS, get_registry

SCHEMA_VERSION = 1

Path_ = tuple  # a key path: tuple of str (mapping keys) and int (list indices)


# =========================================================================== schema
class _Block(BaseModel):
    # no inf/nan: `.inf` or 1e400 for a learning rate or a weight would validate, then fail the run;
    # no `true`/`false` for a number (pydantic would read 1/0)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    _no_bool_numbers = field_validator("*", mode="before")(classmethod(reject_bool_numbers))


class ComponentRef(_Block):
    name: str = Field(description="registered component name")
    params: dict[str, Any] = Field(default_factory=dict, description="the component's params")


class LossRef(ComponentRef):
    weight: float = Field(1.0, ge=0, description="weight of this loss in the generator objective")
    start_step: int = Field(0, ge=0, description="step from which the loss is applied")


class DiscriminatorRef(ComponentRef):
    loss: Literal["hinge", "non-saturating"] = Field("hinge", description="GAN loss")
    weight: float = Field(0.1, ge=0, description="weight of the adversarial generator loss")
    start_step: int = Field(0, ge=0, description="step from which the discriminator trains")
    adaptive_weight: bool = Field(
        True, description="scale the adversarial loss by the ratio of gradient norms at the "
        "decoder's last layer (VQGAN)"
    )
    lr: Optional[float] = Field(None, gt=0, description="discriminator LR (default: train.lr)")
    r1: float = Field(
        0.0, ge=0, description="R1 gradient penalty gamma: gamma/2 * E||grad_x D(x)||^2 on real images "
        "added to the discriminator's loss (0: off; vqkit.gan)"
    )
    r1_every: int = Field(
        1, ge=1, description="apply R1 every N discriminator steps, weighted N times (lazy "
        "regularization, StyleGAN2)"
    )
    lecam: float = Field(
        0.0, ge=0, description="LeCam regularization weight: anchors the discriminator's logits to "
        "moving averages of its logits on real and fake images (0: off; vqkit.gan)"
    )
    lecam_decay: float = Field(0.99, ge=0, lt=1, description="decay of LeCam's moving averages")


class ResetRef(ComponentRef):
    name: str = Field("none", description="registered reset policy")
    every: int = Field(100, ge=1, description="call the policy every N steps")
    start_step: int = Field(0, ge=0, description="first step at which resets may happen")
    stop_step: Optional[int] = Field(
        None, ge=0, description="no resets after this step (default: never stop)"
    )


class TrainConfig(_Block):
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="images per step (per process)")
    lr: float = Field(2.0e-4, gt=0, description="peak learning rate")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="optimizer")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.99), description="Adam betas, each in [0, 1)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="LR schedule after warm-up"
    )
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final LR / peak LR for decays")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max gradient norm (null: off)")
    amp: bool = Field(False, description="automatic mixed precision (bf16 on CPU, fp16 on CUDA)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.strip().lower()):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N (got {value!r})")
        return value
    num_workers: int = Field(0, ge=0, description="data-loader worker processes")
    log_every: int = Field(50, ge=1, description="log metrics every N steps")
    eval_every: int = Field(500, ge=1, description="evaluate on the test split every N steps")
    image_every: int = Field(500, ge=1, description="log reconstruction grids every N steps")
    checkpoint_every: int = Field(500, ge=1, description="checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="periodic checkpoints kept locally")


class EvalConfig(_Block):
    num_samples: int = Field(512, ge=1, description="test images used per evaluation")
    batch_size: int = Field(128, ge=1, description="batch size for evaluation")
    metrics: list[Literal["psnr", "ssim", "lpips", "fd_vgg16_relu5_3"]] = Field(
        default_factory=lambda: ["psnr", "ssim"],
        description="metrics computed, logged as eval/<name> (vqkit.metrics: lpips is LPIPS-AlexNet, "
        "fd_vgg16_relu5_3 a Frechet distance on VGG16 features that needs num_samples >= 512)",
    )

    @model_validator(mode="after")
    def _enough_samples(self) -> "EvalConfig":
        from vqkit.metrics import FD_METRIC, FD_MIN_SAMPLES

        if FD_METRIC in self.metrics and self.num_samples < FD_MIN_SAMPLES:
            raise ValueError(f"metric {FD_METRIC} needs num_samples >= {FD_MIN_SAMPLES}, got {self.num_samples}")
        return self


class TrackingConfig(_Block):
    uri: Optional[str] = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db in the working directory)"
    )
    experiment: str = Field("vqkit", description="MLflow experiment name")

    @field_validator("experiment")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty (MLflow refuses an unnamed experiment)")
        return value
    run_name: Optional[str] = Field(
        None, description="MLflow run name (default: the recipe name, followed by the --set "
        "overrides when there are any; a sweep names each child by its grid values)"
    )
    description: Optional[str] = Field(None, description="MLflow run description (markdown)")
    output_dir: str = Field("runs", description="local folder for checkpoints and buffers")
    system_metrics: bool = Field(
        False, description="log MLflow system metrics (CPU, memory, disk, GPU; psutil) every 10 s"
    )


class DimensionSpec(_Block):
    """One key of a sweep's search space (see :class:`vqkit.interfaces.Dimension`)."""

    choices: Optional[list[Any]] = Field(None, min_length=1, description="the values to try")
    low: Optional[float] = Field(None, description="lower end of a range")
    high: Optional[float] = Field(None, description="upper end of a range")
    log: bool = Field(False, description="log-uniform range (low > 0)")
    integer: bool = Field(False, description="whole numbers in [low, high]")

    @model_validator(mode="before")
    @classmethod
    def _list_is_choices(cls, value: Any) -> Any:
        return {"choices": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_kind(self) -> "DimensionSpec":
        ranged = self.low is not None or self.high is not None
        if self.choices is not None and ranged:
            raise ValueError("give either choices or a range (low, high), not both")
        if self.choices is None:
            if self.low is None or self.high is None:
                raise ValueError("a range needs both low and high (or give a list of choices)")
            if self.low > self.high:
                raise ValueError(f"low ({self.low:g}) is above high ({self.high:g})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-uniform range needs low > 0, got {self.low:g}")
        elif self.log or self.integer:
            raise ValueError("log and integer apply to ranges, not to choices")
        return self


class ObjectiveSpec(_Block):
    metric: str = Field("eval/psnr", description="child metric the search optimizes (its last value)")
    direction: Optional[Literal["max", "min"]] = Field(
        None, description="max or min (default: from the metric's name, as `vqkit compare --sort`)"
    )


class SweepConfig(_Block):
    """What `vqkit sweep RECIPE` runs: every combination of the grid, as nested child runs."""

    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="recipe key path (as for --set) -> the values to try; the sweep runs every "
        "combination (same as --grid KEY=V1,V2)",
    )
    link: list[list[str]] = Field(
        default_factory=list,
        description="groups of grid keys whose values vary together: the i-th values of a group's keys "
        "make one choice (zipped, not crossed; same as --link KEY,KEY)",
    )
    jobs: int = Field(1, ge=1, description="children trained side by side (CPU threads split)")
    metrics: list[str] = Field(
        default_factory=lambda: ["eval/psnr"],
        description="metrics of the summary: the best child of each (direction from the name)",
    )
    # search and launcher: component kinds like the others (docs/sweeps.md)
    search: ComponentRef = Field(
        default_factory=lambda: ComponentRef(name="grid"),
        description="which combinations run: a registered search (`vqkit components searches`)",
    )
    space: dict[str, DimensionSpec] = Field(
        default_factory=dict,
        description="recipe key path -> a list of choices, or {low, high, log, integer} for a range "
        "(`grid` entries are choices too; same as --space KEY=SPEC)",
    )
    objective: ObjectiveSpec = Field(
        default_factory=lambda: ObjectiveSpec(), description="what the search optimizes"
    )
    budget: Optional[int] = Field(
        None, ge=1, le=MAX_TRIALS,
        description=f"number of trials, at most {MAX_TRIALS} (default: the search's own, e.g. every grid combination)"
    )
    launcher: ComponentRef = Field(
        default_factory=lambda: ComponentRef(name="local"),
        description="where the children run: a registered launcher (`vqkit components launchers`)",
    )


class Requirement(_Block):
    dist: str = Field(description="a distribution, as a pip requirement (`vqkit-fsq`, `vqkit-fsq>=0.1`)")
    install: Optional[str] = Field(None, description="how to install it (default: pip install 'DIST')")


#: ``requires:`` (autoencoder and prior recipes): the plugin distributions the recipe's
#: components come from, checked when it is loaded; not part of the normalized recipe
REQUIRES_FIELD = Field(
    default_factory=list,
    description="distributions the recipe's components come from: `vqkit-fsq>=0.1`, or "
    "{dist: ..., install: ...} with the line that installs it; checked when the recipe is loaded",
)


def _requirement_item(value: Any) -> Any:
    """One ``requires:`` item: a string, or a mapping checked as :class:`Requirement`
    (one message either way, not one per branch of the union)."""
    if isinstance(value, dict):
        return Requirement.model_validate(value)
    if not isinstance(value, str):
        raise ValueError(f"must be a requirement string ('vqkit-fsq>=0.1') or a mapping "
                         f"{{dist: ..., install: ...}} (got {value!r})")
    return value


RequirementItem = Annotated[Union[str, Requirement], BeforeValidator(_requirement_item)]


class RecipeModel(_Block):
    vqkit: Literal[1] = Field(description="recipe schema version")
    name: str = Field(description="experiment name")
    requires: list[RequirementItem] = REQUIRES_FIELD
    seed: int = Field(0, ge=0, le=2**32 - 1, description="global seed (0 to 2^32 - 1, as numpy takes)")
    data: ComponentRef
    encoder: ComponentRef
    quantizer: ComponentRef
    decoder: ComponentRef
    losses: list[LossRef] = Field(min_length=1, description="generator reconstruction losses")
    discriminator: Optional[DiscriminatorRef] = None
    reset: ResetRef = Field(default_factory=lambda: ResetRef(name="none"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: Optional[SweepConfig] = Field(
        None, description="a grid for `vqkit sweep` (ignored by `vqkit train`)"
    )


# which top-level component blocks map to which registry kind
COMPONENT_BLOCKS = {
    "data": "datasets",
    "encoder": "encoders",
    "quantizer": "quantizers",
    "decoder": "decoders",
    "discriminator": "discriminators",
    "reset": "reset_policies",
}


# =========================================================================== YAML with marks
class _Loc:
    """Where each key path came from: path -> (file, line, col)."""

    def __init__(self) -> None:
        self.marks: dict[Path_, tuple[str, int, int]] = {}  # where the key is
        self.values: dict[Path_, tuple[str, int, int]] = {}  # where a scalar value is

    def find(self, path: Path_, value: bool = False) -> dict[str, Any]:
        """Location of ``path`` (its value when ``value`` and known) or of its longest
        known prefix."""
        p = tuple(path)
        if value and p in self.values:
            f, line, col = self.values[p]
            return {"file": f, "line": line, "col": col}
        while True:
            if p in self.marks:
                f, line, col = self.marks[p]
                return {"file": f, "line": line, "col": col}
            if not p:
                return {}
            p = p[:-1]


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def _key_path(dotted: str) -> Path_:
    """``losses.1.name`` -> ``("losses", 1, "name")`` (the inverse of :func:`_dotted`)."""
    return tuple(int(part) if part.isdigit() else part for part in dotted.split(".")) if dotted else ()


def _load_yaml(path: Path, loc: _Loc, problems: list[Problem]) -> Any:
    """Parse one YAML file with the safe loader, recording the mark of every key."""
    shown = str(path)
    try:
        text = yamlsafe.read_text(path)  # bounded: a huge file is not read to its end
    except FileNotFoundError:
        problems.append(Problem(f"recipe file not found: {shown}"))
        return None
    except yamlsafe.YamlLimitError as exc:
        problems.append(Problem(f"YAML error: {exc.problem}", file=shown, line=1, col=1))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(f"cannot read recipe {shown}: {exc}"))
        return None
    try:
        node = yamlsafe.compose(text)  # limits on size, depth, nodes and aliases
        if node is None:
            problems.append(Problem("recipe is empty", file=shown, line=1, col=1))
            return None
        key_problems: list[Problem] = []
        _walk(node, (), shown, loc, key_problems)
        if key_problems:
            problems.extend(key_problems)
            return None
        return yamlsafe.construct(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        msg = exc.problem or "invalid YAML"
        if "could not determine a constructor" in (exc.problem or ""):
            msg = f"{exc.problem.replace('could not determine a constructor for the tag', 'tag')} is not allowed (recipes are plain YAML: only safe tags)"
        elif exc.context:
            msg = f"{exc.context}: {exc.problem}"
        problems.append(
            Problem(
                f"YAML error: {msg}",
                file=shown,
                line=mark.line + 1 if mark else None,
                col=mark.column + 1 if mark else None,
            )
        )
    except yaml.YAMLError as exc:
        problems.append(Problem(f"YAML error: {exc}", file=shown))
    return None


def _walk(node: yaml.Node, path: Path_, file: str, loc: _Loc, key_problems: list[Problem]) -> None:
    loc.marks[path] = (file, node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b] : 1`: not a name
                key_problems.append(Problem(f"a key must be a name, not a {'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}",
                                     path=_dotted(path), file=file, line=key_node.start_mark.line + 1,
                                     col=key_node.start_mark.column + 1))
                continue
            kind = {"tag:yaml.org,2002:timestamp": "a date", "tag:yaml.org,2002:bool": "a boolean",
                    "tag:yaml.org,2002:null": "null"}.get(key_node.tag)
            if kind is not None:  # `2020-01-01:`, `on:`, `~:` -- YAML would not make it a name
                key_problems.append(Problem(f"key {key_node.value!r} is read by YAML as {kind}, not a name; quote it "
                                     f"if a name is meant", path=_dotted(path), file=file,
                                     line=key_node.start_mark.line + 1, col=key_node.start_mark.column + 1))
                continue
            key = key_node.value
            if key in seen:
                key_problems.append(
                    Problem(
                        f"duplicate key {key!r} (first at line {seen[key]})",
                        path=_dotted(path + (key,)),
                        file=file,
                        line=key_node.start_mark.line + 1,
                        col=key_node.start_mark.column + 1,
                    )
                )
            seen[key] = key_node.start_mark.line + 1
            # point at the key: that is where a user looks for a wrong name
            loc.marks[path + (key,)] = (file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _walk_value(value_node, path + (key,), file, loc, key_problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), file, loc, key_problems)


def _walk_value(node: yaml.Node, path: Path_, file: str, loc: _Loc, key_problems: list[Problem]) -> None:
    key_mark = loc.marks[path]
    _walk(node, path, file, loc, key_problems)
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        loc.values[path] = loc.marks[path]
        loc.marks[path] = key_mark


def _is_component_block(path: Path_) -> bool:
    """Whether ``path`` is a component block (``quantizer``, ``reset``, ``losses.0``...)."""
    return (len(path) == 1 and path[0] in COMPONENT_BLOCKS) or (
        len(path) == 2 and path[0] == "losses" and isinstance(path[1], int)
    )


def _swaps_component(path: Path_, base: Any, over: Any) -> bool:
    """A component block whose ``name`` changes is replaced whole, not merged: the new
    component does not inherit the old one's params (or ``every``, ``weight``...)."""
    return (
        _is_component_block(path)
        and isinstance(base, dict)
        and isinstance(over, dict)
        and "name" in over
        and over.get("name") != base.get("name", "none" if path == ("reset",) else None)
    )


def _merge(base: Any, over: Any, path: Path_ = ()) -> Any:
    """The one merge rule of ``extends:`` and ``--set``: mappings deep-merge, except a
    component block whose ``name`` changes, which ``over`` replaces whole; anything else
    in ``over`` (lists, scalars, null) replaces ``base``."""
    if isinstance(base, dict) and isinstance(over, dict) and not _swaps_component(path, base, over):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v, path + (k,)) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


#: The most recipe files one ``extends:`` chain may hold (bounded cost, no RecursionError).
MAX_EXTENDS_DEPTH = 32


#: ``extends: vqkit:NAME`` names a recipe shipped with vqkit (its ``recipes/`` folder, package data)
SHIPPED_PREFIX = "vqkit:"


def shipped_recipes_dir() -> Path:
    """The recipes shipped with vqkit: ``vqkit/recipes`` of the installed package (package
    data; in a checkout, a link to the repository's ``recipes/``)."""
    return Path(__file__).resolve().parent / "recipes"


def shipped_recipe(ref: str, problems: list[Problem], where: dict) -> Path | None:
    """The file of ``extends: vqkit:NAME`` (NAME relative to the shipped recipes, e.g.
    ``quickstart.yaml``, ``quantizers/fashion-mnist.yaml``), or ``None`` after adding a
    located problem with the shipped names."""
    name = ref[len(SHIPPED_PREFIX):]
    root = shipped_recipes_dir()
    path = root / name
    if ".." not in Path(name).parts and not os.path.isabs(name) and path.is_file():
        return path
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml")) if root.is_dir() else []
    problems.append(Problem(f"no recipe {name!r} ships with vqkit" + suggest(name, names), path="extends", **where))
    return None


def _read_with_extends(
    path: Path, loc: _Loc, problems: list[Problem], chain: tuple[Path, ...] = ()
) -> Any:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain + (resolved,))
        problems.append(Problem(f"`extends` cycle: {cycle}", file=str(path)))
        return None
    own = _Loc()
    data = _load_yaml(path, own, problems)
    if data is None:
        return None
    if not isinstance(data, dict):
        problems.append(Problem("a recipe must be a mapping of keys", **own.find(())))
        return None
    parent_ref = data.pop("extends", None)
    if parent_ref is not None:
        if not isinstance(parent_ref, str):
            problems.append(
                Problem("must be a path to a recipe file", path="extends", **own.find(("extends",)))
            )
            parent = None
        else:
            parent_path = (path.parent / parent_ref) if not os.path.isabs(parent_ref) else Path(parent_ref)
            if parent_ref.startswith(SHIPPED_PREFIX):
                parent_path = shipped_recipe(parent_ref, problems, own.find(("extends",)))
            if parent_path is None:
                parent = None
            elif parent_path.is_dir():
                problems.append(Problem(f"{parent_path} is a directory, not a recipe file", path="extends",
                                        **own.find(("extends",), value=True)))
                parent = None
            elif not parent_path.exists():
                hint = ""
                if not parent_ref.startswith(SHIPPED_PREFIX) and not os.path.isabs(parent_ref) and (
                        shipped_recipes_dir() / parent_ref).is_file():
                    hint = f" (vqkit ships a recipe of that name: extends: {SHIPPED_PREFIX}{parent_ref})"
                problems.append(
                    Problem(f"recipe file not found: {parent_path}{hint}", path="extends",
                            **own.find(("extends",), value=True))
                )
                parent = None
            elif parent_path.resolve() in (*chain, resolved):  # located at the `extends` that closes the cycle
                cycle = " -> ".join(str(p) for p in (*chain, resolved, parent_path.resolve()))
                problems.append(Problem(f"`extends` cycle: {cycle}", path="extends", **own.find(("extends",), value=True)))
                parent = None
            elif len(chain) + 1 >= MAX_EXTENDS_DEPTH:
                problems.append(Problem(
                    f"`extends` chain deeper than {MAX_EXTENDS_DEPTH} recipe files (starting at {chain[0] if chain else resolved})",
                    path="extends", **own.find(("extends",))))
                parent = None
            else:
                parent = _read_with_extends(parent_path, loc, problems, chain + (resolved,))
        if parent is not None:
            # the child's keys override the parent's locations
            _drop_locations_under(loc, data, parent)
            loc.marks.update({k: v for k, v in own.marks.items() if k != ("extends",)})
            loc.values.update({k: v for k, v in own.values.items() if k != ("extends",)})
            return _merge(parent, data)
    loc.marks.update(own.marks)
    loc.values.update(own.values)
    return data


def _drop_locations_under(loc: _Loc, data: dict, parent: Any = None) -> None:
    """Forget parent locations of values the child replaces wholesale (lists, scalars and
    component blocks whose name changes)."""
    parent = parent if isinstance(parent, dict) else {}
    for key, value in data.items():
        if not isinstance(value, dict) or _swaps_component((key,), parent.get(key), value):
            for marks in (loc.marks, loc.values):
                for p in [p for p in marks if p[:1] == (key,)]:
                    del marks[p]


# =========================================================================== overrides
def parse_override(text: str) -> tuple[Path_, Any]:
    """``a.b.0.c=value`` -> (('a', 'b', 0, 'c'), value parsed as YAML)."""
    if "=" not in text:
        raise VqkitError(Problem(f"--set expects KEY.PATH=VALUE, got {text!r}"))
    key, _, raw = text.partition("=")
    parts: list[str | int] = []
    for part in key.strip().split("."):
        if not part:
            raise VqkitError(Problem(f"--set: empty key in {key!r}"))
        if part[0] == "-" and part[1:].isdigit():
            raise VqkitError(Problem(f"list indices count from 0 (no negative index {part})", path=key.strip(), file=SET))
        parts.append(int(part) if part.isdigit() else part)
    try:
        value = yamlsafe.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:  # one line: PyYAML's own text spans several
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        what += f" ({context})" if context else ""
        raise VqkitError(Problem(f"value {raw!r} is not valid YAML: {what}", path=key.strip(), file=SET)) from None
    return tuple(parts), value


#: the ``file`` of problems located at a ``--set`` option
SET = "--set"


def _items(path: Path_, items: list) -> str:
    n = len(items)
    return f"{_dotted(path)} has {n} item{'s' if n != 1 else ''}" + (f" (0 to {n - 1})" if n else "")


def _not_in_recipe(path: Path_) -> str:
    """Why an index into a list the recipe does not set cannot be given: its default (if
    any) is filled in after the overrides, so there is nothing to index yet."""
    return (f"{_dotted(path)} is not in the recipe (its default applies): set the whole list, "
            f"e.g. --set '{_dotted(path)}=[...]'")


def _not_a_container(value: Any) -> str:
    shown = repr(value)
    return f"it is {shown if len(shown) < 40 else shown[:37] + '...'}, not a mapping or list"


def _apply_override(data: dict, path: Path_, value: Any, loc: _Loc, problems: list[Problem]) -> None:
    cur: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(cur, dict):
            if part not in cur or cur[part] is None:
                cur[part] = [] if isinstance(nxt, int) else {}
                loc.marks[path[: i + 1]] = (SET, None, None)  # type: ignore[assignment]  # made by --set
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        else:
            if isinstance(cur, list) and not isinstance(part, int):
                why = f"{_dotted(path[:i])} is a list: give an index ({_dotted(path[:i])}.0.{part})"
            elif isinstance(cur, list) and not cur and loc.marks.get(path[:i], (None,))[0] == SET:
                why = _not_in_recipe(path[:i])
            elif isinstance(cur, list):
                why = _items(path[:i], cur)
            else:  # the value at path[:i] is a scalar
                problems.append(Problem(f"cannot descend into {_dotted(path[:i])}: {_not_a_container(cur)}",
                                        path=_dotted(path), file=SET))
                return
            problems.append(Problem(f"cannot descend into {_dotted(path[: i + 1])}: {why}",
                                    path=_dotted(path), file=SET))
            return
    last = path[-1]
    # `--set quantizer.name=fsq` swaps the component: same rule as a child recipe's block
    block = path[:-1]
    if last == "name" and _is_component_block(block) and _swaps_component(block, cur, {"name": value}):
        cur.clear()
        _forget_locations(loc, block)
    if isinstance(cur, dict):
        old = cur.get(last)
        cur[last] = _merge(old, value, path)
        if isinstance(old, dict) and isinstance(value, dict) and not _swaps_component(path, old, value):
            for key in value:  # merged: only the keys given are now from --set
                _forget_locations(loc, path + (key,))
                loc.marks[path + (key,)] = (SET, None, None)  # type: ignore[assignment]
            return
    elif isinstance(cur, list) and isinstance(last, int) and last <= len(cur):
        if last == len(cur):
            cur.append(value)
        else:
            cur[last] = _merge(cur[last], value, path)
    elif isinstance(cur, list) and isinstance(last, int):
        if not cur and loc.marks.get(path[:-1], (None,))[0] == SET:
            why = _not_in_recipe(path[:-1])
        else:
            why = f"no such item: {_items(path[:-1], cur)}; {_dotted(path[:-1])}.{len(cur)} adds one"
        problems.append(Problem(why, path=_dotted(path), file=SET))
        return
    else:
        if isinstance(cur, list):
            why = f"it is a list: give an index ({_dotted(path[:-1])}.0.{last})"
        else:
            why = _not_a_container(cur)
        problems.append(Problem(f"cannot descend into {_dotted(path[:-1])}: {why}", path=_dotted(path), file=SET))
        return
    _forget_locations(loc, path)
    loc.marks[path] = (SET, None, None)  # type: ignore[assignment]


def _forget_locations(loc: _Loc, path: Path_) -> None:
    for marks in (loc.marks, loc.values):
        for p in [p for p in marks if p[: len(path)] == path]:
            del marks[p]


# =========================================================================== validation
class Recipe:
    """A validated, normalized recipe."""

    def __init__(self, model: RecipeModel, component_params: dict[Path_, BaseModel], source: str,
                 loc: _Loc | None = None):
        self.model = model
        self.source = source
        self._params = component_params
        self._loc = loc
        #: located settings that validate but cannot take effect (see :func:`schedule_warnings`)
        self.warnings: list[Problem] = []

    def locate(self, path: str) -> dict[str, Any]:
        """``file``/``line``/``col`` of the dotted key ``path`` (or its longest located
        prefix) in the recipe files it was read from; the recipe's ``source`` alone when
        the recipe was not read from a file (e.g. from a checkpoint's copy)."""
        found = self._loc.find(_key_path(path)) if self._loc is not None else {}
        if found:
            return found
        return {} if self.source.startswith("<") else {"file": self.source}

    def set_under(self, path: str) -> list[str]:
        """The keys under the dotted ``path`` (or ``path`` itself) that a ``--set`` option
        gave, e.g. to say that a block's build problem may come from an override."""
        return _set_under(self._loc, path) if self._loc is not None else []

    @property
    def kind(self) -> str:
        """``"prior"`` for a ``kind: prior`` recipe, else ``"autoencoder"``."""
        return "prior" if isinstance(self.model, PriorRecipeModel) else "autoencoder"

    def params_of(self, *path: str | int) -> BaseModel:
        """The validated ``Params`` instance of the component at ``path`` (e.g. ``"encoder"``
        or ``("losses", 0)``)."""
        return self._params[tuple(path)]

    def to_dict(self, exclude_defaults: bool = False) -> dict[str, Any]:
        """The normalized recipe: every default filled in, component params included
        (``exclude_defaults``: only the settings that differ from their defaults)."""
        data = self.model.model_dump(mode="json", exclude={"requires"}, exclude_defaults=exclude_defaults)
        for path, params in self._params.items():
            target: Any = data
            try:
                for p in path:
                    target = target[p]
            except (KeyError, IndexError):  # the whole block is its default, params included
                continue
            dumped = params.model_dump(mode="json", exclude_defaults=exclude_defaults)
            if dumped or not exclude_defaults:
                target["params"] = dumped
            else:
                target.pop("params", None)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def sha256(self) -> str:
        """SHA-256 of the normalized recipe (every default written out): what was trained,
        exactly (the runs' ``vqkit.recipe_sha256`` tag)."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()

    def identity(self) -> str:
        """SHA-256 of the settings that differ from their defaults: what identifies a sweep.
        Unlike :meth:`sha256` it stays the same when a vqkit (or plugin) release adds a key
        with a default, and when a recipe spells a default out."""
        return hashlib.sha256(yaml.safe_dump(self.to_dict(exclude_defaults=True), sort_keys=True).encode()).hexdigest()

    def flat_params(self) -> dict[str, Any]:
        """The normalized recipe flattened to dotted keys (MLflow params)."""
        out: dict[str, Any] = {}

        def rec(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    rec(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
                for i, v in enumerate(value):
                    rec(f"{prefix}.{i}", v)
            else:
                out[prefix] = value

        rec("", self.to_dict())
        return out


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "tuple", "none"}


def _is_union_tag(part: Any) -> bool:
    """Whether a pydantic error-location part names a branch of a union
    (``constrained-int``, ``tuple[constrained-int, constrained-int]``, ``str``), not a recipe
    key (identifiers, or dotted paths such as a sweep's ``train.lr``)."""
    return isinstance(part, str) and (part in _TYPE_TAGS or re.fullmatch(r"[a-z]+(-[a-z]+)+(\[.*\])?|[a-z]+\[.*\]", part) is not None)


def _one_error_per_union(errors: list[dict]) -> list[dict]:
    """A value that fits no branch of a union gets one error per branch; keep the one that
    got furthest into its branch (the longest location: e.g. the tuple's bad item over
    "not an int"), with the branch names dropped from its location."""
    best: dict[tuple, tuple[int, int, dict]] = {}
    for i, err in enumerate(errors):
        parts = tuple(err["loc"])
        cut = next((j for j, part in enumerate(parts) if _is_union_tag(part)), None)
        key = parts[:cut] if cut is not None else ("#", i)
        depth = len(parts) - (cut or 0)
        clean = {**err, "loc": tuple(part for part in parts if not _is_union_tag(part))}
        if key not in best or depth > best[key][0]:
            best[key] = (depth, i, clean)
    return [err for _, _, err in sorted(best.values(), key=lambda v: v[1])]


def _pydantic_problems(exc: ValidationError, base: Path_, loc: _Loc, model: type[BaseModel] | None = None) -> list[Problem]:
    problems = []
    for err in _one_error_per_union(exc.errors()):
        path = base + tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # a validator's own message
        if err["type"] == "extra_forbidden" and model is not None:
            fields = _fields_at(model, tuple(err["loc"])[:-1])
            if fields is not None:
                msg = f"unknown key {str(path[-1])!r}" + (
                    suggest(str(path[-1]), fields) if fields else " (this component takes no params)"
                )
                head, dot, rest = str(path[-1]).partition(".")
                if dot and rest:  # `--set` syntax written into a file
                    msg += f"; a dotted key is --set syntax: in a recipe file, nest it ({head}: {{{rest}: ...}})"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "int_parsing" and isinstance(err.get("input"), str) and re.fullmatch(
                r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", err["input"].strip()):
            # PyYAML (YAML 1.1) reads 1e6 as text: only 1.0e6 is a number
            value = float(err["input"])
            msg = f"must be a whole number (got {err['input']!r}, which YAML reads as text: write it out" + (
                f", {int(value)})" if abs(value) < 1e16 and value == int(value) else ")")
        elif err["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be")
            close = closest(str(err.get("input")), re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", ""))))
            if close is not None:
                msg += f" (did you mean {close!r}?)"
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):  # not the class name
            msg = f"must be a mapping (got {err.get('input')!r})"
            if isinstance(err.get("input"), str) and _is_component_block(path):
                msg += f"; a component is named inside its block: {{name: {err['input']}}}"
        else:
            got = err.get("input")
            if not isinstance(got, (dict, list)) and err["type"] not in ("value_error",):
                msg = f"{msg} (got {got!r})"
        at_value = err["type"] not in ("extra_forbidden", "missing")
        problems.append(Problem(msg, path=_dotted(path), **loc.find(path, value=at_value)))
    return problems


def _fields_at(model: type[BaseModel], path: Path_) -> list[str] | None:
    """Field names of the (nested) model at ``path``, for did-you-mean on unknown keys."""
    cur: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        cur = _model_in(ann)
        if cur is None:
            return None
    return list(getattr(cur, "model_fields", {}))


def _model_in(ann: Any) -> Any:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        m = _model_in(arg)
        if m is not None:
            return m
    return None


#: the blocks a trained model needs (``vqkit eval``, :meth:`vqkit.model.VQModel.from_checkpoint`)
MODEL_BLOCKS = ("data", "encoder", "quantizer", "decoder")


def validate_data(data: Any, loc: _Loc, source: str, components: tuple[str, ...] | None = None) -> Recipe:
    """Validate a merged recipe mapping; raise one :class:`VqkitError` with every problem.
    ``components``: the blocks whose components must be registered (default: all), e.g.
    :data:`MODEL_BLOCKS` to read a trained model whose reset policy's plugin is gone."""
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise VqkitError(Problem("a recipe must be a mapping of keys", **loc.find(())))
    version = data.get("vqkit")
    if "vqkit" in data and version != SCHEMA_VERSION:
        raise VqkitError(
            Problem(
                f"unsupported recipe schema version {version!r}; this vqkit reads version {SCHEMA_VERSION}",
                path="vqkit",
                **loc.find(("vqkit",), value=True),
            )
        )
    if "kind" in data:
        return _validate_prior(data, loc, source)
    try:
        model = RecipeModel.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, (), loc, RecipeModel))
        model = None

    # component names and params, checked even when other blocks failed
    registry = get_registry()
    params: dict[Path_, BaseModel] = {}
    refs: list[tuple[Path_, str, Any]] = []
    for block, kind in COMPONENT_BLOCKS.items():
        value = data.get(block)
        if block == "reset" and value is None:
            value = {"name": "none"}
        if isinstance(value, dict):
            refs.append(((block,), kind, value))
    losses = data.get("losses")
    if isinstance(losses, list):
        for i, value in enumerate(losses):
            if isinstance(value, dict):
                refs.append((("losses", i), "perceptual_losses", value))
    sweep = data.get("sweep")
    if isinstance(sweep, dict):  # the search and launcher a `vqkit sweep` uses
        for block, kind in (("search", "searches"), ("launcher", "launchers")):
            if isinstance(sweep.get(block), dict):
                refs.append((("sweep", block), kind, sweep[block]))
    if components is not None:
        refs = [r for r in refs if r[0][0] in components]
    required, missing = requirement_problems(data.get("requires"), loc)
    problems.extend(required)
    for path, kind, ref in refs:
        name = ref.get("name")
        if not isinstance(name, str):
            if "name" not in ref:  # the block schema reported it: say which names there are
                where = _dotted(path + ("name",))
                problems[:] = [dataclasses.replace(p, message=p.message + suggest("", registry.names(kind)))
                               if p.path == where and p.message == "required key is missing" else p
                               for p in problems]
            continue  # the block schema already reported it
        if name not in registry.names(kind) or registry.clash_message(kind, name):
            problems.append(
                Problem(
                    registry.clash_message(kind, name) or registry.unknown_message(kind, name) + _missing_hint(missing),
                    path=_dotted(path + ("name",)),
                    **loc.find(path + ("name",), value=True),
                )
            )
            continue
        entry = registry.get(kind, name)
        raw = ref.get("params") or {}
        if not isinstance(raw, dict):
            continue
        try:
            params[path] = entry.cls.Params.model_validate(raw)
        except ValidationError as exc:
            for p in _pydantic_problems(exc, path + ("params",), loc, entry.cls.Params):
                problems.append(
                    dataclasses.replace(p, message=f"{p.message} [{NOUNS[kind]} {name!r}, provided by {entry.distribution or entry.plugin}]")
                )
    problems.extend(_capability_problems(data, refs, registry, loc))
    if problems:
        raise VqkitError(problems)
    assert model is not None
    recipe = Recipe(model, params, source, loc)
    recipe.warnings = schedule_warnings(model, registry, loc)
    return recipe


def requirement_problems(requires: Any, loc: _Loc) -> tuple[list[Problem], list[str]]:
    """Check a recipe's ``requires:`` against the installed distributions: a problem at
    ``requires.N`` for each one that is not installed, not the version required, or not a
    requirement (with its install line), and the names of those not installed."""
    from packaging.requirements import InvalidRequirement
    from packaging.requirements import Requirement as Req

    problems: list[Problem] = []
    missing: list[str] = []
    for i, item in enumerate(requires if isinstance(requires, list) else []):
        text = item.get("dist") if isinstance(item, dict) else item
        if not isinstance(text, str):
            continue  # the schema reports it
        where = {"path": f"requires.{i}", **loc.find(("requires", i) + (("dist",) if isinstance(item, dict) else ()),
                                                     value=True)}
        try:
            req = Req(text)
        except InvalidRequirement:
            problems.append(Problem(f"{text!r} is not a requirement (a distribution name with an optional version, "
                                    "e.g. vqkit-fsq>=0.1)", **where))
            continue
        install = item.get("install") if isinstance(item, dict) else None
        how = f" (install it: {install if isinstance(install, str) and install else 'pip install ' + repr(text)})"
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            missing.append(req.name)
            problems.append(Problem(f"distribution {req.name!r} is not installed{how}", **where))
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(Problem(f"distribution {req.name!r} is {version}, the recipe requires {text}{how}", **where))
    return problems, missing


def _missing_hint(missing: list[str]) -> str:
    """What an unknown component of a recipe whose ``requires:`` are not all installed adds."""
    return f"; the recipe requires {', '.join(missing)}: not installed" if missing else ""


def schedule_warnings(model: RecipeModel, registry: Any, loc: _Loc | None = None) -> list[Problem]:
    """Settings that validate but never take effect, each located at its key: a reset
    policy that is never called because ``reset.every`` (or ``reset.start_step``) puts its
    first call past the last step, or because ``reset.stop_step`` comes before it (the
    trainer calls it after 0-based step ``s`` when ``s >= start_step``, ``(s + 1) % every
    == 0`` and ``s <= stop_step``; :func:`vqkit.train.codebook.reset_due`); a loss or the
    discriminator whose ``start_step`` is at or past ``train.steps``."""
    loc = loc or _Loc()
    return _reset_warnings(model, registry, loc) + _start_warnings(model, loc)


def _start_warnings(model: RecipeModel, loc: _Loc) -> list[Problem]:
    """A loss or discriminator whose ``start_step`` is past the last step (0-based steps run
    ``0 .. train.steps - 1``; a part starts at ``step >= start_step``). (``r1_every`` with
    ``r1: 0`` is not warned about: a sweep shares it between children with and without R1.)"""
    steps, out = model.train.steps, []
    for i, loss in enumerate(model.losses):
        if loss.start_step >= steps:
            out.append(Problem(f"{loss.start_step} >= train.steps {steps}: loss {loss.name!r} never applies "
                               f"(steps run 0 to {steps - 1})",
                               path=f"losses.{i}.start_step", **loc.find(("losses", i, "start_step"), value=True)))
    disc = model.discriminator
    if disc is None:
        return out
    if disc.start_step >= steps:
        out.append(Problem(f"{disc.start_step} >= train.steps {steps}: the discriminator never trains, so its "
                           f"adversarial term{', R1' if disc.r1 else ''}{', LeCam' if disc.lecam else ''} and any "
                           f"discriminator-feature loss never act (steps run 0 to {steps - 1})",
                           path="discriminator.start_step",
                           **loc.find(("discriminator", "start_step"), value=True)))
    return out


def _reset_warnings(model: RecipeModel, registry: Any, loc: _Loc) -> list[Problem]:
    rc, steps = model.reset, model.train.steps
    if rc.name not in registry.names("reset_policies"):  # read without its block (MODEL_BLOCKS)
        return []
    if getattr(registry.get("reset_policies", rc.name).cls, "never_resets", False):
        return []
    first = -(-(rc.start_step + 1) // rc.every) * rc.every - 1  # 0-based step of the first call
    who = f"reset policy {rc.name!r} never runs"
    out: list[Problem] = []
    if first >= steps:
        key = "every" if rc.every > steps else "start_step"
        said = f"{rc.every} > train.steps {steps}" if key == "every" else f"{rc.start_step}"
        out.append(Problem(f"{said}: {who} (its first call would be at step {first}; steps run 0 to {steps - 1})",
                           path=f"reset.{key}", **loc.find(("reset", key), value=True)))
    elif rc.stop_step is not None and rc.stop_step < first:
        out.append(Problem(f"{rc.stop_step} comes before the first reset (at step {first}: every {rc.every} steps "
                           f"from start_step {rc.start_step}): {who}",
                           path="reset.stop_step", **loc.find(("reset", "stop_step"), value=True)))
    return out


def _provider(entry: Any) -> str:
    """``'fsq' (vqkit-fsq 0.1.0)``: a component and the distribution that provides it."""
    dist = entry.distribution or f"plugin {entry.plugin}"
    return f"{entry.name!r} ({dist}{' ' + entry.version if entry.version else ''})"


def _capability_problems(data: dict, refs: list[tuple[Path_, str, Any]], registry: Any, loc: _Loc) -> list[Problem]:
    """Combinations of components their declared capabilities rule out (see
    :mod:`vqkit.interfaces`, "Capabilities"), located in the recipe."""
    entries: dict[Path_, Any] = {}
    for path, kind, ref in refs:
        name = ref.get("name")
        if isinstance(name, str) and name in registry.names(kind) and not registry.clash_message(kind, name):
            entries[path] = registry.get(kind, name)
    problems = []
    quantizer, reset = entries.get(("quantizer",)), entries.get(("reset",))
    if quantizer is not None and reset is not None:
        if quantizer.cls.fixed_codebook and not reset.cls.never_resets:
            where = ("reset", "name") if isinstance(data.get("reset"), dict) else ("reset",)
            problems.append(
                Problem(
                    f"reset policy {_provider(reset)} replaces codes, but quantizer "
                    f"{_provider(quantizer)} has a fixed code-book (it declares "
                    "fixed_codebook = True); use `reset: {name: none}` or another quantizer",
                    path=_dotted(where),
                    **loc.find(where, value=True),
                )
            )
    disc = data.get("discriminator")
    has_disc = disc is not None  # not a mapping: the block's own error says so
    nulled = ""
    if "discriminator" in data and disc is None:  # `discriminator:` or `--set discriminator=null` removed it
        at = loc.find(("discriminator",))
        if at:
            where = at["file"] + (f":{at['line']}:{at['col']}" if at.get("line") else "")
            nulled = f" (`discriminator` is null at {where})"
    for path, entry in entries.items():
        if path[0] == "losses" and entry.cls.needs_discriminator and not has_disc:
            where = path + ("name",)
            problems.append(
                Problem(
                    f"loss {_provider(entry)} needs a discriminator (it declares "
                    f"needs_discriminator = True) but the recipe has no `discriminator` block{nulled}; "
                    "add e.g. `discriminator: {name: patchgan}`",
                    path=_dotted(where),
                    **loc.find(where, value=True),
                )
            )
    return problems


# =========================================================================== prior recipes
class AutoencoderRef(_Block):
    run: Optional[str] = Field(
        None, description="the trained autoencoder: MLflow run id (or unique id prefix, or run name), run dir or checkpoint file "
        "(relative paths: from the working directory); wins over `experiment`"
    )
    experiment: Optional[str] = Field(
        None, description="when `run` is not given: the newest finished run of this MLflow "
        "experiment (in the prior's tracking store)"
    )
    cache_dir: str = Field(
        "runs/codes", description="folder of the cached codes of the train and test splits, one "
        "file per autoencoder checkpoint (named by its SHA-256)"
    )
    batch_size: int = Field(500, ge=1, description="images per batch when computing the codes")


class PriorRef(ComponentRef):
    class_conditional: bool = Field(
        False, description="condition on the data set's class labels (it must expose `labels`)"
    )


class PriorEvalConfig(_Block):
    num_samples: int = Field(10000, ge=1, description="test grids used for prior/test_bpd")
    batch_size: int = Field(500, ge=1, description="grids per batch for evaluation")
    grid_samples: int = Field(
        40, ge=1, description="samples decoded into each sample grid (class-conditional: "
        "spread evenly over the classes, one row per class)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the grids")
    top_k: Optional[int] = Field(None, ge=1, description="keep the k likeliest codes (null: all)")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="nucleus sampling mass (null: off)")
    fd_samples: int = Field(
        0, ge=0, description="at the end of training, the feature distance of this many samples "
        "against as many reconstructions of test images (0: off; else at least 512, the Frechet "
        "distance's minimum)"
    )

    @field_validator("fd_samples")
    @classmethod
    def _fd_minimum(cls, value: int) -> int:
        from vqkit.metrics import FD_MIN_SAMPLES

        if 0 < value < FD_MIN_SAMPLES:  # found only after training otherwise, with the run FAILED
            raise ValueError(f"needs at least {FD_MIN_SAMPLES} (the Frechet distance's minimum), or 0 for off; got {value}")
        return value


class PriorRecipeModel(_Block):
    vqkit: Literal[1] = Field(description="recipe schema version")
    kind: Literal["prior"] = Field(description="`prior`: a model of an autoencoder's codes")
    name: str = Field(description="experiment name")
    requires: list[RequirementItem] = REQUIRES_FIELD
    seed: int = Field(0, ge=0, le=2**32 - 1, description="global seed (0 to 2^32 - 1, as numpy takes)")
    autoencoder: AutoencoderRef
    prior: PriorRef
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: PriorEvalConfig = Field(default_factory=PriorEvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def _validate_prior(data: dict, loc: _Loc, source: str) -> Recipe:
    """Validate a ``kind: prior`` recipe (same error reporting as autoencoder recipes)."""
    if data.get("kind") != "prior":
        raise VqkitError(Problem(
            f"unknown recipe kind {data.get('kind')!r} (valid: prior; leave `kind` out for an "
            "autoencoder recipe)", path="kind", **loc.find(("kind",), value=True)))
    problems: list[Problem] = []
    model = None
    blocks = [b for b in (*COMPONENT_BLOCKS, "losses") if b in data and b not in PriorRecipeModel.model_fields]
    if blocks:  # e.g. `kind: prior` on top of an autoencoder recipe: one error, not one per block
        raise VqkitError(Problem(
            f"a prior recipe (kind: prior) has no autoencoder blocks, but this one has {', '.join(blocks)} "
            "(does it extend an autoencoder recipe?); it names its trained autoencoder in "
            "`autoencoder: {run: ...}`", path="kind", **loc.find(("kind",), value=True)))
    try:
        model = PriorRecipeModel.model_validate(data)
        if model.autoencoder.run is None and model.autoencoder.experiment is None:
            problems.append(Problem(
                "name the trained autoencoder: `run` (MLflow run id, run dir or checkpoint) or "
                "`experiment`", path="autoencoder", **loc.find(("autoencoder",))))
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, (), loc, PriorRecipeModel))
    params: dict[Path_, BaseModel] = {}
    required, missing = requirement_problems(data.get("requires"), loc)
    problems.extend(required)
    ref = data.get("prior")
    registry = get_registry()
    if isinstance(ref, dict) and isinstance(ref.get("name"), str):
        name = ref["name"]
        if name not in registry.names("priors"):
            problems.append(Problem(registry.unknown_message("priors", name) + _missing_hint(missing), path="prior.name",
                                    **loc.find(("prior", "name"), value=True)))
        elif isinstance(ref.get("params") or {}, dict):
            entry = registry.get("priors", name)
            try:
                params[("prior",)] = entry.cls.Params.model_validate(ref.get("params") or {})
            except ValidationError as exc:
                for p in _pydantic_problems(exc, ("prior", "params"), loc, entry.cls.Params):
                    problems.append(dataclasses.replace(
                        p, message=f"{p.message} [prior {name!r}, provided by {entry.distribution or entry.plugin}]"))
    if problems:
        raise VqkitError(problems)
    assert model is not None
    return Recipe(model, params, source, loc)


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override, validate and normalize the recipe at ``path``."""
    problems: list[Problem] = []
    loc = _Loc()
    data = _read_with_extends(Path(path), loc, problems)
    if problems:
        raise VqkitError(_in_order(problems, loc))
    recipe = _override_and_validate(data, loc, str(path), overrides)
    for problem in recipe.warnings:  # one line per command: same text, same place -> shown once
        warnings.warn(str(problem), RecipeWarning, stacklevel=1)
    return recipe


def recipe_from_dict(
    data: dict[str, Any], source: str = "<dict>", overrides: list[str] | tuple[str, ...] = (),
    components: tuple[str, ...] | None = None,
) -> Recipe:
    """Validate a recipe given as a mapping (e.g. read back from a checkpoint), after
    applying ``--set`` style ``overrides``; ``components`` as for :func:`validate_data`."""
    return _override_and_validate(copy.deepcopy(data), _Loc(), source, overrides, components)


def _override_and_validate(data: Any, loc: _Loc, source: str, overrides: list[str] | tuple[str, ...],
                           components: tuple[str, ...] | None = None) -> Recipe:
    problems: list[Problem] = []
    keys: list[str] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except VqkitError as exc:
            problems.extend(exc.problems)
            keys.append(text.partition("=")[0].strip())
            continue
        keys.append(_dotted(key))
        _apply_override(data, key, value, loc, problems)
    if problems:
        raise VqkitError(_in_order(problems, loc, keys))
    try:
        return validate_data(data, loc, source, components)
    except VqkitError as exc:
        raise VqkitError(_in_order(exc.problems, loc, keys)) from None


def _set_under(loc: _Loc, path: str) -> list[str]:
    """The keys at or under the dotted ``path`` that a ``--set`` option gave."""
    key = _key_path(path)
    return sorted({_dotted(k) for k, mark in loc.marks.items() if mark[0] == SET and k[:len(key)] == key and k})


def with_set_note(problem: Problem, overridden: list[str]) -> Problem:
    """``problem`` located in a file, noting the ``--set`` keys under its path: the bad value
    may be an override's rather than the file's."""
    if not overridden or problem.file == SET:
        return problem
    return dataclasses.replace(problem, message=f"{problem.message} (--set gave {', '.join(overridden)})")


def _in_order(problems: list[Problem], loc: _Loc, set_keys: list[str] = ()) -> list[Problem]:
    """Problems in reading order: by file (in the order the files were read), line and
    column; then those of ``--set`` options in their order on the command line; then
    those without a location. A file's problem names the ``--set`` keys under its path."""
    problems = [with_set_note(p, _set_under(loc, p.path)) if p.file and p.path else p for p in problems]
    files: dict[str, int] = {}
    for where in loc.marks.values():
        if where[0] != SET:
            files.setdefault(where[0], len(files))

    def set_index(path: str) -> int:
        for i, key in enumerate(set_keys):
            if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                return i
        return len(set_keys)

    def key(p: Problem) -> tuple:
        if p.file == SET:
            return (1, len(files), set_index(p.path), 0)
        if p.file is None:
            return (2, 0, 0, 0)
        return (0, files.get(p.file, len(files)), p.line or 0, p.col or 0)

    return sorted(problems, key=key)
