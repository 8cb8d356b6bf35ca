"""vqkit-residual: the vqkit quantizer contract suite and the residual VQ's own behaviour."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from vqkit_residual import ResidualVQ

from vqkit.components.vq import VectorQuantizer
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
