"""User-facing errors: one type, printed without traceback, exit code 2."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Iterable, Sequence

EXIT_USER_ERROR = 2


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with user input, located as precisely as known."""

    message: str
    path: str = ""
    file: str | None = None
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.col is not None:
                    where += f":{self.col}"
            where += ": "
        path = f"{self.path}: " if self.path else ""
        return f"{where}{path}{self.message}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class VqkitError(Exception):
    """An error the user can fix (bad recipe, unknown component, missing file,
    broken plugin). The CLI prints each problem and exits 2 without a traceback."""

    def __init__(self, problems: str | Problem | Sequence[Problem]):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def closest(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice most like ``name`` (difflib's ratio of at least ``cutoff``, ignoring
    case: ``PatchGAN`` finds ``patchgan``), or ``None``."""
    choices = sorted(set(choices))
    folded = {c.lower(): c for c in reversed(choices)}  # the first choice of each folded spelling
    if str(name).lower() in folded and folded[str(name).lower()] != name:
        return folded[str(name).lower()]
    close = difflib.get_close_matches(str(name).lower(), sorted(folded), n=1, cutoff=cutoff)
    return folded[close[0]] if close else None


def suggest(name: str, choices: Iterable[str], *, label: str = "valid", always_list: bool = True) -> str:
    """' (did you mean 'x'? valid: a, b, c)' for an unknown ``name``.

    ``label`` names the list of choices; with ``always_list=False`` the list is given only
    when no choice is close (`` (did you mean 'x'?)`` or `` (valid: a, b, c)``)."""
    choices = sorted(set(choices))
    close = closest(name, choices)
    parts = []
    if close is not None:
        parts.append(f"did you mean {close!r}?")
    if close is None or always_list:
        parts.append(f"{label}: " + (", ".join(choices) if choices else "(none registered)"))
    return " (" + " ".join(parts) + ")"


class PluginWarning(UserWarning):
    """A plugin could not be loaded and was skipped."""


class RecipeWarning(UserWarning):
    """A recipe validates but a setting cannot do what it says (e.g. a reset that never
    fires); shown as one located ``vqkit: warning:`` line, once per command."""
