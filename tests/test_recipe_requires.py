"""A recipe's ``requires:`` names the distributions its components come from: a missing
or too-old one is a located error with its install line, and an unknown component of such a
recipe names the distributions that are missing, e.g. the quantizer comparison sweep without
``vqkit-fsq`` and ``vqkit-residual``."""
from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest

from vqkit.cli import main
from vqkit.plugins import build_registry

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quantizers" / "fashion-mnist.yaml"


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("vqkit: error:")]


def uninstall(gone: set[str], use_registry, monkeypatch) -> None:
    """As if the distributions ``gone`` were not installed: their entry points are not
    loaded and ``importlib.metadata.version`` does not find them."""
    use_registry(build_registry(entry_points=[
        ep for ep in md.entry_points(group="vqkit") if ep.dist is None or ep.dist.name not in gone]))
    real_version = md.version

    def version(name):
        if name in gone:
            raise md.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(md, "version", version)


def test_the_quantizer_sweep_without_its_plugins_names_them(capsys, use_registry, monkeypatch):
    uninstall({"vqkit-fsq", "vqkit-residual"}, use_registry, monkeypatch)
    code = main(["sweep", str(RECIPE), "--dry-run"])
    lines = errors(capsys.readouterr().err)
    assert code == 2
    text = RECIPE.read_text().splitlines()
    row = next(i + 1 for i, t in enumerate(text) if t.startswith("requires:"))
    # the recipe's requires are checked first: two lines, each with its install line
    assert lines == [
        f"vqkit: error: {RECIPE}:{row + 1}:{text[row].index('vqkit-fsq') + 1}: requires.0: distribution 'vqkit-fsq' is not installed "
        "(install it: pip install -e plugins/vqkit-fsq)",
        f"vqkit: error: {RECIPE}:{row + 2}:{text[row + 1].index('vqkit-residual') + 1}: requires.1: distribution 'vqkit-residual' is not installed "
        "(install it: pip install -e plugins/vqkit-residual)",
    ]
    # a child's unknown quantizer (a grid value) names them too
    code = main(["validate", str(RECIPE), "--set", "quantizer={name: fsq}", "--set", "reset={name: none}"])
    lines = errors(capsys.readouterr().err)
    assert code == 2 and len(lines) == 3 and lines[2].endswith(
        "quantizer.name: unknown quantizer 'fsq' (valid: vq); the recipe requires vqkit-fsq, vqkit-residual: "
        "not installed"), lines


def test_a_third_party_recipe_names_its_distribution(tmp_path, capsys):
    quickstart = (ROOT / "recipes" / "quickstart.yaml").read_text()
    path = tmp_path / "third.yaml"
    path.write_text(quickstart.replace("name: quickstart\n", "name: third\nrequires: [vqkit-moonbeam>=1.2]\n")
                    .replace("{name: vq,", "{name: moonbeam,"))
    assert main(["validate", str(path), "--json"]) == 2
    problems = json.loads(capsys.readouterr().out)[0]["problems"]
    assert [(p["path"], p["message"]) for p in problems] == [
        ("requires.0", "distribution 'vqkit-moonbeam' is not installed (install it: pip install 'vqkit-moonbeam>=1.2')"),
        ("quantizer.name", "unknown quantizer 'moonbeam' (valid: fsq, residual, vq); "
                           "the recipe requires vqkit-moonbeam: not installed"),
    ]
    # an installed distribution of the wrong version; a requirement that is not one
    path.write_text(quickstart.replace("name: quickstart\n", "name: third\nrequires: ['vqkit-fsq>=99', 'a b']\n"))
    assert main(["validate", str(path)]) == 2
    assert errors(capsys.readouterr().err) == [
        f"vqkit: error: {path}:7:12: requires.0: distribution 'vqkit-fsq' is {md.version('vqkit-fsq')}, the recipe "
        "requires vqkit-fsq>=99 (install it: pip install 'vqkit-fsq>=99')",
        f"vqkit: error: {path}:7:29: requires.1: 'a b' is not a requirement (a distribution name with an optional "
        "version, e.g. vqkit-fsq>=0.1)",
    ]
    # satisfied: validates, and the normalized recipe (params, hash) does not carry the key
    path.write_text(quickstart.replace("name: quickstart\n", "name: third\nrequires: [vqkit-fsq>=0.1]\n"))
    assert main(["validate", str(path)]) == 0
    assert main(["explain", str(path)]) == 0
    assert "requires" not in capsys.readouterr().out


def test_an_unknown_component_names_the_plugins_that_are_blocked(capsys, use_registry, monkeypatch):
    """Installed but blocked (VQKIT_DISABLE_PLUGINS): the unknown component says which
    plugins, of which distributions, are blocked, rather than only 'unknown'."""
    monkeypatch.setenv("VQKIT_DISABLE_PLUGINS", "fsq,residual")
    use_registry(build_registry())
    code = main(["validate", str(RECIPE), "--set", "quantizer={name: fsq}", "--set", "reset={name: none}"])
    lines = errors(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and lines[0].endswith(
        "quantizer.name: unknown quantizer 'fsq' (valid: vq); blocked by VQKIT_DISABLE_PLUGINS: fsq (vqkit-fsq), "
        "residual (vqkit-residual)"), lines


@pytest.mark.parametrize("recipe", sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("plugins/vqkit-*/recipes/*.yaml")))
def test_each_plugin_recipe_names_its_distribution_when_it_is_missing(recipe, capsys, use_registry, monkeypatch):
    """plugins/<dist>/recipes/*.yaml use their plugin's quantizer: without the distribution,
    the recipe says which one to install and how, not only "unknown quantizer"."""
    dist = Path(recipe).parts[1]
    uninstall({dist}, use_registry, monkeypatch)
    assert main(["validate", str(ROOT / recipe)]) == 2
    lines = errors(capsys.readouterr().err)
    assert len(lines) == 2, lines
    assert lines[0].endswith(f": requires.0: distribution '{dist}' is not installed "
                             f"(install it: pip install -e plugins/{dist})"), lines
    assert lines[1].endswith(f"; the recipe requires {dist}: not installed"), lines


@pytest.mark.parametrize("value, expected", [
    ("[5]", "--set: requires.0: must be a requirement string ('vqkit-fsq>=0.1') or a mapping "
            "{dist: ..., install: ...} (got 5)"),
    ("[{dist: 5}]", "--set: requires.0.dist: Input should be a valid string (got 5)"),
])
def test_a_bad_requires_item_is_one_error_without_union_branches(capsys, value, expected):
    assert main(["validate", str(ROOT / "recipes" / "quickstart.yaml"), "--set", f"requires={value}"]) == 2
    assert errors(capsys.readouterr().err) == [f"vqkit: error: {expected}"]
