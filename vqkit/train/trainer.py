"""The training loop: one recipe in, one MLflow run and a folder of checkpoints out.

Objective of the generator (encoder, quantizer, decoder), at step ``s``::

    total = sum_i  w_i * loss_i(convert(recon), convert(x))          for losses with s >= start_step_i
          + sum_k  quantizer.loss_weights()[k] * out.losses[k]        (weight 1.0 when not listed)
          + lambda * gan_weight * g_loss(D(recon))                    when a discriminator is
                                                                      configured and s >= its start_step

``convert`` maps ``[-1, 1]`` images to each loss's declared ``input_range``; ``lambda`` is
the adaptive weight (ratio of gradient norms at the decoder's last layer, VQGAN) or 1.
The discriminator is frozen during the generator pass and trained alongside with its own
optimizer on real images vs detached reconstructions.

Only parameters with ``requires_grad`` are optimized (LPIPS nets are frozen). Everything
needed to continue bit for bit is in the checkpoints (:mod:`vqkit.train.checkpoint`); the
data order is a function of the step (:mod:`vqkit.train.data`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np
import torch
from torch import nn

from vqkit import __version__
from vqkit.errors import VqkitError
from vqkit.interfaces import Dataset
from vqkit.model import VQModel
from vqkit.recipe import Recipe
from vqkit.train import checkpoint as ckpt
from vqkit.train import objective
from vqkit.train.build import Built, build_all, component_tags, loss_keys, not_implemented_error
from vqkit.train.data import StepBatches, read_batch
from vqkit.train.distributed import DistContext, init_distributed
from vqkit.train.loop import (
    NonFiniteLoss,
    TrainResult,
    _finite_params,
    _link_or_copy,
    _make_optimizer,
    _retarget,
    _sigterm_as_interrupt,
    seed_everything,
)
from vqkit.train.schedule import make_scheduler
from vqkit.train.trial import PRUNED_TAG, StopTrial, channel_from_env

__all__ = ["Trainer", "TrainResult", "NonFiniteLoss", "evaluate", "save_recon_grid", "train", "dataset_fingerprint"]

#: MLflow image key of the reconstruction grids (``mlflow.log_image(key=, step=)``).
RECON_KEY = "reconstructions"


# =========================================================================== helpers
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


def save_recon_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path) -> Path:
    """PNG grid: originals in the top row, their reconstructions below.

    Both float ``(N, C, H, W)`` in ``[-1, 1]`` (clamped), ``C`` 1 or 3. Small images are
    enlarged (nearest neighbour) to at least 64 pixels high. Written atomically.
    """
    from PIL import Image

    def to_uint8(t: torch.Tensor) -> np.ndarray:
        t = ((t.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        return t.permute(0, 2, 3, 1).numpy()

    top, bottom = to_uint8(originals), to_uint8(reconstructions)
    n, h, w, _ = top.shape
    pad = 2
    grid = np.full((2 * h + 3 * pad, n * w + (n + 1) * pad, 3), 255, dtype=np.uint8)
    for row, images in enumerate((top, bottom)):
        y = pad + row * (h + pad)
        for i in range(n):
            x = pad + i * (w + pad)
            grid[y:y + h, x:x + w] = images[i]
    image = Image.fromarray(grid)
    scale = max(1, math.ceil(64 / h))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


# =========================================================================== the trainer
class Trainer:
    """Trains the model of a recipe; see the module docstring for the objective.

    Args:
        recipe: the validated recipe.
        resume: a checkpoint (as returned by :func:`vqkit.train.checkpoint.load_checkpoint`)
            to continue from, with ``resume_path`` the file it came from.
        quiet: no progress bar and no progress lines (the final summary still prints).
        stop_after: stop (with a checkpoint) after this many total steps even if
            ``train.steps`` is larger; the LR schedule still follows ``train.steps``.
        stdout / stderr: where to print (default: the process's).
        tags: extra MLflow tags of the run, e.g. ``{"mlflow.parentRunId": ID}`` for a child
            of a sweep.
        entry_point: the command recorded as the run's ``mlflow.project.entryPoint``.
    """

    #: resuming a FINISHED run from a checkpoint *file* logs a new run instead, so the
    #: finished run keeps its status (``vqkit train --resume FILE`` sets this False)
    continue_finished_runs: bool = True

    def __init__(
        self,
        recipe: Recipe,
        *,
        resume: dict[str, Any] | None = None,
        resume_path: Path | None = None,
        quiet: bool = False,
        stop_after: int | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        tags: dict[str, str] | None = None,
        entry_point: str = "vqkit train",
    ):
        self.recipe = recipe
        self.extra_tags = dict(tags or {})
        # a sweep's child: its trial's tags, and the search it reports evaluations to (pruning)
        self.trial = channel_from_env()
        if self.trial is not None:
            self.extra_tags.update(self.trial.tags)
        self.entry_point = entry_point
        self.system_metrics: Any = None
        self.cfg = recipe.model
        self.resume = resume
        self.resume_path = resume_path
        self.quiet = quiet
        self.stop_after = stop_after
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.dist: DistContext | None = None
        self.tracker: Any = None
        self.run_dir: Path | None = None
        self.step = 0
        self.last_good: Path | None = None
        self.last_eval: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ printing
    def _say(self, text: str) -> None:
        if self.dist is None or self.dist.is_main:
            print(text, file=self.err, flush=True)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg
        tc = cfg.train
        self.dist = dist = init_distributed(tc.device)
        self.device = device = dist.device
        seed_everything(cfg.seed)
        built: Built = build_all(self.recipe)
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

        # mixed precision: bf16 autocast on CPU, fp16 autocast + GradScaler on CUDA
        self.amp = bool(tc.amp)
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        use_scaler = self.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.disc_scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

        from vqkit.train.codebook import codebook_manager

        # one monitor and policy per code-book (several for a multi_codebook quantizer)
        self.codebook = codebook_manager(self.model.quantizer, built.policies, cfg.reset, dist)
        self.monitor = self.codebook.monitor

        from vqkit.metrics import MetricSet

        # the standard metrics, independent of the training losses' settings; the real test
        # images' Fréchet statistics are computed once
        self.metric_set = MetricSet(cfg.eval.metrics, device=device, cache_real=True)

        if self.resume is not None:
            self._load_state(self.resume)
        self.step = int(self.resume["step"]) if self.resume is not None else 0

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

        self.batches = StepBatches(
            built.train_data, tc.batch_size, cfg.seed, dist.rank, dist.world_size, tc.num_workers
        )
        # a fixed set of test images for the reconstruction grids: the first ones of the test
        # split built with seed 0, so every run of a data set shows the same images
        size = max(built.image_size)
        grid_data = built.test_data
        if cfg.seed != 0:
            from vqkit.plugins import get_registry

            cls = get_registry().get("datasets", cfg.data.name).cls
            grid_data = cls(self.recipe.params_of("data"), split="test", seed=0)
        n_grid = min(len(grid_data), 16 if size <= 64 else 8)
        self.grid_images = read_batch(grid_data, torch.arange(n_grid))

    def _disc_steps(self) -> int:
        return max(1, self.cfg.train.steps - self.disc_ref.start_step)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT,
            "vqkit_version": __version__,
            "step": self.step,
            "channels": self.built.channels,
            "image_size": list(self.built.image_size),
            "recipe": self.recipe.to_dict(),
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
            "codebook": self.codebook.state_dict(),
            "rng": ckpt.capture_rng(),
            "data": {
                "epoch": self.batches.epoch_of(self.step) if hasattr(self, "batches") else 0,
                "steps_per_epoch": self.batches.steps_per_epoch if hasattr(self, "batches") else 0,
            },
            "run": {
                "run_id": getattr(self.tracker, "run_id", None),
                "local_id": getattr(self.tracker, "local_id", None),
                "tracking_uri": getattr(self.tracker, "uri", None),
                "experiment": self.cfg.tracking.experiment,
                "run_dir": str(self.run_dir) if self.run_dir else None,
            },
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        where = str(self.resume_path or "checkpoint")
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
        ckpt.restore_rng(state["rng"])

    # ------------------------------------------------------------------ tracking / run dir
    def _setup_tracking(self) -> None:
        from vqkit.tracking import DESCRIPTION_TAG, Tracker, context_tags, read_run_info, resolve_tracking_uri

        tcfg = self.cfg.tracking
        prev_run = (self.resume or {}).get("run") or {}
        uri = tcfg.uri or None
        if uri is None and not os.environ.get("MLFLOW_TRACKING_URI") and prev_run.get("tracking_uri"):
            uri = prev_run["tracking_uri"]  # continue the run in the store that holds it
        uri = resolve_tracking_uri(uri)
        run_name = tcfg.run_name or self.cfg.name
        self.tracker = tracker = Tracker(uri, tcfg.experiment, run_name, enabled=self.dist.is_main, stderr=self.err)

        # the run dir: the resumed checkpoint's run dir, else <output_dir>/<run id>
        run_dir: Path | None = None
        if self.resume_path is not None:
            parent = Path(self.resume_path).resolve().parent
            for cand in (parent.parent, parent):
                if read_run_info(cand):
                    run_dir = cand
                    break
            if run_dir is None and prev_run.get("run_dir") and read_run_info(prev_run["run_dir"]):
                run_dir = Path(prev_run["run_dir"])
        resume_id = prev_run.get("run_id")
        if run_dir is not None:
            info = read_run_info(run_dir)
            resume_id = info.get("run_id") or resume_id
            tracker.local_id = info.get("local_id") or tracker.local_id
        if resume_id and prev_run.get("tracking_uri") and prev_run["tracking_uri"] != uri:
            self._say(
                f"vqkit: note: the resumed run was tracked at {prev_run['tracking_uri']}; "
                f"logging to a new run at {uri}"
            )
            resume_id = None
        forked_from = None
        if resume_id and not self.continue_finished_runs and self.dist.is_main:
            from vqkit.tracking import run_status

            if run_status(uri, resume_id) == "FINISHED":
                import uuid

                self._say(f"vqkit: note: MLflow run {resume_id} is FINISHED; training resumed from "
                          f"{self.resume_path} is logged as a new run (tag vqkit.resumed_from)")
                forked_from, resume_id, run_dir = resume_id, None, None
                tracker.local_id = uuid.uuid4().hex[:12]
        # a resumed leg supersedes what an earlier leg logged after the checkpoint's step
        run_id = tracker.start(resume_run_id=resume_id, after_step=self.step if self.resume is not None else None)
        if run_dir is None:
            run_dir = Path(tcfg.output_dir).resolve() / (run_id or f"local-{tracker.local_id}")
        self.run_dir = run_dir
        if not self.dist.is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        tracker.attach(run_dir)
        if forked_from is not None:
            tracker.set_tags({"vqkit.resumed_from": json.dumps(
                {"run_id": forked_from, "checkpoint": str(self.resume_path), "step": self.step})})
        self.ckpt_dir = run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.ckpt_dir, run_dir / "images"):  # temp files of a killed process
            ckpt.remove_temp_files(folder)

        tracker.log_params(self.recipe.flat_params())
        tags = {
            "vqkit.version": __version__,
            **component_tags(self.recipe),  # vqkit.plugins: the distributions this run used
            "vqkit.recipe_sha256": self.recipe.sha256(),
            "vqkit.run_dir": str(run_dir),
            "vqkit.world_size": self.dist.world_size,
        }
        if self.resume is not None:
            tags["vqkit.resumed_from_step"] = self.step
        tags.update(context_tags(self.recipe.source, self.entry_point))
        if tcfg.description:
            tags[DESCRIPTION_TAG] = tcfg.description
        tags.update(self.extra_tags)
        tracker.set_tags(tags)
        recipe_path = run_dir / "recipe.yaml"
        recipe_path.write_text(self.recipe.to_yaml(), encoding="utf-8")
        tracker.log_artifact(recipe_path)
        if self.resume is None:
            for split, ds in (("train", self.built.train_data), ("test", self.built.test_data)):
                digest, profile = dataset_fingerprint(ds)
                tracker.log_dataset(self.cfg.data.name, digest,
                                    {"component": self.cfg.data.name, "params": self.recipe.to_dict()["data"]["params"]},
                                    split, profile)
        if tcfg.system_metrics:
            from vqkit.tracking import SystemMetrics

            self.system_metrics = SystemMetrics(uri, tracker.run_id)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _train_step(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One generator (and discriminator) update; returns detached 0-dim loss terms.
        The objective is :func:`vqkit.train.objective.generator_objective`."""
        disc_on = self.disc is not None and step >= self.disc_ref.start_step
        self._disc_trainable(False)  # frozen for every generator-side term
        self.opt.zero_grad(set_to_none=True)
        try:
            with self._autocast():
                g = objective.generator_objective(
                    self.model, x, step, list(zip(self.loss_names, self.loss_refs, self.losses)),
                    forward=self.model_ddp, discriminator=self.disc, gan_ref=self.disc_ref,
                    grad_scale=self.scaler.scale(torch.ones((), device=self.device)) if self.scaler.is_enabled() else None,
                )
        except FloatingPointError as exc:  # a quantizer refused non-finite latents (on every rank)
            raise NonFiniteLoss(f"step {step + 1}: {exc}") from None
        terms, total = g.terms, g.total
        if self._nonfinite(total):
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
            with self._autocast():
                d_loss = objective.discriminator_objective(self.disc, self.disc_ref.loss, x, g.reconstruction)
            terms["loss/gan_d"] = d_loss
            if self._nonfinite(d_loss):
                raise NonFiniteLoss(self._describe_terms(terms, step))
            self.disc_scaler.scale(d_loss).backward()
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
            if self._nonfinite(norm):
                raise NonFiniteLoss(f"gradient norm is {float(norm)} at step {self.step}")

        return objective.optimizer_step(opt, params, scaler, self.cfg.train.grad_clip, self.dist,
                                        average=list(average), check_norm=check)

    def _sync_from_rank0(self) -> None:
        """Make every rank hold rank 0's model after the first step (k-means or other
        data-dependent initialisation inside a component may differ between ranks)."""
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                t.copy_(self.dist.broadcast(t.data))

    def _nonfinite(self, value: torch.Tensor) -> bool:
        bad = not bool(torch.isfinite(value).all())
        return self.dist.any_flag(bad) if self.dist.enabled else bad

    def _describe_terms(self, terms: dict[str, torch.Tensor], step: int) -> str:
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        return f"step {step + 1}: {parts}"

    # ------------------------------------------------------------------ periodic work
    def _check_weights(self) -> None:
        """Stop (every rank together: the check is collective) if any rank's weights hold
        NaN or inf; called on every rank before work that rank 0 does alone."""
        if self.dist.any_flag(not _finite_params(self.model, self.disc)):
            raise NonFiniteLoss(f"model weights are NaN or infinite after step {self.step}")

    def _save(self, final: bool = False, collective: bool = True) -> Path | None:
        """Write a checkpoint of the current state (rank 0); never a non-finite one. Called
        on every rank (the weight check is collective) unless ``collective`` is false
        (rank 0 alone, after an interrupt)."""
        if collective:
            self._check_weights()
        if not self.dist.is_main:
            return None
        if not _finite_params(self.model, self.disc):
            raise NonFiniteLoss(f"model weights are NaN or infinite after step {self.step}")
        path = self.ckpt_dir / "final.pt" if final else ckpt.step_file(self.ckpt_dir, self.step)
        ckpt.save_checkpoint(path, self._state())
        ckpt.write_latest(self.ckpt_dir, path, self.step)
        if not final:
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        self.last_good = path
        artifact = "final.pt" if final else "last.pt"
        if final:
            self.tracker.log_artifact(path, "checkpoints")
        else:  # one periodic checkpoint in MLflow, replaced at each save
            link = self.ckpt_dir / "last.pt"
            _link_or_copy(path, link)
            self.tracker.log_artifact(link, "checkpoints")
        self.tracker.set_tags(
            {"vqkit.last_checkpoint": json.dumps({"artifact": f"checkpoints/{artifact}", "step": self.step})}
        )
        return path

    def _log_images(self) -> None:
        if not self.dist.is_main:
            return
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            x = self.grid_images.to(self.device)
            try:
                recon = self.model(x)[0]
            except FloatingPointError as exc:
                self._main_only_failure(f"reconstruction grid after step {self.step}: {exc}")
                return
            finally:
                self.model.train(was)
        path = save_recon_grid(x, recon, self.run_dir / "images" / f"recon_{self.step:06d}.png")
        self.tracker.log_artifact(path, "images")
        self.tracker.log_image(path, RECON_KEY, self.step)  # MLflow's image grid / step slider

    def _evaluate(self) -> dict[str, float]:
        ec = self.cfg.eval
        try:
            return evaluate(
                self.model, self.built.test_data, ec.num_samples, ec.batch_size, list(ec.metrics),
                self.device, self.metric_set,
            )
        except FloatingPointError as exc:  # non-finite latents (finite but exploded weights)
            self._main_only_failure(f"evaluation after step {self.step}: {exc}")
            return {}

    def _main_only_failure(self, message: str) -> None:
        """Rank 0's own work (evaluation, images) met non-finite values: stop now when alone,
        else at :meth:`_share_main_failure`, where every rank stops together."""
        if not self.dist.enabled:
            raise NonFiniteLoss(message)
        self._main_failure = message

    def _share_main_failure(self) -> None:
        """Collective (every rank calls it after rank 0's evaluation/images)."""
        failure = getattr(self, "_main_failure", None)
        if self.dist.enabled and self.dist.any_flag(failure is not None):
            raise NonFiniteLoss(failure or "rank 0 met non-finite values in its evaluation or images")

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        try:
            self._setup()
            self._setup_tracking()
        except BaseException as exc:
            if self.dist is not None:
                self.dist.close()
            if isinstance(exc, OSError):  # e.g. an unwritable run folder
                self._fail_os(exc, end_run=True)
            if isinstance(exc, NotImplementedError):
                raise not_implemented_error(exc, getattr(self, "built", None), self.recipe) from None
            raise
        tc = self.cfg.train
        dist = self.dist
        stop = tc.steps if self.stop_after is None else min(tc.steps, self.stop_after)
        start = self.step
        if start >= stop:
            self._say(f"vqkit: nothing to do: the checkpoint is at step {start} and train.steps is {tc.steps}")
        if dist.is_main:
            self._say(f"vqkit: {self.tracker.describe()}")
            self._say(f"vqkit: run dir {self.run_dir}")
        status = "FAILED"
        previous_term = _sigterm_as_interrupt()
        try:
            self._loop(start, stop)
            status = "FINISHED" if self.step >= tc.steps else "RUNNING"
        except NonFiniteLoss as exc:
            self._fail_nonfinite(exc)
        except NotImplementedError as exc:  # a component cannot do what the recipe asks
            raise not_implemented_error(exc, self.built, self.recipe) from None
        except OSError as exc:  # full disk, read-only file system, permissions: FAILED below
            self._fail_os(exc)
        except StopTrial as exc:  # the sweep's search pruned this child: resumable, KILLED, exit 0
            status = "KILLED"
            path = self._save(collective=False)
            self.tracker.set_tags({PRUNED_TAG: str(exc.step)})
            self._say(f"vqkit: stopped at step {exc.step}: pruned by the sweep's search; checkpoint {path}")
        except KeyboardInterrupt:
            status = "KILLED"
            if self.step > start and dist.is_main and _finite_params(self.model, self.disc):
                try:
                    path = self._save(collective=False)
                except OSError as exc:  # e.g. the disk filled up: the newest checkpoint stays
                    self._say(f"vqkit: warning: interrupted at step {self.step}; no checkpoint written "
                              f"({exc.filename}: {exc.strerror or exc})")
                else:
                    self._say(f"vqkit: interrupted at step {self.step}; checkpoint {path}; continue with "
                              f"`vqkit train --resume {self.run_dir}`")
            raise
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            if self.system_metrics is not None:
                self.system_metrics.finish()
            if dist.is_main and status != "RUNNING":
                self.tracker.finish(status)
            elif dist.is_main:
                self.tracker.flush()
            dist.close(barrier=status in ("FINISHED", "RUNNING"))
        result = TrainResult(
            run_id=self.tracker.run_id,
            run_dir=self.run_dir,
            step=self.step,
            metrics={**self.last_metrics, **self.last_eval},
            checkpoint=self.last_good,
            tracking_uri=self.tracker.uri,
        )
        if dist.is_main:
            self._summary(result)
        return result

    def _fail_os(self, exc: OSError, end_run: bool = False) -> None:
        """Raise the one-line user error for a file-system error (the path and the cause),
        after tagging the MLflow run ``vqkit.failure`` (and ending it FAILED when
        ``end_run``; the loop's ``finally`` does it otherwise)."""
        import errno as errno_names

        name = errno_names.errorcode.get(exc.errno or 0, "")
        cause = (exc.strerror or str(exc)) + (f" ({name})" if name else "")
        reason = f"{exc.filename}: {cause}" if exc.filename else cause
        tracker = self.tracker
        # a resumed leg that fails before it trains leaves the run as it found it
        before = getattr(tracker, "reopened_from", None) if end_run else None
        keep_status = before in ("FINISHED", "FAILED", "KILLED")
        if tracker is not None and getattr(tracker, "enabled", False):
            try:
                if not keep_status:
                    tracker.set_tags({"vqkit.failure": f"file system error: {reason}"[:5000]})
                if end_run:
                    tracker.finish(before if keep_status else "FAILED")
            except OSError:  # pragma: no cover - the tracker keeps what it cannot write
                pass
        ckpt_dir = getattr(self, "ckpt_dir", None)
        newest = ckpt.latest_checkpoint(ckpt_dir) if ckpt_dir is not None and ckpt_dir.is_dir() else None
        keep = f"; the newest checkpoint, {newest}, is intact" if newest is not None else ""
        ended = ""
        if tracker is not None and getattr(tracker, "run_id", None):
            ended = f"; the MLflow run keeps its status {before}" if keep_status else "; the MLflow run is marked FAILED"
        raise VqkitError(f"{reason}{ended}{keep}") from None

    def _fail_nonfinite(self, exc: NonFiniteLoss) -> None:
        if self.dist.is_main:
            self.tracker.set_tags({"vqkit.failure": f"non-finite loss: {exc}"[:5000]})
        good = self.last_good or (self.resume_path if self.resume is not None else None)
        keep = f"the last good checkpoint is {good}" if good else "no checkpoint was written before it"
        raise VqkitError(
            f"training stopped: the loss became NaN/inf ({exc}); {keep}. Lower train.lr, set "
            "train.grad_clip, or disable train.amp, then resume from the last good checkpoint"
        ) from None

    def _loop(self, start: int, stop: int) -> None:
        tc = self.cfg.train
        dist = self.dist
        show_bar = (not self.quiet) and dist.is_main and self.out.isatty()
        lines = (not self.quiet) and dist.is_main and not show_bar
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True, file=self.out,
                       desc=self.cfg.name)
        self.model_ddp.train()
        if self.disc is not None:
            self.disc.train()
        sums: dict[str, torch.Tensor] = {}
        n_window = 0
        data_s = step_s = 0.0
        batches: Iterator[torch.Tensor] = self.batches.iterate(start, stop)
        try:
            for step in range(start, stop):
                t0 = time.perf_counter()
                x = next(batches).to(self.device, non_blocking=True)
                t1 = time.perf_counter()
                terms = self._train_step(x, step)
                self.step = step + 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
                n_window += 1
                if self.device.type == "cuda" and (self.step % tc.log_every == 0):
                    torch.cuda.synchronize(self.device)
                t2 = time.perf_counter()
                data_s += t1 - t0
                step_s += t2 - t0
                last = self.step == stop
                if bar is not None:
                    bar.update(1)
                if last or any(self.step % every == 0 for every in (tc.eval_every, tc.image_every)):
                    self._check_weights()  # before rank 0 evaluates or draws alone
                if self.step % tc.log_every == 0 or last:
                    metrics = {k: float(v) / n_window for k, v in sums.items()}
                    if dist.is_main:
                        # an early stop (stop_after) must not add to the monitor's history, so a
                        # resumed run ends with exactly the state of an uninterrupted one
                        regular = self.step % tc.log_every == 0 or self.step == tc.steps
                        metrics.update(self.monitor.metrics(self.step) if regular else self.monitor.snapshot())
                    metrics["train/lr"] = float(self.sched.get_last_lr()[0])
                    metrics["time/data_s"] = data_s / n_window
                    metrics["time/step_s"] = step_s / n_window
                    metrics["time/data_share"] = data_s / step_s if step_s > 0 else 0.0
                    metrics["train/epoch"] = float(self.batches.epoch_of(step))
                    self.last_metrics = metrics
                    self.tracker.log_metrics(metrics, self.step)
                    sums, n_window, data_s, step_s = {}, 0, 0.0, 0.0
                    if bar is not None:
                        bar.set_postfix(self._postfix(metrics), refresh=False)
                if dist.is_main and (self.step % tc.eval_every == 0 or (last and self.step == tc.steps)):
                    self.last_eval = self._evaluate()
                    self.tracker.log_metrics(self.last_eval, self.step)
                    if (self.trial is not None and self.step < tc.steps
                            and self.trial.report(self.step, self.last_eval)):
                        self._pruned_at = self.step  # data-parallel: every rank stops below, together
                        if dist.world_size == 1:
                            raise StopTrial(self.step)
                    if bar is not None:
                        bar.set_postfix(self._postfix({**self.last_metrics, **self.last_eval}), refresh=False)
                    if lines:
                        self._progress_line()
                if dist.is_main and (self.step % tc.image_every == 0 or last):
                    self._log_images()
                if last or any(self.step % every == 0 for every in (tc.eval_every, tc.image_every)):
                    self._share_main_failure()
                    if self.trial is not None and dist.any_flag(getattr(self, "_pruned_at", None) is not None):
                        raise StopTrial(self.step)  # rank 0's search said stop: all ranks stop at this step
                if self.step % tc.checkpoint_every == 0 and not (last and self.step == tc.steps):
                    self._save()
                elif last and self.step < tc.steps:
                    self._save()  # stopped early (stop_after): keep a resumable checkpoint
        finally:
            if bar is not None:
                bar.close()
        if self.debug_state_dir:
            self._dump_state("end")
        if self.step >= tc.steps:
            self._finish_artifacts()

    def _postfix(self, m: dict[str, float]) -> dict[str, str]:
        out = {"loss": f"{m.get('loss/total', float('nan')):.4f}"}
        if "codebook/usage" in m:
            out["usage"] = f"{100 * m['codebook/usage']:.0f}%"
        if "eval/psnr" in m:
            out["psnr"] = f"{m['eval/psnr']:.2f}"
        if "time/data_share" in m:
            out["data"] = f"{100 * m['time/data_share']:.0f}%"
        return out

    def _progress_line(self) -> None:
        m = {**self.last_metrics, **self.last_eval}
        parts = [f"step {self.step}/{self.cfg.train.steps}"]
        for key, fmt in (("loss/total", "{:.4f}"), ("codebook/usage", "{:.2f}"), ("eval/psnr", "{:.2f}"),
                         ("eval/ssim", "{:.3f}"), ("time/step_s", "{:.3f}")):
            if key in m:
                parts.append(f"{key}={fmt.format(m[key])}")
        print("vqkit: " + " ".join(parts), file=self.out, flush=True)

    def _finish_artifacts(self) -> None:
        """Plots (rank 0) and the final checkpoint (called on every rank)."""
        if self.dist.is_main:
            plots = self.monitor.save_plots(self.run_dir / "plots")
            for p in plots:
                self.tracker.log_artifact(p, "plots")
        self._save(final=True)

    def _summary(self, result: TrainResult) -> None:
        m = result.metrics
        bits = []
        for key in ("eval/psnr", "eval/ssim", "eval/lpips", "codebook/usage", "codebook/perplexity"):
            if key in m:
                bits.append(f"{key.split('/')[-1]}={m[key]:.4g}")
        print(f"vqkit: step {result.step}: " + (" ".join(bits) if bits else "done"), file=self.out)
        if result.run_id:
            print(f"vqkit: MLflow run {result.run_id} (experiment {self.cfg.tracking.experiment!r}) "
                  f"in {result.tracking_uri}", file=self.out)
        print(f"vqkit: run dir {result.run_dir}" + (f"; checkpoint {result.checkpoint}" if result.checkpoint else ""),
              file=self.out, flush=True)
        if result.run_id and result.tracking_uri:
            from vqkit.tracking import ui_command

            print(f"vqkit: see it in MLflow's UI: {ui_command(result.tracking_uri)}", file=self.out, flush=True)


def train(
    recipe: Recipe,
    *,
    resume: str | Path | None = None,
    quiet: bool = False,
    stop_after: int | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> TrainResult:
    """Train ``recipe``; ``resume`` is a checkpoint file to continue from."""
    state = None
    path = None
    if resume is not None:
        path = Path(resume)
        state = ckpt.load_checkpoint(path)
    trainer = Trainer(recipe, resume=state, resume_path=path, quiet=quiet, stop_after=stop_after,
                      stdout=stdout, stderr=stderr)
    return trainer.run()
