"""The reset-policy contract suite (run over every registered policy by test_contracts.py)
as plugin authors use it: the pytest base class, with non-default params."""
from __future__ import annotations

from vqkit.plugins import get_registry
from vqkit.testing.reset_contracts import ResetPolicyContract, registered_reset_cases

CASES = registered_reset_cases()


def test_builtin_policies_are_under_contract():
    names = {n for n, _ in CASES}
    assert {"none", "random", "jukebox", "kmeans"} <= names


class TestJukeboxWithNoise(ResetPolicyContract):
    """The pytest base class, as plugin authors use it, with non-default params."""

    policy_cls = get_registry().get("reset_policies", "jukebox").cls
    params = policy_cls.Params(noise=0.05, decay=0.9, buffer_size=300)
