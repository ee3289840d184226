import pytest

from phase7fw.errors import Phase7Error
from phase7fw.plugins import DEFAULT_PLUGINS, PluginWarning, load_plugins

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
    assert not plugins.load_errors
    names = [row["name"] for row in plugins.describe()]
    assert names == list(DEFAULT_PLUGINS) + [n for n in names if n not in DEFAULT_PLUGINS]  # built-ins first
    entry = plugins.registry.get("tokenizer", "bytes")
    assert entry.plugin == "phase7fw.components.tokenizers"
    # every built-in registered something under its own name (a module that silently registers
    # nothing, or whose components are credited to another plugin, fails here)
    components = {row["name"]: row["components"] for row in plugins.describe()}
    assert [n for n in DEFAULT_PLUGINS if not components[n]] == []
    assert "model:phase7" in components["phase7fw.components.phase7.model"]
    assert "kernel:hyperbolic_attention:triton" in components["phase7fw.kernels.plugin"]


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
    with pytest.warns(PluginWarning, match="broken==0.3: ImportError: needs libfoo"):
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


def test_misspelled_hook_disables_that_plugin(fake_dist, monkeypatch):
    fake_dist("fake-opt", GOOD)
    fake_dist("typo", """
from phase7fw import hookimpl

@hookimpl
def register_component(register):
    pass
""", version="0.2")
    with pytest.warns(PluginWarning, match="typo==0.2: PluginValidationError: implements 'register_component',"
                                           " which is not a phase7fw hook"):
        plugins = load_plugins()
    assert ("optimizer", "fake_sgd") in plugins.registry
    assert [e.name for e in plugins.load_errors] == ["typo"]
    monkeypatch.setenv("PHASE7FW_STRICT_PLUGINS", "1")
    with pytest.raises(Phase7Error, match="register_component"):
        load_plugins()


def test_duplicate_component_across_plugins_names_both_and_disables_the_later(fake_dist, monkeypatch):
    fake_dist("one", GOOD)
    fake_dist("two", GOOD.replace('"test"', '"test"); register("callback", "two_only", lambda c: 0'))
    with pytest.warns(PluginWarning, match="registered twice"):
        plugins = load_plugins()
    [err] = plugins.load_errors
    assert "'fake_sgd'" in str(err) and "plugin one" in str(err) and "plugin two" in str(err)
    loser = err.name
    winner = ({"one", "two"} - {loser}).pop()
    assert plugins.registry.get("optimizer", "fake_sgd").plugin == winner
    # the loser is disabled as a whole: nothing it registered stays
    assert all(e.plugin != loser for e in plugins.registry.entries())
    assert loser not in {row["name"] for row in plugins.describe()}
    monkeypatch.setenv("PHASE7FW_STRICT_PLUGINS", "1")
    with pytest.raises(Phase7Error, match="registered twice"):
        load_plugins()


def test_a_duplicate_of_a_builtin_name_disables_the_third_party_plugin(fake_dist):
    fake_dist("shadow", GOOD.replace("fake_sgd", "adamw"), version="9.9")
    with pytest.warns(PluginWarning):
        plugins = load_plugins()
    assert plugins.registry.get("optimizer", "adamw").plugin == "phase7fw.components.optimizers"
    [err] = plugins.load_errors
    assert str(err).startswith("shadow==9.9: RegistryError: optimizer 'adamw' is registered twice")


def test_in_process_plugin_object():
    import attrs

    from phase7fw import hookimpl

    class MyPlugin:
        @hookimpl
        def register_components(self, register):
            register("callback", "noop", lambda c: object(), attrs.make_class("C", {}, frozen=True))

    plugins = load_plugins(extra=[MyPlugin()])
    assert plugins.registry.get("callback", "noop").plugin == "MyPlugin"
