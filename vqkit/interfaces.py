"""The component interfaces of vqkit and their tensor contracts.

Every component kind is an abstract base class here. A component class

* declares its parameters once, as a nested pydantic model ``Params``
  (subclass of :class:`Params`, unknown keys forbidden, every field described);
* is constructed by the builder as ``cls(params, **context)`` where ``params`` is
  a validated ``Params`` instance and ``context`` holds the keyword arguments
  documented on each interface (shapes the component must agree with);
* states its tensor contract in its docstring.

Conventions shared by all interfaces:

* Images are ``float32`` tensors of shape ``(B, C, H, W)`` with values in
  ``[-1, 1]`` unless a component declares another ``input_range``.
* Latents are channel-first ``(B, D, h, w)`` at every component boundary.
* Code indices are ``int64`` tensors of shape ``(B, h, w)`` (``(B, S, h, w)`` for a
  quantizer with ``S`` code-books, see :class:`Quantizer`).

Capabilities: what a component can and cannot do is declared on its class, as typed
class-level flags that each interface lists in ``CAPABILITIES`` with its default value
(``Quantizer.fixed_codebook``, ``Quantizer.multi_codebook``,
``PerceptualLoss.needs_discriminator``, ``CodebookResetPolicy.never_resets``). A component
overrides only the flags that differ from the default::

    class FSQ(Quantizer):
        fixed_codebook = True      # implicit code-book: replace_codes is not supported

The same declarations are read by ``vqkit validate`` (e.g. a reset policy that replaces
codes with a fixed-code-book quantizer is a located recipe error), by the trainer, by
``vqkit components`` and by the contract suites in :mod:`vqkit.testing` (which skip the
checks that do not apply). :meth:`Component.capabilities` returns them;
:meth:`Component.declaration_problems` is checked when a component is registered.
"""
from __future__ import annotations

import abc
import dataclasses
import types
import typing
from typing import Any, ClassVar, Mapping

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from torch import nn

__all__ = [
    "Params",
    "Component",
    "ReportsStats",
    "Encoder",
    "Decoder",
    "Quantizer",
    "QuantizerOutput",
    "PerceptualLoss",
    "CodebookResetPolicy",
    "ResetPlan",
    "Dataset",
    "Discriminator",
    "Prior",
    "Launcher",
    "Search",
    "MAX_TRIALS",
    "Dimension",
    "Objective",
    "Trial",
    "TrialOutcome",
    "TrialReporter",
    "KINDS",
]


