import pytest

from phase7fw.errors import RecipeError
from phase7fw.recipe import load_recipe, parse_set, read_toml, recipe_to_dict, recipe_to_toml
from tests.conftest import RECIPES


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
[run]
name = "base"
[model]
name = "llama"
d_model = 64
n_layers = 2
n_heads = 2
seq_len = 32
[train]
max_steps = 10
[[data.sources]]
name = "python_stdlib"
max_files = 3
"""


def errors_of(source, overrides=None):
    with pytest.raises(RecipeError) as info:
        load_recipe(source, overrides)
    return info.value.errors


def test_defaults_and_values(tmp_path):
    r = load_recipe(write(tmp_path, "r.toml", BASE))
    assert r.run.name == "base" and r.output_dir == "runs/base"
    assert r.model.name == "llama" and r.model.config.d_model == 64
    assert r.optimizer.name == "adamw" and r.lr_scheduler.name == "warmup_cosine"
    assert r.train.precision == "fp32" and r.train.grad_accum_steps == 1
    assert r.data.tokenizer.name == "bytes"
    assert r.data.sources[0].name == "python_stdlib" and r.data.sources[0].config.max_files == 3


def test_every_error_at_once_with_key_paths(tmp_path):
    errs = errors_of(write(tmp_path, "r.toml", BASE + """
