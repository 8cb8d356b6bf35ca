"""What a run's MLflow params look like: a component without params (`reset: {name: none}`,
a loss with none) logs no `<block>.params = {}` param, which MLflow's parallel-coordinates
and compare views would show as a column of `{}`/`unknown` beside the runs that have
`<block>.params.<name>`."""
from __future__ import annotations

import io
from pathlib import Path

from vqkit.recipe import load_recipe
from vqkit.tracking import Tracker

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def test_empty_component_params_are_not_logged(store, tmp_path):
    from mlflow import MlflowClient

    recipe = load_recipe(QUICKSTART, ["reset={name: none}"])
    flat = recipe.flat_params()
    empty = sorted(k for k, v in flat.items() if v == {})
    assert "reset.params" in empty  # the normalized recipe has it; the run must not
    t = Tracker(store, "params", "reset none", stderr=io.StringIO())
    run_id = t.start()
    t.attach(tmp_path / "run")
    t.log_params({**flat, "sweep.extra": {}})
    assert t.finish()
    logged = MlflowClient(tracking_uri=store).get_run(run_id).data.params
    assert not [k for k in empty if k in logged] and "sweep.extra" not in logged
    assert not [k for k, v in logged.items() if v == "{}"]
    assert logged["reset.name"] == "none" and logged["quantizer.params.codebook_size"] == "256"
    assert logged["encoder.params.channels"] == "[16, 32]"  # lists stay, as values