def _numbers_in(annotation) -> tuple[bool, bool]:
    """(scalar, container): whether a field typed ``annotation`` takes a number itself, or
    a list/tuple of numbers; ``bool`` fields and unions that accept ``bool`` take neither."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _numbers_in(args[0])
    if origin in (typing.Union, types.UnionType):
        found = [_numbers_in(a) for a in args]
        if any(a is bool for a in args):
            return False, False
        return any(f[0] for f in found), any(f[1] for f in found)
    if origin in (list, tuple, set, frozenset):
        return False, any(_numbers_in(a)[0] for a in args if a is not Ellipsis)
    return annotation in (int, float), False


def reject_bool_numbers(model: type[BaseModel], value, info: ValidationInfo):
    """A YAML ``true``/``false`` where a number is expected is a mistake (``r1: true`` would
    otherwise silently be gamma 1.0): refused, for scalars and lists/tuples of numbers."""
    field = model.model_fields.get(info.field_name or "")
    if field is None:
        return value
    scalar, container = _numbers_in(field.annotation)
    if scalar and isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    if container and isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, bool):
                raise ValueError(f"expected a number, got {str(item).lower()}")
    return value


class Params(BaseModel):
    """Base class of every component's parameter schema.

    Unknown keys are rejected, and so are infinite and NaN numbers and booleans where a
    number is expected; instances are immutable. Subclasses declare each field with a type,
    a default and a ``description`` (``Field(..., description=)``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    _no_bool_numbers = field_validator("*", mode="before")(classmethod(reject_bool_numbers))


class Component:
    """Mixin holding what every component declares."""

    #: Parameter schema; override in each component.
    Params: ClassVar[type[Params]] = Params

    #: Names of the capability flags of this kind (class attributes of the interface,
    #: documented there with their default). A component class overrides the flag
    #: attributes, never this tuple.
    CAPABILITIES: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The capability flags this class declares: ``{flag: value}`` for every name in
        ``CAPABILITIES`` (defaults included)."""
        return {name: getattr(cls, name) for name in cls.CAPABILITIES}

    @classmethod
    def declaration_problems(cls) -> list[str]:
        """What is wrong with the class's declarations (checked at registration; a
        non-empty list makes the plugin ``broken``). Flags must keep their declared type."""
        problems = []
        for name in cls.CAPABILITIES:
            value = getattr(cls, name)
            if not isinstance(value, bool):
                problems.append(f"capability {name!r} must be a bool, got {value!r}")
        return problems


class ReportsStats:
    """Mixin of the kinds that produce training-time numbers besides their output
    (perceptual losses, discriminators, reset policies; quantizers return theirs in
    :attr:`QuantizerOutput.stats`).

    :meth:`stats` returns the component's declared stats: ``{name: plain float}`` about its
    most recent call (when the trainer reads it is stated on each interface). The trainer
    logs them as metrics under the component's recipe block: ``losses/<name>/<stat>`` (the
    loss's metric key without ``loss/``, e.g. ``losses/lpips/<stat>``),
    ``discriminator/<stat>``, ``reset/<stat>`` (``reset/<s>/<stat>`` for the per-code-book
    policies of a multi-code-book quantizer), like ``quantizer/<stat>``. Names are
    ``/``-separated words (``[A-Za-z0-9_.-]``), values finite floats. Default: none.
    """

    def stats(self) -> Mapping[str, float]:
        return {}


# --------------------------------------------------------------------------- encoders / decoders
class Encoder(Component, nn.Module, abc.ABC):
    """Maps images to continuous latents.

    Constructed as ``cls(params, in_channels=C)``.

    ``forward(x)``: ``x`` float32 ``(B, C, H, W)`` in ``[-1, 1]`` with ``H`` and ``W``
    divisible by :attr:`factor`; returns float ``(B, latent_dim, H/factor, W/factor)``.
    """

    #: Number of latent channels ``D`` produced.
    latent_dim: int
    #: Spatial downsampling factor.
    factor: int

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...


class Decoder(Component, nn.Module, abc.ABC):
    """Maps (quantized) latents back to images.

    Constructed as ``cls(params, out_channels=C, latent_dim=D, factor=f)``.

    ``forward(z)``: ``z`` float ``(B, D, h, w)``; returns float32 ``(B, C, h*f, w*f)``,
    unbounded but trained towards ``[-1, 1]``.
    """

    @abc.abstractmethod
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ...

    def last_layer_weight(self) -> torch.Tensor | None:
        """The weight of the final layer (for the adaptive GAN weight), or ``None``."""
        return None


# --------------------------------------------------------------------------- quantizers
@dataclasses.dataclass(frozen=True)
class QuantizerOutput:
    """What every quantizer returns, whatever its options.

    quantized: float ``(B, D, h, w)``, same dtype as the input; in training the
        straight-through estimate ``z + (q - z).detach()`` so gradients reach the encoder.
    indices: int64 ``(B, h, w)``, values in ``[0, codebook_size)``.
    losses: unweighted named loss terms (0-dim tensors), e.g. ``{"codebook": ...,
        "commitment": ...}``; a term's weight (such as β) is already applied inside the
        quantizer only where it is part of the method's definition and is then documented.
    stats: plain floats for logging (e.g. batch perplexity).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    losses: Mapping[str, torch.Tensor]
    stats: Mapping[str, float] = dataclasses.field(default_factory=dict)


