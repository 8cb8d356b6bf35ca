"""A run trained with a plugin's component, after that plugin is uninstalled: `vqkit eval`
still works when the missing component is not part of the model (a reset policy), and
`vqkit train --resume` says which distribution (and version) the run needs."""
from __future__ import annotations

import json

from vqkit.cli import main
from vqkit.plugins import build_registry
from vqkit.testing import install_fake_distribution

pytest_plugins = ("trainkit",)  # fixtures: store, workdir

SPLIT = '''
from vqkit import hookimpl
from vqkit.components.resets import RandomReset


class SplitReset(RandomReset):
    """Random reset under another name."""


@hookimpl
def vqkit_register_reset_policies(register):
    register("split", SplitReset)
'''


def test_eval_and_resume_after_the_plugin_is_uninstalled(tmp_path, workdir, store, capsys, use_registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    recipe = tmp_path / "split.yaml"
    recipe.write_text(
        "vqkit: 1\nname: split\nseed: 0\n"
        "data: {name: fashion-mnist, params: {limit: 64}}\n"
        "encoder: {name: conv, params: {channels: [8], factor: 2, latent_dim: 4}}\n"
        "quantizer: {name: vq, params: {codebook_size: 8}}\n"
        "decoder: {name: conv, params: {channels: [8]}}\n"
        "losses: [{name: pixel-l1}]\n"
        "reset: {name: split, every: 1}\n"
        "train: {steps: 2, batch_size: 4, log_every: 1, eval_every: 2, image_every: 2, checkpoint_every: 2, device: cpu}\n"
        "eval: {num_samples: 8, batch_size: 8, metrics: [psnr]}\n"
        "tracking: {experiment: split, output_dir: runs}\n"
    )
    with install_fake_distribution(tmp_path / "d", "vqkit-split", "0.1.0", {"vqkit_split_mod": SPLIT},
                                   {"split": "vqkit_split_mod"}):
        use_registry(build_registry())
        assert main(["train", str(recipe), "--quiet"]) == 0
    run_id = next(line.split()[3] for line in capsys.readouterr().out.splitlines()
                  if line.startswith("vqkit: MLflow run "))
    use_registry(build_registry())  # the plugin is gone
    assert main(["eval", run_id, "--no-log", "--json"]) == 0, capsys.readouterr().err
    assert "eval/psnr" in json.loads(capsys.readouterr().out)
    assert main(["train", "--resume", run_id, "--set", "train.steps=4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqkit: error: ") and err[0].endswith(
        f"reset.name: unknown reset policy 'split' (valid: jukebox, kmeans, none, random); MLflow run {run_id} was "
        "trained with 'split' from distribution vqkit-split==0.1.0, which is not installed "
        "(pip install 'vqkit-split==0.1.0')"), err
