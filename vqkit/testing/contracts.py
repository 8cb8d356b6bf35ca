"""Contract checks every registered component must pass.

Plugin authors run them on their own components::

    from vqkit.testing import contract_checks
    for check in contract_checks("quantizers"):
        check(MyQuantizer)

or parametrize pytest over ``vqkit.testing.registered_cases()`` as vqkit's own suite does.
Each check builds the component from its default ``Params`` (or its ``example_params``
classmethod when it declares one, e.g. a dataset that needs a folder) with small shapes,
and raises ``AssertionError`` with a precise message on violation.

The checks read the component's capability flags (see :mod:`vqkit.interfaces`): a check
that does not apply (``replace_codes`` of a quantizer declaring ``fixed_codebook = True``,
the per-code-book checks of a single-code-book one) raises :class:`NotApplicable`, a
``unittest.SkipTest``, so pytest reports it as skipped with the reason. Parametrize
over the checks (one test each) rather than looping, so that a skip skips one check::

    @pytest.mark.parametrize("check", contract_checks("quantizers"), ids=lambda c: c.__name__)
    def test_contract(check):
        check(MyQuantizer)
Reset policies have their own suite in :mod:`vqkit.testing.reset_contracts`, also returned
by ``contract_checks("reset_policies")``.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import re
import tempfile
import unittest
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from vqkit.interfaces import (
    Decoder,
    Discriminator,
    Encoder,
    PerceptualLoss,
    Quantizer,
    QuantizerOutput,
    ReportsStats,
)

Check = Callable[[type], None]


class NotApplicable(unittest.SkipTest):
    """A contract check that does not apply to a component, given what its class declares
    (pytest and unittest report it as a skip with this reason)."""

_WORKDIR: Path | None = None

#: a stat's name: ``/``-separated words (it becomes part of a metric key)
STAT_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def assert_stats(name: str, stats: Any, logged_as: str) -> None:
    """``stats`` is a mapping of valid stat names to finite plain floats."""
    assert isinstance(stats, Mapping), f"{name}: stats must be a mapping, got {type(stats).__name__}"
    for key, value in stats.items():
        assert isinstance(key, str) and STAT_NAME.fullmatch(key), f"{name}: stat name {key!r} must be /-separated words of [A-Za-z0-9_.-] (it is logged as {logged_as}/<name>)"
        assert isinstance(value, float) and not isinstance(value, bool), f"{name}: stat {key!r} must be a plain float, got {type(value).__name__} (it is logged as {logged_as}/{key})"
        assert math.isfinite(value), f"{name}: stat {key!r} is {value}"


def declares_stats(cls: type) -> None:
    """Raise :class:`NotApplicable` unless ``cls`` overrides :meth:`ReportsStats.stats`."""
    if getattr(cls, "stats", None) is ReportsStats.stats:
        raise NotApplicable(f"{getattr(cls, '__name__', cls)} declares no stats (ReportsStats.stats not overridden)")


def example_params(cls: type) -> Any:
    """The params a contract check builds ``cls`` with."""
    global _WORKDIR
    maker = getattr(cls, "example_params", None)
    if maker is not None:
        if _WORKDIR is None:
            _WORKDIR = Path(tempfile.mkdtemp(prefix="vqkit-contracts-"))
        return maker(_WORKDIR)
    return cls.Params()


def _seeded(seed: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under torch seed ``seed``, leaving the global RNG as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.random.set_rng_state(state)


def _state_roundtrip(module: torch.nn.Module, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Save through torch.save/torch.load(weights_only=True) into a fresh instance."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    other = _seeded(12345, make)
    other.load_state_dict(torch.load(buf, weights_only=True))
    return other


# ----------------------------------------------------------------------------- encoders
def _encoder(cls: type, in_channels: int = 3) -> Encoder:
    return cls(example_params(cls), in_channels=in_channels)


def _encoder_input(enc: Encoder, channels: int) -> torch.Tensor:
    size = 4 * enc.factor
    return torch.rand(2, channels, size, size + enc.factor) * 2 - 1


def check_encoder_shapes(cls: type) -> None:
    for c in (1, 3):
        enc = _seeded(0, _encoder, cls, c)
        x = _encoder_input(enc, c)
        z = enc(x)
        h, w = x.shape[-2] // enc.factor, x.shape[-1] // enc.factor
        assert z.shape == (2, enc.latent_dim, h, w), f"{cls.__name__}: {c}-channel input {tuple(x.shape)} gave {tuple(z.shape)}, expected {(2, enc.latent_dim, h, w)}"
        assert torch.isfinite(z).all(), f"{cls.__name__}: non-finite output"


def check_encoder_gradients(cls: type) -> None:
    enc = _seeded(0, lambda: _encoder(cls))
    x = _encoder_input(enc, 3).requires_grad_(True)
    enc(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, f"{cls.__name__}: no gradient to the input"
    trainable = [p for p in enc.parameters() if p.requires_grad]
    assert trainable, f"{cls.__name__}: no trainable parameters"
    assert all(p.grad is not None for p in trainable), f"{cls.__name__}: a parameter got no gradient"


def check_encoder_determinism_and_state(cls: type) -> None:
    a = _seeded(0, lambda: _encoder(cls)).eval()
    b = _seeded(0, lambda: _encoder(cls)).eval()
    x = _encoder_input(a, 3)
    assert torch.equal(a(x), b(x)), f"{cls.__name__}: same seed, different outputs"
    c = _state_roundtrip(a, lambda: _encoder(cls)).eval()
    assert torch.equal(a(x), c(x)), f"{cls.__name__}: state_dict round trip changed the output"


# ----------------------------------------------------------------------------- decoders
def _decoder(cls: type, out_channels: int = 3, latent_dim: int = 8, factor: int = 4) -> Decoder:
    return cls(example_params(cls), out_channels=out_channels, latent_dim=latent_dim, factor=factor)


def check_decoder_shapes(cls: type) -> None:
    for c, factor in ((1, 2), (3, 4), (3, 8)):
        dec = _seeded(0, _decoder, cls, c, 8, factor)
        z = torch.randn(2, 8, 3, 5)
        x = dec(z)
        assert x.shape == (2, c, 3 * factor, 5 * factor), f"{cls.__name__}: factor {factor}, {c} channels gave {tuple(x.shape)}"
        assert torch.isfinite(x).all(), f"{cls.__name__}: non-finite output"


def check_decoder_gradients_and_state(cls: type) -> None:
    dec = _seeded(0, lambda: _decoder(cls))
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    dec(z).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0, f"{cls.__name__}: no gradient to the latents"
    w = dec.last_layer_weight()
    assert w is None or (isinstance(w, torch.Tensor) and w.requires_grad), f"{cls.__name__}: last_layer_weight must be a trainable tensor or None"
    dec.eval()
    other = _state_roundtrip(dec, lambda: _decoder(cls)).eval()
    with torch.no_grad():
        assert torch.equal(dec(z), other(z)), f"{cls.__name__}: state_dict round trip changed the output"


# ----------------------------------------------------------------------------- quantizers
def _quantizer(cls: type, dim: int = 8) -> Quantizer:
    return cls(example_params(cls), dim=dim)


def _latents(dim: int = 8) -> torch.Tensor:
    return _seeded(1, torch.randn, 3, dim, 4, 5)


def _multi(cls: type) -> bool:
    return bool(getattr(cls, "multi_codebook", False))


def _stages(q: Quantizer) -> list[int | None]:
    """The ``stage`` argument of each code-book: ``[None]`` for one code-book, else 0..S-1."""
    return list(range(int(q.num_codebooks))) if _multi(type(q)) else [None]


def _at(method: Callable[..., Any], stage: int | None, *args: Any) -> Any:
    return method(*args) if stage is None else method(*args, stage)


def check_quantizer_output(cls: type) -> None:
    q = _seeded(0, lambda: _quantizer(cls))
    z = _latents()
    for training in (True, False):
        q.train(training)
        out = q(z)
        assert isinstance(out, QuantizerOutput), f"{cls.__name__}: forward must return QuantizerOutput, got {type(out).__name__}"
        assert dataclasses.is_dataclass(out)
        assert out.quantized.shape == z.shape, f"{cls.__name__}: quantized shape {tuple(out.quantized.shape)} != input {tuple(z.shape)}"
        assert out.indices.dtype == torch.int64, f"{cls.__name__}: indices dtype {out.indices.dtype}, expected int64"
        expected = (3, int(q.num_codebooks), 4, 5) if _multi(cls) else (3, 4, 5)
        assert out.indices.shape == expected, f"{cls.__name__}: indices shape {tuple(out.indices.shape)}, expected {'(B, S, h, w)' if _multi(cls) else '(B, h, w)'} = {expected}"
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
        for name, term in out.losses.items():
            assert term.dim() == 0 and torch.isfinite(term), f"{cls.__name__}: loss {name!r} must be a finite scalar"
        weights = q.loss_weights()
        assert set(weights) <= set(out.losses) or not training, f"{cls.__name__}: loss_weights names {set(weights) - set(out.losses)} not in losses"
        assert_stats(cls.__name__, out.stats, "quantizer")
        if not _multi(cls):
            assert q.codebook().shape == (q.codebook_size, q.dim)
            continue
        for s in _stages(q):
            book = q.codebook(s)
            assert book.dim() == 2 and book.shape[0] == q.codebook_size, f"{cls.__name__}: codebook({s}) shape {tuple(book.shape)}, expected (K, D_s) with K={q.codebook_size}"


def check_quantizer_stage_inputs(cls: type) -> None:
    """Multi-code-book quantizers: ``stage_inputs`` gives one ``(B, D_s, h, w)`` tensor per
    code-book, ``D_s`` the width of ``codebook(s)``, without changing the quantizer."""
    if not _multi(cls):
        raise NotApplicable(f"{cls.__name__} has one code-book (multi_codebook = False)")
    q = _seeded(0, lambda: _quantizer(cls)).eval()
    z = _latents()
    out = q(z)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.no_grad():
        inputs = list(q.stage_inputs(z, out.indices))
    assert len(inputs) == q.num_codebooks, f"{cls.__name__}: stage_inputs returned {len(inputs)} tensors for {q.num_codebooks} code-books"
    for s, x in enumerate(inputs):
        d = q.codebook(s).shape[1]
        assert x.shape == (3, d, 4, 5), f"{cls.__name__}: stage_inputs()[{s}] shape {tuple(x.shape)}, expected (B, D_s, h, w) = {(3, d, 4, 5)}"
        assert torch.isfinite(x).all(), f"{cls.__name__}: stage_inputs()[{s}] is not finite"
    after = q.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), f"{cls.__name__}: stage_inputs changed the quantizer's state"


def check_quantizer_decode_indices(cls: type) -> None:
    q = _seeded(0, lambda: _quantizer(cls))
    z = _latents()
    for training in (True, False):
        q.train(training)
        out = q(z)
        with torch.no_grad():
            dec = q.decode_indices(out.indices)
        assert torch.equal(dec, out.quantized.detach()), f"{cls.__name__}: decode_indices(indices) != quantized (training={training}); max diff {(dec - out.quantized).abs().max():.3g}"


def check_quantizer_gradients(cls: type) -> None:
    q = _seeded(0, lambda: _quantizer(cls)).train()
    z = _latents().requires_grad_(True)
    out = q(z)
    total = out.quantized.square().mean() + sum(q.loss_weights().get(k, 0.0) * v for k, v in out.losses.items())
    total.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0, f"{cls.__name__}: no gradient reaches the encoder output (straight-through)"


def check_quantizer_state(cls: type) -> None:
    q = _seeded(0, lambda: _quantizer(cls)).train()
    z = _latents()
    q(z)
    q.eval()
    q(z)  # may apply an update left pending by the training forward
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(z)
    after = q.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before), f"{cls.__name__}: an eval forward changed its state"
    flat = z.movedim(1, -1).reshape(-1, q.dim)
    assert q.to_code_space(flat).shape == flat.shape, f"{cls.__name__}: to_code_space must keep the (N, D) shape"
    other = _state_roundtrip(q, lambda: _quantizer(cls)).eval()
    assert torch.equal(q(z).quantized, other(z).quantized), f"{cls.__name__}: state_dict round trip changed the output"


def check_quantizer_replace_codes(cls: type) -> None:
    if getattr(cls, "fixed_codebook", False):
        raise NotApplicable(f"{cls.__name__} declares fixed_codebook = True (its codes cannot be replaced)")
    q = _seeded(0, lambda: _quantizer(cls)).train()
    q(_latents())
    for stage in _stages(q):
        where = "" if stage is None else f" (code-book {stage})"
        before = _at(q.codebook, stage).clone()
        dim = before.shape[1]
        idx = torch.tensor([0, q.codebook_size - 1])
        vectors = torch.randn(2, dim)
        _at(q.replace_codes, stage, idx, vectors)
        after = _at(q.codebook, stage)
        keep = torch.ones(q.codebook_size, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(after[keep], before[keep]), f"{cls.__name__}: replace_codes changed other codes{where}"
        assert not torch.equal(after[idx], before[idx]), f"{cls.__name__}: replace_codes did not change the codes{where}"
        if stage is None:
            # the replaced code must now be the nearest code of its own vector (in encoder space)
            z = vectors[:1].reshape(1, q.dim, 1, 1)
            assert int(q.eval()(z).indices.flatten()[0]) == int(idx[0]), f"{cls.__name__}: a replaced code does not quantize its own vector to itself"
            q.train()


# ----------------------------------------------------------------------------- losses
def _loss(cls: type, channels: int = 3) -> PerceptualLoss:
    return cls(example_params(cls), channels=channels)


def _discriminator_for(cls: type, channels: int = 3) -> Discriminator | None:
    if not cls.needs_discriminator:
        return None
    from vqkit.plugins import get_registry

    names = get_registry().names("discriminators")
    assert names, f"{cls.__name__} needs a discriminator but none is registered"
    entry = get_registry().get("discriminators", names[0])
    return _seeded(0, lambda: entry.cls(example_params(entry.cls), channels=channels))


def _images(channels: int = 3, size: int = 32, seed: int = 2) -> torch.Tensor:
    return _seeded(seed, torch.rand, 2, channels, size, size)


def _to_range(x01: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    lo, hi = rng
    return x01 * (hi - lo) + lo


def check_loss_values_and_gradients(cls: type) -> None:
    for c in (1, 3):
        loss = _seeded(0, _loss, cls, c)
        disc = _discriminator_for(cls, c)
        target = _to_range(_images(c), cls.input_range)
        rec = _to_range(_images(c, seed=3), cls.input_range).requires_grad_(True)
        value = loss(rec, target, discriminator=disc)
        assert value.dim() == 0 and torch.isfinite(value), f"{cls.__name__}: loss must be a finite scalar"
        assert float(value.detach()) >= 0, f"{cls.__name__}: negative distance"
        same = loss(target, target, discriminator=disc)
        assert float(same.detach()) <= float(value.detach()), f"{cls.__name__}: identical images are not closer than different ones"
        value.backward()
        assert rec.grad is not None and rec.grad.abs().sum() > 0, f"{cls.__name__}: no gradient to the reconstruction"
        if disc is not None:
            assert all(p.grad is None or p.grad.abs().sum() == 0 for p in disc.parameters()), f"{cls.__name__}: the discriminator received gradient from a generator loss"
        assert all(p.grad is None for p in loss.parameters() if not p.requires_grad)


def check_loss_stats(cls: type) -> None:
    """The declared stats after each forward: valid names, finite plain floats, the same
    names every call (they are logged as ``losses/<name>/<stat>``)."""
    declares_stats(cls)
    loss = _seeded(0, _loss, cls, 3)
    disc = _discriminator_for(cls, 3)
    target = _to_range(_images(3), cls.input_range)
    names = []
    for seed in (3, 4):
        loss(_to_range(_images(3, seed=seed), cls.input_range).requires_grad_(True), target, discriminator=disc)
        stats = loss.stats()
        assert_stats(cls.__name__, stats, "losses/<loss>")
        names.append(sorted(stats))
    assert names[0] == names[1], f"{cls.__name__}: stats names changed between two forwards: {names[0]} then {names[1]}"


def check_loss_determinism(cls: type) -> None:
    a = _seeded(0, lambda: _loss(cls))
    b = _seeded(0, lambda: _loss(cls))
    disc = _discriminator_for(cls)
    x, y = _to_range(_images(), cls.input_range), _to_range(_images(seed=3), cls.input_range)
    assert torch.equal(a(x, y, discriminator=disc), b(x, y, discriminator=disc)), f"{cls.__name__}: same seed, different values"


# ----------------------------------------------------------------------------- discriminators
def check_discriminator(cls: type) -> None:
    for c in (1, 3):
        d = _seeded(0, cls, example_params(cls), channels=c)
        x = _images(c, size=64) * 2 - 1
        x.requires_grad_(True)
        logits = d(x)
        assert logits.dim() == 4 and logits.shape[:2] == (2, 1), f"{cls.__name__}: logits shape {tuple(logits.shape)}, expected (B, 1, h, w)"
        feats = d.features(x)
        assert isinstance(feats, list) and feats, f"{cls.__name__}: features() must return a non-empty list"
        assert all(f.shape[0] == 2 for f in feats)
        logits.mean().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert any(p.grad is not None for p in d.parameters())
    d.eval()
    other = _state_roundtrip(d, lambda: cls(example_params(cls), channels=3)).eval()
    x = _images(3, size=64)
    with torch.no_grad():
        assert torch.equal(d(x), other(x)), f"{cls.__name__}: state_dict round trip changed the output"


def check_discriminator_stats(cls: type) -> None:
    """The declared stats after a forward: valid names, finite plain floats (they are logged
    as ``discriminator/<stat>``)."""
    declares_stats(cls)
    d = _seeded(0, cls, example_params(cls), channels=3)
    names = []
    for seed in (2, 5):
        d(_images(3, size=64, seed=seed) * 2 - 1)
        stats = d.stats()
        assert_stats(cls.__name__, stats, "discriminator")
        names.append(sorted(stats))
    assert names[0] == names[1], f"{cls.__name__}: stats names changed between two forwards: {names[0]} then {names[1]}"


# ----------------------------------------------------------------------------- datasets
def check_dataset(cls: type) -> None:
    params = example_params(cls)
    ds = cls(params, split="train", seed=0)
    assert len(ds) > 0, f"{cls.__name__}: empty train split"
    n = min(len(ds), 4)
    items = [ds[i] for i in range(n)]
    for item in items:
        assert item.dtype == torch.float32, f"{cls.__name__}: item dtype {item.dtype}"
        assert item.shape == (ds.channels, *ds.image_size), f"{cls.__name__}: item shape {tuple(item.shape)} != (channels, *image_size) {(ds.channels, *ds.image_size)}"
        assert float(item.min()) >= -1 and float(item.max()) <= 1, f"{cls.__name__}: values outside [-1, 1]"
    again = cls(copy.deepcopy(params), split="train", seed=0)
    assert all(torch.equal(items[i], again[i]) for i in range(n)), f"{cls.__name__}: not deterministic given params, split and seed"
    test = cls(params, split="test", seed=0)
    assert len(test) > 0, f"{cls.__name__}: empty test split"
    assert test.channels == ds.channels and tuple(test.image_size) == tuple(ds.image_size)


CHECKS: dict[str, list[Check]] = {
    "encoders": [check_encoder_shapes, check_encoder_gradients, check_encoder_determinism_and_state],
    "decoders": [check_decoder_shapes, check_decoder_gradients_and_state],
    "quantizers": [
        check_quantizer_output,
        check_quantizer_decode_indices,
        check_quantizer_gradients,
        check_quantizer_state,
        check_quantizer_replace_codes,
        check_quantizer_stage_inputs,
    ],
    "perceptual_losses": [check_loss_values_and_gradients, check_loss_determinism, check_loss_stats],
    "discriminators": [check_discriminator, check_discriminator_stats],
    "datasets": [check_dataset],
}


def contract_checks(kind: str) -> list[Check]:
    """The checks of one component kind; reset policies get :mod:`vqkit.testing.reset_contracts`."""
    if kind == "reset_policies":
        from vqkit.testing.reset_contracts import reset_contract_checks

        return reset_contract_checks()
    if kind == "priors":
        from vqkit.testing.prior_contracts import prior_contract_checks

        return prior_contract_checks()
    if kind in ("launchers", "searches"):
        from vqkit.testing import sweep_contracts

        return sweep_contracts.launcher_contract_checks() if kind == "launchers" else \
            sweep_contracts.search_contract_checks()
    return list(CHECKS[kind])


def registered_cases() -> list[tuple[str, str, Check]]:
    """(kind, name, check) for every registered component and every check of its kind."""
    from vqkit.plugins import get_registry

    cases = []
    for entry in get_registry().entries():
        for check in contract_checks(entry.kind):
            cases.append((entry.kind, entry.name, check))
    return cases
