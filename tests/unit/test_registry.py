import attrs
import pytest

from phase7fw.registry import KINDS, Registry, RegistryError


@attrs.frozen
class Cfg:
    lr: float = 1.0


def test_pinned_kinds():
    assert KINDS == ("model", "embedding", "attention", "ssm", "block", "optimizer", "lr_scheduler",
                     "curvature_scheduler", "data_source", "tokenizer", "tracker", "callback", "kernel")


def test_duplicate_names_both_plugins():
    reg = Registry()
    reg.register("optimizer", "sgd", lambda c, **k: None, Cfg, plugin="first-plugin")
    with pytest.raises(RegistryError) as info:
        reg.register("optimizer", "sgd", lambda c, **k: None, Cfg, plugin="second-plugin")
    msg = str(info.value)
    assert "first-plugin" in msg and "second-plugin" in msg and "'sgd'" in msg


def test_same_name_different_kind_is_fine():
    reg = Registry()
    reg.register("optimizer", "x", lambda c, **k: 1, plugin="a")
    reg.register("model", "x", lambda c, **k: 2, plugin="a")
    assert reg.build("model", "x", None) == 2


def test_unknown_name_lists_and_suggests():
    reg = Registry()
    for name in ("adamw", "lion", "sgd"):
        reg.register("optimizer", name, lambda c, **k: None, plugin="p")
    with pytest.raises(RegistryError) as info:
        reg.get("optimizer", "adamv")
    msg = str(info.value)
    assert "did you mean 'adamw'?" in msg
    assert "adamw, lion, sgd" in msg


def test_unknown_kind_and_bad_config_cls():
    reg = Registry()
    with pytest.raises(RegistryError, match="unknown kind 'optimiser'"):
        reg.register("optimiser", "x", lambda c: None, plugin="p")
    with pytest.raises(RegistryError, match="must be an attrs class"):
        reg.register("optimizer", "x", lambda c: None, dict, plugin="p")


def test_config_fields_describe_defaults():
    reg = Registry()
    entry = reg.register("optimizer", "x", lambda c: None, Cfg, "desc", plugin="p")
    assert entry.config_fields() == [{"name": "lr", "type": "float", "default": "1.0", "help": ""}]
