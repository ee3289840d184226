"""The command line as a user meets it: exit codes, messages, JSON outputs."""

import json
import re

import pytest

from tests.conftest import RECIPES, run_cli

TINY = RECIPES / "llama_tiny.toml"
SMALL = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "model.seq_len=32", "--set", "model.ffn_hidden=64", "--set", "train.batch_size=2",
         "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.save_every=0",
         "--set", 'data.sources=[{name = "python_stdlib", max_files = 5}]']


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    for f in fragments:
        assert f in proc.stderr


def test_bad_recipe_is_exit_2_with_every_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nmax_steps = "many"\nbatch_size = -1\n[optimizer]\nlr = "abc"\n')
    proc = run_cli("run", bad)
    assert_clean_error(proc, "train.max_steps: expected int, got str 'many'", "train.batch_size: must be > 0, got -1",
                       "optimizer.lr: expected float, got str 'abc'")
    proc = run_cli("recipe", "validate", TINY, "--set", "train.max_steps=0")
    assert_clean_error(proc, "train.max_steps: must be > 0, got 0")
    assert_clean_error(run_cli("run", tmp_path / "missing.toml"), "file not found")
    assert_clean_error(run_cli("recipe", "validate", TINY, "--set", "train.max_steps"), "expected key.path=VALUE")


def test_bad_cli_arguments_exit_2():
    proc = run_cli("run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert run_cli("frobnicate").returncode == 2
    assert_clean_error(run_cli("components", "optimiser"), "unknown kind 'optimiser'")


def test_recipe_validate_and_show_resolved():
    proc = run_cli("recipe", "validate", TINY)
    assert proc.returncode == 0 and "valid" in proc.stdout
    proc = run_cli("recipe", "show", TINY, "--set", "optimizer.lr=1e-3")
    assert proc.returncode == 0
    assert "lr = 0.001" in proc.stdout and "max_nonfinite_steps = 10" in proc.stdout  # defaults filled in


def test_plugins_and_components_json():
    proc = run_cli("plugins", "--json")
    data = json.loads(proc.stdout)
    names = {p["name"]: p for p in data["plugins"]}
    assert "optimizer:adamw" in names["phase7fw.components.optimizers"]["components"]
    assert names["lion"]["dist"].startswith("phase7fw-lion==")  # the example plugin, installed
    proc = run_cli("components", "optimizer", "--json")
    comps = {c["name"]: c for c in json.loads(proc.stdout)}
    assert {"adamw", "lion"} <= set(comps)
    lr = next(f for f in comps["adamw"]["config"] if f["name"] == "lr")
    assert lr["type"] == "float" and lr["default"] == "0.0003"


def test_train_with_the_installed_example_plugin(tmp_path):
    proc = run_cli("run", TINY, *SMALL, "--set", "train.max_steps=3", "--set", "optimizer.name=lion",
                   "--set", "optimizer.lr=1e-4", "--set", "lr_scheduler.min_lr=0.0", "--set", f"run.output_dir={tmp_path}/run", "--resume", "never")
    assert proc.returncode == 0, proc.stderr
    assert "optimizer lion" in proc.stdout
    assert len(re.findall(r"^Step +\d+ \| Loss:", proc.stdout, re.M)) == 3
    assert (tmp_path / "run" / "llama_final.pt").exists()


def test_corrupt_and_unsafe_checkpoints_exit_2(tmp_path):
    import torch

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a zip file at all")
    assert_clean_error(run_cli("eval", broken), "corrupt or truncated")
    assert_clean_error(run_cli("generate", tmp_path / "nope.pt", "--prompt", "x"), "checkpoint not found")

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "phase7fw-checkpoint", "payload": pytest.MonkeyPatch()}, unsafe)
    assert_clean_error(run_cli("eval", unsafe), "refusing to load", "never unpickles")


def test_run_eval_generate_roundtrip(tmp_path):
    out = f"{tmp_path}/run"
    proc = run_cli("run", TINY, *SMALL, "--set", "train.max_steps=2", "--set", f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("eval", f"{out}/llama_final.pt")
    assert proc.returncode == 0 and re.search(r"val loss \d+\.\d{4} \| ppl [\d.]+", proc.stdout)
    proc = run_cli("generate", f"{out}/llama_final.pt", "--prompt", "def ", "--max-new-tokens", "5",
                   "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("def ")
    proc = run_cli("generate", f"{out}/llama_final.pt", "--prompt", "def ", "--max-new-tokens", "5",
                   "--temperature", "0", "--int8")  # int8 weight-only decoding (torch reference on the CPU)
    assert proc.returncode == 0 and proc.stdout.startswith("def ") and len(proc.stdout) > len("def "), proc.stderr


def test_doctor_on_cpu():
    proc = run_cli("doctor")
    assert proc.returncode == 0 and "torch" in proc.stdout and "warning: no CUDA GPU" in proc.stdout
    assert run_cli("doctor", "--require-gpu").returncode == 1


def test_ctrl_c_in_the_cli_saves_and_exits_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "phase7fw", "run", str(TINY), *SMALL, "--set",
                             "train.max_steps=100000", "--set", f"run.output_dir={out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("Step"):
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    [saved] = [l for l in rest.splitlines() if l.startswith("Stopped by Ctrl-C")]
    step = int(saved.split("at step ")[1].split(";")[0])
    assert (out / f"llama_step_{step}.pt").exists()


def test_wandb_run_id_survives_resume(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": ""}
    common = [*SMALL, "--set", f"run.output_dir={tmp_path}/run", "--set", 'trackers=[{name = "wandb"}]',
              "--set", "train.save_every=2"]
    first = run_cli("run", TINY, *common, "--set", "train.max_steps=2", env=env)
    assert first.returncode == 0, first.stderr
    import torch

    run_id = torch.load(tmp_path / "run" / "llama_final.pt", weights_only=True)["trackers"]["wandb"]["run_id"]
    second = run_cli("run", TINY, *common, "--set", "train.max_steps=4", env=env)
    assert second.returncode == 0, second.stderr
    assert "Resumed from" in second.stdout
    again = torch.load(tmp_path / "run" / "llama_final.pt", weights_only=True)["trackers"]["wandb"]["run_id"]
    assert again == run_id
    runs = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))  # tracker dir = run dir
    assert len(runs) >= 1
