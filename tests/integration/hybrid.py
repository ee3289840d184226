"""Shared by the Phase 7 and Phase 8 training tests: both hybrid models shrink the same way for
a few-second run and must resume bit-identically; only their attention settings differ."""

import math
import shutil

import torch

from phase7fw import Engine
from phase7fw.core.checkpoint import load_checkpoint
from tests.conftest import tiny_overrides
from tests.integration.test_training import rows

#: What makes phase7_tiny / phase8_tiny train in a few seconds (besides ``tiny_overrides``).
HYBRID_TINY = {
    "model.d_model": 32, "model.n_heads": 2, "model.ffn_hidden": 64, "model.ssm.n_heads": 2,
    "model.ssm.max_rank": 8, "model.ssm.min_rank": 2, "model.ssm.chunk_size": 8, "model.embedding.rank": 4,
    "curvature_scheduler.warmup_steps": 4,
}


def hybrid_overrides(tmp_path, model: dict, **extra) -> dict:
    """``tiny_overrides`` with :data:`HYBRID_TINY`, then the model's own ``model`` keys, then ``extra``."""
    return tiny_overrides(tmp_path, **{**HYBRID_TINY, **model, **extra})


def assert_resume_is_bit_identical(recipe, overrides, tmp_path) -> None:
    """A run resumed from its step-3 checkpoint logs the same losses, gradient norms and
    curvatures as the uninterrupted run, and ends with the same weights."""
    Engine.from_recipe(recipe, overrides(tmp_path / "a"), quiet=True).fit()
    ref = rows(tmp_path / "a" / "run")
    target = tmp_path / "b" / "run"
    target.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "run" / "phase7_step_3.pt", target)
    e = Engine.from_recipe(recipe, overrides(tmp_path / "b"), quiet=True)
    assert e.step == 3 and math.isclose(float(e.model.blocks[0].attn.kappa), ref[2]["curvature"], rel_tol=1e-6)
    e.fit()
    again = rows(target)
    assert [(r["loss"], r["grad_norm"], r["curvature"]) for r in again] == \
        [(r["loss"], r["grad_norm"], r["curvature"]) for r in ref[3:]]
    a = load_checkpoint(tmp_path / "a" / "run" / "phase7_final.pt")["model"]
    b = load_checkpoint(target / "phase7_final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
