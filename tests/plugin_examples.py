"""Plugin module sources used by the plugin-loading tests (written into fake distributions)."""

GOOD = '''
import torch
from pydantic import Field
from vqkit import hookimpl
from vqkit.interfaces import Params, PerceptualLoss


class HuberLoss(PerceptualLoss):
    """Huber distance between pixels."""

    class Params(Params):
        delta: float = Field(1.0, gt=0, description="transition point")

    def __init__(self, params, *, channels=3):
        super().__init__()
        self.params = params

    def forward(self, reconstruction, target, discriminator=None):
        return torch.nn.functional.huber_loss(reconstruction, target, delta=self.params.delta)


@hookimpl
def vqkit_register_perceptual_losses(register):
    register("huber", HuberLoss)
'''

# same name as GOOD's component, from another distribution
DUPLICATE = GOOD.replace("Huber distance", "Another Huber")

BROKEN_IMPORT = '''
import this_module_does_not_exist_anywhere
'''

BROKEN_HOOK = '''
from vqkit import hookimpl

@hookimpl
def vqkit_register_perceptual_losses(register):
    raise RuntimeError("plugin bug while registering")
'''

MISSPELT_HOOK = '''
from vqkit import hookimpl

@hookimpl
def vqkit_register_quantisers(register):
    pass
'''

NOT_A_COMPONENT = '''
from vqkit import hookimpl

@hookimpl
def vqkit_register_encoders(register):
    register("notes", dict)
'''

# a hook implementation that accepts fewer arguments than the spec (allowed by pluggy)
FEWER_ARGS = '''
from vqkit import hookimpl

@hookimpl
def vqkit_register_datasets():
    pass
'''

# A tiny fixed-code-book quantizer (a grid of `levels` per projected dimension, like FSQ):
# declares fixed_codebook = True and does not implement replace_codes.
FIXED_QUANTIZER = '''
from typing import Annotated

import torch
from pydantic import Field
from torch import nn
from vqkit import hookimpl
from vqkit.interfaces import Params, Quantizer, QuantizerOutput


class GridQuantizer(Quantizer):
    """Rounds a bounded projection of each latent to a fixed grid (test plugin)."""

    fixed_codebook = True

    class Params(Params):
        levels: list[Annotated[int, Field(ge=2)]] = Field([3, 3], min_length=1, description="grid points per projected dimension")

    def __init__(self, params, *, dim):
        super().__init__()
        self.levels = list(params.levels)
        self.dim = dim
        self.codebook_size = 1
        for n in self.levels:
            self.codebook_size *= n
        self.proj_in = nn.Conv2d(dim, len(self.levels), 1)
        self.proj_out = nn.Conv2d(len(self.levels), dim, 1)
        self.register_buffer("code_counts", torch.zeros(self.codebook_size))
        self.register_buffer("_n", torch.tensor(self.levels, dtype=torch.float32).view(1, -1, 1, 1))
        basis = [1]
        for n in self.levels[:-1]:
            basis.append(basis[-1] * n)
        self.register_buffer("_basis", torch.tensor(basis).view(1, -1, 1, 1))

    def _grid(self, indices):
        digits = (indices.unsqueeze(1) // self._basis) % self._n.long()
        return digits.float() / (self._n - 1) * 2 - 1

    def forward(self, z):
        u = torch.tanh(self.proj_in(z))
        digits = torch.round((u + 1) / 2 * (self._n - 1))
        indices = (digits.long() * self._basis).sum(1)
        grid = digits / (self._n - 1) * 2 - 1
        straight = grid.detach() + (u - u.detach())   # value exactly the grid point
        if self.training:
            self.code_counts += torch.bincount(indices.flatten(), minlength=self.codebook_size).float()
        return QuantizerOutput(self.proj_out(straight), indices, {}, {"grid_mean": float(grid.detach().mean())})

    def decode_indices(self, indices):
        return self.proj_out(self._grid(indices))

    def codebook(self):
        all_codes = torch.arange(self.codebook_size).view(1, -1, 1)
        return self.decode_indices(all_codes).detach()[0].permute(1, 2, 0).reshape(-1, self.dim)


@hookimpl
def vqkit_register_quantizers(register):
    register("grid", GridQuantizer)
'''

# registers a quantizer under the built-in name `vq` (a name clash)
CLASHING_VQ = FIXED_QUANTIZER.replace('register("grid", GridQuantizer)', 'register("vq", GridQuantizer)')

# A tiny multi-code-book quantizer: two nearest-code stages on the residuals
# (multi_codebook = True, indices (B, S, h, w), per-stage codebook/replace_codes).
MULTI_QUANTIZER = '''
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from vqkit import hookimpl
from vqkit.interfaces import Params, Quantizer, QuantizerOutput


class TwoStage(Quantizer):
    """Residual nearest-code quantizer with S stages (test plugin)."""

    multi_codebook = True

    class Params(Params):
        stages: int = Field(2, ge=1, description="number of code-books S")
        codebook_size: int = Field(16, ge=2, description="codes per code-book K")

    def __init__(self, params, *, dim):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks = dim, params.codebook_size, params.stages
        self.books = nn.ParameterList(
            [nn.Parameter(torch.randn(params.codebook_size, dim) / (s + 1)) for s in range(params.stages)]
        )

    def _search(self, r, s):
        flat = r.movedim(1, -1).reshape(-1, self.dim)
        return torch.cdist(flat.detach(), self.books[s].detach()).argmin(1)

    def forward(self, z):
        b, _, h, w = z.shape
        residual, total, indices, losses = z, torch.zeros_like(z), [], {}
        for s in range(self.num_codebooks):
            idx = self._search(residual, s)
            code = self.books[s][idx].reshape(b, h, w, self.dim).movedim(-1, 1)
            losses[f"codebook{s}"] = F.mse_loss(code, residual.detach())
            total = total + code
            residual = residual - code.detach()
            indices.append(idx.reshape(b, h, w))
        losses["commitment"] = F.mse_loss(z, total.detach())
        quantized = total.detach() + (z - z.detach())
        return QuantizerOutput(quantized, torch.stack(indices, 1), losses, {"stages": float(self.num_codebooks)})

    def decode_indices(self, indices):
        total = 0
        for s in range(self.num_codebooks):
            total = total + self.books[s][indices[:, s]].movedim(-1, 1)
        return total

    def stage_inputs(self, z, indices):
        out, residual = [], z
        for s in range(self.num_codebooks):
            out.append(residual)
            residual = residual - self.books[s][indices[:, s]].movedim(-1, 1)
        return out

    def codebook(self, stage):
        return self.books[stage].detach()

    def replace_codes(self, idx, vectors, stage):
        with torch.no_grad():
            self.books[stage][idx] = vectors.to(self.books[stage].dtype)

    def code_parameters(self, stage):
        return [self.books[stage]]

    def loss_weights(self):
        return {"commitment": 0.25}


@hookimpl
def vqkit_register_quantizers(register):
    register("two-stage", TwoStage)
'''
