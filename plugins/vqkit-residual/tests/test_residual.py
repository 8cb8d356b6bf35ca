"""vqkit-residual: the vqkit quantizer contract suite and the residual VQ's own behaviour."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from vqkit_residual import ResidualVQ

from vqkit.components.vq import VectorQuantizer
from vqkit.interfaces import CodebookResetPolicy, ResetPlan
from vqkit.testing import contract_checks

CHECKS = contract_checks("quantizers")


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_contract(check):
    check(ResidualVQ)


def _rvq(seed: int = 0, dim: int = 8, **params) -> ResidualVQ:
    torch.manual_seed(seed)
    return ResidualVQ(ResidualVQ.Params(**params), dim=dim)


@pytest.mark.parametrize("options", [{}, {"ema": True}, {"kmeans_init": True}, {"ema": True, "kmeans_init": True, "stages": 4}])
def test_decode_is_exact_in_train_and_eval(options):
    q = _rvq(codebook_size=16, **options)
    z = torch.randn(4, 8, 5, 6)
    for training in (True, True, False, True):
        q.train(training)
        out = q(z)
        assert out.indices.shape == (4, q.num_codebooks, 5, 6) and out.indices.dtype == torch.int64
        assert torch.equal(q.decode_indices(out.indices), out.quantized.detach()), f"training={training}"


def test_one_stage_is_vq():
    """With one stage the residual quantizer is the built-in vq: same codes, indices,
    values and losses from the same seed."""
    torch.manual_seed(3)
    vq = VectorQuantizer(VectorQuantizer.Params(codebook_size=32), dim=8)
    rvq = _rvq(3, codebook_size=32, stages=1)
    z = torch.randn(2, 8, 4, 4)
    a, b = vq(z), rvq(z)
    assert torch.equal(a.indices, b.indices[:, 0])
    assert torch.equal(a.quantized, b.quantized)
    assert set(a.losses) == set(b.losses) and all(torch.equal(a.losses[k], b.losses[k]) for k in a.losses)
    assert isinstance(rvq.stages[0], VectorQuantizer)


def test_stages_quantize_the_residuals():
    """With k-means initialised stages every stage removes energy, and the
    stage inputs are exactly what each stage quantized."""
    q = _rvq(codebook_size=16, stages=3, kmeans_init=True).train()
    z = torch.randn(16, 8, 4, 4)
    out = q(z)
    errors = [out.stats[f"stage{s}/rel_error"] for s in range(3)]
    assert errors[0] < 1.0 and errors[1] < errors[0] and errors[2] < errors[1], errors
    inputs = q.stage_inputs(z, out.indices)
    assert torch.equal(inputs[0], z)
    q.eval()
    for s, stage in enumerate(q.stages):
        assert torch.equal(stage(inputs[s]).indices, out.indices[:, s])
    final = inputs[2] - q.stages[2].decode_indices(out.indices[:, 2])
    torch.testing.assert_close(z - out.quantized, final, rtol=0, atol=1e-6)


def test_gradients_reach_the_latents_and_every_codebook():
    q = _rvq(codebook_size=8, stages=3).train()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    weights = q.loss_weights()
    assert weights == {"commitment": 0.25, "codebook": 1.0}
    total = out.quantized.square().mean() + sum(weights[k] * v for k, v in out.losses.items())
    total.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for s in range(3):
        (embed,) = q.code_parameters(s)
        assert embed.grad is not None and embed.grad.abs().sum() > 0, f"stage {s} got no code-book gradient"
    # the straight-through part alone is the identity
    z2 = z.detach().clone().requires_grad_(True)
    q(z2).quantized.sum().backward()
    assert torch.equal(z2.grad, torch.ones_like(z2))


def test_replace_codes_acts_on_one_stage():
    q = _rvq(codebook_size=8, stages=2).train()
    z = torch.randn(2, 8, 3, 3)
    q(z)
    before = q.codebook().clone()
    vectors = torch.randn(2, 8)
    q.replace_codes(torch.tensor([1, 5]), vectors, stage=1)
    after = q.codebook()
    assert torch.equal(after[0], before[0]), "another stage changed"
    assert torch.equal(after[1, [1, 5]], vectors)
    assert torch.equal(after[1, [0, 2, 3, 4, 6, 7]], before[1, [0, 2, 3, 4, 6, 7]])
    # a replaced code of stage 1 is the nearest code of its vector in that stage's space
    assert int(q.stages[1].eval()(vectors[:1].reshape(1, 8, 1, 1)).indices) == 1
    # and the next forward decodes exactly with the new code-book
    q.train()
    out = q(z)
    assert torch.equal(q.decode_indices(out.indices), out.quantized.detach())


def test_state_dict_round_trip_with_ema():
    q = _rvq(codebook_size=8, stages=2, ema=True).train()
    z = torch.randn(2, 8, 3, 3)
    q(z)
    q(z)
    other = _rvq(5, codebook_size=8, stages=2, ema=True)
    other.load_state_dict(q.state_dict())
    q.eval()
    other.eval()
    assert torch.equal(q(z).quantized, other(z).quantized)


def test_bad_params_and_shapes():
    with pytest.raises(ValidationError, match="cosine is not supported"):
        ResidualVQ.Params(cosine=True)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        ResidualVQ.Params(stages=0)
    q = _rvq(stages=2)
    with pytest.raises(ValueError, match=r"indices \(B, 2, h, w\)"):
        q.decode_indices(torch.zeros(1, 3, 3, dtype=torch.int64))
    with pytest.raises(IndexError, match="stage 2 out of range"):
        q.codebook(2)


class _Recording(CodebookResetPolicy):
    """A reset policy that records what it observes and resets the codes it is told to."""

    def __init__(self, params=None, *, codebook_size, dim, seed=0, reset=()):
        self.codebook_size, self.dim, self.seen, self.reset = codebook_size, dim, [], list(reset)

    def observe(self, z, indices):
        self.seen.append((z.clone(), indices.clone()))

    def plan(self, codebook, step):
        self.planned_on = codebook.clone()
        idx = torch.tensor(self.reset, dtype=torch.int64)
        return ResetPlan(idx, torch.arange(len(self.reset) * self.dim, dtype=torch.float32).reshape(-1, self.dim) + 7)


def test_shared_reset_is_one_policy_over_every_stage():
    """shared_reset: one policy sees both stages as one code-book of S*K codes (stage s's
    code k numbered s*K + k, observed with the residuals that stage quantized); its plan is
    applied stage by stage (codes, Adam rows, that stage's reset count). Per stage (the
    default): one policy per stage, each seeing only its stage."""
    from vqkit.recipe import ResetRef
    from vqkit.train.codebook import codebook_manager

    q = _rvq(codebook_size=4, stages=2, dim=3, shared_reset=True).train()
    assert q.shared_reset and not _rvq(codebook_size=4, stages=2, dim=3).shared_reset
    opt = torch.optim.Adam(q.parameters())
    z = torch.randn(2, 3, 2, 2)
    out = q(z)
    (out.quantized.square().mean() + sum(out.losses.values())).backward()
    opt.step()
    policy = _Recording(codebook_size=8, dim=3, reset=[1, 6])
    manager = codebook_manager(q, [policy], ResetRef(name="random", every=1))
    before = q.codebook().clone()
    assert manager.after_step(0, z, out.indices, [opt]) == 2
    seen_z, seen_i = policy.seen[0]
    inputs = q.stage_inputs(z, out.indices)
    assert seen_z.shape == (16, 3) and torch.equal(seen_z[:8], inputs[0].movedim(1, -1).reshape(-1, 3))
    assert torch.equal(seen_z[8:], inputs[1].movedim(1, -1).reshape(-1, 3))
    assert torch.equal(seen_i, torch.cat([out.indices[:, 0].reshape(-1), out.indices[:, 1].reshape(-1) + 4]))
    assert torch.equal(policy.planned_on, before.reshape(8, 3))
    after = q.codebook()
    assert torch.equal(after[0, 1], torch.tensor([7.0, 8.0, 9.0])) and torch.equal(after[1, 2], torch.tensor([10.0, 11.0, 12.0]))
    assert torch.equal(after[0, [0, 2, 3]], before[0, [0, 2, 3]]) and torch.equal(after[1, [0, 1, 3]], before[1, [0, 1, 3]])
    for s, row in ((0, 1), (1, 2)):
        state = opt.state[q.code_parameters(s)[0]]
        assert not state["exp_avg"][row].any() and state["exp_avg"].abs().sum() > 0
    metrics = manager.monitor.metrics(0)
    assert metrics["codebook/0/resets"] == 1 and metrics["codebook/1/resets"] == 1 and metrics["codebook/resets"] == 2
    # the checkpoint state round-trips, and does not load into per-stage resets
    again = codebook_manager(q, [_Recording(codebook_size=8, dim=3)], ResetRef(name="random", every=1))
    again.load_state_dict(manager.state_dict())
    per_stage = _rvq(codebook_size=4, stages=2, dim=3)
    staged = codebook_manager(per_stage, [_Recording(codebook_size=4, dim=3), _Recording(codebook_size=4, dim=3)],
                              ResetRef(name="random", every=1))
    with pytest.raises(ValueError, match="shared_reset differs"):
        staged.load_state_dict(manager.state_dict())
    out = per_stage(z)
    staged.after_step(0, z, out.indices, [])
    assert [p.seen[0][1].max() < 4 for p in (staged.managers[0].policy, staged.managers[1].policy)] == [True, True]


@pytest.mark.parametrize("shared", [False, True])
def test_resets_train_shared_or_per_stage(shared, tmp_path, monkeypatch):
    """A short training with the built-in random resets: the recipe's shared_reset decides how
    many policies are built; both replace dead codes of every stage."""
    import yaml
    from mlflow import MlflowClient

    from vqkit.cli import main
    from vqkit.model import VQModel
    from vqkit.recipe import load_recipe
    from vqkit.testing.sweeps import TINY_RECIPE, sqlite_store
    from vqkit.train.build import build_policies

    monkeypatch.chdir(tmp_path)
    uri = sqlite_store(tmp_path)
    recipe = tmp_path / "rvq.yaml"
    recipe.write_text(yaml.safe_dump({
        **TINY_RECIPE, "quantizer": {"name": "residual", "params": {"stages": 2, "codebook_size": 64,
                                                                     "shared_reset": shared}},
        "reset": {"name": "random", "every": 2}, "train": {**TINY_RECIPE["train"], "steps": 4}}))
    loaded = load_recipe(str(recipe), [])
    policies = build_policies(loaded, VQModel.from_recipe(loaded, channels=1))
    assert [p.codebook_size for p in policies] == ([128] if shared else [64, 64])
    assert main(["train", str(recipe), "--quiet", "--set", f"tracking.uri={uri}"]) == 0
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    assert run.data.params["quantizer.params.shared_reset"] == str(shared)
    for s in (0, 1):  # 64 codes per stage, 64 latents per step: both stages have dead codes
        resets = client.get_metric_history(run.info.run_id, f"codebook/{s}/resets")
        assert sum(m.value for m in resets) > 0, f"stage {s}: no code was reset"
