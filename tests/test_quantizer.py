"""The built-in ``vq`` quantizer and its kernels (vqkit.ops): behaviour against plain references."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import vqkit.components.vq as vq_module
from vqkit.components.vq import VectorQuantizer
from vqkit.ops import (
    code_sums,
    inertia,
    kmeans,
    kmeans_plus_plus,
    nearest_codes,
    nearest_two_codes,
    straight_through_vq,
    tile_shape,
)

D = 6


def make(dim: int = D, **kw) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(VectorQuantizer.Params(**{"codebook_size": 24, **kw}), dim=dim)


def latents(b=2, d=D, h=3, w=4, seed=1, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, h, w, generator=g) * scale


def spread(q: VectorQuantizer, seed=2) -> VectorQuantizer:
    """Give the code-book well separated random codes (the default init is tiny)."""
    g = torch.Generator().manual_seed(seed)
    q.replace_codes(torch.arange(q.codebook_size), torch.randn(q.codebook_size, q.dim, generator=g))
    return q


def flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def brute_force(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), codes.double()).argmin(1)


def assert_same_or_tied(idx: torch.Tensor, x: torch.Tensor, codes: torch.Tensor) -> None:
    ref = brute_force(x, codes)
    differ = idx != ref
    if differ.any():
        d = torch.cdist(x.double(), codes.double())
        rows = differ.nonzero().flatten()
        gap = (d[rows, idx[rows]] - d[rows, ref[rows]]).abs()
        assert float(gap.max()) < 1e-5, f"{int(differ.sum())} indices differ from brute force beyond ties"


# ----------------------------------------------------------------------------- search kernel
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
def test_nearest_codes_equal_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 9, generator=g)
    codes = torch.randn(200, 9, generator=g)
    idx, scores = nearest_codes(x, codes, chunk_size)
    assert idx.dtype == torch.int64 and idx.shape == (301,)
    assert_same_or_tied(idx, x, codes)
    d2 = x.square().sum(1) - 2 * scores
    torch.testing.assert_close(d2, (x - codes[idx]).square().sum(1), atol=1e-4, rtol=1e-4)


def test_tile_shape_bounds_memory_independent_of_n_and_k():
    cpu = torch.device("cpu")
    for n, k in [(16384, 8192), (10**6, 65536), (5, 3)]:
        rows, codes = tile_shape(n, k, cpu)
        assert rows * codes <= 1 << 20 and 1 <= rows <= n and 1 <= codes <= k
    assert tile_shape(100, 50, cpu, chunk_size=10) == (1, 10)


def test_nearest_codes_wants_float32():
    with pytest.raises(TypeError):
        nearest_codes(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))


LAYOUTS = {
    "channel-first planes": ((2, 5, 16, 17), False),  # searched in place, image by image
    "channel-first groups": ((5, 5, 16, 17), False),  # batched GEMM over images (2 + 2 + 1 with chunk 6000)
    "small images": ((3, 5, 4, 5), False),  # flattened to rows
    "channels-last": ((2, 5, 16, 17), True),  # rows are a free view
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("chunk_size", [None, 48, 6000])
def test_fused_step_matches_reference_straight_through(layout, chunk_size):
    shape, channels_last = LAYOUTS[layout]
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(*shape, generator=g)
    e0 = torch.randn(11, shape[1], generator=g)
    up = torch.randn(*shape, generator=g)
    if channels_last:
        z0 = z0.contiguous(memory_format=torch.channels_last)
    w_cb, w_cm = 0.7, 0.3

    z, e = z0.clone().requires_grad_(), e0.clone().requires_grad_()
    step = straight_through_vq(z, e, chunk_size=chunk_size)
    ((step.quantized * up).sum() + w_cb * step.codebook_loss + w_cm * step.commitment_loss).backward()

    zr, er = z0.clone().requires_grad_(), e0.clone().requires_grad_()
    idx = brute_force(flat(z0), e0)
    q = er[idx].view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    st = zr + (q - zr).detach()
    ((st * up).sum() + w_cb * F.mse_loss(q, zr.detach()) + w_cm * F.mse_loss(zr, q.detach())).backward()

    assert step.indices.shape == shape[:1] + shape[2:]
    assert torch.equal(step.indices.reshape(-1), idx)
    assert torch.equal(step.quantized, q.detach())
    assert step.quantized.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(step.counts, torch.bincount(idx, minlength=11).float())
    torch.testing.assert_close(step.codebook_loss, F.mse_loss(q, z0))
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(e.grad, er.grad)
    sums = code_sums(z0, step.indices, 11)
    torch.testing.assert_close(sums, torch.zeros(11, shape[1]).index_add_(0, idx, flat(z0)))


# ----------------------------------------------------------------------------- gradients
def test_straight_through_gradient_reaches_the_encoder_output():
    q = spread(make()).train()
    z = latents().requires_grad_()
    out = q(z)
    up = torch.randn_like(z)
    (out.quantized * up).sum().backward()
    assert torch.equal(z.grad, up), "the straight-through estimator passes the gradient unchanged"
    assert q.embed.grad is None or float(q.embed.grad.abs().sum()) == 0.0, "the STE output must not train codes"


def test_codebook_receives_only_the_codebook_loss_gradient():
    q = spread(make()).train()
    z = latents().requires_grad_()
    q(z).losses["commitment"].backward()
    assert q.embed.grad is None or float(q.embed.grad.abs().sum()) == 0.0, "commitment loss moved the codes"
    assert float(z.grad.abs().sum()) > 0

    q.zero_grad()
    z = latents().requires_grad_()
    out = q(z)
    out.losses["codebook"].backward()
    assert z.grad is None or float(z.grad.abs().sum()) == 0.0, "code-book loss reached the encoder"
    x, idx = flat(z.detach()), out.indices.reshape(-1)
    expected = torch.zeros_like(q.embed).index_add_(0, idx, 2 * (q.embed.detach()[idx] - x) / x.numel())
    torch.testing.assert_close(q.embed.grad, expected)


@pytest.mark.parametrize("beta", [0.25, 1.5])
def test_beta_weighs_the_commitment_term(beta):
    q = spread(make(beta=beta)).train()
    assert q.loss_weights() == {"codebook": 1.0, "commitment": beta}
    z = latents().requires_grad_()
    out = q(z)
    w = q.loss_weights()
    sum(w[k] * v for k, v in out.losses.items()).backward()
    x, idx = flat(z.detach()), out.indices.reshape(-1)
    codes = q.embed.detach()
    # encoder: beta * 2 (z - e) / numel; code-book: 2 (e - z) / numel, independent of beta
    grad_z = beta * 2 * (x - codes[idx]) / x.numel()
    torch.testing.assert_close(flat(z.grad), grad_z)
    grad_e = torch.zeros_like(codes).index_add_(0, idx, 2 * (codes[idx] - x) / x.numel())
    torch.testing.assert_close(q.embed.grad, grad_e)
    assert out.losses["commitment"].item() == pytest.approx(out.losses["codebook"].item())
    assert out.losses["commitment"].item() == pytest.approx(F.mse_loss(x, codes[idx]).item(), rel=1e-5)


def test_ema_mode_has_no_codebook_term_and_no_code_parameters():
    q = make(ema=True)
    assert q.loss_weights() == {"commitment": 0.25}
    assert q.code_parameters() == []
    assert not any(p is q.embed for p in q.parameters())
    out = q.train()(latents())
    assert set(out.losses) == {"commitment"}
    learned = make()
    assert learned.code_parameters() == [learned.embed] and learned.embed.requires_grad


# ----------------------------------------------------------------------------- outputs
COMBOS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("ema,cosine,kmeans_init", COMBOS)
def test_decode_indices_reproduces_quantized_exactly(ema, cosine, kmeans_init):
    q = make(ema=ema, cosine=cosine, kmeans_init=kmeans_init, kmeans_iters=3)
    for training, (h, w) in zip((True, True, False, True, False), ((3, 4), (16, 16), (16, 16), (3, 4), (3, 4))):
        q.train(training)
        out = q(latents(h=h, w=w, seed=5 + training, scale=2.0))
        assert out.quantized.shape == (2, D, h, w) and out.indices.shape == (2, h, w)
        assert out.indices.dtype == torch.int64
        assert torch.equal(q.decode_indices(out.indices), out.quantized.detach()), (training, ema, cosine)
        if cosine:
            norms = out.quantized.detach().norm(dim=1)
            torch.testing.assert_close(norms, torch.ones_like(norms))
            torch.testing.assert_close(q.codebook().norm(dim=1), torch.ones(q.codebook_size))


@pytest.mark.parametrize("ema,cosine", list(itertools.product([False, True], repeat=2)))
def test_indices_are_the_brute_force_nearest_codes(ema, cosine):
    q = spread(make(ema=ema, cosine=cosine, codebook_size=40, chunk_size=32))
    q.eval()
    z = latents(b=3, h=5, w=7, seed=9)
    out = q(z)
    x = flat(z)
    codes = q.codebook()
    if cosine:
        x = F.normalize(x, dim=1)
    assert_same_or_tied(out.indices.reshape(-1), x, codes)
    assert torch.equal(flat(out.quantized), codes[out.indices.reshape(-1)])


def test_perplexity_stat():
    q = spread(make(codebook_size=8)).eval()
    z = q.codebook()[torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])].T.reshape(1, D, 2, 4)
    out = q(z)
    assert out.stats["perplexity"] == pytest.approx(4.0, rel=1e-5)


def test_bad_input_shape_is_rejected():
    with pytest.raises(ValueError, match=r"\(B, 6, h, w\)"):
        make()(torch.zeros(2, 5, 3, 3))


# ----------------------------------------------------------------------------- state
def test_no_usage_counter_and_old_checkpoints_with_one_load():
    """Usage is counted by the trainer from the indices; the quantizer keeps no counter
    (the old ``code_counts`` grew without bound and nothing read it). A state dict that
    still has it loads."""
    q = spread(make()).train()
    q(latents())
    assert "code_counts" not in q.state_dict() and not hasattr(q, "take_counts")
    old = {**q.state_dict(), "code_counts": torch.arange(24.0)}
    fresh = make()
    fresh.load_state_dict(old)
    assert torch.equal(fresh.codebook(), q.codebook())


def test_ema_updates_codes_in_training_mode_only_and_follows_the_formula():
    decay, eps = 0.9, 1e-5
    q = spread(make(ema=True, ema_decay=decay, ema_eps=eps, codebook_size=10))
    state0 = {k: v.clone() for k, v in q.state_dict().items()}
    z = latents(seed=4)
    q.eval()(z)
    q.eval()(z)
    for k, v in q.state_dict().items():
        assert torch.equal(v, state0[k]), f"eval forward changed {k}"

    q.train()
    out = q(z)
    assert torch.equal(q.decode_indices(out.indices), out.quantized), "codes changed under the batch that used them"
    x, idx = flat(z), out.indices.reshape(-1)
    counts = torch.bincount(idx, minlength=10).float()
    size = decay * state0["ema_cluster_size"] + (1 - decay) * counts
    sums = decay * state0["ema_embed_sum"] + (1 - decay) * torch.zeros(10, D).index_add_(0, idx, x)
    torch.testing.assert_close(q.ema_cluster_size, size)
    torch.testing.assert_close(q.ema_embed_sum, sums)
    n = size.sum()
    expected = sums / ((size + eps) / (n + 10 * eps) * n).unsqueeze(1)
    torch.testing.assert_close(q.codebook(), expected)
    q.eval()(z)  # the next forward uses the updated codes
    torch.testing.assert_close(q.embed, expected)
    moved = counts > 0
    assert not torch.allclose(q.embed[moved], state0["embed"][moved])


@pytest.mark.parametrize("ema", [False, True])
def test_replace_codes_resets_dependent_state(ema):
    q = spread(make(ema=ema)).train()
    q(latents())
    used = q(latents(seed=7)).indices.flatten().unique()[:3]  # leaves an EMA update pending
    assert used.numel() == 3
    before = q.codebook()
    vectors = torch.randn(3, D) * 5
    q.replace_codes(used, vectors)
    after = q.codebook()
    keep = torch.ones(24, dtype=torch.bool)
    keep[used] = False
    assert torch.equal(after[keep], before[keep])
    assert torch.equal(after[used], vectors)
    if ema:
        assert torch.equal(q.ema_cluster_size[used], torch.ones(3))
        assert torch.equal(q.ema_embed_sum[used], vectors)
        assert not bool(q.ema_pending)
    out = q.eval()(vectors.reshape(3, D, 1, 1))
    assert torch.equal(out.indices.flatten(), used)


def test_kmeans_init_happens_once_and_is_checkpointed(monkeypatch):
    calls = []
    real = vq_module.kmeans

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(vq_module, "kmeans", counting)
    q = make(kmeans_init=True, codebook_size=8, kmeans_iters=5)
    z = latents(b=4, seed=11, scale=3.0)
    q.eval()(z)
    assert calls == [] and not bool(q.kmeans_done), "k-means must wait for a training batch"
    q.train()
    q(z)
    assert calls == [8] and bool(q.kmeans_done)
    # the codes are the k-means centroids of the first batch: its inertia is k-means quality
    x = flat(z)
    assert inertia(x, q.codebook()) < 0.8 * inertia(x, x[torch.randperm(x.shape[0])[:8]])
    q(latents(seed=12))
    assert calls == [8]
    other = make(kmeans_init=True, codebook_size=8)
    other.load_state_dict(q.state_dict())
    other.train()(z)
    assert calls == [8], "a loaded checkpoint must not re-run the k-means initialisation"


@pytest.mark.parametrize("ema,cosine", list(itertools.product([False, True], repeat=2)))
def test_state_dict_round_trip(ema, cosine):
    q = make(ema=ema, cosine=cosine, kmeans_init=True, kmeans_iters=2).train()
    q(latents(seed=1))
    q(latents(seed=2))  # with EMA: leaves an update pending
    state = q.state_dict()
    expected_keys = {"embed", "kmeans_done"}
    if ema:
        expected_keys |= {"ema_cluster_size", "ema_embed_sum", "ema_pending"}
        assert bool(state["ema_pending"])
    assert set(state) == expected_keys
    fresh = make(ema=ema, cosine=cosine, kmeans_init=True, kmeans_iters=2)
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        if ema and k in ("embed", "ema_pending"):  # a loaded model starts with the update applied
            continue
        assert torch.equal(v, state[k]), k
    assert torch.equal(fresh.codebook(), q.codebook())
    if ema:
        assert torch.equal(fresh.embed, q.codebook()) and not bool(fresh.ema_pending)
    z = latents(seed=3)
    for training in (True, False):
        a, b = q.train(training)(z), fresh.train(training)(z)
        assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)


# ----------------------------------------------------------------------------- precision
def test_search_runs_in_float32_under_bf16_autocast():
    q = make(codebook_size=2, dim=4).eval()
    # two codes that bf16 cannot tell apart: only an fp32 search finds the nearer one
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    codes = torch.stack([base, base + torch.tensor([0.0, 0.0, 0.0, 2e-3])])
    q.replace_codes(torch.arange(2), codes)
    x = torch.stack([base + torch.tensor([0.0, 0.0, 0.0, 1.9e-3])] * 3)
    z = x.T.reshape(1, 4, 3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        assert out.losses["commitment"].dtype == torch.float32
    assert out.indices.flatten().tolist() == [1, 1, 1]
    assert out.quantized.dtype == z.dtype == torch.float32
    zb = z.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outb = q(zb)
    assert outb.quantized.dtype == torch.bfloat16
    assert torch.equal(outb.quantized, q.decode_indices(outb.indices).to(torch.bfloat16))


@pytest.mark.parametrize("k,chunk_size", [(1, None), (2, None), (200, 7), (200, 1000), (1500, None), (1500, 3000)])
def test_nearest_two_codes_gives_the_runner_up(k, chunk_size):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(257, 9, generator=g)
    codes = torch.randn(k, 9, generator=g)
    idx, best, second = nearest_two_codes(x, codes, chunk_size)
    assert_same_or_tied(idx, x, codes)
    ref = (x.double() @ codes.double().t() - 0.5 * codes.double().square().sum(1)).float()
    top = ref.topk(min(k, 2), dim=1).values
    torch.testing.assert_close(best, top[:, 0], atol=1e-4, rtol=1e-5)
    if k == 1:
        assert bool(torch.isinf(second).all()) and bool((second < 0).all())
    else:
        torch.testing.assert_close(second, top[:, 1], atol=1e-4, rtol=1e-5)
    assert bool((second <= best).all())


# ----------------------------------------------------------------------------- k-means
def blobs(n=600, d=5, k=6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 6
    return centres[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g) * 0.3


def test_kmeans_api_and_determinism():
    x = blobs()
    a = kmeans(x, 6, 20, torch.Generator().manual_seed(1))
    b = kmeans(x, 6, 20, torch.Generator().manual_seed(1))
    centroids, assign, inert = a
    assert centroids.shape == (6, 5) and assign.shape == (600,) and assign.dtype == torch.int64
    assert torch.equal(centroids, b.centroids) and torch.equal(assign, b.assignments) and inert == b.inertia
    assert_same_or_tied(assign, x, centroids)
    assert inert == pytest.approx(float((x - centroids[assign]).square().sum()), rel=1e-4)
    assert inert == pytest.approx(inertia(x, centroids), rel=1e-6)
    # well separated blobs: k-means++ + Lloyd finds them (noise variance 0.09 per dimension)
    assert inert / x.numel() < 0.12


def test_kmeans_with_init_and_zero_iterations():
    x = blobs()
    init = x[:6].clone()
    res = kmeans(x, 6, 0, init=init)
    assert torch.equal(res.centroids, init)
    assert torch.equal(res.assignments, brute_force(x, init))
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 6, 1, init=x[:5])


def test_kmeans_lloyd_step_is_the_mean_of_assigned_rows():
    x = blobs(n=200)
    init = x[:6].clone()
    one = kmeans(x, 6, 1, init=init)
    a0 = brute_force(x, init)
    means = torch.stack([x[a0 == j].mean(0) if (a0 == j).any() else init[j] for j in range(6)])
    torch.testing.assert_close(one.centroids, means)


def test_kmeans_plus_plus_spreads_centres_and_handles_k_above_n():
    x = blobs(k=6)
    c = kmeans_plus_plus(x, 6, torch.Generator().manual_seed(0))
    rand = x[torch.randperm(600, generator=torch.Generator().manual_seed(0))[:6]]
    assert inertia(x, c) < inertia(x, rand)
    small = torch.randn(5, 3)
    c = kmeans_plus_plus(small, 9, torch.Generator().manual_seed(0))
    assert c.shape == (9, 3)
    assert {tuple(r.tolist()) for r in c} == {tuple(r.tolist()) for r in small}
    res = kmeans(small, 9, 3, torch.Generator().manual_seed(0))
    assert res.inertia == pytest.approx(0.0, abs=1e-5)
    assert math.isfinite(res.inertia)


def fashion_patches(n_images: int = 400, size: int = 4) -> torch.Tensor:
    """Real data: non-overlapping ``size`` x ``size`` patches of Fashion-MNIST test images
    (many exact duplicates: the flat background)."""
    from vqkit.components.fashion_mnist import FashionMnist

    images = FashionMnist(FashionMnist.Params(limit=n_images), split="test").get_batch(range(n_images))
    patches = images.unfold(2, size, size).unfold(3, size, size)  # (n, 1, 8, 8, size, size)
    return patches.reshape(-1, size * size).contiguous()


@pytest.mark.parametrize("k", [128, 256])
def test_kmeans_moved_centroid_search_equals_full_lloyd(monkeypatch, k):
    """The iterations that search only the moved centroids give Lloyd's result."""
    import sys

    kmeans_module = sys.modules["vqkit.ops.kmeans"]
    x = fashion_patches(100)  # 6,400 patches: 25-50 per centroid
    init = kmeans_plus_plus(x, k, torch.Generator().manual_seed(0))
    calls = []
    real = kmeans_module._reassign

    def spy(*args, **kwargs):
        calls.append(int(args[3].sum()))
        return real(*args, **kwargs)

    monkeypatch.setattr(kmeans_module, "_reassign", spy)
    for iters in (1, 6, 30):
        fast = kmeans(x, k, iters, init=init)
        monkeypatch.setattr(kmeans_module, "MOVED_SHARE", -1.0)  # every step a full search
        full = kmeans(x, k, iters, init=init)
        monkeypatch.setattr(kmeans_module, "MOVED_SHARE", 0.5)
        assert fast.inertia == pytest.approx(full.inertia, rel=1e-6)
        torch.testing.assert_close(fast.centroids, full.centroids, atol=1e-5, rtol=1e-5)
        assert_same_or_tied(fast.assignments, x, fast.centroids)
        assert fast.inertia == pytest.approx(float((x - fast.centroids[fast.assignments]).square().sum()), rel=1e-4)
    assert calls and min(calls) < k // 2, "the moved-centroid search was not exercised"


