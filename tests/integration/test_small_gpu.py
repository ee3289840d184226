"""Small-GPU mode end to end on the CPU: bf16 weights with stochastic rounding, 8-bit
``adamw_lowmem`` states, the update inside backward, checkpointed blocks and a chunked
cross-entropy; exact resume, and checkpoints that load into the standard mode and back."""

import math
import shutil

import pytest
import torch

from phase7fw import Engine
from phase7fw.core.checkpoint import load_checkpoint
from phase7fw.errors import Phase7Error
from tests.conftest import RECIPES
from tests.integration.test_phase7_training import overrides
from tests.integration.test_training import rows

TINY = RECIPES / "phase7_tiny.toml"

SMALL_GPU = {
    "optimizer": {"name": "adamw_lowmem", "lr": 3e-3, "weight_decay": 0.1, "state_bits": 8},
    "train.param_dtype": "bf16",
    "train.precision": "bf16",
    "train.optimizer_in_backward": True,
    "train.activation_checkpointing": True,
    "train.ce_chunk_tokens": 48,
}
STANDARD = {"optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1}}


def small(tmp_path, **extra):
    return overrides(tmp_path, **{**SMALL_GPU, **extra})


def test_small_gpu_mode_trains_and_prints_the_memory_plan(tmp_path, capsys):
    engine = Engine.from_recipe(TINY, small(tmp_path, **{"train.max_steps": 16, "train.eval_every": 0,
                                                        "train.save_every": 0}))
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.in_backward is not None and engine.model.ce_chunk_tokens == 48
    summary = engine.fit()
    out = capsys.readouterr().out
    assert "memory plan" in out and "none: each update runs in backward" in out and "8-bit moments" in out
    assert "expected peak" in out
    log = rows(tmp_path / "run")
    assert summary["skipped_steps"] == 0 and len(log) == 16
    # 16 steps of batch 4 x 32 tokens on fresh text (data.sampling = "epochs"): 0.86 here, ~1.0 if nothing learned
    assert sum(r["loss"] for r in log[-4:]) < 0.9 * sum(r["loss"] for r in log[:4])
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in log)
    state = load_checkpoint(tmp_path / "run" / "phase7_final.pt")
    assert {t.dtype for t in state["model"].values()} == {torch.bfloat16}
    first = next(iter(state["optimizer"]["state"].values()))
    assert first["exp_avg_codes"].dtype == torch.int8 and first["exp_avg_sq_codes"].dtype == torch.uint8


def test_small_gpu_resume_is_bit_identical(tmp_path):
    """Stochastic rounding and the 8-bit states draw from (seed, step, parameter): a resumed
    run continues exactly, two-pass clipping included."""
    Engine.from_recipe(TINY, small(tmp_path / "a", **{"train.grad_clip": 0.5})).fit()
    ref = rows(tmp_path / "a" / "run")
    target = tmp_path / "b" / "run"
    target.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "run" / "phase7_step_3.pt", target)
    e = Engine.from_recipe(TINY, small(tmp_path / "b", **{"train.grad_clip": 0.5}))
    assert e.step == 3
    e.fit()
    again = rows(target)
    assert [(r["loss"], r["grad_norm"]) for r in again] == [(r["loss"], r["grad_norm"]) for r in ref[3:]]
    a = load_checkpoint(tmp_path / "a" / "run" / "phase7_final.pt")
    b = load_checkpoint(target / "phase7_final.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


def resume_into(tmp_path, source_dir, extra):
    """A new run dir holding only ``source_dir``'s step-3 checkpoint, resumed with ``extra``."""
    target = tmp_path / "run"
    target.mkdir(parents=True)
    shutil.copy(source_dir / "phase7_step_3.pt", target)
    return Engine.from_recipe(TINY, overrides(tmp_path, **extra))


def test_small_gpu_checkpoint_loads_into_the_standard_mode(tmp_path):
    Engine.from_recipe(TINY, small(tmp_path / "a")).fit()
    saved = load_checkpoint(tmp_path / "a" / "run" / "phase7_step_3.pt")
    e = resume_into(tmp_path / "b", tmp_path / "a" / "run", STANDARD)
    assert e.step == 3 and isinstance(e.optimizer, torch.optim.AdamW)
    for name, p in e.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, saved["model"][name].float())
    state = e.optimizer.state[e.model.head.weight]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].abs().sum() > 0
    assert e.optimizer.param_groups[0]["decoupled_weight_decay"] is True
    assert e.fit()["skipped_steps"] == 0


def test_standard_checkpoint_loads_into_small_gpu_mode(tmp_path):
    Engine.from_recipe(TINY, overrides(tmp_path / "a", **STANDARD)).fit()
    saved = load_checkpoint(tmp_path / "a" / "run" / "phase7_step_3.pt")
    e = resume_into(tmp_path / "b", tmp_path / "a" / "run", SMALL_GPU)
    assert e.step == 3
    for name, p in e.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, saved["model"][name].to(torch.bfloat16))
    state = e.optimizer.state[e.model.head.weight]
    assert state["exp_avg_codes"].dtype == torch.int8 and state["step"].item() == 3
    log_before = rows(tmp_path / "a" / "run")
    e.fit()
    after = rows(tmp_path / "b" / "run")
    assert [r["step"] for r in after] == [4, 5, 6]
    # the moments came along: the continuation is close to the standard run's (not a cold restart)
    assert abs(after[0]["loss"] - log_before[3]["loss"]) < 0.05 * log_before[3]["loss"]


def test_nonfinite_steps_are_skipped_in_backward_mode(tmp_path):
    engine = Engine.from_recipe(TINY, small(tmp_path, **{"train.grad_clip": 0.0}))
    real = engine._loss_fn
    calls = {"n": 0}

    def flaky(x, y):
        calls["n"] += 1
        loss, metrics = real(x, y)
        return (loss * float("nan"), metrics) if calls["n"] in (2, 3) else (loss, metrics)

    engine._loss_fn = flaky
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    summary = engine.fit()
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert [r["step"] for r in rows(tmp_path / "run") if r.get("skipped")] == [2, 3]
    assert all(torch.isfinite(p.float()).all() for p in engine.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in engine.model.state_dict().items())  # the good steps updated


def test_standard_adamw_refuses_bf16_weights(tmp_path):
    with pytest.raises(Phase7Error, match="adamw_lowmem"):
        Engine.from_recipe(TINY, overrides(tmp_path, **{"train.param_dtype": "bf16", "train.precision": "bf16"}))
