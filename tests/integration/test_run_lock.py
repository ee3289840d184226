"""One run per output folder: a second run is refused while the first trains, and a lock left by
a killed run does not block the next one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from phase7fw.core.checkpoint import load_checkpoint
from phase7fw.core.run_lock import LOCK_NAME, RunLock, RunLocked
from tests.conftest import RECIPES, ROOT, run_cli

TINY = RECIPES / "llama_tiny.toml"
SMALL = ["--dummy-data", "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "model.seq_len=32", "--set", "model.ffn_hidden=64", "--set", "train.batch_size=2",
         "--set", "train.log_every=5", "--set", "train.eval_every=0", "--set", "train.save_every=20"]


def start_run(out, *extra):
    """A long run in the background; returns once it holds the lock and has logged a step."""
    cmd = [sys.executable, "-m", "phase7fw", "run", str(TINY), *SMALL, "--set", f"run.output_dir={out}",
           "--set", "train.max_steps=1000000", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((out / "training_log.jsonl").is_file() and (out / "training_log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the first run did not start"
        time.sleep(0.2)
    return proc


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_and_the_first_loses_nothing(tmp_path):
    out = tmp_path / "run"
    first = start_run(out, "--set", 'run.name="first"')
    try:
        second = run_cli("run", TINY, *SMALL, "--set", f"run.output_dir={out}", "--set", 'run.name="second"',
                         "--set", "train.max_steps=3")
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert f"{out} is in use by another phase7fw run: pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert first.poll() is None  # untouched, still training
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: saves a checkpoint and exits 130
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert 'name = "first"' in (out / "resolved_recipe.toml").read_text()
    steps = [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 5  # one run's rows, each step once
    saved = sorted(out.glob("llama_step_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))[-1]
    state = load_checkpoint(saved)
    assert 'name = "first"' in state["recipe"] and state["step"] >= steps[-1]
    assert not (out / LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_stale(tmp_path):
    out = tmp_path / "run"
    first = start_run(out, "--set", "train.save_every=0")  # no checkpoint: --resume never below stays valid
    first.kill()  # SIGKILL: no cleanup, the lock file stays behind
    first.communicate(timeout=60)
    assert (out / LOCK_NAME).exists()
    proc = run_cli("run", TINY, *SMALL, "--set", f"run.output_dir={out}", "--set", "train.max_steps=2",
                   "--resume", "never", "--set", "train.save_every=0")
    assert proc.returncode == 0, proc.stderr


def test_the_lock_in_one_process(tmp_path):
    with RunLock(tmp_path) as held:
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
        assert json.loads(held.path.read_text())["pid"] == os.getpid()
    with RunLock(tmp_path):  # free again
        pass
    # a lock file nobody holds (its writer died) is taken over
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": socket.gethostname()}))
    with RunLock(tmp_path) as again:
        assert json.loads(again.path.read_text())["pid"] == os.getpid()
