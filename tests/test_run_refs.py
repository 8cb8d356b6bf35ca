"""One run resolver for every command that takes a run: `vqkit eval`, `train --resume`,
`sample` and a prior recipe's `autoencoder: {run: ...}` accept what `vqkit compare` prints
and accepts (a full id, a unique id prefix such as the 8-character ids of its tables, a
run name); an unknown reference is one located line with a suggestion, an ambiguous one
lists its candidates."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from vqkit.cli import main
from vqkit.commands.train import resolve_checkpoint
from vqkit.errors import VqkitError
from vqkit.tracking import Tracker

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, workdir


def fake_run(store: str, workdir: Path, name: str) -> str:
    """A finished MLflow run with a local run dir holding one (unread) checkpoint file."""
    t = Tracker(store, "refs", name, stderr=io.StringIO())
    run_id = t.start()
    run_dir = workdir / "runs" / run_id
    t.attach(run_dir)
    assert t.finish()
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000004.pt").write_bytes(b"not read here")
    return run_id


@pytest.fixture
def fakes(workdir, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return {name: fake_run(store, workdir, name) for name in ("alpha", "beta", "beta ")}


def test_ids_prefixes_and_names_name_the_same_checkpoint(fakes, workdir):
    rid = fakes["alpha"]
    want = (workdir / "runs" / rid / "checkpoints" / "step_00000004.pt").resolve()
    for ref in (rid, rid[:8], rid[:5].upper(), "alpha"):
        assert resolve_checkpoint(ref).resolve() == want, ref


def test_unknown_and_ambiguous_references_are_one_error_each(fakes, workdir, store):
    with pytest.raises(VqkitError) as exc:
        resolve_checkpoint("alpah")
    text = str(exc.value)
    assert "no MLflow run with id, id prefix or name 'alpah'" in text and "did you mean 'alpha'?" in text

    # a hex prefix that is one character off an existing id: did you mean that id
    rid = fakes["beta"]
    typo = rid[:7] + ("0" if rid[7] != "0" else "1")
    if not any(r.startswith(typo) for r in fakes.values()):
        with pytest.raises(VqkitError) as exc:
            resolve_checkpoint(typo)
        assert f"did you mean {rid[:8]!r}?" in str(exc.value)

    # two runs named alike: "beta" names one exactly; a shared prefix of ids can be ambiguous
    assert resolve_checkpoint("beta").parent.parent.name == fakes["beta"]
    t = Tracker(store, "refs", "beta", stderr=io.StringIO())
    second = t.start()
    assert t.finish()
    with pytest.raises(VqkitError) as exc:
        resolve_checkpoint("beta")
    text = str(exc.value)
    assert "'beta' matches 2 runs" in text and fakes["beta"][:8] in text and second[:8] in text


def test_commands_take_prefixes_and_report_unknown_runs_in_one_line(fakes, workdir, capsys):
    for argv in (["eval", "alpah", "--no-log"], ["train", "--resume", "alpah", "--quiet"],
                 ["sample", "alpah", "-o", "x.png"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vqkit: error: no MLflow run with id, id prefix or name 'alpah'"), err
        assert "did you mean 'alpha'?" in err[0]


def test_a_prior_recipe_names_its_autoencoder_by_prefix_or_name(fakes, workdir, store):
    from vqkit.prior.family import resolve_autoencoder
    from vqkit.recipe import AutoencoderRef

    rid = fakes["alpha"]
    for ref in (rid[:8], "alpha"):
        got = resolve_autoencoder(AutoencoderRef(run=ref), store)
        assert got.parent.parent.name == rid
    with pytest.raises(VqkitError) as exc:
        resolve_autoencoder(AutoencoderRef(run="alpah"), store)
    (problem,) = exc.value.problems
    assert problem.path == "autoencoder.run" and "did you mean 'alpha'?" in problem.message


TINY = {
    "vqkit": 1, "name": "tiny-refs", "seed": 1,
    "data": {"name": "fashion-mnist", "params": {"limit": 64}},
    "encoder": {"name": "conv", "params": {"channels": [8], "factor": 2, "latent_dim": 4}},
    "quantizer": {"name": "vq", "params": {"codebook_size": 16}},
    "decoder": {"name": "conv", "params": {"channels": [8]}},
    "losses": [{"name": "pixel-l1"}],
    "train": {"steps": 2, "batch_size": 8, "log_every": 1, "eval_every": 2, "image_every": 100,
              "checkpoint_every": 2, "device": "cpu"},
    "eval": {"num_samples": 16, "batch_size": 16, "metrics": ["psnr"]},
    "tracking": {"experiment": "refs", "run_name": "tiny refs run"},
}


def test_eval_and_resume_take_the_short_id_and_the_run_name(workdir, store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    assert main(["train", "tiny.yaml", "--quiet"]) == 0
    run_id = capsys.readouterr().out.split("MLflow run ")[1].split()[0]
    assert main(["eval", run_id[:8], "--no-log", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main(["train", "--resume", "tiny refs run", "--set", "train.steps=3", "--quiet"]) == 0
    assert f"MLflow run {run_id}" in capsys.readouterr().out  # the same run continued
