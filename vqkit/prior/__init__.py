"""The prior family: a model of a trained autoencoder's codes, trained by the shared loop
(:mod:`vqkit.train.loop`) and sampled by ``vqkit sample``.

* :mod:`vqkit.prior.codes`: the codes of the train/test splits, cached by checkpoint digest;
* :mod:`vqkit.prior.family`: the training step, evaluation (bits per dimension) and grids;
* :mod:`vqkit.prior.sampling`: load a trained prior with its autoencoder, draw and decode;
* :mod:`vqkit.prior.quality`: the feature distance of samples against test reconstructions.
"""
