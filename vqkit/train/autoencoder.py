"""The autoencoder family of the shared training loop (:mod:`vqkit.train.loop`): an
encoder, a quantizer and a decoder (and optionally a discriminator) trained on images.

Objective of the generator (encoder, quantizer, decoder), at step ``s``::

    total = sum_i  w_i * loss_i(convert(recon), convert(x))          for losses with s >= start_step_i
          + sum_k  quantizer.loss_weights()[k] * out.losses[k]        (weight 1.0 when not listed)
          + lambda * gan_weight * g_loss(D(recon))                    when a discriminator is
                                                                      configured and s >= its start_step

``convert`` maps ``[-1, 1]`` images to each loss's declared ``input_range``; ``lambda`` is
the adaptive weight (ratio of gradient norms at the decoder's last layer, VQGAN) or 1.
The discriminator is frozen during the generator pass and trained alongside with its own
optimizer on real images vs detached reconstructions, optionally with the R1 and LeCam
regularisers (``discriminator.r1``, ``discriminator.lecam``; LeCam's anchors are
checkpointed and, under torchrun, moved by the logits averaged over the ranks).

Only parameters with ``requires_grad`` are optimized (LPIPS nets are frozen). Under
torchrun the model is wrapped in DDP (buffers follow rank 0), the discriminator's gradients
are averaged by hand, code-book resets are planned on rank 0 and broadcast
(:mod:`vqkit.train.codebook`). Everything needed to continue bit for bit is in the
checkpoints (:mod:`vqkit.train.checkpoint`); the data order is a function of the step
(:mod:`vqkit.train.data`).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from vqkit.errors import RecipeWarning, VqkitError
from vqkit.interfaces import Dataset
from vqkit.model import VQModel
from vqkit.tracking import GRIDS_DIR
from vqkit.train import objective
from vqkit.train.build import Built, build_all, component_tags, in_recipe_file, loss_keys, not_implemented_error
from vqkit.train.data import StepBatches, read_batch
from vqkit.train.loop import Family, NonFiniteLoss, TrainLoop, _make_optimizer, _retarget
from vqkit.train.schedule import make_scheduler

__all__ = ["AutoencoderFamily", "evaluate", "save_recon_grid", "save_recon_pairs", "dataset_fingerprint", "RECON_KEY"]

#: MLflow image key of the reconstruction grids (``mlflow.log_image(key=, step=)``).
RECON_KEY = "reconstructions"


def _grad_params(module: nn.Module | None) -> list[nn.Parameter]:
    if module is None:
        return []
    return [p for p in module.parameters() if p.requires_grad]


# =========================================================================== evaluation
@torch.no_grad()
def evaluate(
    model: VQModel,
    dataset: Dataset,
    num_samples: int,
    batch_size: int,
    metrics: list[str],
    device: torch.device,
    metric_set: Any = None,
) -> dict[str, float]:
    """Reconstruction quality on the first ``num_samples`` items of ``dataset``.

    Returns ``eval/<name>`` for each of ``metrics`` (see :mod:`vqkit.metrics`: psnr, ssim,
    the standard LPIPS, the VGG16 Fréchet distance), computed by ``metric_set`` (a
    :class:`vqkit.metrics.MetricSet` of those names; built here when ``None``), and
    ``eval/usage`` / ``eval/perplexity`` of the test codes. The model is put in eval mode
    and restored to its previous mode.
    """
    from vqkit.metrics import MetricSet

    if metric_set is None:
        metric_set = MetricSet(metrics, device=device)
    was_training = model.training
    model.eval()
    n = min(int(num_samples), len(dataset))
    from vqkit.telemetry import stage_counts, usage_and_perplexity

    num_codebooks = int(getattr(model.quantizer, "num_codebooks", 1))
    counts = torch.zeros(num_codebooks, model.codebook_size, dtype=torch.float64)
    try:
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            x = read_batch(dataset, idx).to(device)
            recon, out, _ = model(x)
            counts += stage_counts(out.indices, model.codebook_size, num_codebooks)
            metric_set.update(recon, x)
    finally:
        model.train(was_training)
    result = metric_set.compute()
    usage = usage_and_perplexity(counts)  # averaged over code-books
    if usage is not None:
        result["eval/usage"], result["eval/perplexity"] = usage
    return result


def dataset_fingerprint(ds: Dataset, samples: int = 256) -> tuple[str, dict[str, Any]]:
    """``(digest, profile)`` of a data set split for MLflow's dataset inputs: the digest is
    the SHA-256 of the length, the image shape and the float32 bytes of ``samples`` evenly
    spaced items (reading all of a large folder would cost more than a short run)."""
    import hashlib

    n = len(ds)
    h = hashlib.sha256(f"{n}:{int(ds.channels)}:{tuple(ds.image_size)}".encode())
    idx = torch.linspace(0, n - 1, steps=min(n, samples)).round().long().unique()
    h.update(read_batch(ds, idx).float().contiguous().numpy().tobytes())
    profile = {"num_items": n, "channels": int(ds.channels), "image_size": list(ds.image_size),
               "digest_items": int(idx.numel())}
    return h.hexdigest()[:16], profile


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    """Float ``(N, C, H, W)`` in ``[-1, 1]`` (clamped), ``C`` 1 or 3 -> uint8 ``(N, H, W, 3)``."""
    t = ((t.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.permute(0, 2, 3, 1).numpy()


def _save_png(grid: np.ndarray, tile_height: int, path: Path) -> Path:
    """Write ``grid`` as a PNG, enlarged (nearest neighbour) so that a tile of ``tile_height``
    pixels is at least 64 pixels high; atomically."""
    from PIL import Image

    image = Image.fromarray(grid)
    scale = max(1, math.ceil(64 / tile_height))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def save_recon_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path) -> Path:
    """PNG grid: originals in the top row, their reconstructions below (the named artifact
    ``grids/recon_<step>.png`` that ``vqkit compare --grid`` stacks).

    Both float ``(N, C, H, W)`` in ``[-1, 1]`` (clamped), ``C`` 1 or 3. Small images are
    enlarged (nearest neighbour) to at least 64 pixels high. Written atomically.
    """
    top, bottom = _to_uint8(originals), _to_uint8(reconstructions)
    n, h, w, _ = top.shape
    pad = 2
    grid = np.full((2 * h + 3 * pad, n * w + (n + 1) * pad, 3), 255, dtype=np.uint8)
    for row, images in enumerate((top, bottom)):
        y = pad + row * (h + pad)
        for i in range(n):
            x = pad + i * (w + pad)
            grid[y:y + h, x:x + w] = images[i]
    return _save_png(grid, h, path)


#: Gap in pixels (before enlarging) between an original and its reconstruction, and between
#: two pairs, in :func:`save_recon_pairs`.
PAIR_GAP, PAIRS_GAP = 1, 4


def recon_pairs_layout(n: int) -> tuple[int, int]:
    """``(pairs per row, rows)`` of :func:`save_recon_pairs` for ``n`` pairs: ``ceil(sqrt(n))``
    pairs a row (16 pairs: 4 x 4, i.e. 8 tiles wide and 4 high)."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return cols, max(1, math.ceil(n / cols))


