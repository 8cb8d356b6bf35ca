"""Training: build a model from a recipe, run the loop, checkpoint, resume.

Submodules: :mod:`~vqkit.train.build` (recipe -> components),
:mod:`~vqkit.train.trainer` (the loop), :mod:`~vqkit.train.checkpoint` (atomic, safe
checkpoints), :mod:`~vqkit.train.schedule` (LR schedules),
:mod:`~vqkit.train.distributed` (torchrun / DDP), :mod:`~vqkit.train.codebook`
(code-book health and resets).
"""
