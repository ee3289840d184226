"""The Phase 8 recipes through the Engine: the tiny model trains, resume is bit-identical,
generation with the cache equals recomputation."""

import math

from phase7fw import Engine
from tests.conftest import RECIPES
from tests.integration.hybrid import assert_resume_is_bit_identical, hybrid_overrides
from tests.integration.test_training import rows

TINY = RECIPES / "phase8_tiny.toml"


def overrides(tmp_path, **extra):
    return hybrid_overrides(tmp_path, {"model.seq_len": 40, "model.attention.chunk_size": 16}, **extra)


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
    assert_resume_is_bit_identical(TINY, overrides, tmp_path)
