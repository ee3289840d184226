"""The Phase 8 model (the phase7 model with ``attention = "hyperbolic_linear"``): its recipes,
its parameter budget, causality, gradients to every parameter and the curvature."""

import pytest
import torch

from phase7fw import build_model, load_recipe
from phase7fw.components.phase7.model import Phase7Model
from phase7fw.components.phase8.attention import HyperbolicLinearAttention
from phase7fw.errors import RecipeError
from tests.conftest import RECIPES

PHASE8 = sorted(RECIPES.glob("phase8_*.toml"))
SMALL = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 40,
         "model.attention.chunk_size": 16, "model.ssm.n_heads": 2, "model.ssm.max_rank": 8, "model.ssm.min_rank": 2,
         "model.ssm.chunk_size": 8, "model.embedding.rank": 4}


def small_model(seed=0, **extra):
    torch.manual_seed(seed)
    m = build_model(load_recipe(RECIPES / "phase8_tiny.toml", {**SMALL, **extra}), "cpu", vocab_size=257)
    m.set_curvature(0.7)
    return m


def test_the_phase8_recipes_are_the_phase7_model_with_the_linear_attention():
    assert {p.stem for p in PHASE8} >= {"phase8_tiny", "phase8_small", "phase8_1.5b", "phase8_1.5b_long"}
    for path in PHASE8:
        model = build_model(load_recipe(path), "meta")
        assert type(model) is Phase7Model, path
        assert all(isinstance(b.attn, HyperbolicLinearAttention) for b in model.blocks), path
        # FSDP2 shards every parameter along dim 0: no scalar parameters
        assert not [n for n, p in model.named_parameters() if p.dim() == 0], path


def test_phase8_1_5b_has_a_true_count_between_1_4b_and_1_6b_and_the_long_recipe_is_long():
    for name in ("phase8_1.5b", "phase8_1.5b_standard", "phase8_1.5b_long"):
        recipe = load_recipe(RECIPES / f"{name}.toml")
        model = build_model(recipe, "meta")
        n = sum(p.numel() for p in model.parameters())
        assert 1.4e9 <= n <= 1.6e9, (name, n)
        assert model.parameter_breakdown()["total"] == n
    long = load_recipe(RECIPES / "phase8_1.5b_long.toml")
    assert long.model.config.seq_len >= 8192
    t = long.train
    assert (t.param_dtype, t.activation_checkpointing, long.optimizer.name) == ("bf16", True, "adamw_lowmem")
    # the gradient buffer did not fit beside 8192-token activations under 10 GiB (H100, 2026-12-06)
    assert (t.optimizer_in_backward, t.batch_size, t.grad_accum_steps) == (True, 1, 1)


def test_a_phase7_window_key_is_not_silently_accepted():
    with pytest.raises(RecipeError, match=r"model.attention.window: unknown key"):
        load_recipe(RECIPES / "phase8_tiny.toml", {"model.attention.window": 64})
    with pytest.raises(RecipeError, match="power of two"):
        load_recipe(RECIPES / "phase8_tiny.toml", {"model.attention.chunk_size": 48})


@pytest.mark.parametrize("mixer", ["hybrid", "attention"])
def test_changing_a_token_leaves_earlier_logits_bit_identical(mixer):
    m = small_model(**{"model.mixer": mixer}).eval()
    x = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    for t in (5, 21, 39):  # inside the first chunk, in the second, the last token
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 257
        with torch.no_grad():
            a, b = m(x), m(y)
        assert torch.equal(a[:, :t], b[:, :t]), t
        assert not torch.equal(a[:, t:], b[:, t:]), t


@pytest.mark.parametrize("decay", ["data", "none"])
def test_every_parameter_gets_a_finite_nonzero_gradient(decay):
    m = small_model(**{"model.attention.decay": decay})
    x = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    m.begin_step()
    loss, _ = m.loss(x, torch.roll(x, -1, 1))
    loss.backward()
    m.finish_backward()
    names = []
    for name, p in m.named_parameters():
        names.append(name)
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert any(n.endswith("attn.log_c") for n in names)  # the curvature is learned
    assert any("attn.decay_proj" in n for n in names) == (decay == "data")


def test_curvature_follows_the_scheduler_and_is_clamped():
    m = small_model()
    attn = m.blocks[0].attn
    m.set_curvature(0.25)
    assert torch.allclose(attn.curvature(), torch.full((2,), 0.25))
    with torch.no_grad():
        attn.log_c.copy_(torch.tensor([100.0, -100.0]))
    assert attn.curvature().tolist() == pytest.approx([attn.c_max, attn.c_min])


def test_bench_counts_linear_attention_flops_without_the_sequence_length():
    m = small_model()
    short, long = m.flops_per_token(1024)["attention"], m.flops_per_token(32768)["attention"]
    assert short == long > 0  # flat in T: the chunk, not the context, sets the cost