[optimizer]
name = "adamw"
lr = "abc"
[lr_scheduler]
name = "warmup_cosine"
warmup_step = 10
"""), {"train.batch_size": 0, "train.max_steps": 10.7, "train.precision": "fp8", "train.compile": 1})
    assert "optimizer.lr: expected float, got str 'abc'" in errs
    assert "lr_scheduler.warmup_step: unknown key; did you mean 'warmup_steps'?" in errs
    assert "train.batch_size: must be > 0, got 0" in errs
    assert "train.max_steps: expected int, got float 10.7" in errs
    assert "train.precision: expected one of 'bf16', 'fp16', 'fp32', 'auto', got 'fp8'" in errs
    assert "train.compile: expected bool, got int 1" in errs
    assert len(errs) == 6


def test_string_is_not_an_int(tmp_path):
    assert errors_of(write(tmp_path, "r.toml", BASE), {"train.max_steps": "3"}) == [
        "train.max_steps: expected int, got str '3'"
    ]


def test_unknown_top_level_and_component_errors(tmp_path):
    errs = errors_of(write(tmp_path, "r.toml", BASE + '\n[trainer]\nx = 1\n'), {"model.name": "lama"})
    assert "trainer: unknown key; did you mean 'train'?" in errs
    [model_err] = [e for e in errs if e.startswith("model.name")]
    assert "unknown model 'lama'; did you mean 'llama'?" in model_err


def test_component_options_are_strict(tmp_path):
    errs = errors_of(write(tmp_path, "r.toml", BASE), {"model.d_modle": 3, "model.n_layers": -1})
    assert "model.d_modle: unknown key; did you mean 'd_model'?" in errs
    assert "model.n_layers: must be > 0, got -1" in errs


def test_data_source_weight_checked(tmp_path):
    errs = errors_of(write(tmp_path, "r.toml", BASE), {"data.sources.0.weight": -2.0})
    assert errs == ["data.sources[0].weight: must be > 0, got -2.0"]


def test_extends_deep_merges(tmp_path):
    write(tmp_path, "base.toml", BASE)
    sub = tmp_path / "sub"
    sub.mkdir()
    child = write(sub, "child.toml", 'extends = "../base.toml"\n[run]\nseed = 7\n[model]\nd_model = 128\n')
    r = load_recipe(child)
    assert r.run.name == "base" and r.run.seed == 7
    assert r.model.config.d_model == 128 and r.model.config.n_layers == 2


def test_missing_extends_file(tmp_path):
    child = write(tmp_path, "child.toml", 'extends = "nope.toml"\n')
    with pytest.raises(RecipeError) as info:
        read_toml(child)
    assert "extends: file not found: 'nope.toml'" in str(info.value)
    assert str(child) in str(info.value)


def test_extends_cycle(tmp_path):
    write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="cycle"):
        read_toml(tmp_path / "a.toml")


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="invalid TOML"):
        read_toml(write(tmp_path, "bad.toml", "[run\nname="))
    with pytest.raises(RecipeError, match="file not found"):
        read_toml(tmp_path / "missing.toml")


def test_set_parses_toml_values():
    assert parse_set("train.max_steps=20") == ("train.max_steps", 20)
    assert parse_set("optimizer.lr=3e-4") == ("optimizer.lr", 3e-4)
    assert parse_set("train.compile=true") == ("train.compile", True)
    assert parse_set('run.name="x y"') == ("run.name", "x y")
    assert parse_set("run.name=plain") == ("run.name", "plain")
    assert parse_set("optimizer.betas=[0.9, 0.99]") == ("optimizer.betas", [0.9, 0.99])
    with pytest.raises(RecipeError, match="expected key.path=VALUE"):
        parse_set("train.max_steps")


def test_set_validated_like_the_file(tmp_path):
    path = write(tmp_path, "r.toml", BASE)
    r = load_recipe(path, ["train.max_steps=20", "optimizer.lr=1e-3"])
    assert r.train.max_steps == 20 and r.optimizer.config.lr == 1e-3
    assert errors_of(path, ["optimizer.lr=abc"]) == ["optimizer.lr: expected float, got str 'abc'"]
    assert errors_of(path, ["train.nope=1"]) == ["train.nope: unknown key (allowed: max_steps, batch_size, "
                                                 "grad_accum_steps, precision, grad_clip, activation_checkpointing, "
                                                 "checkpoint_policy, checkpoint_every, compile, compile_mode, log_every, eval_every, eval_batches, save_every, "
                                                 "max_nonfinite_steps, device, param_dtype, optimizer_in_backward, "
                                                 "ce_chunk_tokens, init_from, freeze)"]


def test_compile_mode_needs_compile(tmp_path):
    path = write(tmp_path, "r.toml", BASE)
    assert errors_of(path, ['train.compile_mode="reduce-overhead"']) == [
        "train.compile_mode = 'reduce-overhead' without train.compile = true: the mode is torch.compile's;"
        " set train.compile = true or leave compile_mode out"]
    assert errors_of(path, ['train.compile_mode="fast"'])[0].startswith("train.compile_mode: ")
    r = load_recipe(path, ["train.compile=true", 'train.compile_mode="max-autotune-no-cudagraphs"'])
    assert r.train.compile_mode == "max-autotune-no-cudagraphs"


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, "r.toml", BASE), {"data.sources.0.weight": 2.0})
    text = recipe_to_toml(r)
    again = load_recipe(write(tmp_path, "resolved.toml", text))
    assert again == r
    assert recipe_to_dict(again)["data"]["sources"][0]["weight"] == 2.0


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.toml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.train.max_steps > 0


def test_quality_recipes_compare_at_equal_parameters_data_and_schedule():
    """benchmarks/quality.py compares these: parameters within 1% of the llama baseline's, and
    the same data, tokenizer, optimizer, schedule, batch and sequence length."""
    from phase7fw import build_model

    paths = sorted((RECIPES / "quality").glob("*_100m*.toml"))
    assert len(paths) >= 5
    recipes = {p.stem: load_recipe(p) for p in paths}
    params = {name: sum(t.numel() for t in build_model(r).parameters()) for name, r in recipes.items()}
    base = params["llama_100m"]
    for name, n in params.items():
        assert abs(n / base - 1) < 0.01, (name, n, base)
    shared = {name: (recipe_to_dict(r)["data"], recipe_to_dict(r)["optimizer"], recipe_to_dict(r)["lr_scheduler"],
                     r.train.batch_size, r.train.max_steps, r.model.config.seq_len, r.run.seed)
              for name, r in recipes.items()}
    assert len({repr(v) for v in shared.values()}) == 1, shared
