"""Code-book reset policies."""
from __future__ import annotations

from vqkit import hookimpl
from vqkit.interfaces import CodebookResetPolicy, Params, ResetPlan


class NoReset(CodebookResetPolicy):
    """Never reset codes."""

    def __init__(self, params: Params | None = None, *, codebook_size: int = 0, dim: int = 0, seed: int = 0):
        self.params = params or self.Params()

    def plan(self, codebook, step) -> ResetPlan | None:
        return None


@hookimpl
def vqkit_register_reset_policies(register):
    register("none", NoReset)
