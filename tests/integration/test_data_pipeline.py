"""The data pipeline end to end: `phase7fw data prepare`, training on a bpe tokenizer and
rebuilding it from a checkpoint, `phase7fw recipe new`, and bad input at the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from phase7fw import Engine, load_recipe
from phase7fw.errors import CheckpointError
from tests.conftest import RECIPES, ROOT, run_cli, tiny_overrides

TINY = RECIPES / "llama_tiny.toml"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
BPE = '{name = "bpe", vocab_size = 512, sample_chars = 300000}'


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def cli(tmp_path, *args):
    return run_cli(*args, env={**OFFLINE, "PHASE7FW_CACHE_DIR": str(tmp_path / "cache"),
                               "HF_DATASETS_CACHE": str(tmp_path / "hf")})


def test_data_prepare_is_idempotent(tmp_path):
    (tmp_path / "notes.txt").write_text(" ".join(f"note{i} about item {i * 7}" for i in range(2000)))
    sources = (f'data.sources=[{{name = "python_stdlib", max_files = 30}},'
               f' {{name = "text_files", paths = ["{tmp_path}/*.txt"], weight = 0.5}}]')
    args = ["data", "prepare", TINY, "--set", sources, "--set", f"data.tokenizer={BPE}", "--set", "model.seq_len=32"]
    first = cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    assert "tokenizer bpe (vocab 512): trained" in first.stdout
    assert first.stdout.count(": prepared, ") == 2
    second = cli(tmp_path, *args)
    assert second.returncode == 0, second.stderr
    assert "tokenizer bpe (vocab 512): loaded from" in second.stdout
    assert second.stdout.count(": cached, ") == 2 and ": prepared" not in second.stdout
    entries = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert len(entries) == 2 and not any(e.startswith(".tmp") for e in entries)
    meta = json.loads((tmp_path / "cache" / "tokens" / entries[0] / "meta.json").read_text())
    assert meta["dtype"] == "<u2" and meta["tokenizer"].startswith("bpe-")


def test_bad_data_input_is_exit_2(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with open(tmp_path / "d.jsonl", "w") as f:
        f.write(json.dumps({"body": "text", "id": 1}) + "\n")

    def prepare(sources):
        return cli(tmp_path, "data", "prepare", TINY, "--set", f"data.sources=[{sources}]")

    assert_clean_error(prepare(f'{{name = "text_files", paths = ["{tmp_path}/nothing/*.txt"]}}'), "no file matches")
    assert_clean_error(prepare(f'{{name = "text_files", paths = ["{tmp_path}/empty.txt"]}}'), "the source is empty")
    assert_clean_error(prepare(f'{{name = "hf_dataset", path = "{tmp_path}/d.jsonl"}}'),
                       "no text field 'text'; its fields are 'body', 'id'")
    assert_clean_error(prepare('{name = "python_stdlib", weight = 0.0}'), "data.sources[0].weight: must be > 0, got 0.0")
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir()]  # nothing half-written


def test_bpe_run_checkpoint_rebuilds_its_tokenizer_and_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PHASE7FW_CACHE_DIR", str(tmp_path / "cache"))
    overrides = tiny_overrides(tmp_path, **{"train.max_steps": 2, "train.save_every": 2, "train.eval_every": 2,
                                            "data.tokenizer": {"name": "bpe", "vocab_size": 400, "sample_chars": 200_000}})
    engine = Engine.from_recipe(TINY, overrides)
    assert engine.vocab_size == 400 and engine.tokenizer.vocab_size == 400
    engine.fit()
    fingerprint = engine.tokenizer.fingerprint()
    shutil.rmtree(tmp_path / "cache")  # no cache, no data: the checkpoint alone rebuilds the tokenizer
    restored = Engine.from_checkpoint(tmp_path / "run" / "llama_final.pt")
    assert restored.tokenizer.fingerprint() == fingerprint
    assert isinstance(restored.generate("def ", max_new_tokens=4, temperature=0.0), str)
    # The same run with another tokenizer would read the ids differently: refused, exit 2.
    with pytest.raises(CheckpointError, match="trained with tokenizer 'bpe-.*token ids would not match"):
        Engine.from_recipe(TINY, {**overrides, "data.tokenizer": {"name": "bytes"}, "model.vocab_size": 400})
    proc = cli(tmp_path, "run", TINY, "--set", f"run.output_dir={tmp_path / 'run'}",
               "--set", 'data.sources=[{name = "python_stdlib", max_files = 20}]')
    assert_clean_error(proc, "token ids would not match")


# ----------------------------------------------------------------------------- recipe new
def wizard(*args, stdin="", cwd=None):
    """`phase7fw recipe new` with stdin from a pipe (never a terminal)."""
    return subprocess.run([sys.executable, "-m", "phase7fw", "recipe", "new", *map(str, args)], input=stdin,
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=120,
                          env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)})


def test_recipe_new_with_flags_writes_a_valid_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("hello\n")
    out = tmp_path / "my.toml"
    proc = wizard("--preset", "phase7_small", "--source", "python_stdlib:1.0", "--source", "text_files:paths=data/*.txt:0.5",
                  "--tokenizer", "bpe:vocab_size=4096", "--tokens", "50M", "--output", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: valid" in proc.stdout
    recipe = load_recipe(out)
    assert recipe.model.name == "phase7" and recipe.model.config.d_model == 256  # from the preset
    per_step = recipe.train.batch_size * recipe.train.grad_accum_steps * recipe.model.config.seq_len
    assert recipe.train.max_steps == -(-50_000_000 // per_step)
    assert [(s.name, s.weight) for s in recipe.data.sources] == [("python_stdlib", 1.0), ("text_files", 0.5)]
    assert recipe.data.sources[1].config.paths == ["data/*.txt"]
    assert recipe.data.tokenizer.name == "bpe" and recipe.data.tokenizer.config.vocab_size == 4096
    assert_clean_error(wizard("--preset", "phase7_small", "--source", "python_stdlib", "--output", out),
                       "exists; choose another --output or pass --force")


def test_recipe_new_interactive_through_stdin(tmp_path):
    answers = "\n".join([
        "phase7_tiny",        # preset
        "python_stdlib",      # source 1
        "40", "",             # max_files, include_tests (default)
        "2",                  # weight
        "synthetic", "", "",  # source 2 with default options
        "0.5",                # its weight
        "",                   # no more sources
        "bpe", "1024", "", "", "",  # tokenizer and its options
        "1M",                 # token budget
        str(tmp_path / "wiz.toml"),
    ]) + "\n"
    proc = wizard("--interactive", stdin=answers)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recipe = load_recipe(tmp_path / "wiz.toml")
    assert [(s.name, s.weight) for s in recipe.data.sources] == [("python_stdlib", 2.0), ("synthetic", 0.5)]
    assert recipe.data.sources[0].config.max_files == 40
    assert recipe.data.tokenizer.config.vocab_size == 1024 and recipe.train.max_steps == 1_000_000 // 1024 + 1


def test_recipe_new_without_a_terminal_needs_its_flags(tmp_path):
    assert_clean_error(wizard("--preset", "phase7_tiny"), "missing --source, --output and stdin is not a terminal")
    assert_clean_error(wizard("--interactive", stdin="phase7_tiny\n"), "input ended at the question")
    assert_clean_error(wizard("--preset", "phase7_tiny", "--source", "text_files:paths=nope/*.txt", "-o",
                              tmp_path / "x.toml"), "no file matches 'nope/*.txt'")
    assert not (tmp_path / "x.toml").exists()
