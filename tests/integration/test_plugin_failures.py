"""A misbehaving plugin is named (distribution==version), disabled, and the rest works: the CLI,
``phase7fw plugins`` and ``doctor`` always; PHASE7FW_STRICT_PLUGINS=1 keeps the hard failure.
Hooks go through pluggy (ordering, wrappers); recipe callbacks are hook implementations too."""

import sys
import warnings

import pytest

from phase7fw.cli import main
from phase7fw.core.engine import Engine
from phase7fw.plugins import PluginError, PluginWarning, load_plugins
from tests.conftest import RECIPES, run_cli, tiny_overrides

TINY = RECIPES / "llama_tiny.toml"
SMALL = ["--dummy-data", "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "model.seq_len=32", "--set", "model.ffn_hidden=64", "--set", "train.batch_size=2",
         "--set", "train.max_steps=2", "--set", "train.eval_every=0"]

HOOK = """
from phase7fw import hookimpl

@hookimpl
def {hook}({args}):
    raise RuntimeError("{hook} is broken")
"""
BROKEN = {
    "register_commands": HOOK.format(hook="register_commands", args="subparsers"),
    "run_start": HOOK.format(hook="run_start", args="engine"),
    "run_end": HOOK.format(hook="run_end", args="engine, summary"),
    "config": """
from __future__ import annotations
import attrs
from phase7fw import hookimpl

@attrs.frozen
class Cfg:
    x: UndefinedType = 1

@hookimpl
def register_components(register):
    register("optimizer", "needs_undefined", lambda c, **k: None, Cfg)
""",
    "exit_at_import": "import sys\nsys.exit(3)\n",
    "duplicate": """
from phase7fw import hookimpl

@hookimpl
def register_components(register):
    register("tokenizer", "bytes", lambda c, **k: None)
""",
}
MESSAGES = {
    "register_commands": "RuntimeError: register_commands is broken (in its register_commands hook)",
    "run_start": "RuntimeError: run_start is broken (in its run_start hook)",
    "run_end": "RuntimeError: run_end is broken (in its run_end hook)",
    "config": "RegistryError: plugin bad: config_cls Cfg of optimizer 'needs_undefined' has an annotation that"
              " cannot be resolved (NameError",
    "exit_at_import": "SystemExit: the plugin called sys.exit(3)",
    "duplicate": "RegistryError: tokenizer 'bytes' is registered twice: by plugin phase7fw.components.tokenizers"
                 " and by plugin bad",
}


def site_env():
    return {"PYTHONPATH": next(p for p in sys.path if p.endswith("site"))}


def cli(capsys, *args):
    """``phase7fw ARGS`` in this process (the fake plugin is on sys.path): (code, out, err)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_plugin_is_named_disabled_and_the_cli_works(tmp_path, fake_dist, monkeypatch, capsys, case):
    fake_dist("bad", BROKEN[case], version="6.6")
    named = f"bad==6.6: {MESSAGES[case]}"
    warning = f"warning: plugin bad failed and is disabled: {named}"

    code, out, err = cli(capsys, "plugins")
    assert code == 0 and "phase7fw.components.tokenizers (built-in" in out
    if case not in ("run_start", "run_end"):  # those fail only when a run starts or ends
        assert f"FAILED bad ({named}" in out and warning in err
        code, out, err = cli(capsys, "recipe", "validate", TINY)
        assert code == 0 and "valid" in out and warning in err
        monkeypatch.setenv("PHASE7FW_STRICT_PLUGINS", "1")
        code, out, err = cli(capsys, "plugins")
    else:
        code, out, err = cli(capsys, "run", TINY, *SMALL, "--set", f"run.output_dir={tmp_path / 'run'}")
        assert code == 0 and "Done: 2 steps" in out and warning in err
        monkeypatch.setenv("PHASE7FW_STRICT_PLUGINS", "1")
        code, out, err = cli(capsys, "run", TINY, *SMALL, "--set", f"run.output_dir={tmp_path / 'strict'}")
    assert code == 2
    assert f"error: plugin bad failed ({named}" in err and "PHASE7FW_STRICT_PLUGINS is set" in err


def test_a_plugin_calling_sys_exit_at_import_does_not_silence_the_cli(fake_dist):
    fake_dist("bad", BROKEN["exit_at_import"], version="6.6")
    for args in (["plugins"], ["doctor"], ["components", "tokenizer"]):
        proc = run_cli(*args, env=site_env())
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "warning: plugin bad failed and is disabled: bad==6.6: SystemExit" in proc.stderr
        assert proc.stdout.strip()
    assert "plugin bad failed and is disabled" in run_cli("doctor", env=site_env()).stdout


def test_a_failing_command_plugin_keeps_no_half_registered_command(fake_dist):
    fake_dist("bad", """
