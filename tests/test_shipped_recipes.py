"""A recipe outside the checkout (a plugin's own) extends a recipe shipped with vqkit by name:
`extends: vqkit:quickstart.yaml`. Checked from an installed package: vqkit's wheel, unpacked
as pip installs it, imported ahead of the checkout, with the recipe in another folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vqkit.errors import VqkitError
from vqkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent

PLUGIN_RECIPE = """\
extends: vqkit:quickstart.yaml
name: qs-plugin
reset: {name: none}
train: {steps: 7}
"""


def test_a_recipe_elsewhere_extends_a_shipped_recipe_by_name(tmp_path):
    (tmp_path / "qs.yaml").write_text(PLUGIN_RECIPE)
    r = load_recipe(tmp_path / "qs.yaml").to_dict()
    assert r["name"] == "qs-plugin" and r["train"]["steps"] == 7 and r["reset"]["name"] == "none"
    assert r["quantizer"]["params"]["codebook_size"] == 256  # from the shipped quickstart
    (tmp_path / "sub.yaml").write_text("extends: vqkit:quantizers/fashion-mnist.yaml\nname: sub\n")
    assert load_recipe(tmp_path / "sub.yaml").to_dict()["name"] == "sub"

    (tmp_path / "typo.yaml").write_text("extends: vqkit:quickstrat.yaml\n")
    with pytest.raises(VqkitError) as exc:
        load_recipe(tmp_path / "typo.yaml")
    (problem,) = exc.value.problems
    assert problem.path == "extends" and "no recipe 'quickstrat.yaml' ships with vqkit" in problem.message
    assert "did you mean 'quickstart.yaml'?" in problem.message


def test_the_installed_package_ships_the_recipes(tmp_path):
    # built from a copy of the sources: building in the checkout leaves build/ and an
    # egg-info there (a second `vqkit` distribution for anything run from the checkout)
    src = tmp_path / "src"
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "vqkit", src / "vqkit", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "recipes", src / "recipes", ignore=ignore)
    assert (src / "vqkit" / "recipes").is_symlink()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True, cwd=tmp_path,
                   env={**os.environ, "PIP_NO_INDEX": "1"})
    (wheel,) = wheels.glob("vqkit-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    shipped = sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
    assert sorted(n.removeprefix("vqkit/recipes/") for n in names if n.startswith("vqkit/recipes/")) == shipped

    plugin = tmp_path / "myplugin" / "recipes"
    plugin.mkdir(parents=True)
    (plugin / "qs.yaml").write_text(PLUGIN_RECIPE)
    code = ("import json, vqkit; from vqkit.recipe import load_recipe; "
            "r = load_recipe('recipes/qs.yaml').to_dict(); "
            "print(json.dumps([vqkit.__file__, r['name'], r['quantizer']['params']['codebook_size']]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=plugin.parent, env={**os.environ, "PYTHONPATH": str(site)}).stdout
    where, name, k = json.loads(out.strip().splitlines()[-1])
    assert Path(where).is_relative_to(site) and name == "qs-plugin" and k == 256
