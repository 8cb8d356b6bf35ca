"""vqkit: vector-quantized autoencoders as reproducible experiments."""
import pluggy

__version__ = "0.1.0"

#: Marker for plugin hook implementations: ``@vqkit.hookimpl``.
hookimpl = pluggy.HookimplMarker("vqkit")

__all__ = ["__version__", "hookimpl"]
