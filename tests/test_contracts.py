"""Every registered component passes the contract suite of its kind (timm-style:
parametrized over the live registry, so a new built-in is covered the day it is registered)."""
from __future__ import annotations

import dataclasses
import sys
import types
import unittest

import pytest

from tests import plugin_examples as ex
from vqkit.interfaces import KINDS
from vqkit.plugins import get_registry
from vqkit.testing import NotApplicable, contract_checks, registered_cases

CASES = registered_cases()


@pytest.mark.parametrize(
    "kind,name,check", CASES, ids=[f"{k}/{n}/{c.__name__.removeprefix('check_')}" for k, n, c in CASES]
)
def test_contract(kind, name, check):
    check(get_registry().get(kind, name).cls)


def test_every_kind_with_a_suite_has_builtins():
    covered = {kind for kind, _, _ in CASES}
    assert covered == set(KINDS), "a component kind has no registered component under contract"


# ----------------------------------------------------------------------------- capabilities
def _plugin_class(source, name):
    """The class ``name`` of a test plugin's source, as a module pydantic can resolve."""
    module = types.ModuleType(f"vqkit_test_plugin_{name.lower()}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return getattr(module, name)


GRID = _plugin_class(ex.FIXED_QUANTIZER, "GridQuantizer")
TWO_STAGE = _plugin_class(ex.MULTI_QUANTIZER, "TwoStage")
QUANTIZER_CHECKS = contract_checks("quantizers")


@pytest.mark.parametrize("check", QUANTIZER_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", [GRID, TWO_STAGE], ids=["fixed-codebook", "multi-codebook"])
def test_the_suite_reads_capabilities(cls, check):
    """A fixed code-book skips the replace_codes check, a single code-book the per-stage
    check (as pytest skips with the reason); everything else runs and passes."""
    skipped = {
        (GRID, "check_quantizer_replace_codes"): "declares fixed_codebook = True",
        (GRID, "check_quantizer_stage_inputs"): "has one code-book",
    }.get((cls, check.__name__))
    if skipped is None:
        check(cls)
        return
    with pytest.raises(NotApplicable, match=skipped) as info:
        check(cls)
    assert isinstance(info.value, unittest.SkipTest)  # pytest reports it as a skip


def test_multi_codebook_checks_catch_a_wrong_indices_shape():
    class FlatIndices(TWO_STAGE):
        def forward(self, z):
            out = super().forward(z)
            return dataclasses.replace(out, indices=out.indices[:, 0])

    with pytest.raises(AssertionError, match=r"indices shape \(3, 4, 5\), expected \(B, S, h, w\) = \(3, 2, 4, 5\)"):
        contract_checks("quantizers")[0](FlatIndices)
