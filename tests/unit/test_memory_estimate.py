"""The run header's activation estimate follows the cross-entropy path actually used."""

from pathlib import Path

from phase7fw.core.memory import activation_estimate
from phase7fw.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _recipe(**over):
    return load_recipe(RECIPES / "phase7_1.5b_standard.toml", over or None)


def test_full_logits_cost_14_bytes_per_token_and_vocab():
    recipe = _recipe(**{"train.activation_checkpointing": False})
    full, note = activation_estimate(recipe, 32000)
    chunked, note_c = activation_estimate(_recipe(**{"train.activation_checkpointing": False,
                                                     "train.ce_chunk_tokens": 256}), 32000)
    assert "full logits" in note and "256-token chunks" in note_c
    assert full - chunked == (1024 - 256) * 32000 * 14


def test_fused_kernel_holds_one_chunk_and_the_head_gradient():
    recipe = _recipe(**{"train.activation_checkpointing": False})
    full, _ = activation_estimate(recipe, 32000)
    fused, note = activation_estimate(recipe, 32000, fused_ce=True)
    assert "fused CE kernel" in note
    # 1024 tokens x 32000 bf16 logits (< 256 MiB) + fp32 head grad + fp32 hidden grad
    assert full - fused == 1024 * 32000 * 14 - (1024 * 32000 * 2 + 32000 * 2048 * 4 + 1024 * 2048 * 4)
