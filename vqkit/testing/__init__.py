"""Test helpers for vqkit and for plugin authors.

* :func:`contract_checks` / :func:`registered_cases`: the component contract suite
  (see :mod:`vqkit.testing.contracts`).
* :func:`install_fake_distribution`: put a plugin distribution (dist-info with entry
  points + module source) on ``sys.path`` so entry-point loading is tested for real.
"""
from vqkit.testing.contracts import contract_checks, registered_cases
from vqkit.testing.fakedist import install_fake_distribution

__all__ = ["contract_checks", "registered_cases", "install_fake_distribution"]
