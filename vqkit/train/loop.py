"""The training loop shared by model families: one recipe in, one MLflow run and a folder
of checkpoints out.

A model family (the prior over codes today; see :mod:`vqkit.prior.family`) supplies a
:class:`Family`: how to build its model and data, one optimizer step, an evaluation, the
images it logs and its part of the checkpoint. :class:`TrainLoop` does everything else,
the same way for every family:

* device, seeding, the MLflow run and the local run dir (params: the flattened normalized
  recipe; tags ``vqkit.version``, ``vqkit.plugins``, ``vqkit.recipe_sha256``,
  ``vqkit.run_dir``, ``vqkit.family`` and the family's own; artifact ``recipe.yaml``);
* the step loop with a progress bar (or progress lines when stdout is not a terminal),
  metrics averaged over ``train.log_every`` steps plus ``train/lr``, ``time/step_s``,
  ``time/data_s``, ``time/data_share`` and ``train/epoch``; evaluation every
  ``train.eval_every`` steps, images every ``train.image_every`` steps;
* checkpoints (:mod:`vqkit.train.checkpoint`: atomic files, ``latest.json``, pruning,
  ``checkpoints/last.pt`` / ``final.pt`` artifacts, the ``vqkit.last_checkpoint`` tag)
  holding the family's state, the step, the RNG states, the normalized recipe and the run;
  ``resume`` continues bit for bit (the data order is a function of the step);
* a NaN/inf loss stops the run with one ``vqkit: error:`` line naming the last good
  checkpoint; SIGTERM / Ctrl-C checkpoints and ends the run as KILLED.

The autoencoder family still runs its own copy of this loop in
:class:`vqkit.train.trainer.Trainer`, with the helpers defined here.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
import random
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
from vqkit.recipe import Recipe
from vqkit.train import checkpoint as ckpt

__all__ = ["Family", "TrainLoop", "NonFiniteLoss", "TrainResult", "seed_everything"]


# =========================================================================== helpers
class NonFiniteLoss(Exception):
    """The loss (or a gradient norm) became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) training call produced."""

    run_id: str | None
    run_dir: Path | None
    step: int
    metrics: dict[str, float]
    checkpoint: Path | None
    tracking_uri: str | None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from the recipe seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _make_optimizer(params: list[nn.Parameter], train_cfg, lr: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if train_cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay)


def _finite_params(*modules: nn.Module | None) -> bool:
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                return False
    return True


def _sigterm_as_interrupt():
    """Turn SIGTERM (schedulers, ``kill``) into KeyboardInterrupt so the run checkpoints and
    ends cleanly; returns the previous handler (``None`` outside the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _retarget(sched: torch.optim.lr_scheduler.LambdaLR, lr: float, total_steps: int) -> None:
    """Make a restored scheduler follow the recipe's peak LR and length (a resumed run may
    change ``train.lr`` or ``train.steps``); a no-op when they are unchanged."""
    for fn in sched.lr_lambdas:
        fn.total_steps = total_steps
    sched.base_lrs = [float(lr) for _ in sched.base_lrs]
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes (hard link, else copy), atomically."""
    import shutil

    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)


# =========================================================================== the loop
class Family(abc.ABC):
    """One model family's part of training, called by :class:`TrainLoop`.

    Methods are called in this order: :meth:`setup` (once, after seeding), then
    :meth:`load_state_dict` when resuming, then :meth:`batches` and :meth:`train_step` for
    every step, with :meth:`evaluate` / :meth:`log_images` at their intervals and
    :meth:`finish` after the last step of ``train.steps``.
    """

    #: checkpoint key ``family`` and tag ``vqkit.family``
    name: str = ""
    #: metrics shown in the progress bar / lines and the summary: (key, label, format)
    shown: tuple[tuple[str, str, str], ...] = ()

    @abc.abstractmethod
    def setup(self, loop: "TrainLoop") -> None:
        """Build models, optimizers and data on ``loop.device`` (``loop.resume`` holds the
        checkpoint being resumed, if any)."""

    @abc.abstractmethod
    def batches(self, start: int, stop: int) -> Iterator[Any]:
        """The batches of steps ``start .. stop-1`` (a pure function of the step)."""

    @abc.abstractmethod
    def train_step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """One optimizer update; detached 0-dim metric tensors. Raises
        :class:`NonFiniteLoss` when the loss is NaN/inf."""

    @abc.abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Metrics on the test split."""

    def log_images(self, step: int, run_dir: Path, tracker: Any) -> None:  # noqa: B027
        """Write and log the family's images at ``step``."""

    def finish(self, run_dir: Path, tracker: Any) -> dict[str, float]:
        """Work after the last step (e.g. final metrics); returns metrics to log."""
        return {}

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The family's part of a checkpoint (models, optimizers, schedulers, ...)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        """Restore :meth:`state_dict` output (``where`` names the file, for errors)."""

    @abc.abstractmethod
    def modules(self) -> list[nn.Module]:
        """Modules whose weights must stay finite (never checkpointed otherwise)."""

    @abc.abstractmethod
    def lr(self) -> float:
        """The current learning rate."""

    def epoch_of(self, step: int) -> int:
        return 0

    def tags(self) -> dict[str, Any]:
        """Extra MLflow tags of the run (e.g. links to other runs)."""
        return {}


class TrainLoop:
    """Trains one family on one recipe; see the module docstring.

    Args:
        recipe: the validated recipe.
        family: the model family's step.
        resume: a loaded checkpoint to continue from, ``resume_path`` its file.
        quiet: no progress bar or lines (the summary still prints).
        stop_after: stop (with a checkpoint) after this many total steps; the LR schedule
            still follows ``train.steps``.
    """

    def __init__(self, recipe: Recipe, family: Family, *, resume: dict[str, Any] | None = None,
                 resume_path: Path | None = None, quiet: bool = False, stop_after: int | None = None,
                 stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.recipe = recipe
        self.cfg = recipe.model
        self.family = family
        self.resume = resume
        self.resume_path = resume_path
        self.quiet = quiet
        self.stop_after = stop_after
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.tracker: Any = None
        self.run_dir: Path | None = None
        self.step = 0
        self.last_good: Path | None = None
        self.last_eval: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        from vqkit.train.distributed import resolve_device

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise VqkitError(f"{self.family.name} training runs in one process (no --nproc / torchrun)")
        self.device = resolve_device(self.cfg.train.device)
        seed_everything(self.cfg.seed)
        self.family.setup(self)
        if self.resume is not None:
            if self.resume.get("family") != self.family.name:
                raise VqkitError(
                    f"{self.resume_path} is a checkpoint of a {self.resume.get('family') or 'autoencoder'} "
                    f"run, not of a {self.family.name}"
                )
            self.family.load_state_dict(self.resume, str(self.resume_path or "checkpoint"))
            ckpt.restore_rng(self.resume["rng"])
            self.step = int(self.resume["step"])

    def _setup_tracking(self) -> None:
        from vqkit.plugins import get_registry
        from vqkit.tracking import Tracker, read_run_info, resolve_tracking_uri

        tcfg = self.cfg.tracking
        prev_run = (self.resume or {}).get("run") or {}
        uri = tcfg.uri or None
        if uri is None and not os.environ.get("MLFLOW_TRACKING_URI") and prev_run.get("tracking_uri"):
            uri = prev_run["tracking_uri"]  # continue the run in the store that holds it
        uri = resolve_tracking_uri(uri)
        self.tracker = tracker = Tracker(uri, tcfg.experiment, tcfg.run_name or self.cfg.name, stderr=self.err)
        run_dir: Path | None = None
        if self.resume_path is not None:
            parent = Path(self.resume_path).resolve().parent
            for cand in (parent.parent, parent):
                if read_run_info(cand):
                    run_dir = cand
                    break
        resume_id = prev_run.get("run_id")
        if run_dir is not None:
            info = read_run_info(run_dir)
            resume_id = info.get("run_id") or resume_id
            tracker.local_id = info.get("local_id") or tracker.local_id
        if resume_id and prev_run.get("tracking_uri") and prev_run["tracking_uri"] != uri:
            self.say(f"vqkit: note: the resumed run was tracked at {prev_run['tracking_uri']}; "
                     f"logging to a new run at {uri}")
            resume_id = None
        run_id = tracker.start(resume_run_id=resume_id)
        if run_dir is None:
            run_dir = Path(tcfg.output_dir).resolve() / (run_id or f"local-{tracker.local_id}")
        self.run_dir = run_dir
        tracker.attach(run_dir)
        self.ckpt_dir = run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tracker.log_params(self.recipe.flat_params())
        tags = {
            "vqkit.version": __version__,
            "vqkit.plugins": ", ".join(get_registry().distributions()),
            "vqkit.recipe_sha256": self.recipe.sha256(),
            "vqkit.run_dir": str(run_dir),
            "vqkit.family": self.family.name,
            **self.family.tags(),
        }
        if self.resume is not None:
            tags["vqkit.resumed_from_step"] = self.step
        tracker.set_tags(tags)
        recipe_path = run_dir / "recipe.yaml"
        recipe_path.write_text(self.recipe.to_yaml(), encoding="utf-8")
        tracker.log_artifact(recipe_path)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT,
            "vqkit_version": __version__,
            "family": self.family.name,
            "step": self.step,
            "recipe": self.recipe.to_dict(),
            **self.family.state_dict(),
            "rng": ckpt.capture_rng(),
            "run": {
                "run_id": getattr(self.tracker, "run_id", None),
                "local_id": getattr(self.tracker, "local_id", None),
                "tracking_uri": getattr(self.tracker, "uri", None),
                "experiment": self.cfg.tracking.experiment,
                "run_dir": str(self.run_dir) if self.run_dir else None,
            },
        }

    def save(self, final: bool = False) -> Path:
        """Write a checkpoint of the current state; never one with non-finite weights."""
        if not _finite_params(*self.family.modules()):
            raise NonFiniteLoss(f"model weights are NaN or infinite after step {self.step}")
        path = self.ckpt_dir / "final.pt" if final else ckpt.step_file(self.ckpt_dir, self.step)
        ckpt.save_checkpoint(path, self.state())
        ckpt.write_latest(self.ckpt_dir, path, self.step)
        if not final:
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        self.last_good = path
        if final:
            self.tracker.log_artifact(path, "checkpoints")
        else:  # one periodic checkpoint in MLflow, replaced at each save
            link = self.ckpt_dir / "last.pt"
            _link_or_copy(path, link)
            self.tracker.log_artifact(link, "checkpoints")
        artifact = "final.pt" if final else "last.pt"
        self.tracker.set_tags(
            {"vqkit.last_checkpoint": json.dumps({"artifact": f"checkpoints/{artifact}", "step": self.step})}
        )
        return path

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        self._setup()
        self._setup_tracking()
        tc = self.cfg.train
        stop = tc.steps if self.stop_after is None else min(tc.steps, self.stop_after)
        start = self.step
        if start >= stop:
            self.say(f"vqkit: nothing to do: the checkpoint is at step {start} and train.steps is {tc.steps}")
        self.say(f"vqkit: {self.tracker.describe()}")
        self.say(f"vqkit: run dir {self.run_dir}")
        status = "FAILED"
        previous_term = _sigterm_as_interrupt()
        try:
            self._loop(start, stop)
            status = "FINISHED" if self.step >= tc.steps else "RUNNING"
        except NonFiniteLoss as exc:
            self._fail_nonfinite(exc)
        except KeyboardInterrupt:
            status = "KILLED"
            if self.step > start and _finite_params(*self.family.modules()):
                path = self.save()
                self.say(f"vqkit: interrupted at step {self.step}; checkpoint {path}; continue with "
                         f"`vqkit {self.family.name} train --resume {self.run_dir}`")
            raise
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            if status != "RUNNING":
                self.tracker.finish(status)
            else:
                self.tracker.flush()
        result = TrainResult(
            run_id=self.tracker.run_id, run_dir=self.run_dir, step=self.step,
            metrics={**self.last_metrics, **self.last_eval}, checkpoint=self.last_good,
            tracking_uri=self.tracker.uri,
        )
        self._summary(result)
        return result

    def _fail_nonfinite(self, exc: NonFiniteLoss) -> None:
        self.tracker.set_tags({"vqkit.failure": f"non-finite loss: {exc}"[:5000]})
        good = self.last_good or (self.resume_path if self.resume is not None else None)
        keep = f"the last good checkpoint is {good}" if good else "no checkpoint was written before it"
        raise VqkitError(
            f"training stopped: the loss became NaN/inf ({exc}); {keep}. Lower train.lr, set "
            "train.grad_clip, or disable train.amp, then resume from the last good checkpoint"
        ) from None

    def _loop(self, start: int, stop: int) -> None:
        tc = self.cfg.train
        fam = self.family
        show_bar = not self.quiet and self.out.isatty()
        lines = not self.quiet and not show_bar
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True, file=self.out,
                       desc=self.cfg.name)
        sums: dict[str, torch.Tensor] = {}
        n_window = 0
        data_s = step_s = 0.0
        batches = fam.batches(start, stop)
        try:
            for step in range(start, stop):
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                terms = fam.train_step(batch, step)
                self.step = step + 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
                n_window += 1
                if self.device.type == "cuda" and self.step % tc.log_every == 0:
                    torch.cuda.synchronize(self.device)
                t2 = time.perf_counter()
                data_s += t1 - t0
                step_s += t2 - t0
                last = self.step == stop
                if bar is not None:
                    bar.update(1)
                if self.step % tc.log_every == 0 or last:
                    metrics = {k: float(v) / n_window for k, v in sums.items()}
                    metrics["train/lr"] = fam.lr()
                    metrics["time/data_s"] = data_s / n_window
                    metrics["time/step_s"] = step_s / n_window
                    metrics["time/data_share"] = data_s / step_s if step_s > 0 else 0.0
                    metrics["train/epoch"] = float(fam.epoch_of(step))
                    self.last_metrics = metrics
                    self.tracker.log_metrics(metrics, self.step)
                    sums, n_window, data_s, step_s = {}, 0, 0.0, 0.0
                    if bar is not None:
                        bar.set_postfix(self._postfix(metrics), refresh=False)
                if self.step % tc.eval_every == 0 or (last and self.step == tc.steps):
                    self.last_eval = fam.evaluate()
                    self.tracker.log_metrics(self.last_eval, self.step)
                    if bar is not None:
                        bar.set_postfix(self._postfix({**self.last_metrics, **self.last_eval}), refresh=False)
                    if lines:
                        self._progress_line()
                if self.step % tc.image_every == 0 or last:
                    fam.log_images(self.step, self.run_dir, self.tracker)
                if self.step % tc.checkpoint_every == 0 and not (last and self.step == tc.steps):
                    self.save()
                elif last and self.step < tc.steps:
                    self.save()  # stopped early (stop_after): keep a resumable checkpoint
        finally:
            if bar is not None:
                bar.close()
        if self.step >= tc.steps:
            final = fam.finish(self.run_dir, self.tracker)
            if final:
                self.tracker.log_metrics(final, self.step)
                self.last_eval.update(final)
            self.save(final=True)

    def _postfix(self, m: dict[str, float]) -> dict[str, str]:
        return {label: fmt.format(m[key]) for key, label, fmt in self.family.shown if key in m}

    def _progress_line(self) -> None:
        m = {**self.last_metrics, **self.last_eval}
        parts = [f"step {self.step}/{self.cfg.train.steps}"]
        parts += [f"{key}={fmt.format(m[key])}" for key, _, fmt in self.family.shown if key in m]
        print("vqkit: " + " ".join(parts), file=self.out, flush=True)

    def _summary(self, result: TrainResult) -> None:
        m = result.metrics
        bits = [f"{key}={fmt.format(m[key])}" for key, _, fmt in self.family.shown if key in m]
        print(f"vqkit: step {result.step}: " + (" ".join(bits) if bits else "done"), file=self.out)
        if result.run_id:
            print(f"vqkit: MLflow run {result.run_id} (experiment {self.cfg.tracking.experiment!r}) "
                  f"in {result.tracking_uri}", file=self.out)
        print(f"vqkit: run dir {result.run_dir}" + (f"; checkpoint {result.checkpoint}" if result.checkpoint else ""),
              file=self.out, flush=True)
