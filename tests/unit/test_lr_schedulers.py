"""``warmup_cosine`` and ``constant`` LR schedulers against closed-form values."""

import io
import math

import pytest
import torch
from torch import nn

from phase7fw.components.lr_schedulers import (
    ConstantConfig,
    WarmupCosineConfig,
    build_constant,
    build_warmup_cosine,
)
from phase7fw.errors import Phase7Error

LR, MIN_LR, WARMUP, MAX_STEPS = 1e-3, 1e-4, 10, 110


def optimizer(lrs=(LR,)):
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def lrs_used(opt, sched, n):
    """The lr of each group at each of the first n optimizer steps."""
    out = []
    for _ in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def cosine_ref(s, lr=LR, min_lr=MIN_LR):
    if s < WARMUP:
        return lr * (s + 1) / WARMUP
    progress = min(1.0, (s - WARMUP) / (MAX_STEPS - WARMUP))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_warmup_cosine_closed_form():
    opt = optimizer()
    sched = build_warmup_cosine(
        WarmupCosineConfig(warmup_steps=WARMUP, min_lr=MIN_LR), optimizer=opt, max_steps=MAX_STEPS, registry=None
    )
    used = [row[0] for row in lrs_used(opt, sched, 130)]
    expected = {
        0: 1e-4,  # lr / warmup
        WARMUP - 1: 1e-3,  # end of warm-up reaches lr
        WARMUP: 1e-3,  # cosine starts at lr
        35: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)),  # a quarter of the way
        60: 5.5e-4,  # half way: the mean of lr and min_lr
        MAX_STEPS: 1e-4,
        129: 1e-4,  # constant after max_steps
    }
    for s, value in expected.items():
        assert used[s] == pytest.approx(value, rel=1e-12, abs=1e-15), s
    assert used == pytest.approx([cosine_ref(s) for s in range(130)], rel=1e-12)
    assert all(a >= b for a, b in zip(used[WARMUP:], used[WARMUP + 1 :]))  # monotone decay


def test_warmup_cosine_param_groups_scale_from_their_own_lr():
    opt = optimizer((LR, 2 * LR))
    sched = build_warmup_cosine(
        WarmupCosineConfig(warmup_steps=WARMUP, min_lr=MIN_LR), optimizer=opt, max_steps=MAX_STEPS
    )
    for s, (a, b) in enumerate(lrs_used(opt, sched, 120)):
        assert a == pytest.approx(cosine_ref(s), rel=1e-12)
        assert b == pytest.approx(2 * cosine_ref(s), rel=1e-12)


def test_no_warmup_and_warmup_longer_than_run():
    opt = optimizer()
    sched = build_warmup_cosine(WarmupCosineConfig(warmup_steps=0), optimizer=opt, max_steps=4)
    used = [r[0] for r in lrs_used(opt, sched, 6)]
    assert used == pytest.approx([LR, LR * (1 + math.cos(math.pi / 4)) / 2, LR / 2, LR * (1 - math.cos(math.pi / 4)) / 2, 0, 0])
    opt = optimizer()
    sched = build_warmup_cosine(WarmupCosineConfig(warmup_steps=100), optimizer=opt, max_steps=20)
    assert [r[0] for r in lrs_used(opt, sched, 20)] == pytest.approx([LR * (s + 1) / 100 for s in range(20)])


def test_min_lr_above_lr_is_an_error():
    with pytest.raises(Phase7Error, match="min_lr"):
        build_warmup_cosine(WarmupCosineConfig(min_lr=2 * LR), optimizer=optimizer(), max_steps=10)


def test_state_dict_round_trip_resumes_exactly():
    def fresh():
        torch.manual_seed(0)
        opt = optimizer((LR, 3 * LR))
        sched = build_warmup_cosine(
            WarmupCosineConfig(warmup_steps=WARMUP, min_lr=MIN_LR), optimizer=opt, max_steps=MAX_STEPS
        )
        return opt, sched

    opt, sched = fresh()
    full = lrs_used(opt, sched, 60)

    opt, sched = fresh()
    lrs_used(opt, sched, 25)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # checkpoints never unpickle objects

    opt2, sched2 = fresh()  # build order: optimizer -> scheduler -> load
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.last_epoch == 25
    assert lrs_used(opt2, sched2, 35) == full[25:]


def test_constant():
    opt = optimizer()
    sched = build_constant(ConstantConfig(warmup_steps=4), optimizer=opt, max_steps=50)
    assert [r[0] for r in lrs_used(opt, sched, 7)] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR, LR, LR, LR])
    opt = optimizer((LR, 5 * LR))
    sched = build_constant(ConstantConfig(), optimizer=opt, max_steps=50)
    assert lrs_used(opt, sched, 3) == [[LR, 5 * LR]] * 3


def test_recipe_table_structures_strictly():
    from phase7fw.plugins import load_plugins
    from phase7fw.recipe.convert import structure_component

    reg = load_plugins().registry
    errors = []
    comp = structure_component({"name": "warmup_cosine", "warmup_steps": 5}, "lr_scheduler", reg, "lr_scheduler", errors)
    assert errors == [] and comp.config == WarmupCosineConfig(warmup_steps=5)
    errors = []
    structure_component({"name": "constant", "warmup_steps": 2.5}, "lr_scheduler", reg, "lr_scheduler", errors)
    assert [e.split(":")[0] for e in errors] == ["lr_scheduler.warmup_steps"]
