"""The docs stay true: hooks documented with their exact arguments, every component param
described, the plugin distribution of docs/plugins.md builds, installs, passes its tests
and trains as written, and the README's recipe examples validate."""
from __future__ import annotations

import configparser
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vqkit import hookspecs
from vqkit.cli import main
from vqkit.interfaces import KINDS
from vqkit.plugins import get_registry

pytest_plugins = ("trainkit",)  # fixture: store (a migrated MLflow sqlite store)

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DOC = (ROOT / "docs" / "plugins.md").read_text()
README = (ROOT / "README.md").read_text()


def test_every_hook_is_documented_with_its_signature():
    specs = {n: f for n, f in vars(hookspecs).items() if n.startswith("vqkit_")}
    assert {n.removeprefix("vqkit_register_") for n in specs} == set(KINDS)
    documented = set(re.findall(r"`(vqkit_\w+)\((.*?)\)`", PLUGINS_DOC))
    expected = {(n, ", ".join(inspect.signature(f).parameters)) for n, f in specs.items()}
    assert documented == expected


def test_every_component_param_is_described():
    for entry in get_registry().entries():
        for name, field in entry.cls.Params.model_fields.items():
            assert field.description, f"{entry.kind}/{entry.name}: param {name!r} has no description"


def doc_files(text: str) -> dict[str, str]:
    """The code blocks that start with a ``# <path>`` comment line: path -> content."""
    files = {}
    for body in re.findall(r"```\w+\n(.*?)```", text, re.S):
        first = body.splitlines()[0]
        if first.startswith("# ") and re.fullmatch(r"# [\w./-]+\.(py|toml|cfg|yaml)", first):
            files[first[2:]] = body
    return files


def test_each_component_kind_has_a_section_with_its_contract_suite():
    sections = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", PLUGINS_DOC, re.S | re.M))
    for title, kind in [("Encoder", "encoders"), ("Decoder", "decoders"), ("Quantizer", "quantizers"),
                        ("Perceptual loss", "perceptual_losses"), ("Reset policy", "reset_policies"),
                        ("Dataset", "datasets"), ("Discriminator", "discriminators")]:
        assert f'contract_checks("{kind}")' in sections[title], title
        assert "Constructed as" in sections[title], title
        # every capability flag of the kind is named in its section
        for flag in KINDS[kind].CAPABILITIES:
            assert f"`{flag}" in sections[title] or f"{flag} =" in sections[title], (title, flag)


@pytest.fixture
def doc_plugin(tmp_path, use_registry):
    """The `vqkit-example` distribution written from docs/plugins.md alone and pip-installed
    (no dependencies, no build isolation: nothing is downloaded) into a private target folder
    put on sys.path for the test; removed afterwards."""
    files = doc_files(PLUGINS_DOC)
    src, site = tmp_path / "src", tmp_path / "site"
    for path, body in files.items():
        if path == "setup.cfg":  # the alternative form of pyproject.toml's entry points
            continue
        target = src / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    sys.path.insert(0, str(site))
    use_registry(None)
    try:
        yield files, src, site
    finally:
        sys.path.remove(str(site))
        for name in [m for m in sys.modules if m.split(".")[0] == "vqkit_example"]:
            del sys.modules[name]


def test_the_doc_plugin_installs_passes_its_contract_tests_and_trains(doc_plugin, tmp_path, store, capsys, monkeypatch):
    files, src, site = doc_plugin
    # the setup.cfg form declares the same entry points as pyproject.toml
    cfg = configparser.ConfigParser()
    cfg.read_string(files["setup.cfg"])
    from_cfg = dict(line.split(" = ") for line in cfg["options.entry_points"]["vqkit"].strip().splitlines())
    section = re.search(r"^\[project\.entry-points\.vqkit\]\n(.*?)(?:\n\n|\Z)", files["pyproject.toml"], re.S | re.M)
    from_toml = dict(re.findall(r'^(\w+) = "([\w.]+)"$', section.group(1), re.M))
    assert from_cfg == from_toml == {"huber": "vqkit_example.huber", "binary": "vqkit_example.binary"}

    # installed: both components come from the distribution, with their capabilities
    registry = get_registry()
    binary = registry.get("quantizers", "binary")
    assert (binary.distribution, binary.version, binary.plugin) == ("vqkit-example", "0.1.0", "binary")
    assert binary.cls.capabilities() == {"fixed_codebook": True, "multi_codebook": False}
    assert registry.get("perceptual_losses", "huber").distribution == "vqkit-example"

    # its own tests, run as its author would (from outside the source tree)
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
         str(src / "tests")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\b\d+ passed, 2 skipped\b", run.stdout), run.stdout
    assert "declares fixed_codebook = True" in run.stdout and "has one code-book" in run.stdout

    # the recipe validates; with a resetting policy it is the error the doc shows
    recipe = tmp_path / "recipes" / "binary.yaml"
    recipe.parent.mkdir()
    recipe.write_text(files["recipes/binary.yaml"])
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "recipes/binary.yaml"]) == 0
    capsys.readouterr()
    recipe.write_text(files["recipes/binary.yaml"].replace("reset:     {name: none}", "reset:     {name: random}"))
    assert main(["validate", "recipes/binary.yaml"]) == 2
    shown = re.search(r"```\n(vqkit: error: recipes/binary.yaml.*?)\n```", PLUGINS_DOC, re.S).group(1)
    assert capsys.readouterr().err.strip() == shown

    # a short training with it
    recipe.write_text(files["recipes/binary.yaml"])
    argv = ["train", "recipes/binary.yaml", "--set", "train.steps=4", "--set", "train.batch_size=8",
            "--set", "data.params.limit=64", "--set", f"tracking.uri={store}", "--set", "train.log_every=2",
            "--set", "eval={num_samples: 16, batch_size: 16}", "--set", "train.device=cpu"]
    assert main(argv) == 0
    from mlflow import MlflowClient

    client = MlflowClient(store)
    (run_info,) = client.search_runs([client.get_experiment_by_name("binary").experiment_id])
    tags, metrics = run_info.data.tags, run_info.data.metrics
    assert tags["vqkit.component.quantizer"] == "binary (vqkit-example 0.1.0)"
    assert tags["vqkit.component.losses.0"] == "huber (vqkit-example 0.1.0)"
    assert tags["vqkit.plugins"] == "vqkit-example==0.1.0, vqkit==0.1.0"
    assert 0.0 <= metrics["quantizer/ones"] <= 1.0 and "loss/commitment" in metrics
    assert 0.0 <= metrics["losses/huber/quadratic_share"] <= 1.0  # the loss's declared stat


def test_readme_recipe_examples_validate(tmp_path):
    """The README's recipe examples (the `extends:` one resolved against recipes/)."""
    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    swap = next(textwrap.dedent(b) for b in blocks if "extends:" in b)
    path = tmp_path / "swap.yaml"
    path.write_text(swap.replace("extends: quickstart.yaml", f"extends: {ROOT / 'recipes' / 'quickstart.yaml'}"))
    assert main(["validate", str(path)]) == 0
    from vqkit.recipe import load_recipe

    data = load_recipe(path).to_dict()
    assert data["reset"]["name"] == "kmeans" and data["reset"]["stop_step"] is None  # replaced
    assert data["quantizer"]["params"]["ema"] is True  # same name: merged
    full = yaml.safe_load(blocks[0])
    assert full["vqkit"] == 1 and main(["validate", str(_write(tmp_path, blocks[0]))]) == 0


def _write(folder: Path, text: str) -> Path:
    path = folder / "full.yaml"
    path.write_text(text)
    return path
