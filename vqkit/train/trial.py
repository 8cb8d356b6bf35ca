"""The channel between a sweep's search and one child run (``vqkit train``).

A sweep describes a child's trial in the environment variable ``VQKIT_TRIAL`` (JSON):
``{"tags": {...}, "search": NAME, "state": {...}}``. The trainer reads it once
(:func:`channel_from_env`): the ``tags`` go on the child's MLflow run (e.g.
``vqkit.sweep.trial``), and, when the search prunes, the trainer reports every evaluation
(``eval/*`` metrics at their step) to the search's :class:`~vqkit.interfaces.TrialReporter`
(``Search.trial_reporter(state)``, looked up in the plugin registry by name) and stops the
run when it answers ``True``: a last checkpoint is written (the child stays resumable), the
MLflow run gets the tag ``vqkit.pruned`` (the step) and ends ``KILLED``, and ``vqkit train``
exits 0. Nothing here depends on where the child runs: the reporter reaches the search's
state through what ``state`` names (e.g. a study file next to the parent run).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from vqkit.errors import VqkitError

TRIAL_ENV = "VQKIT_TRIAL"
#: tag of a child run stopped by its search (value: the step it stopped at)
PRUNED_TAG = "vqkit.pruned"
#: tag naming the trial of a sweep's child run (its number, unique within the sweep)
TRIAL_TAG = "vqkit.sweep.trial"


class StopTrial(Exception):
    """Raised in the training loop when the search asks the child to stop."""

    def __init__(self, step: int, reason: str = ""):
        super().__init__(reason or f"pruned at step {step}")
        self.step = step


@dataclasses.dataclass
class TrialChannel:
    tags: dict[str, str]
    search: str | None = None
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    _reporter: Any = None

    def reporter(self):
        """The search's reporter for this trial (``None`` when it does not prune)."""
        if self._reporter is None and self.search:
            from vqkit.plugins import get_registry

            cls = get_registry().get("searches", self.search).cls
            self._reporter = cls.trial_reporter(self.state) or False
        return self._reporter or None

    def report(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Hand ``metrics`` at ``step`` to the search; ``True`` when it wants the run stopped."""
        reporter = self.reporter()
        return bool(reporter.report(step, dict(metrics))) if reporter is not None else False


def channel_env(tags: Mapping[str, str], search: str | None = None,
                state: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The environment that describes a trial to its child."""
    return {TRIAL_ENV: json.dumps({"tags": dict(tags), "search": search, "state": dict(state or {})})}


def channel_from_env(environ: Mapping[str, str] | None = None) -> TrialChannel | None:
    """The trial this process trains (``None`` outside a sweep)."""
    text = (environ if environ is not None else os.environ).get(TRIAL_ENV)
    if not text:
        return None
    try:
        data = json.loads(text)
        return TrialChannel({str(k): str(v) for k, v in data.get("tags", {}).items()},
                            data.get("search"), dict(data.get("state") or {}))
    except (ValueError, AttributeError, TypeError) as exc:
        raise VqkitError(f"${TRIAL_ENV} is not a trial description (JSON with tags, search, state): {exc}") from None
