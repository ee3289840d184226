"""The core: the Engine (build order), the training loop, checkpoints, distributed runs and
the memory plan (docs/architecture.md).

The core reaches components only through the registry and the interfaces declared in
:mod:`phase7fw.interfaces`; it never imports one by name.
"""
