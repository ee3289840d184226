"""Damaged or odd input through the command line: one clear message, never a traceback."""

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
