"""Damaged or odd input through the command line: one clear message, never a traceback."""

import pytest

from tests.conftest import RECIPES, run_cli

TINY = RECIPES / "llama_tiny.toml"
DATA = ["--set", 'data.sources=[{name = "python_stdlib", max_files = 5}]']


def test_run_rebuilds_a_damaged_token_cache_and_says_which_file(tmp_path):
    env = {"PHASE7FW_CACHE_DIR": str(tmp_path / "cache")}
    assert run_cli("data", "prepare", TINY, *DATA, env=env).returncode == 0
    (entry,) = (tmp_path / "cache" / "tokens").iterdir()
    (entry / "tokens.bin").write_bytes(b"")
    proc = run_cli("run", TINY, *DATA, "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set",
                   "model.n_heads=2", "--set", "model.seq_len=32", "--set", "model.ffn_hidden=64", "--set",
                   "train.max_steps=2", "--set", f"run.output_dir={tmp_path / 'run'}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"rebuilt (the cached entry was damaged: {entry / 'tokens.bin'} is 0 bytes" in proc.stdout


def cli(capsys, *args):
    from phase7fw.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_sampling_settings_must_be_finite(tmp_path, capsys):
    for flag, value, message in [("--temperature", "nan", "temperature must be >= 0 (0 = greedy) and finite"),
                                 ("--temperature", "inf", "temperature must be >= 0 (0 = greedy) and finite"),
                                 ("--top-p", "nan", "top_p must be in (0, 1]"),
                                 ("--repetition-penalty", "inf", "repetition_penalty must be > 0 (1 = off) and finite")]:
        for command in (["generate", tmp_path / "any.pt", "--prompt", "x"], ["chat", tmp_path / "any.pt"]):
            code, _, err = cli(capsys, *command, flag, value)
            assert code == 2 and err.startswith("error: ") and message in err, (command, flag, err)


def test_eval_batches_must_be_positive(tmp_path, capsys):
    code, _, err = cli(capsys, "eval", tmp_path / "any.pt", "--batches", "-2")
    assert code == 2 and "error: --batches must be >= 1, got -2" in err


def test_recipe_validate_catches_what_run_would(capsys):
    for overrides, message in [
        (["model.n_heads=3"], "model.d_model (128) must be divisible by model.n_heads (3)"),
        (["lr_scheduler.min_lr=1.0"], "lr_scheduler.min_lr (1) is larger than the optimizer's lr"),
        (["model.tie_embeddings=true", 'parallel.strategy="fsdp"'], "not supported"),
        (["model.vocab_size=100"], "model.vocab_size = 100 is smaller than the tokenizer's vocabulary (257)"),
        (['data.sources=[{name = "text_files", paths = ["/nonexistent/*.txt"]}]'], "text_files: no file matches"),
    ]:
        sets = [a for o in overrides for a in ("--set", o)]
        code, out, err = cli(capsys, "recipe", "validate", RECIPES / "phase7_tiny.toml", *sets)
        assert code == 2 and message in err and "valid" not in out, (overrides, err)
    code, out, _ = cli(capsys, "recipe", "validate", RECIPES / "phase7_tiny.toml")
    assert code == 0 and "valid" in out


def test_binary_and_non_utf8_text_files_are_reported_with_counts(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("plain text " * 40)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 40)
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    env_cache = ["--set", f'data.cache_dir="{tmp_path / "cache"}"']
    source = ["--set", f'data.sources=[{{name = "text_files", paths = ["{tmp_path}/*.txt"]}}]']
    for attempt in ("prepared", "cached"):  # said again when the cached entry is used
        code, out, _ = cli(capsys, "data", "prepare", TINY, *source, *env_cache, "--set", "model.seq_len=16",
                           "--set", "data.val_fraction=0.1")
        assert code == 0 and f"): {attempt}," in out
        assert (f"warning: data.sources[0] (text_files): skipped 1 of 3 files that are binary, not text (NUL bytes):"
                f" {tmp_path / 'image.txt'}") in out
        assert (f"warning: data.sources[0] (text_files): 1 of 3 files are not UTF-8 and were read with replacement"
                f" characters (U+FFFD): {tmp_path / 'latin1.txt'}") in out


def test_an_empty_jsonl_is_one_message(tmp_path, capsys):
    pytest.importorskip("datasets")
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = cli(capsys, "data", "prepare", TINY, "--set",
                       f'data.sources=[{{name = "hf_dataset", path = "{tmp_path / "empty.jsonl"}"}}]')
    assert code == 2 and f"error: hf_dataset: {tmp_path / 'empty.jsonl'} is empty (0 bytes)" in err
    assert "StopIteration" not in err
