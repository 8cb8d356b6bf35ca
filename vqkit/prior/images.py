"""Image grids of samples: PNG files for people, arrays for MLflow's image log."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["grid_array", "save_grid"]


def grid_array(images: torch.Tensor, columns: int, pad: int = 2, min_height: int = 64) -> np.ndarray:
    """uint8 ``(H, W, 3)`` grid of float ``(N, C, H, W)`` images in ``[-1, 1]`` (clamped), filled
    row by row, ``columns`` per row, white padding; small images are enlarged (nearest
    neighbour) to at least ``min_height`` pixels high."""
    t = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    t = t[:, :3]
    scale = max(1, math.ceil(min_height / t.shape[2]))
    if scale > 1:
        t = t.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, _, h, w = t.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h + (rows + 1) * pad, columns * w + (columns + 1) * pad, 3), 255, dtype=np.uint8)
    arr = t.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, columns: int, path: str | Path) -> Path:
    """Write :func:`grid_array` as a PNG, atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid_array(images, columns)).save(tmp, format="PNG")
    tmp.replace(path)
    return path