@pytest.mark.parametrize("large", [False, True])
def test_code_sums_both_accumulation_orders(monkeypatch, large):
    import sys

    monkeypatch.setattr(sys.modules["vqkit.ops.search"], "LARGE_CODEBOOK_ELEMENTS", 1 if large else 1 << 30)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 5, 16, 17, generator=g)
    idx = torch.randint(0, 11, (2, 16, 17), generator=g)
    expected = torch.zeros(11, 5).index_add_(0, idx.reshape(-1), flat(z))
    torch.testing.assert_close(code_sums(z, idx, 11), expected)


# ----------------------------------------------------------------------------- ties and bad input
TIE_CASES = [(64, 2, 33), (64, 7, 40), (64, 31, 32), (2048, 5, 2047), (2048, 1, 64)]


def _duplicated_codes(k: int, low: int, high: int, d: int = 4) -> torch.Tensor:
    codes = torch.randn(k, d, generator=torch.Generator().manual_seed(k + low))
    codes[high] = codes[low]
    return codes


@pytest.mark.parametrize("k,low,high", TIE_CASES)
def test_search_ties_go_to_the_lowest_index(k, low, high):
    """Duplicate codes (k-means with K > N makes them) give exactly equal scores: the lower
    index wins, as documented, in every search path (lane trick, runner-up, fused step)."""
    codes = _duplicated_codes(k, low, high)
    x = codes[high].repeat(5, 1)
    assert nearest_codes(x, codes)[0].tolist() == [low] * 5
    idx, best, second = nearest_two_codes(x, codes)
    assert idx.tolist() == [low] * 5 and torch.equal(best, second)
    for shape in ((3, 4, 2, 2), (2, 4, 16, 16), (6, 4, 16, 16)):  # rows, planes, batched planes
        z = codes[high].view(1, 4, 1, 1).expand(*shape).contiguous()
        step = straight_through_vq(z, codes)
        assert set(step.indices.flatten().tolist()) == {low}, shape


