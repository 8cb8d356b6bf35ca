"""Contract checks every registered :class:`~vqkit.interfaces.Prior` must pass.

Each check builds the prior from its ``example_params`` (or default ``Params``) on a tiny
problem (16 codes, a 3x4 grid, unconditional and with 3 classes) and raises
``AssertionError`` with a precise message:

``logits``
    ``forward`` gives float32 ``(B, L, K)`` finite logits, for full grids and prefixes (a
    prefix's logits equal the full grid's first positions);
``causal``
    changing the codes at positions ``>= t`` leaves the logits of positions ``<= t``
    unchanged; with classes, the label changes the logits;
``sample``
    (with weights redrawn at a larger scale, so that the context matters)
    ``sample`` returns int64 ``(n, *grid)`` in ``[0, K)``, the same codes for the same
    generator seed, exactly the codes of the reference recomputation
    (:meth:`Prior.sample`, the whole prefix at every token) with temperature, top-k and
    top-p, and the argmax path with ``top_k=1``;
``gradients_and_state``
    the NLL reaches every trainable parameter with finite gradients; a ``state_dict``
    round trip (``torch.load(weights_only=True)``) keeps the logits; ``sample`` restores
    the training mode.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vqkit.interfaces import Prior
from vqkit.testing.contracts import _seeded, _state_roundtrip, example_params

__all__ = ["prior_contract_checks"]

K, GRID, CLASSES = 16, (3, 4), 3


def _prior(cls: type, num_classes: int = 0) -> Prior:
    return _seeded(0, lambda: cls(example_params(cls), codebook_size=K, grid=GRID, num_classes=num_classes)).eval()


def _codes(n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (n, GRID[0] * GRID[1]), generator=g)


def _labels(n: int = 3) -> torch.Tensor:
    return torch.arange(n) % CLASSES


def check_prior_logits(cls: type) -> None:
    for classes in (0, CLASSES):
        p = _prior(cls, classes)
        assert isinstance(p, Prior), f"{cls.__name__} is not a vqkit.interfaces.Prior"
        assert (p.codebook_size, tuple(p.grid), p.num_classes) == (K, GRID, classes), f"{cls.__name__}: codebook_size/grid/num_classes not kept"
        codes, labels = _codes(), (_labels() if classes else None)
        with torch.no_grad():
            logits = p(codes, labels)
            assert logits.dtype == torch.float32 and logits.shape == (3, codes.shape[1], K), f"{cls.__name__}: logits {logits.dtype} {tuple(logits.shape)}, expected float32 (3, {codes.shape[1]}, {K})"
            assert torch.isfinite(logits).all(), f"{cls.__name__}: non-finite logits"
            prefix = p(codes[:, :5], labels)
        assert prefix.shape == (3, 5, K), f"{cls.__name__}: prefix logits {tuple(prefix.shape)}"
        assert torch.allclose(prefix, logits[:, :5], atol=1e-5, rtol=1e-4), f"{cls.__name__}: logits of a prefix differ from the full grid's first positions"


def check_prior_causal(cls: type) -> None:
    for classes in (0, CLASSES):
        p = _prior(cls, classes)
        codes, labels = _codes(), (_labels() if classes else None)
        with torch.no_grad():
            base = p(codes, labels)
            for t in (0, 5, codes.shape[1] - 1):
                changed = codes.clone()
                changed[:, t:] = (changed[:, t:] + 1 + torch.arange(changed.shape[1] - t)) % K
                other = p(changed, labels)
                assert torch.allclose(other[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=1e-4), f"{cls.__name__}: codes at positions >= {t} changed the logits of positions <= {t} (not causal)"
            if classes:
                other = p(codes, (labels + 1) % CLASSES)
                assert not torch.allclose(other, base), f"{cls.__name__}: the class label does not change the logits"


def _peaky(p: Prior) -> Prior:
    """Redraw every float parameter from N(0, 0.5^2): logits then depend strongly on the
    context, so a sampler that gets the context wrong draws other codes."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in p.parameters():
            if param.is_floating_point():
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return p


def check_prior_sample(cls: type) -> None:
    for classes in (0, CLASSES):
        p = _peaky(_prior(cls, classes))
        labels = _labels(4) if classes else None

        def draw(fn: Callable[..., torch.Tensor], seed: int, labels=labels, **kw) -> torch.Tensor:
            return fn(4, labels, generator=torch.Generator().manual_seed(seed), **kw)

        a = draw(p.sample, 7)
        assert a.dtype == torch.int64 and a.shape == (4, *GRID), f"{cls.__name__}: samples {a.dtype} {tuple(a.shape)}, expected int64 (4, *{GRID})"
        assert int(a.min()) >= 0 and int(a.max()) < K, f"{cls.__name__}: sampled codes outside [0, {K})"
        assert torch.equal(a, draw(p.sample, 7)), f"{cls.__name__}: the same generator seed gave different samples"
        reference = lambda n, lab, p=p, **kw: Prior.sample(p, n, lab, **kw)  # noqa: E731
        for kw in ({}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.8}):
            assert torch.equal(draw(p.sample, 3, **kw), draw(reference, 3, **kw)), f"{cls.__name__}: sample({kw}) differs from recomputing the whole prefix at every token"
        greedy = draw(p.sample, 0, top_k=1).reshape(4, -1)
        with torch.no_grad():
            assert torch.equal(p(greedy, labels).argmax(-1), greedy), f"{cls.__name__}: top_k=1 does not follow the argmax of the logits"


def check_prior_gradients_and_state(cls: type) -> None:
    p = _prior(cls, CLASSES).train()
    codes, labels = _codes(), _labels()
    logits = p(codes, labels)
    F.cross_entropy(logits.reshape(-1, K), codes.reshape(-1)).backward()
    for name, param in p.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{cls.__name__}: no finite gradient for {name}"
    p.sample(2, labels[:2])
    assert p.training, f"{cls.__name__}: sample() did not restore training mode"
    p.eval()
    other = _state_roundtrip(p, lambda: cls(example_params(cls), codebook_size=K, grid=GRID, num_classes=CLASSES)).eval()
    with torch.no_grad():
        assert torch.equal(p(codes, labels), other(codes, labels)), f"{cls.__name__}: state_dict round trip changed the logits"


def prior_contract_checks() -> list[Callable[[type], None]]:
    return [check_prior_logits, check_prior_causal, check_prior_sample, check_prior_gradients_and_state]
