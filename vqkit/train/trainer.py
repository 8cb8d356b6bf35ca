"""``vqkit train``'s entry points: :class:`Trainer` (the autoencoder family on the shared
loop) and :func:`train`.

The loop itself is :class:`vqkit.train.loop.TrainLoop`; the autoencoder's step, state,
evaluation and images are :class:`vqkit.train.autoencoder.AutoencoderFamily`. The names
below are kept for callers of this module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from vqkit.recipe import Recipe
from vqkit.train import checkpoint as ckpt
from vqkit.train.autoencoder import (
    RECON_KEY,
    AutoencoderFamily,
    dataset_fingerprint,
    evaluate,
    save_recon_grid,
)
from vqkit.train.loop import NonFiniteLoss, TrainLoop, TrainResult

__all__ = ["Trainer", "TrainResult", "NonFiniteLoss", "evaluate", "save_recon_grid", "train",
           "dataset_fingerprint", "RECON_KEY"]


class Trainer(TrainLoop):
    """:class:`~vqkit.train.loop.TrainLoop` over an :class:`AutoencoderFamily`; takes the
    loop's keyword arguments (``resume``, ``resume_path``, ``quiet``, ``stop_after``,
    ``stdout``, ``stderr``, ``tags``, ``entry_point``)."""

    def __init__(self, recipe: Recipe, **kwargs: Any):
        super().__init__(recipe, AutoencoderFamily(), **kwargs)


def train(
    recipe: Recipe,
    *,
    resume: str | Path | None = None,
    quiet: bool = False,
    stop_after: int | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> TrainResult:
    """Train ``recipe``; ``resume`` is a checkpoint file to continue from."""
    state = None
    path = None
    if resume is not None:
        path = Path(resume)
        state = ckpt.load_checkpoint(path)
    trainer = Trainer(recipe, resume=state, resume_path=path, quiet=quiet, stop_after=stop_after,
                      stdout=stdout, stderr=stderr)
    return trainer.run()
