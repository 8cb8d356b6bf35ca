"""The sweep plugin distributions in plugins/ (vqkit-ray, vqkit-submitit, vqkit-optuna),
installed as a user would (`make setup`: `pip install -e plugins/vqkit-ray ...`): found
through their entry points and their own test suites pass (vqkit's launcher/search contract
suites; a 4-child sweep on a two-node Ray cluster of 2 CPUs started with `ray start` and joined
by address, and a lost Ray worker; the same sweep through submitit's local executor; an
8-trial Optuna search with pruning that resumes after an interruption, its study logged to the
parent run, and a 2-process child pruned on both ranks). Real Slurm is checked outside CI:
scripts/slurm-local.sh and scripts/slurm_sweep_check.py."""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from vqkit.plugins import get_registry

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"
#: (kind, name) -> (distribution, its folder)
DISTS = {
    ("launchers", "ray"): ("vqkit-ray", PLUGINS / "vqkit-ray"),
    ("launchers", "submitit"): ("vqkit-submitit", PLUGINS / "vqkit-submitit"),
    ("searches", "optuna"): ("vqkit-optuna", PLUGINS / "vqkit-optuna"),
}


@pytest.mark.parametrize("kind,name", list(DISTS), ids=[n for _, n in DISTS])
def test_installed_and_registered_from_its_distribution(kind, name):
    dist, folder = DISTS[(kind, name)]
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        pytest.fail(f"{dist} is not installed: `make setup` installs it (pip install -e {folder.relative_to(ROOT)})")
    entry = get_registry().get(kind, name)
    assert entry.distribution == dist
    assert entry.params_schema()["properties"], f"{dist}: no params"


@pytest.mark.parametrize("kind,name", list(DISTS), ids=[n for _, n in DISTS])
def test_the_distributions_own_test_suite_passes(kind, name):
    dist, folder = DISTS[(kind, name)]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "tests"],
                          cwd=folder, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{dist}'s tests failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
