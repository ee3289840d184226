"""The Lion plugin: the update rule, recipe validation, and discovery through its entry point."""

import importlib.metadata

import pytest
import torch

from phase7fw_lion import Lion, LionConfig, build_lion, register_components


def test_two_steps_match_hand_computed_values():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = Lion([w], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)

    # Step 1, m = 0:  w *= 1 - 0.1*0.5 -> [0.95, -1.9];  c = 0.1*g = [0.05, -0.03]
    #   w -= 0.1*sign(c) -> [0.85, -1.8];  m = 0.01*g = [0.005, -0.003]
    w.grad = torch.tensor([0.5, -0.3], dtype=torch.float64)
    opt.step()
    assert torch.allclose(w, torch.tensor([0.85, -1.8], dtype=torch.float64))
    assert torch.allclose(opt.state[w]["exp_avg"], torch.tensor([0.005, -0.003], dtype=torch.float64))

    # Step 2: w *= 0.95 -> [0.8075, -1.71];  c = 0.9*m + 0.1*g = [-0.0155, 0.0373]
    #   w -= 0.1*sign(c) -> [0.9075, -1.81];  m = 0.99*m + 0.01*g = [0.00295, 0.00103]
    w.grad = torch.tensor([-0.2, 0.4], dtype=torch.float64)
    opt.step()
    assert torch.allclose(w, torch.tensor([0.9075, -1.81], dtype=torch.float64))
    assert torch.allclose(opt.state[w]["exp_avg"], torch.tensor([0.00295, 0.00103], dtype=torch.float64))


def test_factory_respects_no_decay_group_and_round_trips_state():
    decay = torch.nn.Parameter(torch.ones(3))
    no_decay = torch.nn.Parameter(torch.ones(3))
    groups = [{"params": [decay]}, {"params": [no_decay], "weight_decay": 0.0}]
    opt = build_lion(LionConfig(lr=0.1, weight_decay=1.0), params=groups)
    assert isinstance(opt, torch.optim.Optimizer)
    decay.grad = torch.zeros(3)
    no_decay.grad = torch.zeros(3)
    opt.step()  # zero gradient: only weight decay moves weights
    assert torch.allclose(decay, torch.full((3,), 0.9))
    assert torch.equal(no_decay, torch.ones(3))

    again = build_lion(LionConfig(lr=0.1, weight_decay=1.0), params=groups)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[decay]["exp_avg"], opt.state[decay]["exp_avg"])


def test_invalid_arguments():
    p = [torch.nn.Parameter(torch.zeros(1))]
    for kwargs in ({"lr": 0.0}, {"betas": (0.9, 1.0)}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError):
            Lion(p, **kwargs)


def test_recipe_table_is_validated():
    from phase7fw.recipe.convert import structure_component
    from phase7fw.registry import Registry

    registry = Registry()
    register_components(register=registry.register)
    errors = []
    ok = structure_component({"name": "lion", "lr": 3e-5, "betas": [0.95, 0.98]}, "optimizer", registry,
                             "optimizer", errors)
    assert errors == [] and ok.config == LionConfig(lr=3e-5, betas=(0.95, 0.98))

    bad = structure_component({"name": "lion", "lr": -1.0, "betas": [0.9, 1.5], "weight_decay": "x"},
                              "optimizer", registry, "optimizer", errors)
    assert bad is None
    assert [e.split(":")[0] for e in errors] == ["optimizer.lr", "optimizer.betas", "optimizer.weight_decay"]


def test_found_through_entry_point(monkeypatch):
    try:
        version = importlib.metadata.version("phase7fw-lion")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("phase7fw-lion is not installed: pip install -e plugins/phase7fw-lion")
    monkeypatch.delenv("PHASE7FW_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("PHASE7FW_STRICT_PLUGINS", raising=False)
    from phase7fw.plugins import load_plugins

    plugins = load_plugins()
    assert ("optimizer", "lion") in plugins.registry
    row = next(r for r in plugins.describe() if r["name"] == "lion")
    assert row["version"] == version
    assert row["dist"] == f"phase7fw-lion=={version}"
    assert row["builtin"] is False
    assert row["components"] == ["optimizer:lion"]

    monkeypatch.setenv("PHASE7FW_DISABLE_PLUGINS", "phase7fw-lion")
    assert ("optimizer", "lion") not in load_plugins().registry
