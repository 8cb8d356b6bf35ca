"""Every registered component passes the contract suite of its kind (timm-style:
parametrized over the live registry, so a new built-in is covered the day it is registered)."""
from __future__ import annotations

import pytest

from vqkit.interfaces import KINDS
from vqkit.plugins import get_registry
from vqkit.testing import registered_cases

CASES = registered_cases()


@pytest.mark.parametrize(
    "kind,name,check", CASES, ids=[f"{k}/{n}/{c.__name__.removeprefix('check_')}" for k, n, c in CASES]
)
def test_contract(kind, name, check):
    check(get_registry().get(kind, name).cls)


def test_every_kind_with_a_suite_has_builtins():
    covered = {kind for kind, _, _ in CASES}
    assert covered == set(KINDS), "a component kind has no registered component under contract"
