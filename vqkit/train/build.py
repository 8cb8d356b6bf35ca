"""Build every training component of a recipe through the plugin registry.

Context passed to component constructors (``cls(params, **context)``):

* dataset: ``split`` (``"train"``/``"test"``), ``seed`` (recipe seed);
* encoder: ``in_channels = dataset.channels``;
* quantizer: ``dim = encoder.latent_dim``;
* decoder: ``out_channels = C``, ``latent_dim = D``, ``factor = encoder.factor``;
* losses: ``channels = C``; discriminator: ``channels = C``;
* reset policy: ``codebook_size = quantizer.codebook_size``, ``dim = D``, ``seed`` (recipe seed);
  for a multi-code-book quantizer one policy per code-book ``s``, with ``dim = D_s`` (the
  width of ``quantizer.codebook(s)``) and ``seed = recipe seed + s``.

Also here: :func:`component_tags` (which component of the run came from which
distribution, for MLflow) and :func:`not_implemented_error` (a component that raised
``NotImplementedError`` at run time, as a user error naming it and its distribution).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from vqkit.errors import Problem, VqkitError
from vqkit.interfaces import CodebookResetPolicy, Dataset, Discriminator, PerceptualLoss
from vqkit.model import VQModel
from vqkit.plugins import NOUNS, get_registry
from vqkit.recipe import LossRef, Recipe, with_set_note

__all__ = [
    "Built",
    "build_datasets",
    "build_model",
    "build_losses",
    "build_discriminator",
    "build_policy",
    "build_policies",
    "build_all",
    "check_parts_meet",
    "check_runtime",
    "component_tags",
    "not_implemented_error",
    "loss_keys",
]


def _make(kind: str, name: str, params: Any, where: str, **context: Any) -> Any:
    """Construct a registered component; user errors keep their message, with a location."""
    entry = get_registry().get(kind, name)
    try:
        return entry.cls(params, **context)
    except VqkitError as exc:
        raise VqkitError(
            [dataclasses.replace(p, path=p.path or where) for p in exc.problems]
        ) from None
    except NotImplementedError as exc:
        raise VqkitError(
            Problem(
                f"{NOUNS[kind]} {_describe(entry)} cannot be built this way: {exc or 'NotImplementedError'}",
                path=where,
            )
        ) from None
    except (MemoryError, RuntimeError, TypeError, OverflowError) as exc:
        if not _out_of_memory(exc):
            raise
        asked = re.search(r"allocate (\d+) bytes", str(exc))
        what = (f"one tensor of {int(asked.group(1)) / 2**30:,.1f} GiB" if asked else "a size past 2^63"
                if "overflow" in str(exc).lower() else (_first_line(exc) or "MemoryError"))
        raise VqkitError(Problem(
            f"{NOUNS[kind]} {_describe(entry)} does not fit in memory with these params ({what}); "
            "lower its sizes", path=where)) from None


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (a size a user chose), not a bug."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(  # a size past 2^63 does not even reach the allocator
        s in text for s in ("can't allocate memory", "out of memory", "not enough memory", "overflow when unpacking"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def build_datasets(recipe: Recipe) -> tuple[Dataset, Dataset]:
    """The ``(train, test)`` splits of the recipe's data set."""
    ref = recipe.model.data
    params = recipe.params_of("data")
    splits, problems = [], []
    for split in ("train", "test"):  # both built, so the problems of both are reported at once
        try:
            splits.append(_make("datasets", ref.name, params, "data", split=split, seed=recipe.model.seed))
        except VqkitError as exc:
            problems.append(exc.problems)
    if problems:
        raise VqkitError(merge_problems(problems))
    train, test = splits
    for split, ds in (("train", train), ("test", test)):
        if len(ds) == 0:
            raise VqkitError(Problem(f"data set {ref.name!r} has an empty {split} split", path="data"))
    if tuple(train.image_size) != tuple(test.image_size) or train.channels != test.channels:
        raise VqkitError(
            Problem(
                f"data set {ref.name!r}: train images are {train.channels}x{tuple(train.image_size)}, "
                f"test images {test.channels}x{tuple(test.image_size)}; they must agree",
                path="data",
            )
        )
    return train, test


