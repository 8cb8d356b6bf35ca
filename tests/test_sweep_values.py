"""Sweep values beyond scalars: whole component blocks as grid values and linked keys (values
that vary together, zipped not crossed), in a recipe's ``sweep:`` block and as flags; run
names that say what differs; every problem located before anything runs."""
from __future__ import annotations

import shutil

import pytest
import yaml

from vqkit.cli import main
from vqkit.sweep import block_label, expand_grid, parse_grid, plan_sweep, values_name
from vqkit.testing.sweeps import TINY_RECIPE, sweep_runs

pytest_plugins = ("trainkit",)  # fixtures: mlflow_template

VQ8 = {"name": "vq", "params": {"codebook_size": 8}}
VQ16_EMA = {"name": "vq", "params": {"codebook_size": 16, "ema": True}}


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_template):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")
    return tmp_path


def write(folder, text_or_data, name="tiny.yaml"):
    path = folder / name
    path.write_text(text_or_data if isinstance(text_or_data, str) else yaml.safe_dump(text_or_data, sort_keys=False))
    return path


def test_whole_blocks_are_named_by_what_tells_them_apart():
    grid = parse_grid(["quantizer={name: fsq, params: {levels: [8,6,5]}},{name: fsq, params: {levels: [4,4,4,4]}},"
                       "{name: vq, params: {codebook_size: 256}}", "reset={name: none},{name: random, every: 50}"])
    assert grid["quantizer"][0] == {"name": "fsq", "params": {"levels": [8, 6, 5]}}
    names = [c.name for c in expand_grid(grid)]
    # the name alone where it is unique among the choices, the differing params where it is not
    assert names[:3] == ["quantizer=fsq(levels=[8,6,5]) reset=none", "quantizer=fsq(levels=[8,6,5]) reset=random",
                         "quantizer=fsq(levels=[4,4,4,4]) reset=none"]
    assert names[4] == "quantizer=vq reset=none"
    # a param only one of two same-named blocks sets; a mapping that is not a component block
    assert block_label(VQ8, [VQ8, VQ16_EMA]) == "vq(K=8,ema=default)"
    assert block_label(VQ16_EMA, [VQ8, VQ16_EMA]) == "vq(K=16,ema=true)"
    assert block_label({"steps": 10, "lr": 0.001}, [{"steps": 10, "lr": 0.001}, {"steps": 10, "lr": 0.002}]) == \
        "{lr=0.001}"
    assert values_name({"quantizer": {"name": "fsq", "params": {"levels": [8, 6, 5]}}}) == "quantizer=fsq"


def test_linked_keys_vary_together_in_the_recipe_and_as_flags(workdir, capsys):
    recipe = write(workdir, {**TINY_RECIPE, "sweep": {
        "grid": {"quantizer": [VQ8, VQ16_EMA], "reset": [{"name": "none"}, {"name": "random", "every": 2}]},
        "link": [["quantizer", "reset"]]}})
    plan = plan_sweep(str(recipe))
    assert [c.name for c in plan.children] == ["quantizer=vq(K=8,ema=default) reset=none",
                                               "quantizer=vq(K=16,ema=true) reset=random"]
    assert [r.model.quantizer.params["codebook_size"] for r in plan.recipes] == [8, 16]
    assert [r.model.reset.name for r in plan.recipes] == ["none", "random"]
    assert plan.name == "tiny sweep quantizer+reset"
    # crossed with an ordinary grid key; the same link given as flags
    plan = plan_sweep(str(recipe), ["train.lr=0.001,0.002"])
    assert len(plan.children) == 4 and plan.children[1].name.endswith("reset=none lr=0.002")
    plain = write(workdir, TINY_RECIPE, "plain.yaml")
    assert main(["sweep", str(plain), "--dry-run", "--grid", "quantizer.params.codebook_size=8,16",
                 "--grid", "train.lr=0.001,0.002", "--link", "quantizer.params.codebook_size,train.lr"]) == 0
    out = capsys.readouterr().out
    assert "1/2  K=8 lr=0.001" in out and "2/2  K=16 lr=0.002" in out


