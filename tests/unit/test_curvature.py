"""Curvature schedulers: closed-form values, state round trip, mismatched resume."""

import io
import math

import pytest
import torch

from phase7fw.components.phase7 import curvature as cv
from phase7fw.errors import Phase7Error
from phase7fw.interfaces import CurvatureScheduler
from phase7fw.registry import Registry


def _registry():
    reg = Registry()
    cv.register_components(reg.register)
    return reg


def _build(name, **cfg):
    cls = cv.ConstantCurvatureConfig if name == "constant" else cv.WarmupCurvatureConfig
    return _registry().build("curvature_scheduler", name, cls(**cfg), max_steps=10_000)


@pytest.mark.parametrize("step", [0, 1, 250, 500, 999, 1000, 1001, 50_000])
def test_cosine_closed_form(step):
    s = _build("cosine", warmup_steps=1000, target_curvature=2.0, min_curvature=0.5)
    f = min(step / 1000, 1.0)
    assert s.value(step) == pytest.approx(0.5 + 1.5 * (1 - math.cos(math.pi * f)) / 2, rel=1e-12)


@pytest.mark.parametrize("step", [0, 1, 250, 500, 999, 1000, 1001, 50_000])
def test_linear_closed_form(step):
    s = _build("linear", warmup_steps=1000, target_curvature=2.0, min_curvature=0.5)
    assert s.value(step) == pytest.approx(0.5 + 1.5 * min(step / 1000, 1.0), rel=1e-12)


def test_landmarks_and_monotonic():
    for name in ("linear", "cosine"):
        s = _build(name, warmup_steps=100, target_curvature=1.0, min_curvature=0.1)
        assert isinstance(s, CurvatureScheduler)
        assert s.value(0) == pytest.approx(0.1)
        assert s.value(50) == pytest.approx(0.55)  # both pass the midpoint at half warm-up
        assert s.value(100) == s.value(10_000) == pytest.approx(1.0)
        values = [s.value(t) for t in range(0, 130)]
        assert all(b >= a for a, b in zip(values, values[1:]))


def test_zero_warmup_is_target_immediately():
    for name in ("linear", "cosine"):
        s = _build(name, warmup_steps=0, target_curvature=1.5, min_curvature=0.1)
        assert s.value(0) == s.value(7) == 1.5


def test_constant():
    s = _build("constant", curvature=0.7)
    assert s.value(0) == s.value(123_456) == 0.7
    assert _build("constant").value(5) == 1.0


def _through_torch(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name, cfg", [
    ("constant", {"curvature": 0.3}),
    ("linear", {"warmup_steps": 10, "target_curvature": 3.0, "min_curvature": 0.2}),
    ("cosine", {"warmup_steps": 10, "target_curvature": 3.0, "min_curvature": 0.2}),
])
def test_state_round_trip(name, cfg):
    a = _build(name, **cfg)
    state = _through_torch(a.state_dict())
    b = _build(name, **cfg)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert [b.value(t) for t in range(20)] == [a.value(t) for t in range(20)]


def test_mismatched_resume_is_an_error():
    saved = _build("cosine", warmup_steps=10, target_curvature=3.0, min_curvature=0.2).state_dict()
    with pytest.raises(Phase7Error, match="warmup_steps: checkpoint 10, recipe 20"):
        _build("cosine", warmup_steps=20, target_curvature=3.0, min_curvature=0.2).load_state_dict(saved)
    with pytest.raises(Phase7Error, match="name: checkpoint 'cosine', recipe 'linear'"):
        _build("linear", warmup_steps=10, target_curvature=3.0, min_curvature=0.2).load_state_dict(saved)
    with pytest.raises(Phase7Error, match="curvature"):
        _build("constant").load_state_dict(saved)


def test_config_validation():
    with pytest.raises(Phase7Error, match="min_curvature .* must be <= target_curvature"):
        cv.WarmupCurvatureConfig(target_curvature=0.1, min_curvature=1.0)
    from phase7fw.recipe.convert import structure

    errors = []
    raw = {"warmup_steps": -1, "target_curvature": 0.0, "min_curvature": -2}
    structure(raw, cv.WarmupCurvatureConfig, _registry(), "curvature_scheduler", errors)
    assert len(errors) == 3 and all(e.startswith("curvature_scheduler.") for e in errors)
