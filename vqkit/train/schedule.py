"""Learning-rate schedules: linear warm-up, then constant, cosine or linear decay.

:class:`WarmupSchedule` is a plain callable object (its state is a few numbers), used as
the ``lr_lambda`` of :class:`torch.optim.lr_scheduler.LambdaLR`, so scheduler state dicts
hold only plain values and load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["WarmupSchedule", "make_scheduler"]

KINDS = ("constant", "cosine", "linear")


class WarmupSchedule:
    """LR multiplier for optimizer step ``s`` (0-based).

    * warm-up: ``(s + 1) / warmup_steps`` for ``s < warmup_steps``;
    * then, with ``p = (s - warmup_steps) / max(1, total_steps - warmup_steps)`` clamped to
      ``[0, 1]``: ``1`` (constant), ``m + (1 - m) * (1 + cos(pi p)) / 2`` (cosine) or
      ``1 - (1 - m) p`` (linear), where ``m = min_lr_ratio``.
    """

    def __init__(self, kind: str = "constant", warmup_steps: int = 0, total_steps: int = 1,
                 min_lr_ratio: float = 0.0):
        if kind not in KINDS:
            raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(KINDS)}")
        self.kind = kind
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        p = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        m = self.min_lr_ratio
        if self.kind == "cosine":
            return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0 - (1.0 - m) * p


def make_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg, total_steps: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``train_cfg`` (a :class:`vqkit.recipe.TrainConfig`) over
    ``total_steps`` optimizer steps (default ``train_cfg.steps``); call ``.step()`` once
    after every optimizer step."""
    total = train_cfg.steps if total_steps is None else total_steps
    schedule = WarmupSchedule(train_cfg.schedule, train_cfg.warmup_steps, total, train_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
