"""Fast tensor kernels of vqkit (plain torch, any device).

* :mod:`vqkit.ops.search`: chunked exact nearest-code search and the fused
  straight-through quantization step (:func:`straight_through_vq`).
* :mod:`vqkit.ops.kmeans`: batched k-means++ seeding and Lloyd iterations
  (:func:`kmeans`), used by ``kmeans_init`` and by code-book reset policies.
"""
from vqkit.ops.kmeans import KMeansResult, inertia, kmeans, kmeans_plus_plus
from vqkit.ops.search import VQStep, code_sums, nearest_codes, nearest_two_codes, straight_through_vq, tile_shape

__all__ = [
    "KMeansResult",
    "VQStep",
    "code_sums",
    "inertia",
    "kmeans",
    "kmeans_plus_plus",
    "nearest_codes",
    "nearest_two_codes",
    "straight_through_vq",
    "tile_shape",
]