def test_search_ties_in_random_data_match_first_argmin():
    """Many duplicated codes, rows drawn at the codes: the index is the first arg-min of the
    exact distances (and no speed path changes a row without a tie)."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(16, 6, generator=g)
    codes = base[torch.randint(0, 16, (128,), generator=g)]  # 128 codes, 16 distinct vectors
    x = codes[torch.randint(0, 128, (300,), generator=g)]
    exact = (x.double()[:, None, :] - codes.double()[None]).square().sum(-1)  # equal for equal codes
    expected = exact.argmin(1)  # the first of equal minima
    assert torch.equal(nearest_codes(x, codes)[0], expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("training", [False, True])
def test_non_finite_latents_are_an_error_not_code_0(bad, training):
    q = spread(make(ema=True)).train(training)
    z = latents()
    z[1, 2, 0, 3] = bad
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"vq: .*1 of 144 latent values are NaN or infinite"):
        q(z)
    for key, value in q.state_dict().items():  # nothing was accumulated from the bad batch
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("cosine", [False, True])
def test_decode_indices_in_eval_mode_reproduces_a_training_forward(cosine):
    """The interface's promise in eval mode too: decoding the indices of a training forward
    afterwards gives its ``quantized`` (its EMA update is applied by the next forward)."""
    q = spread(make(ema=True, cosine=cosine)).train()
    out = q(latents(seed=4, scale=2.0))
    q.eval()
    assert torch.equal(q.decode_indices(out.indices), out.quantized)
    # a model loaded from that state decodes with the codes its next forward uses
    fresh = make(ema=True, cosine=cosine)
    fresh.load_state_dict(q.state_dict())
    fresh.eval()
    codes = torch.arange(24).view(1, 4, 6)
    decoded = fresh.decode_indices(codes)
    nxt = q(latents(seed=5))
    assert torch.equal(q.decode_indices(nxt.indices), nxt.quantized)
    assert torch.equal(decoded, q.decode_indices(codes))
