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
