"""The command line: exit codes, messages, machine-readable listings."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vqkit import __version__
from vqkit.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "vqkit.cli", *args], capture_output=True, text=True, cwd=cwd, env=full_env
    )


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vqkit {__version__}"


def test_misspelt_component_in_recipe_exits_2_without_traceback(tmp_path):
    recipe = (ROOT / "recipes" / "quickstart.yaml").read_text()
    assert "name: vq\n" in recipe or "name: vq}" in recipe or "{name: vq," in recipe
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.replace("name: vq", "name: vqq", 1))
    proc = run("validate", str(bad))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = next(i + 1 for i, text in enumerate(bad.read_text().splitlines()) if "vqq" in text)
    assert f"{bad}:{line}:" in proc.stderr
    assert "quantizer.name: unknown quantizer 'vqq' (did you mean 'vq'?" in proc.stderr


@pytest.mark.parametrize("args,expected", [
    (["trian"], "unknown command 'trian' (did you mean 'train'?"),
    (["validate"], "the following arguments are required: RECIPE"),
    (["plugins", "--jsn"], "unknown option '--jsn' (did you mean '--json'?"),
    (["components", "quantiser"], "unknown component kind 'quantiser' (did you mean 'quantizers'?"),
    (["validate", "/nonexistent/recipe.yaml"], "recipe file not found: /nonexistent/recipe.yaml"),
    (["explain", "/nonexistent/recipe.yaml"], "recipe file not found: /nonexistent/recipe.yaml"),
])
def test_user_errors_exit_2_with_message(args, expected, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_every_shipped_recipe_validates():
    recipes = sorted(str(p) for p in (ROOT / "recipes").rglob("*.yaml"))
    assert recipes
    proc = run("validate", "--json", *recipes)
    report = json.loads(proc.stdout)
    assert [r for r in report if not r["ok"]] == []
    assert proc.returncode == 0


def test_validate_json_lists_problems(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vqkit: 1\nname: x\n")
    assert main(["validate", "--json", str(bad)]) == 2
    [report] = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    paths = {p["path"] for p in report["problems"]}
    assert {"data", "encoder", "quantizer", "decoder", "losses"} <= paths
    assert all(p["file"] == str(bad) and p["line"] for p in report["problems"])


def test_validate_build_reports_problems_between_components(capsys):
    """A recipe whose parts are each valid but do not fit together passes the static check
    and fails with --build: exit 2, the recipe file named, no traceback."""
    quick = str(ROOT / "recipes" / "quickstart.yaml")
    mismatch = ["--set", "encoder.params.factor=1", "--set", "encoder.params.channels=[16]"]
    assert main(["validate", quick, *mismatch]) == 0
    capsys.readouterr()
    assert main(["validate", "--build", quick, *mismatch]) == 2
    err = capsys.readouterr().err
    # at the decoder block's line in the recipe file
    line = next(n for n, text in enumerate(Path(quick).read_text().splitlines(), 1) if text.startswith("decoder:"))
    assert re.search(f"vqkit: error: {re.escape(quick)}:{line}:[0-9]+: decoder: decoder 'conv': channels has 2 "
                     "entries but factor 1", err), err
    assert "Traceback" not in err
    assert main(["validate", "--build", "--json", quick, "--set", "data.params.image_size=28",
                 "--set", "encoder.params.factor=8"]) == 2
    [report] = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"][0]["path"] == "encoder"
    assert "28x28" in report["problems"][0]["message"] and report["problems"][0]["file"] == quick
    assert main(["validate", "--build", quick]) == 0


def test_explain_prints_normalized_recipe(capsys):
    assert main(["explain", str(ROOT / "recipes" / "quickstart.yaml"), "--set", "train.steps=3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["train"]["steps"] == 3
    assert data["quantizer"]["params"]["beta"] == 0.25  # default filled in


def test_components_json_lists_every_builtin_with_schema(capsys):
    assert main(["components", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {(c["kind"], c["name"]) for c in data}
    for expected in [("encoders", "conv"), ("decoders", "conv"), ("quantizers", "vq"),
                     ("perceptual_losses", "pixel-l1"), ("perceptual_losses", "pixel-l2"),
                     ("perceptual_losses", "discriminator-features"), ("perceptual_losses", "lpips"),
                     ("discriminators", "patchgan"), ("datasets", "fashion-mnist"),
                     ("datasets", "image-folder"), ("datasets", "natural-patches"),
                     ("reset_policies", "none"), ("reset_policies", "random"),
                     ("reset_policies", "jukebox"), ("reset_policies", "kmeans")]:
        assert expected in names, expected
    for c in data:
        assert set(c) == {"kind", "name", "plugin", "distribution", "version", "summary", "capabilities", "params"}
        assert c["summary"], f"{c['kind']}/{c['name']} has no docstring summary"
        assert c["params"]["type"] == "object"
    vq = next(c for c in data if c["name"] == "vq")
    assert vq["params"]["properties"]["beta"]["default"] == 0.25


def test_components_filters_and_table(capsys):
    assert main(["components", "losses", "pixel-*"]) == 0
    out = capsys.readouterr().out
    assert "pixel-l1" in out and "pixel-l2" in out and "lpips" not in out.split("\n\n")[0]


def test_plugins_lists_builtins(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert all(p["status"] == "ok" for p in data if p["distribution"] == "vqkit")
    provided = {name for p in data for names in p["components"].values() for name in names}
    assert {"vq", "conv", "pixel-l1", "jukebox"} <= provided


def test_every_command_has_help():
    for name, _, _ in COMMANDS:
        proc = run(name, "--help")
        assert proc.returncode == 0 and "usage: vqkit " + name in proc.stdout


def test_help_and_version_do_not_load_torch_or_plugins():
    code = (
        "import sys; from vqkit.cli import main\n"
        "for argv in (['--version'], ['--help'], ['train', '--help']):\n"
        "    try: main(argv)\n"
        "    except SystemExit: pass\n"
        "assert 'torch' not in sys.modules and 'vqkit.plugins' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'vqkit')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
