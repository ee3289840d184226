"""The Phase 8 recipes through the Engine: the tiny model trains, resume is bit-identical,
generation with the cache equals recomputation."""

import math
import shutil

import torch

from phase7fw import Engine
from phase7fw.core.checkpoint import load_checkpoint
from tests.conftest import RECIPES, tiny_overrides
from tests.integration.test_training import rows

TINY = RECIPES / "phase8_tiny.toml"


def overrides(tmp_path, **extra):
    base = tiny_overrides(tmp_path, **{
        "model.d_model": 32, "model.n_heads": 2, "model.seq_len": 40, "model.ffn_hidden": 64,
        "model.attention.chunk_size": 16, "model.ssm.n_heads": 2, "model.ssm.max_rank": 8, "model.ssm.min_rank": 2,
        "model.ssm.chunk_size": 8, "model.embedding.rank": 4, "curvature_scheduler.warmup_steps": 4,
    })
    base.update(extra)
    return base


def test_phase8_tiny_trains_and_generates_the_same_with_and_without_cache(tmp_path):
    engine = Engine.from_recipe(TINY, overrides(tmp_path, **{"train.max_steps": 20, "train.eval_every": 10}),
                                quiet=True)
    summary = engine.fit()
    log = rows(tmp_path / "run")
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    val = [r["loss"] for r in rows(tmp_path / "run", "val")]
    assert len(val) == 2 and all(math.isfinite(v) for v in val)
    assert summary["best_val_loss"] == min(val)  # the summary reports the logged evaluations
    assert val[-1] < log[0]["loss"]  # the held-out loss fell too
    assert {float(b.attn.kappa) for b in engine.model.blocks} == {1.0}
    prompt = "def main(" * 6  # longer than the training sequences: no context limit
    cached = engine.generate(prompt, max_new_tokens=30, temperature=0.0, use_cache=True)
    recomputed = engine.generate(prompt, max_new_tokens=30, temperature=0.0, use_cache=False)
    assert cached == recomputed


def test_phase8_resume_is_bit_identical(tmp_path):
    Engine.from_recipe(TINY, overrides(tmp_path / "a"), quiet=True).fit()
    ref = rows(tmp_path / "a" / "run")
    target = tmp_path / "b" / "run"
    target.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "run" / "phase7_step_3.pt", target)
    e = Engine.from_recipe(TINY, overrides(tmp_path / "b"), quiet=True)
    assert e.step == 3 and math.isclose(float(e.model.blocks[0].attn.kappa), ref[2]["curvature"], rel_tol=1e-6)
    e.fit()
    again = rows(target)
    assert [(r["loss"], r["grad_norm"], r["curvature"]) for r in again] == \
        [(r["loss"], r["grad_norm"], r["curvature"]) for r in ref[3:]]
    a = load_checkpoint(tmp_path / "a" / "run" / "phase7_final.pt")["model"]
    b = load_checkpoint(target / "phase7_final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