def save_recon_pairs(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path) -> Path:
    """PNG of the pairs (original, its reconstruction) side by side, the pairs in rows of
    :func:`recon_pairs_layout` (16 pairs: 4 x 4), ``PAIR_GAP`` white pixels inside a pair and
    ``PAIRS_GAP`` between pairs and around the sheet; the image given to ``mlflow.log_image``.

    Nearly square, so that MLflow's image chart, which shows a thumbnail of at most 256
    pixels a side, shows each image at about 256 / 8 pixels instead of 256 / 16 for the
    2-row strip of :func:`save_recon_grid`. Same input, enlargement and atomic write.
    """
    orig, recon = _to_uint8(originals), _to_uint8(reconstructions)
    n, h, w, _ = orig.shape
    cols, rows = recon_pairs_layout(n)
    pair_w = 2 * w + PAIR_GAP
    grid = np.full((rows * h + (rows + 1) * PAIRS_GAP, cols * pair_w + (cols + 1) * PAIRS_GAP, 3),
                   255, dtype=np.uint8)
    for i in range(n):
        y = PAIRS_GAP + (i // cols) * (h + PAIRS_GAP)
        x = PAIRS_GAP + (i % cols) * (pair_w + PAIRS_GAP)
        grid[y:y + h, x:x + w] = orig[i]
        grid[y:y + h, x + w + PAIR_GAP:x + pair_w] = recon[i]
    return _save_png(grid, h, path)


# =========================================================================== the family
class AutoencoderFamily(Family):
    """Trains the autoencoder of a recipe (see the module docstring); run it with
    ``TrainLoop(recipe, AutoencoderFamily())`` (what ``vqkit train`` does)."""

    name = "autoencoder"
    distributed = True

    # ------------------------------------------------------------------ setup
    def setup(self, loop: TrainLoop) -> None:
        self.loop = loop
        self.recipe = loop.recipe
        cfg = self.cfg = loop.cfg
        tc = cfg.train
        self.dist = dist = loop.dist
        self.device = device = loop.device
        try:
            built: Built = build_all(self.recipe)
        except VqkitError as exc:  # located in the recipe file, as `vqkit validate --build` does
            raise in_recipe_file(exc, self.recipe) from None
        self.built = built
        self.model = built.model.to(device)
        self.losses = built.losses.to(device)
        self.loss_refs = list(cfg.losses)
        self.loss_names = loss_keys(self.loss_refs)
        self.disc = built.discriminator.to(device) if built.discriminator is not None else None
        self.disc_ref = cfg.discriminator

        gen_params = _grad_params(self.model) + _grad_params(self.losses)
        if not gen_params:
            raise VqkitError("the model has no trainable parameters")
        self.gen_params = gen_params
        self.debug_state_dir = os.environ.get("VQKIT_DEBUG_STATE_DIR") or None  # see _dump_state
        self.loss_grad_params = _grad_params(self.losses)  # outside the DDP wrapper
        self.opt = _make_optimizer(gen_params, tc, tc.lr)
        self.sched = make_scheduler(self.opt, tc)
        self.disc_params = _grad_params(self.disc)
        self.disc_opt = self.disc_sched = None
        if self.disc is not None and self.disc_params:
            self.disc_opt = _make_optimizer(self.disc_params, tc, self.disc_ref.lr or tc.lr)
            # the discriminator's schedule (warm-up, decay) runs over its own active steps
            self.disc_sched = make_scheduler(self.disc_opt, tc, self._disc_steps())

        # LeCam's moving averages of the discriminator's logits (checkpointed)
        self.lecam_anchors = None
        if self.disc is not None and self.disc_ref.lecam > 0:
            from vqkit.gan import LeCamAnchors

            self.lecam_anchors = LeCamAnchors().to(device)

        # mixed precision: bf16 autocast on CPU, fp16 autocast + GradScaler on CUDA
        self.scaler = loop.grad_scaler()
        self.disc_scaler = loop.grad_scaler()

        from vqkit.train.codebook import codebook_manager

        # one monitor and policy per code-book (several for a multi_codebook quantizer)
        self.codebook = codebook_manager(self.model.quantizer, built.policies, cfg.reset, dist)
        self.monitor = self.codebook.monitor

        from vqkit.metrics import MetricSet

        # the standard metrics, independent of the training losses' settings; the real test
        # images' Fréchet statistics are computed once
        self.metric_set = MetricSet(cfg.eval.metrics, device=device, cache_real=True)

    def prepare(self) -> None:
        cfg, tc, dist, device = self.cfg, self.cfg.train, self.dist, self.device
        if dist.enabled:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            # buffers (EMA code-books, usage counters) follow rank 0 at every forward
            sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                    else "broadcast_buffers")
            self.model_ddp: nn.Module = DDP(self.model, device_ids=ids, **{sync: True})
        else:
            self.model_ddp = self.model

        self.data = StepBatches(
            self.built.train_data, tc.batch_size, cfg.seed, dist.rank, dist.world_size, tc.num_workers,
            note=None if self.loop.quiet else self.loop.say,
        )
        # a fixed set of test images for the reconstruction grids: the first ones of the test
        # split built with seed 0, so every run of a data set shows the same images
        size = max(self.built.image_size)
        grid_data = self.built.test_data
        if cfg.seed != 0:
            from vqkit.plugins import get_registry

            cls = get_registry().get("datasets", cfg.data.name).cls
            grid_data = cls(self.recipe.params_of("data"), split="test", seed=0)
        n_grid = min(len(grid_data), 16 if size <= 64 else 8)
        self.grid_images = read_batch(grid_data, torch.arange(n_grid))

    def _disc_steps(self) -> int:
        return max(1, self.cfg.train.steps - self.disc_ref.start_step)

    def tags(self) -> dict[str, Any]:
        return component_tags(self.recipe)  # vqkit.plugins: the distributions this run used

    def log_inputs(self, tracker: Any) -> None:
        for split, ds in (("train", self.built.train_data), ("test", self.built.test_data)):
            digest, profile = dataset_fingerprint(ds)
            tracker.log_dataset(self.cfg.data.name, digest,
                                {"component": self.cfg.data.name, "params": self.recipe.to_dict()["data"]["params"]},
                                split, profile)

    def not_implemented(self, exc: NotImplementedError) -> BaseException:
        return not_implemented_error(exc, getattr(self, "built", None), self.recipe)

    # ------------------------------------------------------------------ state
    def modules(self) -> list[nn.Module | None]:
        return [self.model, self.disc]

    def state_dict(self) -> dict[str, Any]:
        step = self.loop.step
        return {
            "channels": self.built.channels,
            "image_size": list(self.built.image_size),
            "model": self.model.state_dict(),
            "optimizers": {
                "generator": self.opt.state_dict(),
                "discriminator": self.disc_opt.state_dict() if self.disc_opt is not None else None,
            },
            "schedulers": {
                "generator": self.sched.state_dict(),
                "discriminator": self.disc_sched.state_dict() if self.disc_sched is not None else None,
            },
            "scalers": {"generator": self.scaler.state_dict(), "discriminator": self.disc_scaler.state_dict()},
            "discriminator": self.disc.state_dict() if self.disc is not None else None,
            "lecam": self.lecam_anchors.state_dict() if self.lecam_anchors is not None else None,
            "codebook": self.codebook.state_dict(),
            "data": {
                "epoch": self.data.epoch_of(step) if hasattr(self, "data") else 0,
                "steps_per_epoch": self.data.steps_per_epoch if hasattr(self, "data") else 0,
            },
        }

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizers"]["generator"])
            self.sched.load_state_dict(state["schedulers"]["generator"])
            if self.disc is not None:
                if state.get("discriminator") is None:
                    raise VqkitError(
                        f"{where} has no discriminator but the recipe has one; resume with the "
                        "recipe the run was trained with"
                    )
                self.disc.load_state_dict(state["discriminator"])
                if self.disc_opt is not None and state["optimizers"].get("discriminator") is not None:
                    self.disc_opt.load_state_dict(state["optimizers"]["discriminator"])
                    self.disc_sched.load_state_dict(state["schedulers"]["discriminator"])
            elif state.get("discriminator") is not None:  # e.g. resumed with --set discriminator=null
                warnings.warn(
                    f"{where} holds a trained discriminator but the recipe has none: the run goes on "
                    "without it (its adversarial and feature terms stop); resume with the recipe the "
                    "run was trained with to keep it",
                    RecipeWarning,
                    stacklevel=2,
                )
            if self.lecam_anchors is not None:
                if state.get("lecam") is not None:
                    self.lecam_anchors.load_state_dict(state["lecam"])
                else:  # trained without LeCam so far (e.g. resumed with --set discriminator.lecam=...)
                    warnings.warn(
                        f"{where} has no LeCam anchors (the run trained without "
                        "discriminator.lecam): they start from the next step's mean logits",
                        RecipeWarning,
                        stacklevel=2,
                    )
            scalers = state.get("scalers") or {}
            if scalers.get("generator"):
                self.scaler.load_state_dict(scalers["generator"])
            if scalers.get("discriminator"):
                self.disc_scaler.load_state_dict(scalers["discriminator"])
            self.codebook.load_state_dict(state["codebook"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise VqkitError(
                f"cannot resume from {where}: its state does not match the recipe's model "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); resume with the "
                "recipe the run was trained with"
            ) from None
        # the schedule follows the recipe (train.steps may have been raised on resume)
        tc = self.cfg.train
        _retarget(self.sched, tc.lr, tc.steps)
        if self.disc_sched is not None:
            _retarget(self.disc_sched, self.disc_ref.lr or tc.lr, self._disc_steps())

    # ------------------------------------------------------------------ one step
    def batches(self, start: int, stop: int) -> Iterator[torch.Tensor]:
        for x in self.data.iterate(start, stop):
            yield x.to(self.device, non_blocking=True)

    def epoch_of(self, step: int) -> int:
        return self.data.epoch_of(step)

    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def train_mode(self) -> None:
        self.model_ddp.train()
        if self.disc is not None:
            self.disc.train()

    def train_step(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One generator (and discriminator) update; returns detached 0-dim loss terms.
        The objective is :func:`vqkit.train.objective.generator_objective`."""
        nonfinite = self.loop.nonfinite
        disc_on = self.disc is not None and step >= self.disc_ref.start_step
        self._disc_trainable(False)  # frozen for every generator-side term
        self.opt.zero_grad(set_to_none=True)
        try:
            with self.loop.autocast():
                g = objective.generator_objective(
                    self.model, x, step, list(zip(self.loss_names, self.loss_refs, self.losses)),
                    forward=self.model_ddp, discriminator=self.disc, gan_ref=self.disc_ref,
                    grad_scale=self.scaler.scale(torch.ones((), device=self.device)) if self.scaler.is_enabled() else None,
                )
        except FloatingPointError as exc:  # a quantizer refused non-finite latents (on every rank)
            raise NonFiniteLoss(f"step {step + 1}: {exc}") from None
        terms, total = g.terms, g.total
        if nonfinite(total):
            raise NonFiniteLoss(self._describe_terms(terms, step))
        for key, value in g.output.stats.items():  # logged as quantizer/<name>
            terms[f"quantizer/{key}"] = torch.as_tensor(float(value))
        self.scaler.scale(total).backward()
        grad_norm = self._clip_and_step(self.opt, self.gen_params, self.scaler, average=self.loss_grad_params)
        if grad_norm is not None:
            terms["train/grad_norm"] = grad_norm
        self.sched.step()

        if disc_on and self.disc_opt is not None:
            self._disc_trainable(True)
            self.disc_opt.zero_grad(set_to_none=True)
            ref = self.disc_ref
            r1_due = ref.r1 > 0 and (step - ref.start_step) % ref.r1_every == 0  # lazy R1
            with self.loop.autocast():
                d = objective.discriminator_objective(
                    self.disc, ref.loss, x, g.reconstruction,
                    r1=ref.r1 / 2 * ref.r1_every if r1_due else 0.0,
                    lecam=ref.lecam, anchors=self.lecam_anchors, lecam_decay=ref.lecam_decay,
                    reduce=self.dist.all_reduce_mean if self.dist.enabled else None,
                    grad_scale=self.disc_scaler.get_scale() if self.disc_scaler.is_enabled() else None,
                )
            terms.update(d.terms)
            if nonfinite(d.total):  # the terms are unweighted and may all be finite: say what was added
                added = [(w, k, key) for w, k, key in (
                    (ref.r1 / 2 * ref.r1_every if r1_due else 0.0, "loss/gan_r1",
                     "discriminator.r1" + (" or discriminator.r1_every" if ref.r1_every > 1 else "")),
                    (ref.lecam, "loss/gan_lecam", "discriminator.lecam")) if w > 0]
                weighted = [f"{w:.4g}·{k}" for w, k, _ in added]
                finite = all(math.isfinite(float(terms.get(k, math.nan))) for k in ("loss/gan_d", *(k for _, k, _ in added)))
                # every unweighted term finite: a regulariser's weight overflowed the sum; else the
                # discriminator itself diverged
                advice = (f"Lower {' or '.join(key for *_, key in added)}" if finite and added else
                          "Lower discriminator.lr (or train.lr) or disable train.amp")
                raise NonFiniteLoss(f"{self._describe_terms(terms, step)}; the discriminator's loss="
                                    f"{float(d.total.detach()):.4g} ({' + '.join(['loss/gan_d', *weighted])})",
                                    advice=advice)
            self.disc_scaler.scale(d.total).backward()
            # no DDP wrapper: its gradients are averaged here
            self._clip_and_step(self.disc_opt, self.disc_params, self.disc_scaler, average=self.disc_params)
            self.disc_sched.step()
            if self.dist.enabled:  # its buffers (BatchNorm statistics) follow rank 0, as the model's do
                with torch.no_grad():
                    for t in self.disc.buffers():
                        if t.is_floating_point():
                            t.copy_(self.dist.broadcast(t))

        resets = self.codebook.after_step(step, g.latents.detach(), g.output.indices.detach(), [self.opt])
        if resets and self.debug_state_dir:
            self._dump_state(f"reset-step{step + 1}")
        if step == 0 and self.dist.enabled:
            self._sync_from_rank0()
        return {k: v.detach() for k, v in terms.items()}

    def _dump_state(self, tag: str) -> None:
        """Debug hook, on when ``VQKIT_DEBUG_STATE_DIR`` names a folder: every rank writes its
        model (code-book included) and discriminator state to ``<tag>-rank<r>.pt`` there,
        after every reset and at the end, so tests can check that ranks agree bit for bit."""
        state = {"model": self.model.state_dict(),
                 "discriminator": self.disc.state_dict() if self.disc is not None else {}}
        torch.save(state, Path(self.debug_state_dir) / f"{tag}-rank{self.dist.rank}.pt")

    def _disc_trainable(self, flag: bool) -> None:
        for p in self.disc_params:  # only the parameters it optimizes (frozen parts stay frozen)
            p.requires_grad_(flag)

    def _clip_and_step(self, opt, params, scaler, average=()) -> torch.Tensor | None:
        def check(norm: torch.Tensor) -> None:
            if self.loop.nonfinite(norm):
                raise NonFiniteLoss(f"gradient norm is {float(norm)} at step {self.loop.step}")

        return objective.optimizer_step(opt, params, scaler, self.cfg.train.grad_clip, self.dist,
                                        average=list(average), check_norm=check)

    def _sync_from_rank0(self) -> None:
        """Make every rank hold rank 0's model after the first step (k-means or other
        data-dependent initialisation inside a component may differ between ranks)."""
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                t.copy_(self.dist.broadcast(t.data))

    def _describe_terms(self, terms: dict[str, torch.Tensor], step: int) -> str:
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        return f"step {step + 1}: {parts}"

    # ------------------------------------------------------------------ periodic work
    def monitor_metrics(self, step: int, regular: bool) -> dict[str, float]:
        # an early stop (stop_after) must not add to the monitor's history, so a resumed run
        # ends with exactly the state of an uninterrupted one
        return self.monitor.metrics(step) if regular else self.monitor.snapshot()

    def evaluate(self) -> dict[str, float]:
        ec = self.cfg.eval
        try:
            return evaluate(
                self.model, self.built.test_data, ec.num_samples, ec.batch_size, list(ec.metrics),
                self.device, self.metric_set,
            )
        except FloatingPointError as exc:  # non-finite latents (finite but exploded weights)
            self.loop.main_only_failure(f"evaluation after step {self.loop.step}: {exc}")
            return {}

    def log_images(self, step: int, run_dir: Path, tracker: Any) -> None:
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            x = self.grid_images.to(self.device)
            try:
                recon = self.model(x)[0]
            except FloatingPointError as exc:
                self.loop.main_only_failure(f"reconstruction grid after step {step}: {exc}")
                return
            finally:
                self.model.train(was)
        # grids/recon_<step>.png (2 rows, what `vqkit compare --grid` stacks), and for MLflow's
        # image chart / step slider (images/ holds only those) the same pairs nearly square,
        # from the run dir's images/ (kept until sent)
        path = save_recon_grid(x, recon, run_dir / "grids" / f"recon_{step:06d}.png")
        tracker.log_artifact(path, GRIDS_DIR)
        pairs = save_recon_pairs(x, recon, run_dir / "images" / f"{RECON_KEY}_{step:06d}.png")
        tracker.log_image(pairs, RECON_KEY, step)

    def after_loop(self) -> None:
        if self.debug_state_dir:
            self._dump_state("end")

    def finish(self, run_dir: Path, tracker: Any) -> dict[str, float]:
        """The code-book plots (``plots/``)."""
        for p in self.monitor.save_plots(run_dir / "plots"):
            tracker.log_artifact(p, "plots")
        return {}

    # ------------------------------------------------------------------ what is printed
    def postfix(self, m: dict[str, float]) -> dict[str, str]:
        out = {"loss": f"{m.get('loss/total', float('nan')):.4f}"}
        if "codebook/usage" in m:
            out["usage"] = f"{100 * m['codebook/usage']:.0f}%"
        if "eval/psnr" in m:
            out["psnr"] = f"{m['eval/psnr']:.2f}"
        if "time/data_share" in m:
            out["data"] = f"{100 * m['time/data_share']:.0f}%"
        return out

    def progress(self, m: dict[str, float]) -> list[str]:
        return [f"{key}={fmt.format(m[key])}" for key, fmt in (
            ("loss/total", "{:.4f}"), ("codebook/usage", "{:.2f}"), ("eval/psnr", "{:.2f}"),
            ("eval/ssim", "{:.3f}"), ("time/step_s", "{:.3f}")) if key in m]

    def summary(self, m: dict[str, float]) -> list[str]:
        keys = ("eval/psnr", "eval/ssim", "eval/lpips", "codebook/usage", "codebook/perplexity")
        return [f"{key.split('/')[-1]}={m[key]:.4g}" for key in keys if key in m]
