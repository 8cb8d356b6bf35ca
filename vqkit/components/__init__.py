"""Built-in components. Each module is a plugin registered through the ``vqkit``
entry-point group (see setup.cfg), exactly like a third-party plugin."""