#: a data set's problem that stands for more of the same ("... and 12 more images that ...")
_MORE = re.compile(r"^\.\.\. and (\d+) more (.*)$")


def merge_problems(lists: list[list[Problem]], limit: int = 20) -> list[Problem]:
    """The problems of several splits (or checks) as one list: each once, at most ``limit``
    shown, the rest counted in one last "... and N more ..." problem."""
    seen: dict[str, Problem] = {}
    hidden, what, template = 0, "", None
    for problems in lists:
        for p in problems:
            more = _MORE.match(p.message)
            if more:
                hidden += int(more.group(1))
                what, template = more.group(2), p
            else:
                seen.setdefault(str(p), p)
    out = list(seen.values())
    hidden += max(0, len(out) - limit)
    out = out[:limit]
    if hidden:
        base = template or out[-1]
        out.append(dataclasses.replace(base, message=f"... and {hidden} more {what or 'problems'}",
                                       line=None, col=None))
    return out


def build_model(recipe: Recipe, channels: int) -> VQModel:
    """Encoder, quantizer and decoder for images with ``channels`` channels."""
    m = recipe.model
    encoder = _make("encoders", m.encoder.name, recipe.params_of("encoder"), "encoder", in_channels=channels)
    dim, factor = int(encoder.latent_dim), int(encoder.factor)
    quantizer = _make("quantizers", m.quantizer.name, recipe.params_of("quantizer"), "quantizer", dim=dim)
    decoder = _make(
        "decoders", m.decoder.name, recipe.params_of("decoder"), "decoder",
        out_channels=channels, latent_dim=dim, factor=factor,
    )
    return VQModel(encoder, quantizer, decoder)


def check_image_size(model: VQModel, image_size: tuple[int, int]) -> None:
    """The data's ``(H, W)`` must be divisible by the encoder's factor."""
    h, w = (int(v) for v in image_size)
    f = model.factor
    if h % f or w % f:
        raise VqkitError(
            Problem(
                f"images are {h}x{w} but the encoder downsamples by {f}: both sides must be "
                f"divisible by {f} (resize/crop the data or change the encoder's factor)",
                path="encoder",
            )
        )


def loss_keys(refs: list[LossRef]) -> list[str]:
    """Metric names ``loss/<name>`` of the recipe's losses (``loss/<name>.<i>`` for repeats)."""
    names = [r.name for r in refs]
    keys = []
    for i, name in enumerate(names):
        keys.append(f"loss/{name}" if names.count(name) == 1 else f"loss/{name}.{i}")
    return keys


def build_losses(recipe: Recipe, channels: int) -> nn.ModuleList:
    """One module per ``losses`` entry (same order as the recipe)."""
    out = nn.ModuleList()
    for i, ref in enumerate(recipe.model.losses):
        loss = _make(
            "perceptual_losses", ref.name, recipe.params_of("losses", i), f"losses.{i}", channels=channels
        )
        out.append(loss)
    return out


def build_discriminator(recipe: Recipe, channels: int) -> Discriminator | None:
    """The recipe's discriminator, or ``None`` when it has none."""
    ref = recipe.model.discriminator
    if ref is None:
        return None
    return _make("discriminators", ref.name, recipe.params_of("discriminator"), "discriminator", channels=channels)


def build_policy(recipe: Recipe, model: VQModel) -> CodebookResetPolicy:
    """The code-book reset policy (``none`` when the recipe has no ``reset`` block)."""
    ref = recipe.model.reset
    return _make(
        "reset_policies", ref.name, recipe.params_of("reset"), "reset",
        codebook_size=model.codebook_size, dim=model.latent_dim, seed=recipe.model.seed,
    )


