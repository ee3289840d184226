"""Every hook phase7fw calls. Plugins implement them with ``@phase7fw.hookimpl``."""

import pluggy

hookspec = pluggy.HookspecMarker("phase7fw")
hookimpl = pluggy.HookimplMarker("phase7fw")


@hookspec
def register_components(register):
    """Register components by calling ``register(kind, name, factory, config_cls=None,
    description="")`` once per component.

    ``kind`` is one of :data:`phase7fw.registry.KINDS`. ``config_cls`` is an attrs class
    that the component's recipe table (minus ``name``) is structured into, strictly.
    ``factory(config, **context)`` builds the component; docs/plugins.md lists the
    context keys each kind receives.
    """


@hookspec
def run_start(engine):
    """Called once when ``Engine.fit`` starts, after the whole run is built."""


@hookspec
def run_end(engine, summary):
    """Called once when ``Engine.fit`` ends normally, with the summary it returns."""


@hookspec
def register_commands(subparsers):
    """Add sub-commands to the ``phase7fw`` CLI (an ``argparse`` subparsers object).

    A command sets ``func`` with ``parser.set_defaults(func=...)``; ``func(args)``
    returns the exit code.
    """
