"""Load a trained prior (with the autoencoder it models) and draw decoded samples."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vqkit.errors import VqkitError

__all__ = ["TrainedPrior", "load_prior", "draw"]


@dataclasses.dataclass
class TrainedPrior:
    """A prior in eval mode, the frozen autoencoder that decodes its codes, and its recipe."""

    prior: Any
    autoencoder: Any
    recipe: Any
    state: dict[str, Any]
    checkpoint: Path

    @property
    def num_classes(self) -> int:
        return int(self.prior.num_classes)


def load_prior(path: str | Path, device: torch.device | str = "cpu") -> TrainedPrior:
    """Rebuild the prior of a ``vqkit prior train`` checkpoint and load its autoencoder (the
    checkpoint file recorded at training time, checked against its SHA-256)."""
    from vqkit.model import VQModel
    from vqkit.prior.codes import file_sha256
    from vqkit.prior.family import build_prior
    from vqkit.recipe import recipe_from_dict
    from vqkit.train.checkpoint import load_checkpoint

    path = Path(path)
    state = load_checkpoint(path)
    if state.get("family") != "prior":
        raise VqkitError(f"{path} is an autoencoder checkpoint, not a prior's; `vqkit sample` needs a run "
                         "of `vqkit prior train`")
    recipe = recipe_from_dict(state["recipe"], source=f"{path}#recipe")
    meta = state["prior"]
    prior = build_prior(meta["name"], recipe.params_of("prior"), int(meta["codebook_size"]),
                        tuple(meta["grid"]), int(meta["num_classes"]))
    prior.load_state_dict(state["model"])
    info = state["autoencoder"]
    ae_path = Path(info["checkpoint"])
    if not ae_path.is_file():
        raise VqkitError(f"the autoencoder checkpoint of this prior is gone: {ae_path}")
    if file_sha256(ae_path) != info["sha256"]:
        raise VqkitError(f"the autoencoder checkpoint {ae_path} changed since the prior {path} was "
                         "trained (its SHA-256 differs); its codes no longer mean what the prior learned")
    ae, _ = VQModel.from_checkpoint(ae_path, map_location=device)
    return TrainedPrior(prior.to(device).eval(), ae, recipe, state, path)


@torch.no_grad()
def draw(trained: TrainedPrior, n: int, labels: torch.Tensor | None = None, *, temperature: float = 1.0,
         top_k: int | None = None, top_p: float | None = None, seed: int = 0,
         batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples: codes int64 ``(n, *grid)`` and decoded images float ``(n, C, H, W)``.
    One generator seeded with ``seed`` draws every batch in order, so the result depends on
    ``seed`` (and ``batch_size``) only."""
    prior = trained.prior
    device = next(prior.parameters()).device
    g = torch.Generator(device=device).manual_seed(int(seed))
    codes, images = [], []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        lab = labels[start:start + m].to(device) if labels is not None else None
        c = prior.sample(m, lab, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
        codes.append(c.cpu())
        images.append(trained.autoencoder.decode_indices(c).float().cpu())
    return torch.cat(codes), torch.cat(images)