class Quantizer(Component, nn.Module, abc.ABC):
    """Snaps latents to a finite code-book.

    Constructed as ``cls(params, dim=D)``.

    ``forward(z)``: ``z`` float ``(B, D, h, w)``; returns :class:`QuantizerOutput`.
    ``decode_indices(indices)`` maps int64 ``(B, h, w)`` to ``(B, D, h, w)`` and
    reproduces ``QuantizerOutput.quantized`` (forward value) exactly, in train and eval.

    Usage is counted by the trainer from ``QuantizerOutput.indices`` (over all ranks); a
    quantizer keeps no usage counter. A quantizer never resets codes by itself: resets are
    done by a :class:`CodebookResetPolicy` called by the trainer, through
    :meth:`replace_codes`. Latents holding NaN or inf may raise ``FloatingPointError``
    (the trainer stops the run as for a non-finite loss; under ``torch.distributed`` raise
    it on every rank, e.g. after an all-reduce of the check, as ``vq`` does).

    What the trainer, the telemetry and the resets use: ``codebook_size`` (``K``),
    ``dim`` (``D``), ``forward``, ``decode_indices``, ``loss_weights()``, and, when a
    reset policy other than ``none`` is used, ``to_code_space()``, ``codebook()``,
    ``replace_codes()`` and ``code_parameters()``.
    ``QuantizerOutput.stats`` are logged as ``quantizer/<name>`` metrics (averaged over
    the logging window). A k-means initialisation, if any, is the quantizer's own
    business (done inside ``forward`` in training mode, recorded in a buffer).

    Capability flags (class attributes):

    ``fixed_codebook`` (default ``False``)
        ``True`` when the code-book is fixed or implicit (e.g. FSQ's grid): codes cannot be
        replaced, ``replace_codes`` need not be implemented (the base raises
        ``NotImplementedError``), and a recipe combining it with a reset policy that
        replaces codes is rejected by ``vqkit validate``. ``codebook()`` still returns the
        ``(K, D)`` code vectors.
    ``multi_codebook`` (default ``False``)
        ``True`` when the quantizer has ``S = num_codebooks`` code-books of ``K`` codes
        each (residual VQ, product quantization). Then ``indices`` are int64
        ``(B, S, h, w)`` (stage ``s`` in ``[:, s]``), ``decode_indices`` takes that
        shape, and the per-code-book methods take the
        stage: ``codebook(stage)`` ``(K, D_s)``, ``replace_codes(idx, vectors, stage)``,
        ``code_parameters(stage)``; :meth:`stage_inputs` returns the vectors each stage
        quantized (the space of its code-book). The trainer keeps one usage monitor and
        one reset policy (built from the recipe's ``reset`` block, seed ``seed + s``) per
        code-book; ``codebook/*`` metrics are aggregated over code-books (usage and
        perplexity averaged, dead codes and resets summed) and also logged per
        code-book as ``codebook/<s>/<metric>``. A multi-code-book quantizer whose instance
        sets ``shared_reset = True`` gets one reset policy for all its code-books instead
        (built with ``codebook_size = S * K``, seed ``seed``): it observes every stage's
        :meth:`stage_inputs` with code ``k`` of stage ``s`` numbered ``s * K + k``, plans
        over the stacked code-books ``(S * K, D)``, and its plan is applied stage by stage.
    """

    codebook_size: int
    dim: int
    #: number of code-books ``S`` (instance attribute of multi-code-book quantizers)
    num_codebooks: int = 1
    #: multi-code-book quantizers: one reset policy over all code-books (``True``) or one
    #: per code-book (``False``, the default); an instance attribute, e.g. set from params
    shared_reset: bool = False

    CAPABILITIES: ClassVar[tuple[str, ...]] = ("fixed_codebook", "multi_codebook")
    fixed_codebook: ClassVar[bool] = False
    multi_codebook: ClassVar[bool] = False

    @abc.abstractmethod
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        ...

    @abc.abstractmethod
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def codebook(self) -> torch.Tensor:
        """The code vectors ``(K, D)`` (detached) in the space of encoder outputs."""

    def replace_codes(self, idx: torch.Tensor, vectors: torch.Tensor) -> None:
        """Set codes ``idx`` (int64 ``(n,)``) to ``vectors`` ``(n, D)`` given in encoder-output
        space, and reset every state that depends on those codes (e.g. EMA cluster sizes
        and sums). Mandatory unless the class declares
        ``fixed_codebook = True``. Multi-code-book quantizers take a third argument,
        ``stage``."""
        raise NotImplementedError(f"{type(self).__name__} cannot replace codes (fixed code-book)")

    def stage_inputs(self, z: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        """Multi-code-book quantizers only: given the encoder output ``z`` ``(B, D, h, w)``
        and the indices ``(B, S, h, w)`` it was quantized to, the vectors each stage
        quantized, one float ``(B, D_s, h, w)`` per stage (for residual VQ: the residual
        entering stage ``s``). The reset policies of stage ``s`` observe these."""
        raise NotImplementedError(f"{type(self).__name__} is not a multi-code-book quantizer")

    @classmethod
    def declaration_problems(cls) -> list[str]:
        problems = super().declaration_problems()
        if not cls.fixed_codebook and cls.replace_codes is Quantizer.replace_codes:
            problems.append(
                "does not implement replace_codes(): implement it, or declare "
                "`fixed_codebook = True` if its codes cannot be replaced"
            )
        if cls.multi_codebook and cls.stage_inputs is Quantizer.stage_inputs:
            problems.append("declares multi_codebook = True but does not implement stage_inputs()")
        return problems

    def loss_weights(self) -> dict[str, float]:
        """Weight of each term of ``QuantizerOutput.losses`` in the training objective
        (e.g. ``{"codebook": 1.0, "commitment": beta}``). The trainer applies them."""
        return {}

    def code_parameters(self) -> list[nn.Parameter]:
        """Parameters whose first dimension indexes codes (their optimizer state rows
        are reset with the codes). Default: none."""
        return []

    def to_code_space(self, z: torch.Tensor) -> torch.Tensor:
        """Flattened encoder outputs ``(N, D)`` as the search compares them with
        :meth:`codebook` (e.g. l2-normalized for cosine codes); the reset policies observe
        these. Default: ``z`` unchanged."""
        return z


# --------------------------------------------------------------------------- reset policies
@dataclasses.dataclass(frozen=True)
class ResetPlan:
    """Codes to replace and the vectors (encoder-output space) to put there."""

    indices: torch.Tensor  # int64 (n,)
    vectors: torch.Tensor  # float (n, D)

    def __len__(self) -> int:
        return int(self.indices.numel())


class CodebookResetPolicy(ReportsStats, Component, abc.ABC):
    """Decides which codes are dead and what replaces them.

    Constructed as ``cls(params, codebook_size=K, dim=D, seed=s)``.

    The trainer calls :meth:`observe` after every training step with the flattened
    encoder outputs ``z`` float ``(N, D)`` (detached, in the quantizer's code space:
    ``Quantizer.to_code_space``, e.g. unit vectors for cosine codes) and their code
    ``indices`` int64 ``(N,)``, and :meth:`plan` every ``reset.every`` steps; it applies a returned
    :class:`ResetPlan` through ``Quantizer.replace_codes`` and resets the optimizer
    state of those rows. Policies never mutate the quantizer themselves. Under
    distributed training, ``observe`` receives the data of all ranks and ``plan`` runs
    on rank 0 only; its plan is broadcast. With a multi-code-book quantizer the trainer
    builds one policy per code-book (seed ``seed + s``), each seeing only its stage.

    Capability flag: ``never_resets`` (default ``False``): the policy never returns a
    plan (like ``none``); only such policies may be combined with a quantizer that
    declares ``fixed_codebook = True``.

    Stats (:meth:`stats`, :class:`ReportsStats`): read after every step's ``observe`` (and
    ``plan`` when one was due), the values at the end of each logging window logged as
    ``reset/<stat>``.
    """

    CAPABILITIES: ClassVar[tuple[str, ...]] = ("never_resets",)
    never_resets: ClassVar[bool] = False

    def observe(self, z: torch.Tensor, indices: torch.Tensor) -> None:  # noqa: B027
        """Record a batch of encoder outputs and assignments."""

    @abc.abstractmethod
    def plan(self, codebook: torch.Tensor, step: int) -> ResetPlan | None:
        """Return the codes to reset given the current code-book ``(K, D)``, or ``None``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027
        pass


# --------------------------------------------------------------------------- losses
class PerceptualLoss(ReportsStats, Component, nn.Module, abc.ABC):
    """A reconstruction / perceptual distance between images.

    Constructed as ``cls(params, channels=C)``.

    ``forward(reconstruction, target, discriminator=None)``: both float32
    ``(B, C, H, W)`` in :attr:`input_range` (the trainer converts from ``[-1, 1]``);
    returns a 0-dim float tensor, differentiable w.r.t. ``reconstruction``.
    Losses with ``needs_discriminator = True`` receive the trained discriminator and must
    not update it (they are computed with its parameters frozen).

    Capability flag: ``needs_discriminator`` (default ``False``): the loss reads the
    recipe's discriminator; ``vqkit validate`` rejects a recipe using it without a
    ``discriminator`` block.

    Stats (:meth:`stats`, :class:`ReportsStats`): read after each training-step ``forward``
    (e.g. the loss's parts before they are summed), averaged over the logging window and
    logged as ``losses/<name>/<stat>``.
    """

    input_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)
    CAPABILITIES: ClassVar[tuple[str, ...]] = ("needs_discriminator",)
    needs_discriminator: ClassVar[bool] = False

    @abc.abstractmethod
    def forward(
        self,
        reconstruction: torch.Tensor,
        target: torch.Tensor,
        discriminator: "Discriminator | None" = None,
    ) -> torch.Tensor:
        ...


class Discriminator(ReportsStats, Component, nn.Module, abc.ABC):
    """Tells real images from reconstructions.

    Constructed as ``cls(params, channels=C)``.

    ``forward(x)``: float32 ``(B, C, H, W)`` in ``[-1, 1]``; returns logits
    ``(B, 1, h, w)`` (patch logits allowed). ``features(x)`` returns the list of
    intermediate feature maps used by feature-matching perceptual losses.

    Stats (:meth:`stats`, :class:`ReportsStats`): read once per training step after the
    generator's adversarial term (its forward on the reconstructions, with the weights of
    the previous discriminator update), averaged over the logging window and logged as
    ``discriminator/<stat>``; steps before the adversarial term starts report none.
    """

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        ...


# --------------------------------------------------------------------------- data
class Dataset(Component, torch.utils.data.Dataset, abc.ABC):
    """A finite, indexable image data set.

    Constructed as ``cls(params, split=S, seed=s)`` with ``S`` in ``{"train", "test"}``.
    ``__getitem__(i)`` returns float32 ``(C, H, W)`` in ``[-1, 1]``; all items share
    :attr:`channels` and :attr:`image_size` ``(H, W)``. Content and order are a pure
    function of the params, the split and the seed.

    Optional fast paths the trainer uses when present: ``get_batch(indices)`` -> float32
    ``(B, C, H, W)`` equal to stacking the items; ``set_epoch(epoch)`` for datasets whose
    train-time augmentation depends on the epoch. ``example_params(workdir)`` (classmethod)
    gives params the contract suite can build the dataset with when the defaults cannot
    (e.g. a required folder).
    """

    channels: int
    image_size: tuple[int, int]

    @abc.abstractmethod
    def __len__(self) -> int:
        ...

    @abc.abstractmethod
    def __getitem__(self, i: int) -> torch.Tensor:
        ...


# --------------------------------------------------------------------------- priors
class Prior(Component, nn.Module, abc.ABC):
    """An autoregressive model of the code grids of a trained autoencoder.

    Constructed as ``cls(params, codebook_size=K, grid=(h, w), num_classes=N)``: ``grid``
    is the shape of one image's indices (any number of dims, flattened in raster order,
    last dim fastest) and ``N`` the number of class labels (``0``: unconditional).

    ``forward(codes, labels=None)``: ``codes`` int64 ``(B, L)`` flattened grids (or a
    prefix of them, ``L <= prod(grid)``), ``labels`` int64 ``(B,)`` in ``[0, N)`` (required
    when ``N > 0``, ignored otherwise); returns float32 logits ``(B, L, K)`` where
    ``logits[:, t]`` is the distribution of ``codes[:, t]`` given ``codes[:, :t]`` and the
    label (never the codes at ``t`` or after: causal).

    ``sample(n, labels=None, temperature=1.0, top_k=None, top_p=None, generator=None)``
    returns int64 ``(n, *grid)``, drawn token by token with ``torch.multinomial`` from the
    filtered distribution (:meth:`filter_logits`) using ``generator``. The default
    implementation recomputes the whole prefix at every token (O(L^2) work per token);
    priors override it with a cache and must draw exactly the same codes for the same
    generator state (checked by the contract suite).
    """

    codebook_size: int
    grid: tuple[int, ...]
    num_classes: int

    @property
    def length(self) -> int:
        """Tokens per grid, ``prod(grid)``."""
        n = 1
        for d in self.grid:
            n *= int(d)
        return n

    @abc.abstractmethod
    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        ...

    @staticmethod
    def filter_logits(
        logits: torch.Tensor,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Probabilities ``(B, K)`` from logits ``(B, K)``: divided by ``temperature``, all but
        the ``top_k`` largest removed, then all but the smallest set whose probability
        reaches ``top_p`` (nucleus) removed; renormalized."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits = logits.float() / float(temperature)
        if top_k is not None and 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if top_p is not None and top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the better tokens
            sorted_p = sorted_p.masked_fill(before >= float(top_p), 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def _draw(self, logits, temperature, top_k, top_p, generator) -> torch.Tensor:
        probs = self.filter_logits(logits, temperature, top_k, top_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            device = next(self.parameters()).device
            codes = torch.zeros((n, 0), dtype=torch.int64, device=device)
            for _ in range(self.length):
                # the placeholder at the end does not influence its own logits (causal)
                logits = self(torch.cat([codes, codes.new_zeros((n, 1))], dim=1), labels)[:, -1]
                nxt = self._draw(logits, temperature, top_k, top_p, generator)
                codes = torch.cat([codes, nxt[:, None]], dim=1)
        finally:
            self.train(was_training)
        return codes.reshape(n, *self.grid)

# --------------------------------------------------------------------------- sweeps: launchers and searches
@dataclasses.dataclass(frozen=True)
class Dimension:
    """One key of a sweep's search space: a list of ``choices``, or a range ``[low, high]``
    (``integer`` for whole numbers, ``log`` for a log-uniform range). Written in a recipe as
    ``[v1, v2]`` or ``{choices: [...]}``, ``{low: 1e-4, high: 1e-2, log: true}``,
    ``{low: 8, high: 64, integer: true}``."""

    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def is_choice(self) -> bool:
        return self.choices is not None

    def edges(self) -> list[Any]:
        """Values the sweep validates before anything runs: every choice, or both ends."""
        if self.choices is not None:
            return list(self.choices)
        lo, hi = (int(self.low), int(self.high)) if self.integer else (float(self.low), float(self.high))
        return [lo] if lo == hi else [lo, hi]

    def to_json(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "integer": self.integer}


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a search optimizes: the last logged value of ``metric`` of each child, to
    ``direction`` ``"max"`` or ``"min"``."""

    metric: str = "eval/psnr"
    direction: str = "max"


