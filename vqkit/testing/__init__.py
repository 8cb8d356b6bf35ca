"""Test helpers for vqkit and for plugin authors.

* :func:`contract_checks` / :func:`registered_cases`: the component contract suite
  (see :mod:`vqkit.testing.contracts`; checks that a component's declared capabilities
  rule out raise :class:`NotApplicable`, reported by pytest as skips; reset policies: :mod:`vqkit.testing.reset_contracts`,
  also as the pytest base class :class:`ResetPolicyContract`).
* :func:`install_fake_distribution`: put a plugin distribution (dist-info with entry
  points + module source) on ``sys.path`` so entry-point loading is tested for real.
"""
from vqkit.testing.contracts import NotApplicable, contract_checks, registered_cases
from vqkit.testing.fakedist import install_fake_distribution
from vqkit.testing.reset_contracts import ResetPolicyContract

__all__ = [
    "NotApplicable",
    "contract_checks",
    "registered_cases",
    "install_fake_distribution",
    "ResetPolicyContract",
]
