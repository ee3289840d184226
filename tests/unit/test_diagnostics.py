"""The diagnostics callback: per-layer statistics rows (split "diag") in the training log."""

import json
import math

import pytest
import torch

from phase7fw import Engine
from tests.conftest import RECIPES

TINY = {"model.d_model": 32, "model.n_heads": 2, "model.n_layers": 2, "model.seq_len": 32,
        "model.attention.window": 8, "model.ssm.n_heads": 2, "model.ssm.chunk_size": 8,
        "train.max_steps": 4, "train.log_every": 2, "train.eval_every": 0, "train.save_every": 0,
        "train.batch_size": 2, "data.sources": [{"name": "python_stdlib", "max_files": 5}],
        "callbacks": [{"name": "diagnostics", "every": 2}]}


def _rows(tmp_path, recipe, overrides):
    engine = Engine.from_recipe(RECIPES / recipe, {**overrides, "run.output_dir": str(tmp_path)}, resume="never",
                                quiet=True)
    engine.fit()
    return engine, [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]


def test_phase7_logs_layer_statistics(tmp_path):
    engine, rows = _rows(tmp_path, "phase7_tiny.toml", TINY)
    diag = [r for r in rows if r["split"] == "diag"]
    assert [r["step"] for r in diag] == [2, 4]
    row = diag[-1]
    for layer in (0, 1):
        p = f"L{layer}."
        attn = engine.model.blocks[layer].attn
        # the layer's own c and tau (the op sees them scaled when qk_norm is on)
        c = (attn.kappa * attn.log_c.exp()).clamp(attn.c_min, attn.c_max)
        assert row[p + "attn.curvature"] == pytest.approx(c.item())
        assert row[p + "attn.tau_mean"] == pytest.approx(torch.nn.functional.softplus(attn.beta).mean().item())
        assert 0 <= row[p + "attn.saturated"] <= 1 and 0 < row[p + "attn.ball_radius"] < 1
        assert 0 < row[p + "attn.entropy"] <= math.log(8) + 1e-6  # at most uniform over the window
        assert row[p + "attn.score_range"] > 0
        assert 0 < row[p + "gate_mean"] < 1
        assert engine.model.blocks[layer].ssm.min_rank <= row[p + "ssm.effective_rank"] <= 16
        assert row[p + "ssm.half_life"] > 0 and row[p + "ssm.out_rms"] > 0


def test_a_model_without_diagnostics_says_so(tmp_path, capsys):
    over = {k: v for k, v in TINY.items() if not k.startswith(("model.attention", "model.ssm"))}
    engine = Engine.from_recipe(RECIPES / "llama_tiny.toml", {**over, "run.output_dir": str(tmp_path)},
                                resume="never")
    engine.fit()
    assert "callback diagnostics: off, the 'llama' model reports no diagnostics" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["split"] == "diag"]


def test_engine_log_outside_fit_is_an_error(tmp_path):
    from phase7fw.errors import Phase7Error

    engine = Engine.from_recipe(RECIPES / "llama_tiny.toml", {"run.output_dir": str(tmp_path)}, resume="never",
                                quiet=True)
    with pytest.raises(Phase7Error, match="during fit"):
        engine.log({"step": 0, "split": "x"})