def build_policies(recipe: Recipe, model: VQModel) -> list[CodebookResetPolicy]:
    """One reset policy per code-book of the quantizer (a single one for most quantizers, and
    for a multi-code-book quantizer with ``shared_reset``)."""
    quantizer = model.quantizer
    if not getattr(type(quantizer), "multi_codebook", False):
        return [build_policy(recipe, model)]
    ref = recipe.model.reset
    if getattr(quantizer, "shared_reset", False):  # one policy over the S x K codes of all stages
        return [_make(
            "reset_policies", ref.name, recipe.params_of("reset"), "reset",
            codebook_size=model.codebook_size * int(quantizer.num_codebooks),
            dim=int(quantizer.codebook(0).shape[1]), seed=recipe.model.seed,
        )]
    return [
        _make(
            "reset_policies", ref.name, recipe.params_of("reset"), "reset",
            codebook_size=model.codebook_size, dim=int(quantizer.codebook(s).shape[1]),
            seed=recipe.model.seed + s,
        )
        for s in range(int(quantizer.num_codebooks))
    ]


@dataclasses.dataclass
class Built:
    """Everything a training run is made of."""

    recipe: Recipe
    train_data: Dataset
    test_data: Dataset
    model: VQModel
    losses: nn.ModuleList
    discriminator: Discriminator | None
    policy: CodebookResetPolicy
    #: one policy per code-book (``[policy]`` unless the quantizer has several)
    policies: list[CodebookResetPolicy] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.policies:
            self.policies = [self.policy]

    @property
    def channels(self) -> int:
        return int(self.train_data.channels)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.train_data.image_size)  # type: ignore[return-value]


def build_all(recipe: Recipe, check: bool = True) -> Built:
    """Build the data sets, model, losses, discriminator and reset policy; with ``check``
    (what ``vqkit train`` and ``vqkit validate --build`` do) also :func:`check_parts_meet`."""
    train, test = build_datasets(recipe)
    c = int(train.channels)
    model = build_model(recipe, c)
    check_image_size(model, tuple(train.image_size))
    losses = build_losses(recipe, c)
    for i, loss in enumerate(losses):
        if not isinstance(loss, PerceptualLoss):  # pragma: no cover - registry checks classes
            raise TypeError(f"losses.{i} is not a PerceptualLoss")
    disc = build_discriminator(recipe, c)  # a loss that needs one: checked by validate
    policies = build_policies(recipe, model)
    built = Built(recipe, train, test, model, losses, disc, policies[0], policies)
    if check:
        check_parts_meet(built)
    return built


def check_runtime(recipe: Recipe) -> None:
    """What ``vqkit train`` needs of this machine besides the parts: the ``train.device``
    (CUDA present, the index visible), the weights of the ``eval.metrics`` networks and a
    ``tracking.output_dir`` that can be a folder;
    problems located at those keys (``vqkit validate --build`` runs it)."""
    from vqkit.metrics import MetricSet
    from vqkit.train.distributed import resolve_device
    from vqkit.train.loop import check_output_dir

    found = []
    for key, check in (("train.device", lambda: resolve_device(recipe.model.train.device)),
                       ("eval.metrics", lambda: MetricSet(recipe.model.eval.metrics, device="cpu")),
                       ("tracking.output_dir", lambda: check_output_dir(recipe))):
        try:
            check()
        except VqkitError as exc:
            found.append([dataclasses.replace(p, path=p.path or key) for p in exc.problems])
    if found:
        raise VqkitError(merge_problems(found))


def in_recipe_file(exc: VqkitError, recipe: Recipe) -> VqkitError:
    """``exc`` with its unlocated problems (a build or dry-batch problem names its recipe
    block only) located at that block in the recipe file that set it (file, line, column,
    as ``vqkit validate`` locates its problems); a recipe built from a plain dict
    (``<dict>``) has no file to name."""
    located = []
    for p in exc.problems:
        if not p.file:
            p = dataclasses.replace(p, **recipe.locate(p.path))
            p = with_set_note(p, recipe.set_under(p.path) if p.path else [])  # the bad value may be an override's
        located.append(p)
    return VqkitError(located)


