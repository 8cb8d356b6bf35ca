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
import itertools

import torch
from pydantic import Field
from torch import nn
from vqkit import hookimpl
from vqkit.interfaces import Params, Quantizer, QuantizerOutput


class GridQuantizer(Quantizer):
    """Rounds a bounded projection of each latent to a fixed grid (test plugin)."""

    fixed_codebook = True

    class Params(Params):
        levels: list[int] = Field([3, 3], min_length=1, description="grid points per projected dimension")

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
        return QuantizerOutput(self.proj_out(straight), indices, {}, {"grid_mean": float(grid.mean())})

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
