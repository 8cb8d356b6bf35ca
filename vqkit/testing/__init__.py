"""Test helpers for vqkit and for plugin authors.

* :func:`contract_checks` / :func:`registered_cases`: the component contract suite
  (see :mod:`vqkit.testing.contracts`; reset policies: :mod:`vqkit.testing.reset_contracts`,
  also as the pytest base class :class:`ResetPolicyContract`).
* :func:`install_fake_distribution`: put a plugin distribution (dist-info with entry
  points + module source) on ``sys.path`` so entry-point loading is tested for real.
"""
from vqkit.testing.contracts import contract_checks, registered_cases
from vqkit.testing.fakedist import install_fake_distribution
from vqkit.testing.reset_contracts import ResetPolicyContract

__all__ = ["contract_checks", "registered_cases", "install_fake_distribution", "ResetPolicyContract"]