@dataclasses.dataclass(frozen=True)
class Trial:
    """One combination chosen by a search: ``number`` (unique within the sweep, stable across
    reruns), the recipe ``values`` (key path -> value) and ``state``, JSON-able data the search
    hands to the child's :class:`TrialReporter` (``{}`` for searches that do not prune)."""

    number: int
    values: dict[str, Any]
    state: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrialOutcome:
    """How a trial's child ended: ``status`` ``"finished"``, ``"pruned"`` (stopped by the
    search) or ``"failed"``; ``value`` the objective (``None`` when not logged)."""

    status: str
    value: float | None = None
    step: int | None = None


class TrialReporter(abc.ABC):
    """Runs inside a child (``vqkit train``): receives the evaluation metrics and says whether
    the search wants the child stopped (pruned). Made by :meth:`Search.trial_reporter`."""

    @abc.abstractmethod
    def report(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Record ``metrics`` (``eval/*``) at ``step``; return ``True`` to stop the child."""


class Launcher(Component, abc.ABC):
    """Where the children of a sweep run.

    Constructed as ``cls(params, jobs=N, out=TextIO)``: ``jobs`` is the number of children
    in flight at once (``vqkit sweep --jobs``), ``out`` where children's output is echoed.

    ``launch(jobs, on_done=None)`` runs every :class:`vqkit.sweep.ChildJob` (its ``argv`` is
    a ``vqkit train`` command with this Python, ``env`` extra environment variables, ``log``
    a file to keep its output in) to its end and returns their exit codes, in the order
    given; ``on_done(job, code)`` is called as each ends (from the calling thread). A child
    that cannot be run or whose worker is lost gets a non-zero code; it never raises for
    that. On ``KeyboardInterrupt`` the running children are asked to stop (SIGTERM: they
    checkpoint) and the interruption is re-raised. ``close()`` frees what the launcher
    started (a local Ray instance, executors); it is called once, after the sweep.
    Children log to the recipe's tracking store themselves, so a launcher whose workers
    run elsewhere needs a store they can reach (an MLflow server, a shared file system).
    """

    @abc.abstractmethod
    def launch(self, jobs: Any, on_done: Any = None) -> list[int]:
        ...

    def close(self) -> None:  # noqa: B027 - optional
        """Free what :meth:`launch` started."""


#: the most children (trials) one sweep may have: a budget or grid beyond it is a user error,
#: not hours of planning (``sweep.budget``, the grid search)
MAX_TRIALS = 10_000


class Search(Component, abc.ABC):
    """Which combinations of recipe values a sweep trains.

    Constructed as ``cls(params, space=..., objective=Objective, budget=N|None, seed=s,
    state_dir=Path)``: ``space`` maps recipe key paths to :class:`Dimension` s (validated
    before the search is built); ``budget`` the number of trials (``None``: the search's
    own default, e.g. every grid combination); ``state_dir`` a folder of the sweep's parent
    run where a search keeps its state (so an interrupted search continues).

    ``ask(n)`` returns up to ``n`` new :class:`Trial` s (``n=None``: as many as it likes);
    an empty list ends the sweep. ``tell(trial, outcome)`` is called with every trial's
    :class:`TrialOutcome` once its child ended, before the next ``ask``. A rerun of the same
    sweep builds the search again with the same ``state_dir`` and seed: trials must come back
    with the same numbers (the sweep skips children that finished, resumes interrupted ones).

    Capability flags: ``adaptive`` (default ``False``): the choice depends on earlier
    outcomes, so the sweep asks in rounds of ``jobs`` trials; ``prunes`` (default ``False``):
    children report their evaluation metrics through :meth:`trial_reporter` and stop when
    told (MLflow: status ``KILLED``, tag ``vqkit.pruned``). A search with state on disk
    returns it from :meth:`artifacts` so the parent run shows it.
    """

    CAPABILITIES: ClassVar[tuple[str, ...]] = ("adaptive", "prunes")
    adaptive: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    @abc.abstractmethod
    def ask(self, n: int | None = None) -> list[Trial]:
        ...

    def tell(self, trial: Trial, outcome: TrialOutcome) -> None:  # noqa: B027 - static searches
        """Record a trial's outcome."""

    @classmethod
    def space_problems(cls, space: Mapping[str, Dimension]) -> dict[str, str]:
        """``{key: problem}`` for dimensions this search cannot explore (e.g. a range given
        to ``grid``); reported, located, before anything runs."""
        return {}

    @classmethod
    def trial_reporter(cls, state: Mapping[str, Any]) -> TrialReporter | None:
        """The reporter a child uses for a trial with this ``state`` (``None``: no pruning)."""
        return None

    def artifacts(self) -> list[Any]:
        """Files holding the search's state (e.g. a study's storage), each a consistent copy
        taken now: the sweep logs them as artifacts of its parent run (under ``search/``)
        after every round and when it stops, finished or interrupted. Default: none."""
        return []


#: kind name (as used in hooks, registries and the CLI) -> interface
KINDS: dict[str, type] = {
    "encoders": Encoder,
    "quantizers": Quantizer,
    "decoders": Decoder,
    "perceptual_losses": PerceptualLoss,
    "reset_policies": CodebookResetPolicy,
    "datasets": Dataset,
    "discriminators": Discriminator,
    "priors": Prior,
    "launchers": Launcher,
    "searches": Search,
}
