"""The built-in ``conv`` encoder and decoder."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from vqkit.components.conv import ConvDecoder, ConvEncoder, ResBlock, level_widths
from vqkit.errors import VqkitError
from vqkit.plugins import build_registry

TINY = {"channels": [8, 16], "latent_dim": 4}


def pair(factor: int, channels: int, **kw) -> tuple[ConvEncoder, ConvDecoder]:
    enc = ConvEncoder(ConvEncoder.Params(factor=factor, **TINY, **kw), in_channels=channels)
    dec = ConvDecoder(
        ConvDecoder.Params(channels=TINY["channels"][::-1], **kw),
        out_channels=channels,
        latent_dim=enc.latent_dim,
        factor=enc.factor,
    )
    return enc, dec


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(16, 16), (16, 24), (32, 8)])
def test_shapes(factor, channels, size):
    torch.manual_seed(0)
    enc, dec = pair(factor, channels)
    x = torch.rand(2, channels, *size) * 2 - 1
    z = enc(x)
    assert z.shape == (2, 4, size[0] // factor, size[1] // factor)
    assert z.dtype == torch.float32
    y = dec(z)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert enc.factor == factor and enc.latent_dim == 4


def test_defaults_construct_and_classic_128_setup():
    enc = ConvEncoder(ConvEncoder.Params(), in_channels=3)
    dec = ConvDecoder(ConvDecoder.Params(), out_channels=3, latent_dim=enc.latent_dim, factor=enc.factor)
    assert (enc.factor, enc.latent_dim) == (4, 64)
    with torch.no_grad():
        z = enc(torch.zeros(1, 3, 128, 128))
        assert z.shape == (1, 64, 32, 32)  # (3,128,128) -> (D,32,32)
        assert dec(z).shape == (1, 3, 128, 128)


def test_size_not_divisible_by_factor_is_a_user_error():
    enc, _ = pair(8, 1)
    with pytest.raises(VqkitError, match=r"28x28 \(HxW\) is not divisible by factor 8.*possible: 1, 2, 4"):
        enc(torch.zeros(1, 1, 28, 28))
    with pytest.raises(VqkitError, match="16x20"):
        enc.check_input_size(16, 20)
    enc.check_input_size(16, 24)  # fine


def test_wrong_channel_count_is_reported():
    enc, dec = pair(2, 3)
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        enc(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expects \(B, 4, h, w\)"):
        dec(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize(
    ("params", "loc", "message"),
    [
        ({"factor": 6}, "factor", "power of two"),
        ({"factor": 0}, "factor", "power of two"),
        ({"factor": 4, "channels": [8, 16, 32, 64]}, "channels", "4 entries but factor 4 gives only 3"),
        ({"channels": []}, "channels", "at least one width"),
        ({"channels": [8, 0]}, "channels", "positive"),
        ({"num_res_blocks": 0}, "num_res_blocks", "greater than or equal to 1"),
        ({"norm": "layer"}, "norm", "group"),
        ({"depth": 3}, "depth", "Extra inputs"),
    ],
)
def test_params_errors_are_located(params, loc, message):
    with pytest.raises(ValidationError) as info:
        ConvEncoder.Params(**params)
    (error,) = info.value.errors()
    assert error["loc"] == (loc,)
    assert message in error["msg"]


def test_level_widths_rule():
    assert level_widths([8, 16], 1 << 3) == [8, 16, 16, 16]
    assert level_widths([8], 4) == [8, 8, 8]
    assert level_widths([8], 1) == [8]
    assert level_widths([16, 8], 8, reverse=True) == [8, 16, 16, 16]
    with pytest.raises(ValueError, match="at most 2 widths"):
        level_widths([8, 16, 32], 2)


def _widths(stages) -> list[list[int]]:
    return [[m.body[-1].out_channels for m in s if isinstance(m, ResBlock)] for s in stages]


def test_decoder_mirrors_encoder():
    enc = ConvEncoder(ConvEncoder.Params(channels=[8, 16], factor=8, num_res_blocks=2), in_channels=3)
    dec = ConvDecoder(
        ConvDecoder.Params(channels=[16, 8], num_res_blocks=2), out_channels=3, latent_dim=64, factor=8
    )
    assert _widths(enc.down) == [[8, 8], [16, 16], [16, 16], [16, 16]]
    assert _widths(dec.up) == [[16, 16], [16, 16], [16, 16], [8, 8]]
    n_down = sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in enc.modules())
    n_up = sum(type(m).__name__ == "Upsample" for m in dec.modules())
    assert n_down == n_up == 3
    assert enc.head[-1].out_channels == dec.conv_in.in_channels == 64
    assert dec.conv_out.in_channels == enc.conv_in.out_channels == 8


def test_decoder_rejects_geometry_it_cannot_build():
    with pytest.raises(VqkitError, match="power of two"):
        ConvDecoder(ConvDecoder.Params(), out_channels=1, latent_dim=4, factor=3)
    with pytest.raises(VqkitError, match="3 entries but factor 2 gives only 2.*from the encoder"):
        ConvDecoder(ConvDecoder.Params(channels=[32, 16, 8]), out_channels=1, latent_dim=4, factor=2)


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
@pytest.mark.parametrize("activation", ["silu", "relu", "gelu", "leaky_relu"])
def test_gradients_reach_every_parameter_and_the_input(norm, activation):
    torch.manual_seed(0)
    enc, dec = pair(4, 3, norm=norm, activation=activation, attention=True)
    x = (torch.rand(2, 3, 16, 8) * 2 - 1).requires_grad_()
    loss = (dec(enc(x)) - x.detach()).abs().mean()
    loss.backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0


def test_last_layer_weight_is_the_final_conv():
    _, dec = pair(2, 3)
    w = dec.last_layer_weight()
    assert isinstance(w, torch.nn.Parameter)
    assert w.shape == (3, 8, 3, 3)
    assert any(w is p for p in dec.parameters())
    # it is really the last layer: changing it changes the output, nothing else does after it
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        before = dec(z)
        w.zero_()
        dec.conv_out.bias.zero_()
        assert torch.equal(dec(z), torch.zeros_like(before))


def test_deterministic_given_seed():
    def build():
        torch.manual_seed(123)
        return pair(4, 1)

    (e1, d1), (e2, d2) = build(), build()
    for a, b in zip([*e1.state_dict().values(), *d1.state_dict().values()],
                    [*e2.state_dict().values(), *d2.state_dict().values()]):
        assert torch.equal(a, b)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(d1(e1(x)), d2(e2(x)))
    torch.manual_seed(124)
    e3, _ = pair(4, 1)
    assert not torch.equal(e3.conv_in.weight, e1.conv_in.weight)


def test_tiny_autoencoder_learns_to_reconstruct():
    torch.manual_seed(0)
    enc, dec = pair(2, 1)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    losses = []
    for _ in range(60):
        loss = (dec(enc(x)) - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_registered_through_the_entry_point():
    registry = build_registry()
    assert registry.get("encoders", "conv").cls is ConvEncoder
    assert registry.get("decoders", "conv").cls is ConvDecoder
    assert registry.get("encoders", "conv").distribution == "vqkit"