#: images in the batch :func:`check_parts_meet` pushes through the parts
CHECK_BATCH = 2


class _Stage:
    """Runs one component on the dry batch; what it raises becomes a user error located
    at its recipe block and naming it (and its distribution)."""

    def __init__(self, built: Built, shape: tuple[int, ...]):
        self.built = built
        self.entries = dict(_used_entries(built.recipe))
        self.shape = "x".join(str(v) for v in shape)

    def __call__(self, block: str, what: str, fn: Any) -> Any:
        try:
            return fn()
        except VqkitError as exc:
            raise VqkitError([dataclasses.replace(p, path=p.path or block) for p in exc.problems]) from None
        except NotImplementedError as exc:
            raise not_implemented_error(exc, self.built, self.built.recipe) from None
        except Exception as exc:  # a component's own shape/type error: name the component
            self.fail(block, what, f"{type(exc).__name__}: {_first_line(exc)}", exc)

    def fail(self, block: str, what: str, detail: str, cause: BaseException | None = None) -> None:
        from vqkit.recipe import COMPONENT_BLOCKS

        entry = self.entries.get(block)
        kind = NOUNS[COMPONENT_BLOCKS.get(block.split(".")[0], "perceptual_losses")]
        who = _describe(entry) if entry is not None else block
        raise VqkitError(
            Problem(f"{kind} {who} failed {what} (a dry batch of {self.shape} images): {detail}", path=block)
        ) from cause


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "(no message)"