from phase7fw import hookimpl

@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("halfway", help="never finished")
    raise RuntimeError("broken after add_parser")
""")
    proc = run_cli("halfway", env=site_env())
    assert proc.returncode == 2 and "invalid choice: 'halfway'" in proc.stderr and "Traceback" not in proc.stderr
    assert "halfway" not in run_cli("--help", env=site_env()).stdout


def test_the_python_api_warns_and_the_engine_keeps_the_error(tmp_path, fake_dist):
    fake_dist("bad", BROKEN["exit_at_import"], version="6.6")
    with pytest.warns(PluginWarning, match=r"phase7fw plugin bad failed and is disabled: bad==6.6: SystemExit"):
        plugins = load_plugins()
    engine = Engine.from_recipe(TINY, tiny_overrides(tmp_path), dummy_data=True, plugins=plugins, quiet=True)
    [err] = engine.plugin_errors
    assert err.dist == "bad==6.6" and isinstance(err.error, SystemExit)


def test_a_builtin_that_fails_is_a_hard_error(monkeypatch):
    import phase7fw.plugins as plugins_module

    monkeypatch.setattr(plugins_module, "DEFAULT_PLUGINS", (*plugins_module.DEFAULT_PLUGINS, "phase7fw.components.gone"))
    with pytest.raises(PluginError, match="plugin phase7fw.components.gone failed .*ModuleNotFoundError.*installation"
                                          " is broken"):
        load_plugins()


def test_hooks_go_through_pluggy_with_ordering_wrappers_and_recipe_callbacks(tmp_path):
    import attrs

    from phase7fw import hookimpl
    from phase7fw.interfaces import Callback

    calls = []

    class Late:
        @hookimpl
        def run_start(self, engine):
            calls.append("plain")

    class First:
        @hookimpl(tryfirst=True)
        def run_start(self, engine):
            calls.append("tryfirst")

    class Wrapper:
        @hookimpl(wrapper=True)
        def run_start(self, engine):
            calls.append("wrapper before")
            result = yield
            calls.append("wrapper after")
            return result

        @hookimpl(wrapper=True)
        def run_end(self, engine, summary):
            calls.append("wrapper around run_end")
            return (yield)

    class Recorder(Callback):
        def __init__(self, tag):
            self.tag = tag

        def on_run_start(self, engine):
            calls.append(f"callback {self.tag}")

        def on_run_end(self, engine, summary):
            calls.append(f"callback {self.tag} end")

    class Callbacks:
        @hookimpl
        def register_components(self, register):
            register("callback", "recorder", lambda c: Recorder(c.tag), attrs.make_class("C", {"tag": attrs.field()},
                                                                                        frozen=True))

    plugins = load_plugins(extra=[Late(), First(), Wrapper(), Callbacks()])
    over = tiny_overrides(tmp_path, **{"train.max_steps": 1, "train.eval_every": 0, "train.save_every": 0,
                                       "callbacks": [{"name": "recorder", "tag": "a"}, {"name": "recorder", "tag": "b"}]})
    Engine.from_recipe(TINY, over, dummy_data=True, plugins=plugins, quiet=True).fit()
    assert calls == ["wrapper before", "tryfirst", "plain", "callback a", "callback b", "wrapper after",
                     "wrapper around run_end", "callback a end", "callback b end"]
    assert not [name for name in plugins.pm.list_name_plugin() if "callback[" in name[0]]  # detached after the run


def test_a_failing_recipe_callback_still_stops_the_run(tmp_path):
    import attrs

    from phase7fw import hookimpl
    from phase7fw.interfaces import Callback

    class Boom(Callback):
        def on_step_end(self, engine, row):
            raise RuntimeError("callback says no")

    class P:
        @hookimpl
        def register_components(self, register):
            register("callback", "boom", lambda c: Boom(), attrs.make_class("C", {}, frozen=True))

    plugins = load_plugins(extra=[P()])
    over = tiny_overrides(tmp_path, **{"train.max_steps": 2, "callbacks": [{"name": "boom"}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)  # not a plugin failure: the run's own error
        with pytest.raises(RuntimeError, match="callback says no"):
            Engine.from_recipe(TINY, over, dummy_data=True, plugins=plugins, quiet=True).fit()
    assert not plugins.load_errors


def test_unknown_component_of_a_disabled_plugin_is_a_recipe_error(tmp_path, fake_dist):
    fake_dist("bad", BROKEN["config"], version="6.6")
    proc = run_cli("recipe", "validate", TINY, "--set", "optimizer.name=needs_undefined", env=site_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optimizer.name: unknown optimizer 'needs_undefined'" in proc.stderr
