"""vqkit-fsq: the vqkit quantizer contract suite, the FSQ grid and its index round trip."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from vqkit_fsq import FSQ

from vqkit.errors import VqkitError
from vqkit.testing import contract_checks

CHECKS = contract_checks("quantizers")


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_contract(check):
    check(FSQ)


@pytest.mark.parametrize("params", [{"levels": [8, 5, 5, 5]}, {"levels": [4, 4, 4, 4], "projections": True}])
@pytest.mark.parametrize("dim", [4, 16])
def test_contract_other_shapes(params, dim):
    """The decode round trip holds with and without projections, for even and odd levels."""
    torch.manual_seed(0)
    q = FSQ(FSQ.Params(**params), dim=dim)
    z = torch.randn(3, dim, 6, 7) * 4  # large values reach the ends of every channel
    for training in (True, False):
        q.train(training)
        out = q(z)
        assert torch.equal(q.decode_indices(out.indices), out.quantized.detach())
    assert (q.project_in is not None) == (dim != 4 or params.get("projections", False))


def _inverse_bound(q: FSQ, rounded: torch.Tensor) -> torch.Tensor:
    """Channel-last inputs whose bounded value is exactly on the grid point ``rounded``."""
    return torch.atanh((rounded + q._offset) / q._amplitude) - q._shift


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 6, 5], [2, 3], [7]])
def test_every_index_is_reached_and_round_trips(levels):
    """Each of the K codes is the index of exactly one grid point, and forward on that
    point gives that index back (without projections: D = len(levels))."""
    q = FSQ(FSQ.Params(levels=levels), dim=len(levels)).eval()
    k = math.prod(levels)
    assert q.codebook_size == k
    codes = q.codebook()
    assert codes.shape == (k, len(levels))
    assert torch.unique(codes, dim=0).shape[0] == k, "two indices decode to the same grid point"
    assert float(codes.min()) == -1.0 and float(codes.max()) <= 1.0
    rounded = codes * torch.tensor([lvl // 2 for lvl in levels], dtype=torch.float32)
    z = _inverse_bound(q, rounded).T.reshape(1, len(levels), 1, k)
    out = q(z)
    assert torch.equal(out.indices.flatten(), torch.arange(k))
    assert torch.equal(out.quantized[0, :, 0].T, codes)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4]])
def test_each_channel_takes_exactly_its_levels(levels):
    q = FSQ(FSQ.Params(levels=levels), dim=len(levels))
    z = torch.linspace(-20, 20, 4001).expand(1, len(levels), 1, 4001)  # saturates both ends
    out = q(z)
    for i, lvl in enumerate(levels):
        values = torch.unique(out.quantized[0, i])
        assert values.numel() == lvl, f"channel {i}: {values.tolist()}"
        half = lvl // 2
        assert torch.equal(values, (torch.arange(lvl, dtype=torch.float32) - half) / half)


def test_straight_through_gradient_is_the_bound_derivative():
    q = FSQ(FSQ.Params(levels=[8, 5]), dim=2).train()
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    q(z).quantized.sum().backward()
    x = z.detach().permute(0, 2, 3, 1)
    expected = (1 - torch.tanh(x + q._shift) ** 2) * q._amplitude / q._half_width
    torch.testing.assert_close(z.grad, expected.permute(0, 3, 1, 2))


def test_projections_learn_and_decode_exactly():
    """With latent_dim 16 and 4 levels the projections are trained by the reconstruction
    gradient; after optimizer steps the decode round trip is still exact."""
    torch.manual_seed(0)
    q = FSQ(FSQ.Params(levels=[8, 5, 5, 5]), dim=16).train()
    target = torch.randn(8, 16, 4, 4)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        out = q(target)
        loss = (out.quantized - target).square().mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.8 * first
    out = q(target)
    assert torch.equal(q.decode_indices(out.indices), out.quantized.detach())


def test_stats():
    q = FSQ(FSQ.Params(levels=[2, 2]), dim=2).train()
    z = torch.tensor([[-5.0, 5.0, 5.0], [-5.0, -5.0, 5.0]]).reshape(1, 2, 1, 3)
    out = q(z)
    assert out.indices.flatten().tolist() == [0, 1, 3]
    assert out.losses == {}
    assert out.stats["usage"] == pytest.approx(0.75)
    assert out.stats["perplexity"] == pytest.approx(3.0)


def test_fixed_codebook_is_declared():
    assert FSQ.fixed_codebook is True
    q = FSQ(dim=4)
    with pytest.raises(NotImplementedError, match="fixed grid"):
        q.replace_codes(torch.tensor([0]), torch.zeros(1, 4))
    assert q.code_parameters() == []


def test_bad_params():
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        FSQ.Params(levels=[8, 1])
    with pytest.raises(ValidationError, match="at most"):
        FSQ.Params(levels=[32] * 5)
    with pytest.raises(ValidationError):
        FSQ.Params(levels=[])
    with pytest.raises(VqkitError, match="latent_dim is 32 but levels has 4 entries"):
        FSQ(FSQ.Params(projections=False), dim=32)


def test_state_dict_holds_only_learned_state():
    """The grid is a function of the params: only the projections are state."""
    q = FSQ(FSQ.Params(levels=[8, 5, 5, 5]), dim=8)
    assert sorted(q.state_dict()) == ["project_in.bias", "project_in.weight", "project_out.bias", "project_out.weight"]
    assert FSQ(FSQ.Params(levels=[8, 5, 5, 5]), dim=4).state_dict() == {}
