"""The built-in searches: ``grid`` (every combination of the choices) and ``random``
(``budget`` combinations drawn from choices, ranges and log-uniform ranges).

Both are static: their trials do not depend on outcomes and come back with the same numbers
on every run of the same sweep, so a rerun skips finished children. Adaptive searches
(``optuna``) are plugin distributions under ``plugins/``.
"""
from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any, Mapping, Optional

from pydantic import Field

from vqkit import hookimpl
from vqkit.errors import VqkitError
from vqkit.interfaces import MAX_TRIALS, Dimension, Objective, Params, Search, Trial


def _round(value: float, digits: int) -> float:
    """``value`` to ``digits`` significant digits (readable run names that are the value)."""
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


class _Static(Search):
    """Trials listed once (in ``__init__``), handed out in order."""

    def __init__(self, params: Params | None = None, *, space: Mapping[str, Dimension],
                 objective: Objective | None = None, budget: int | None = None, seed: int = 0,
                 state_dir: Any = None):
        self.params = params or self.Params()
        self.space = dict(space)
        self.objective = objective or Objective()
        self.budget = budget
        self.seed = seed
        self._trials = [Trial(i, values) for i, values in enumerate(self._combinations())]
        self._next = 0

    def _combinations(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def ask(self, n: int | None = None) -> list[Trial]:
        end = len(self._trials) if n is None else min(len(self._trials), self._next + n)
        out = self._trials[self._next:end]
        self._next = end
        return out


class GridSearch(_Static):
    """Every combination of the choices (last key fastest); `budget` keeps the first N."""

    @classmethod
    def space_problems(cls, space: Mapping[str, Dimension]) -> dict[str, str]:
        return {k: "the grid search takes a list of choices, not a range (use search random or optuna)"
                for k, d in space.items() if not d.is_choice}

    def _combinations(self) -> list[dict[str, Any]]:
        keys = list(self.space)
        count = math.prod(len(self.space[k].choices) for k in keys)
        if self.budget is None and count > MAX_TRIALS:
            raise VqkitError(f"the grid has {count:,} combinations, more than a sweep runs ({MAX_TRIALS:,}); "
                             "fewer values, linked keys (--link) or a budget (--budget N keeps the first N)")
        combos = itertools.islice(itertools.product(*(self.space[k].choices for k in keys)), self.budget)
        return [dict(zip(keys, c)) for c in combos]


class RandomSearch(_Static):
    """`budget` distinct combinations drawn at random (seeded) from choices and ranges."""

    class Params(Params):
        seed: Optional[int] = Field(None, ge=0, le=2**32 - 1, description="seed of the draws (default: the recipe's seed)")
        digits: int = Field(4, ge=1, le=17, description="significant digits kept of values drawn from a "
                            "float range (run names show the value trained)")

    #: trials drawn when no budget is given
    DEFAULT_BUDGET = 10

    def _draw(self, rng: random.Random, d: Dimension) -> Any:
        if d.is_choice:
            return rng.choice(list(d.choices))
        lo, hi = float(d.low), float(d.high)
        if d.log:
            x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        else:
            x = rng.uniform(lo, hi)
        if d.integer:
            return min(int(d.high), max(int(d.low), int(round(x))))
        return min(hi, max(lo, _round(x, self.params.digits)))

    def _combinations(self) -> list[dict[str, Any]]:
        budget = self.DEFAULT_BUDGET if self.budget is None else self.budget
        rng = random.Random(self.seed if self.params.seed is None else self.params.seed)
        seen: set[str] = set()
        out: list[dict[str, Any]] = []
        attempts = 0
        while len(out) < budget and attempts < 100 * budget:
            attempts += 1
            values = {k: self._draw(rng, d) for k, d in self.space.items()}
            key = json.dumps(values, sort_keys=True, default=str)
            if key not in seen:  # a small space of choices runs out: fewer trials, never twice the same
                seen.add(key)
                out.append(values)
        return out


@hookimpl
def vqkit_register_searches(register):
    register("grid", GridSearch)
    register("random", RandomSearch)
