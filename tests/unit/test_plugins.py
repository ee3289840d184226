import pytest

from phase7fw.errors import Phase7Error
from phase7fw.plugins import DEFAULT_PLUGINS, load_plugins

GOOD = """
import attrs
from phase7fw import hookimpl

@attrs.frozen
class Cfg:
    momentum: float = 0.9

@hookimpl
def register_components(register):
    register("optimizer", "fake_sgd", lambda config, params, **kw: ("sgd", config.momentum), Cfg, "test")
"""


def test_builtins_are_plugins_like_any_other():
    plugins = load_plugins()
    names = {row["name"] for row in plugins.describe()}
    assert set(DEFAULT_PLUGINS) <= names | {e.name for e in plugins.load_errors}
    entry = plugins.registry.get("tokenizer", "bytes")
    assert entry.plugin == "phase7fw.components.tokenizers"


def test_installed_plugin_is_discovered_and_used(fake_dist):
    fake_dist("fake-opt", GOOD, version="2.5")
    plugins = load_plugins()
    entry = plugins.registry.get("optimizer", "fake_sgd")
    assert entry.plugin == "fake-opt"
    assert entry.factory(entry.config_cls(), params=[]) == ("sgd", 0.9)
    row = next(r for r in plugins.describe() if r["name"] == "fake-opt")
    assert row["version"] == "2.5" and row["components"] == ["optimizer:fake_sgd"]


def test_broken_plugin_does_not_break_the_others(fake_dist):
    fake_dist("fake-opt", GOOD)
    fake_dist("broken", "raise ImportError('needs libfoo')", version="0.3")
    plugins = load_plugins()
    assert ("optimizer", "fake_sgd") in plugins.registry
    [err] = [e for e in plugins.load_errors if e.name == "broken"]
    assert str(err) == "broken==0.3: ImportError: needs libfoo"


def test_strict_mode_turns_load_errors_into_errors(fake_dist, monkeypatch):
    fake_dist("broken", "raise ImportError('needs libfoo')")
    monkeypatch.setenv("PHASE7FW_STRICT_PLUGINS", "1")
    with pytest.raises(Phase7Error, match="broken.*needs libfoo"):
        load_plugins()


def test_disable_plugins(fake_dist, monkeypatch):
    fake_dist("fake-opt", GOOD)
    monkeypatch.setenv("PHASE7FW_DISABLE_PLUGINS", "fake-opt, tokenizers")
    plugins = load_plugins()
    assert ("optimizer", "fake_sgd") not in plugins.registry
    assert ("tokenizer", "bytes") not in plugins.registry


def test_misspelled_hook_fails(fake_dist):
    fake_dist("typo", """
from phase7fw import hookimpl

@hookimpl
def register_component(register):
    pass
""")
    with pytest.raises(Phase7Error, match="register_component"):
        load_plugins()


def test_duplicate_component_across_plugins_names_both(fake_dist):
    fake_dist("one", GOOD)
    fake_dist("two", GOOD)
    with pytest.raises(Phase7Error) as info:
        load_plugins()
    assert "'fake_sgd'" in str(info.value) and "one" in str(info.value) and "two" in str(info.value)


def test_in_process_plugin_object():
    import attrs

    from phase7fw import hookimpl

    class MyPlugin:
        @hookimpl
        def register_components(self, register):
            register("callback", "noop", lambda c: object(), attrs.make_class("C", {}, frozen=True))

    plugins = load_plugins(extra=[MyPlugin()])
    assert plugins.registry.get("callback", "noop").plugin == "MyPlugin"
