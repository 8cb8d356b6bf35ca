"""Training: build a model from a recipe, run the loop, checkpoint, resume.

Submodules: :mod:`~vqkit.train.build` (recipe -> components),
:mod:`~vqkit.train.loop` (the training loop shared by model families),
:mod:`~vqkit.train.autoencoder` (the autoencoder family: step, state, evaluation, images),
:mod:`~vqkit.train.trainer` (``vqkit train``'s entry points), :mod:`~vqkit.train.checkpoint` (atomic, safe
checkpoints), :mod:`~vqkit.train.schedule` (LR schedules),
:mod:`~vqkit.train.distributed` (torchrun / DDP), :mod:`~vqkit.train.codebook`
(code-book health and resets).
"""
