"""phase7fw: a plugin-based framework for training hybrid hyperbolic-attention LMs."""

__version__ = "0.1.0"

from phase7fw.hookspecs import hookimpl  # noqa: E402
from phase7fw.registry import Registry  # noqa: E402
from phase7fw import _moved  # noqa: E402

_moved.install()  # old flat module paths (phase7fw.engine, ...) keep importing, with a warning


def __getattr__(name):
    # The engine pulls in torch; import it lazily so `phase7fw --help` and plugins stay quick.
    if name in ("Engine", "build_model"):
        from phase7fw.core import engine

        return getattr(engine, name)
    if name == "load_recipe":
        from phase7fw.recipe import load_recipe

        return load_recipe
    raise AttributeError(f"module 'phase7fw' has no attribute {name!r}")


__all__ = ["Engine", "Registry", "build_model", "hookimpl", "load_recipe", "__version__"]