def check_parts_meet(built: Built) -> None:
    """Push one batch of the data's image shape (``CHECK_BATCH`` random images in
    ``[-1, 1]``) through encoder, quantizer, decoder, ``decode_indices``, every loss and
    the discriminator, as a training step and an evaluation would, so a mismatch that only
    shows when the parts meet (an image too small for a discriminator or a loss's network,
    a decoder that returns another size, a plugin's own shape error) is a located user
    error before any run is created. Runs in eval mode without gradients; the modules'
    state, training flags and the random number generators are left as they were."""
    import random

    import numpy as np
    import torch

    from vqkit import gan
    from vqkit.train.objective import convert_range

    recipe, model, disc = built.recipe, built.model, built.discriminator
    c, (h, w) = built.channels, built.image_size
    shape = (CHECK_BATCH, c, h, w)
    stage = _Stage(built, shape)
    modules = [m for m in (model, disc, *built.losses) if m is not None]
    flags = [(m, m.training) for mod in modules for m in mod.modules()]
    # buffers (EMA code-books, usage counters, running statistics) as they were
    saved = [(m, name, buf, buf.detach().clone()) for mod in modules for m in mod.modules()
             for name, buf in m._buffers.items() if buf is not None]
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            x = torch.rand(shape) * 2 - 1
            for mod in modules:
                mod.eval()
            f, d = model.factor, model.latent_dim
            z = stage("encoder", "to encode", lambda: model.encoder(x))
            if tuple(z.shape) != (CHECK_BATCH, d, h // f, w // f):
                stage.fail("encoder", "to encode", f"returned {tuple(z.shape)}, expected "
                           f"{(CHECK_BATCH, d, h // f, w // f)} (latent_dim {d}, factor {f})")
            out = stage("quantizer", "to quantize", lambda: model.quantizer(z))
            if tuple(out.quantized.shape) != tuple(z.shape):
                stage.fail("quantizer", "to quantize", f"returned quantized latents {tuple(out.quantized.shape)} "
                           f"for latents {tuple(z.shape)}")
            recon = stage("decoder", "to decode", lambda: model.decoder(out.quantized))
            if tuple(recon.shape) != shape:
                stage.fail("decoder", "to decode", f"returned {tuple(recon.shape)}, expected {shape}")
            again = stage("quantizer", "in decode_indices", lambda: model.quantizer.decode_indices(out.indices))
            if tuple(again.shape) != tuple(out.quantized.shape):
                stage.fail("quantizer", "in decode_indices", f"returned {tuple(again.shape)}, expected "
                           f"{tuple(out.quantized.shape)}")
            recon = recon.float()
            problems: list[Problem] = []  # the losses and the discriminator: each reported

            def loss_check(i: int, loss: Any) -> None:
                rng = getattr(loss, "input_range", (-1.0, 1.0))
                needs = disc if getattr(loss, "needs_discriminator", False) else None
                value = stage(f"losses.{i}", "to compute its loss", lambda: loss(
                    convert_range(recon, rng), convert_range(x, rng), discriminator=needs))
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    stage.fail(f"losses.{i}", "to compute its loss", f"returned {got}, expected a 0-dim tensor")

            def disc_check() -> None:
                ref = recipe.model.discriminator
                stage("discriminator", "to judge images", lambda: (
                    gan.discriminator_loss(ref.loss, disc(x).float(), disc(recon).float()),
                    gan.generator_loss(ref.loss, disc(recon).float())))
                if ref.r1 > 0:  # R1 differentiates the discriminator twice
                    stage("discriminator", "to take R1's gradient penalty (discriminator.r1: a second "
                          "derivative)", lambda: r1_check(ref))

            def r1_check(ref: Any) -> None:
                with torch.enable_grad():
                    real = x.clone().requires_grad_(True)
                    penalty = gan.r1_penalty(real, disc(real))
                    # backward, as a training step takes it (autograd.grad of the weights alone
                    # can miss a once-differentiable op); the weights' .grad are put back
                    params = list(disc.parameters())
                    grads = [p.grad for p in params]
                    try:
                        penalty.backward()
                    finally:
                        for p, g in zip(params, grads):
                            p.grad = g

            disc_problems: list[Problem] = []
            if disc is not None:  # first: a loss that runs a failing discriminator would fail alike
                try:
                    disc_check()
                except VqkitError as exc:
                    disc_problems = list(exc.problems)
            for i, loss in enumerate(built.losses):
                if disc_problems and getattr(loss, "needs_discriminator", False):
                    continue  # the discriminator's own problem says it (once)
                try:
                    loss_check(i, loss)
                except VqkitError as exc:
                    problems.extend(exc.problems)
            problems += disc_problems  # reported after the losses, in recipe order
            if problems:
                raise VqkitError(problems)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        with torch.no_grad():
            for m, name, buf, copy in saved:
                buf.copy_(copy)  # in place: other references to the buffer see it too
                m._buffers[name] = buf
        for m, flag in flags:
            m.training = flag


def _used_entries(recipe: Recipe, blocks: tuple[str, ...] | None = None) -> list[tuple[str, Any]]:
    """``(block, registry entry)`` of every component the recipe uses (``losses.<i>``; a
    ``kind: prior`` recipe: ``prior``); ``blocks``: only those (e.g. ``MODEL_BLOCKS``)."""
    from vqkit.recipe import COMPONENT_BLOCKS

    m = recipe.model
    if recipe.kind == "prior":
        return [("prior", get_registry().get("priors", m.prior.name))]
    out = []
    for block, kind in COMPONENT_BLOCKS.items():
        ref = getattr(m, block)
        if ref is not None and (blocks is None or block in blocks):
            out.append((block, get_registry().get(kind, ref.name)))
    if blocks is None or "losses" in blocks:
        for i, ref in enumerate(m.losses):
            out.append((f"losses.{i}", get_registry().get("perceptual_losses", ref.name)))
    return out


def _describe(entry: Any) -> str:
    dist = entry.distribution or "no distribution"
    return f"{entry.name} ({dist}{' ' + entry.version if entry.version else ''})"


def component_tags(recipe: Recipe, frozen: dict[str, Recipe] | None = None) -> dict[str, str]:
    """MLflow tags naming where each component of the run came from:
    ``vqkit.component.<block> = name (distribution version)``, plus
    ``vqkit.component.<block>.plugin`` (the entry point) and ``vqkit.plugins``: the
    distributions the run used (``dist==version``, sorted). ``frozen``: trained models the
    run also uses, by name (a prior's ``{"autoencoder": its recipe}``): their model
    components are tagged ``vqkit.component.<name>.<block>`` and count as used."""
    from vqkit.recipe import MODEL_BLOCKS

    tags: dict[str, str] = {}
    used = set()
    entries = list(_used_entries(recipe))
    for name, other in (frozen or {}).items():
        entries += [(f"{name}.{block}", entry) for block, entry in _used_entries(other, MODEL_BLOCKS)]
    for block, entry in entries:
        tags[f"vqkit.component.{block}"] = _describe(entry)
        tags[f"vqkit.component.{block}.plugin"] = entry.plugin
        if entry.distribution:
            used.add(f"{entry.distribution}=={entry.version}")
    tags["vqkit.plugins"] = ", ".join(sorted(used))
    return tags


def not_implemented_error(exc: NotImplementedError, built: Built | None, recipe: Recipe) -> VqkitError:
    """A component raised ``NotImplementedError`` during a run: the user error naming it
    (recipe block, name, distribution) and what it did not implement. The component is
    the innermost frame of the traceback whose ``self`` is one of the run's components."""
    import traceback

    objects: dict[int, str] = {}
    if built is not None:
        objects = {
            id(built.train_data): "data", id(built.test_data): "data",
            id(built.model.encoder): "encoder", id(built.model.quantizer): "quantizer",
            id(built.model.decoder): "decoder",
        }
        if built.discriminator is not None:
            objects[id(built.discriminator)] = "discriminator"
        for i, loss in enumerate(built.losses):
            objects[id(loss)] = f"losses.{i}"
        for policy in built.policies:
            objects[id(policy)] = "reset"
    block, method = None, None
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in objects:
            block, method = objects[id(owner)], frame.f_code.co_name
            break
    entries = dict(_used_entries(recipe))
    detail = str(exc) or "NotImplementedError"
    if block is None:
        return VqkitError(f"a component raised NotImplementedError: {detail}")
    entry = entries.get(block)
    who = _describe(entry) if entry is not None else block
    from vqkit.recipe import COMPONENT_BLOCKS

    kind = NOUNS[COMPONENT_BLOCKS.get(block.split(".")[0], "perceptual_losses")]
    return VqkitError(
        Problem(
            f"{kind} {who} does not implement {method}() ({detail}); it cannot be used this way "
            "(check its documented capabilities, or report it to its distribution)",
            path=block,
        )
    )


def missing_plugin_error(exc: VqkitError, state: dict[str, Any]) -> VqkitError:
    """``exc`` (the recipe of checkpoint ``state`` read back) with, on each component that
    is no longer registered, the distribution the run used for it (from its MLflow tag
    ``vqkit.component.<block>``) and how to install it; ``exc`` itself when unknown."""
    run = state.get("run") or {}
    uri, run_id = run.get("tracking_uri"), run.get("run_id")
    unknown = [p for p in exc.problems if p.message.startswith("unknown ") and p.path.endswith(".name")]
    if not unknown or not uri or not run_id:
        return exc
    try:
        from vqkit.tracking import _client

        tags = _client(uri).get_run(run_id).data.tags  # a lookup: never creates a store
    except Exception:  # noqa: BLE001 - the hint is a courtesy; the error stands without it
        return exc
    problems = []
    for p in exc.problems:
        who = tags.get(f"vqkit.component.{p.path.removesuffix('.name')}", "") if p in unknown else ""
        found = re.match(r"^(\S+) \((\S+) (\S+)\)$", who)
        if found and found.group(2) != "no":
            name, dist, version = found.groups()
            p = dataclasses.replace(p, message=(
                f"{p.message}; MLflow run {run_id} was trained with {name!r} from distribution "
                f"{dist}=={version}, which is not installed (pip install '{dist}=={version}')"))
        problems.append(p)
    return VqkitError(problems)