def test_link_and_block_problems_are_located_before_anything_runs(workdir, capsys):
    recipe = write(workdir, """vqkit: 1
name: tiny
data: {name: fashion-mnist, params: {limit: 96}}
encoder: {name: conv, params: {channels: [8, 8], factor: 4, latent_dim: 8}}
quantizer: {name: vq, params: {codebook_size: 16}}
decoder: {name: conv, params: {channels: [8, 8]}}
losses: [{name: pixel-l1}]
sweep:
  grid:
    quantizer: [{name: vq, params: {codebook_size: 8}}, {name: vq, params: {codebok_size: 16}}]
    reset: [{name: none}]
  link:
    - [quantizer, reset]
    - [quantizr, train.lr]
""")
    assert main(["sweep", str(recipe), "--dry-run", "--link", "reset"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{recipe}:13:7: sweep.link.0: linked keys vary together, so each needs as many values: " \
           "quantizer has 2, reset has 1" in err
    assert f"{recipe}:14:7: sweep.link.1: 'quantizr' is not a key of the sweep's grid" in err
    assert "did you mean 'quantizer'?" in err
    assert "--link reset: a link needs two or more grid keys" in err and "'reset' is linked twice" in err
    # a bad param inside a whole block is located at the recipe's grid key, for the child it concerns
    assert main(["sweep", str(recipe), "--dry-run", "--set", "sweep.link=[]"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:10:5: quantizer.params.codebok_size: " in err and "did you mean 'codebook_size'" in err
    assert "[child 'quantizer=vq(codebok_size=16,K=default) reset=none']" in err
    # a range cannot be linked
    assert main(["sweep", str(recipe), "--dry-run", "--set", "sweep.link=[]", "--search", "random",
                 "--grid", "quantizer={name: vq}", "--space", "train.lr={low: 0.001, high: 0.01}",
                 "--link", "train.lr,quantizer"]) == 2
    assert "--link train.lr,quantizer: 'train.lr' is a range; only lists of values can be linked" in \
        capsys.readouterr().err
    assert not (workdir / "runs").exists()


def test_a_linked_sweep_runs_children_named_for_their_blocks(workdir, capsys):
    recipe = write(workdir, TINY_RECIPE)
    assert main(["sweep", str(recipe), "--grid", "quantizer={name: vq, params: {codebook_size: 8}},"
                 "{name: vq, params: {codebook_size: 16, ema: true}}",
                 "--grid", "reset={name: none},{name: random, every: 2}", "--link", "quantizer,reset"]) == 0
    (parent,), children = sweep_runs(f"sqlite:///{workdir / 'mlflow.db'}")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"quantizer=vq(K=8,ema=default) reset=none", "quantizer=vq(K=16,ema=true) reset=random"}
    assert by_name["quantizer=vq(K=16,ema=true) reset=random"].data.params["quantizer.params.codebook_size"] == "16"
    assert by_name["quantizer=vq(K=16,ema=true) reset=random"].data.params["reset.name"] == "random"
    assert by_name["quantizer=vq(K=8,ema=default) reset=none"].data.params["reset.name"] == "none"
    assert parent.data.params["sweep.link"] == '[["quantizer", "reset"]]'
    assert parent.info.run_name == "tiny sweep quantizer+reset"


# =========================================================================== tracking.run_name in a grid
def dry_run_names(workdir, capsys, sweep: dict) -> list[str]:
    recipe = write(workdir, {**TINY_RECIPE, "sweep": sweep}, "named.yaml")
    assert main(["sweep", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    return [line.split("  ", 1)[1] for line in out.splitlines() if "/" in line.split("  ", 1)[0]]


def test_linked_run_names_name_the_children(workdir, capsys):
    """A grid value of ``tracking.run_name`` is the child's name, followed by the values of
    the keys not linked with it (so no two children share a name), not ``run_name=... key=...``."""
    names = dry_run_names(workdir, capsys, {
        "grid": {"tracking.run_name": ["slow", "fast"], "train.lr": [0.001, 0.002], "reset.name": ["none", "jukebox"]},
        "link": [["tracking.run_name", "train.lr"]]})
    assert names == ["slow reset=none", "slow reset=jukebox", "fast reset=none", "fast reset=jukebox"]
    names = dry_run_names(workdir, capsys, {
        "grid": {"tracking.run_name": ["a-run", "b-run"], "train.lr": [0.001, 0.002]},
        "link": [["tracking.run_name", "train.lr"]]})
    assert names == ["a-run", "b-run"]


def test_a_value_given_twice_is_located_at_its_grid_key(capsys):
    from pathlib import Path

    from vqkit.cli import main

    quick = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert main(["sweep", quick, "--dry-run", "--grid", "reset.name=none,none", "--grid", "seed=1,2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vqkit: error: --grid reset.name: a value is given twice, so two children would be the same: "
        "reset=none seed=1, reset=none seed=2"]
