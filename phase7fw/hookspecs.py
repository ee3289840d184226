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


@hookspec(firstresult=True)
def adapt_optimizer_state(state, optimizer):
    """A checkpoint's optimizer ``state`` (a ``state_dict``) that ``optimizer`` cannot read as
    it is, converted for it; None when this plugin does not know the layout. The plugin of an
    optimizer with its own state layout implements it (``adamw_lowmem``: 8-bit moments ->
    torch's Adam layout); the first non-None result is used."""


# The run lifecycle: one mechanism. The trainer calls these hooks through pluggy; every
# plugin may implement them, and the recipe's [[callbacks]] (``Callback`` components) are
# attached as implementations for the duration of their run (after the plugins', in recipe
# order), so ``tryfirst``/``trylast`` and hook wrappers order both alike.


@hookspec
def run_start(engine):
    """Called once when ``Engine.fit`` starts, after the whole run is built."""


@hookspec
def step_end(engine, row):
    """Called after each logged training window with its log row (``train.log_every``)."""


@hookspec
def eval_end(engine, row):
    """Called after each evaluation with its log row (``"split": "val"``)."""


@hookspec
def checkpoint_saved(engine, path):
    """Called after each checkpoint is written, with its path."""


@hookspec
def run_end(engine, summary):
    """Called once when ``Engine.fit`` ends normally, with the summary it returns."""


@hookspec
def register_commands(subparsers):
    """Add sub-commands to the ``phase7fw`` CLI (an ``argparse`` subparsers object).

    A command sets ``func`` with ``parser.set_defaults(func=...)``; ``func(args)``
    returns the exit code.
    """
