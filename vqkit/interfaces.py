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
* Code indices are ``int64`` tensors of shape ``(B, h, w)``.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

__all__ = [
    "Params",
    "Component",
    "Encoder",
    "Decoder",
    "Quantizer",
    "QuantizerOutput",
    "PerceptualLoss",
    "CodebookResetPolicy",
    "ResetPlan",
    "Dataset",
    "Discriminator",
    "KINDS",
]


class Params(BaseModel):
    """Base class of every component's parameter schema.

    Unknown keys are rejected; instances are immutable. Subclasses declare each
    field with a type, a default and a ``description`` (``Field(..., description=)``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Component:
    """Mixin holding what every component declares."""

    #: Parameter schema; override in each component.
    Params: ClassVar[type[Params]] = Params

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""


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

    Usage counting: the buffer ``code_counts`` (float32 ``(K,)``) accumulates
    assignments in training mode only; the trainer reads and clears it
    (:meth:`take_counts`). A quantizer never resets codes by itself: resets are done by
    a :class:`CodebookResetPolicy` called by the trainer, through :meth:`replace_codes`.
    """

    codebook_size: int
    dim: int

    @abc.abstractmethod
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        ...

    @abc.abstractmethod
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def codebook(self) -> torch.Tensor:
        """The code vectors ``(K, D)`` (detached) in the space of encoder outputs."""

    @abc.abstractmethod
    def replace_codes(self, idx: torch.Tensor, vectors: torch.Tensor) -> None:
        """Set codes ``idx`` (int64 ``(n,)``) to ``vectors`` ``(n, D)`` given in encoder-output
        space, and reset every state that depends on those codes (usage counters, EMA
        cluster sizes and sums)."""

    def loss_weights(self) -> dict[str, float]:
        """Weight of each term of ``QuantizerOutput.losses`` in the training objective
        (e.g. ``{"codebook": 1.0, "commitment": beta}``). The trainer applies them."""
        return {}

    def code_parameters(self) -> list[nn.Parameter]:
        """Parameters whose first dimension indexes codes (their optimizer state rows
        are reset with the codes). Default: none."""
        return []

    def take_counts(self) -> torch.Tensor:
        """Return and zero the assignment counts accumulated since the last call."""
        counts = self.code_counts.clone()
        self.code_counts.zero_()
        return counts


# --------------------------------------------------------------------------- reset policies
@dataclasses.dataclass(frozen=True)
class ResetPlan:
    """Codes to replace and the vectors (encoder-output space) to put there."""

    indices: torch.Tensor  # int64 (n,)
    vectors: torch.Tensor  # float (n, D)

    def __len__(self) -> int:
        return int(self.indices.numel())


class CodebookResetPolicy(Component, abc.ABC):
    """Decides which codes are dead and what replaces them.

    Constructed as ``cls(params, codebook_size=K, dim=D, seed=s)``.

    The trainer calls :meth:`observe` after every training step with the flattened
    encoder outputs ``z`` float ``(N, D)`` (detached) and their code ``indices`` int64
    ``(N,)``, and :meth:`plan` every ``reset.every`` steps; it applies a returned
    :class:`ResetPlan` through ``Quantizer.replace_codes`` and resets the optimizer
    state of those rows. Policies never mutate the quantizer themselves. Under
    distributed training, ``observe`` receives the data of all ranks and ``plan`` runs
    on rank 0 only; its plan is broadcast.
    """

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
class PerceptualLoss(Component, nn.Module, abc.ABC):
    """A reconstruction / perceptual distance between images.

    Constructed as ``cls(params, channels=C)``.

    ``forward(reconstruction, target, discriminator=None)``: both float32
    ``(B, C, H, W)`` in :attr:`input_range` (the trainer converts from ``[-1, 1]``);
    returns a 0-dim float tensor, differentiable w.r.t. ``reconstruction``.
    Losses with ``needs_discriminator = True`` receive the trained discriminator and must
    not update it (they are computed with its parameters frozen).
    """

    input_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)
    needs_discriminator: ClassVar[bool] = False

    @abc.abstractmethod
    def forward(
        self,
        reconstruction: torch.Tensor,
        target: torch.Tensor,
        discriminator: "Discriminator | None" = None,
    ) -> torch.Tensor:
        ...


class Discriminator(Component, nn.Module, abc.ABC):
    """Tells real images from reconstructions.

    Constructed as ``cls(params, channels=C)``.

    ``forward(x)``: float32 ``(B, C, H, W)`` in ``[-1, 1]``; returns logits
    ``(B, 1, h, w)`` (patch logits allowed). ``features(x)`` returns the list of
    intermediate feature maps used by feature-matching perceptual losses.
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


#: kind name (as used in hooks, registries and the CLI) -> interface
KINDS: dict[str, type] = {
    "encoders": Encoder,
    "quantizers": Quantizer,
    "decoders": Decoder,
    "perceptual_losses": PerceptualLoss,
    "reset_policies": CodebookResetPolicy,
    "datasets": Dataset,
    "discriminators": Discriminator,
}
