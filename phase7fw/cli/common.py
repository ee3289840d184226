"""What every command shares: the plugins of this process (loaded once) and the recipe of
its arguments, plus the argument groups several commands take."""

from __future__ import annotations

import sys

_LOADED = None


def _report(err) -> None:
    print(f"warning: plugin {err.name} failed and is disabled: {err}", file=sys.stderr)


def reset() -> None:
    """Forget the loaded plugins (each ``main()`` call loads them afresh)."""
    global _LOADED
    _LOADED = None


def plugins():
    """Plugins of this process, loaded once; a failing plugin is a warning line (an error
    when strict), here and whenever one of its hooks fails later."""
    global _LOADED
    if _LOADED is None:
        from phase7fw.plugins import load_plugins

        _LOADED = load_plugins(report=_report)
    return _LOADED


def plugin_commands(loaded):
    """The ``register_commands`` hook: a plugin that fails in it loses the commands it added."""
    from phase7fw.plugins import CURRENT_PLUGIN

    def call(subparsers):
        owners: dict[str, str] = {}
        add_parser = subparsers.add_parser

        def add(name, **kwargs):
            owners[name] = CURRENT_PLUGIN.get()
            return add_parser(name, **kwargs)

        subparsers.add_parser = add
        before = len(loaded.load_errors)
        try:
            loaded.call("register_commands", subparsers=subparsers)
        finally:
            subparsers.add_parser = add_parser
        failed = {e.name for e in loaded.load_errors[before:]}
        for name, owner in owners.items():
            if owner in failed:
                subparsers.choices.pop(name, None)
                subparsers._choices_actions[:] = [a for a in subparsers._choices_actions if a.dest != name]

    return call


def recipe(args, loaded):
    from phase7fw.recipe import load_recipe

    return load_recipe(args.recipe, args.set or None, plugins=loaded)


# ---------------------------------------------------------------------- argument groups
def with_set(sp) -> None:
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a recipe key (VALUE is TOML: 20, 3e-4, true, \"text\", [1, 2])")


def checkpoint_arg(sp, optional: bool = False) -> None:
    sp.add_argument("checkpoint", nargs="?" if optional else None, metavar="CHECKPOINT|RUN_DIR",
                    help="a checkpoint file, or a run folder (best > final > latest step)"
                    + (", or nothing: the newest run under --runs-dir" if optional else ""))
    sp.add_argument("--runs-dir", default="runs", help="where to look for runs (default: runs)")
    sp.add_argument("--device", default=None, help="override train.device")


def cuda_graph_flag(sp) -> None:
    sp.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                    help="decode with the static step captured in a CUDA graph (auto, the default: on a"
                         " CUDA device when the model has one, else the dynamic cached path, said in one"
                         " line; on: required; off: the dynamic cached path)")
    sp.add_argument("--compile-step", action="store_true",
                    help="compile the decode step (torch.compile) before the CUDA graph captures it: faster"
                         " tokens after a compilation at the first prompt (CUDA only)")
