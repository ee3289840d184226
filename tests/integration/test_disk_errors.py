"""A full disk or a read-only folder: one message naming the device or the path, exit 2, nothing
half-written; saves a killed run left half done are cleaned up at the next start.

A real small (or read-only) filesystem is used where the test may mount a tmpfs (root with
CAP_SYS_ADMIN); elsewhere the same failure is simulated by making the write raise the OSError
the kernel would."""

import errno
import json
import os
import subprocess
import tomllib
import uuid

import pytest
import torch

from phase7fw.core.checkpoint import load_checkpoint
from phase7fw.cli import main
from phase7fw.components.trackers import JsonlTracker
from tests.conftest import RECIPES, run_cli

TINY = RECIPES / "llama_tiny.toml"
SMALL = ["--dummy-data", "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "model.seq_len=32", "--set", "model.ffn_hidden=64", "--set", "train.batch_size=2",
         "--set", "train.log_every=1", "--set", "train.eval_every=0"]


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size, ro=False)`` -> a freshly mounted tmpfs, or None where mounting is not allowed."""
    mounted = []

    def mount(size: str, ro: bool = False):
        if os.geteuid() != 0:
            return None
        where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode:
            return None
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def assert_nothing_half_written(out):
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    for ckpt in out.glob("*.pt"):
        assert all(torch.isfinite(t).all() for t in load_checkpoint(ckpt)["model"].values())
    if (out / "training_log.jsonl").exists():
        for line in (out / "training_log.jsonl").read_text().splitlines():
            json.loads(line)  # every row whole
    if (out / "resolved_recipe.toml").exists():
        tomllib.loads((out / "resolved_recipe.toml").read_text())


def test_a_full_filesystem_stops_the_run_with_one_message(tmpfs):
    fs = tmpfs("700k")
    if fs is None:
        pytest.skip("cannot mount a small tmpfs here; test_a_simulated_full_disk covers the same path")
    out = fs / "run"
    proc = run_cli("run", TINY, *SMALL, "--set", f"run.output_dir={out}", "--set", "train.max_steps=100",
                   "--set", "train.save_every=1")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"error: no space left on tmpfs (mounted at {fs}) while writing {out}/" in proc.stderr
    assert list(out.glob("llama_step_*.pt"))  # the checkpoints that fitted are there and whole
    assert_nothing_half_written(out)


def test_a_simulated_full_disk_while_saving(tmp_path, monkeypatch, capsys):
    import phase7fw.core.checkpoint as checkpoint

    real_save, calls = torch.save, {"n": 0}

    def full_after_two(obj, fh, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            fh.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_after_two)
    out = tmp_path / "run"
    code = main(["run", str(TINY), *SMALL, "--set", f"run.output_dir={out}", "--set", "train.max_steps=10",
                 "--set", "train.save_every=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: no space left on ") and f"while writing {out / 'llama_step_3.pt'}" in err
    assert sorted(p.name for p in out.glob("*.pt")) == ["llama_step_1.pt", "llama_step_2.pt"]
    assert_nothing_half_written(out)


def test_a_log_row_is_never_half_written(tmp_path, monkeypatch):
    import phase7fw.components.trackers as trackers

    log = JsonlTracker(str(tmp_path / "training_log.jsonl"))
    log.log({"step": 1, "split": "train", "loss": 1.0})
    before = (tmp_path / "training_log.jsonl").read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trackers.os, "write", half_then_full)
    with pytest.raises(Exception, match="no space left on .* while writing .*training_log.jsonl"):
        log.log({"step": 2, "split": "train", "loss": 0.9})
    monkeypatch.undo()
    assert (tmp_path / "training_log.jsonl").read_bytes() == before
    log.finish()


def test_a_read_only_output_folder(tmp_path, tmpfs, monkeypatch, capsys):
    fs = tmpfs("1m", ro=True)
    if fs is not None:
        out = fs / "run"
        proc = run_cli("run", TINY, *SMALL, "--set", f"run.output_dir={out}", "--set", "train.max_steps=2")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"error: {out} is read-only (read-only filesystem)" in proc.stderr
        return
    # Simulated: the folder exists but refuses new files (root ignores chmod, so raise EROFS).
    import phase7fw.core.run_lock as run_lock

    out = tmp_path / "run"
    out.mkdir()

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(run_lock.os, "open", refuse)
    code = main(["run", str(TINY), *SMALL, "--set", f"run.output_dir={out}", "--set", "train.max_steps=2"])
    assert code == 2
    assert f"error: {out / '.phase7fw.lock'} is read-only (read-only filesystem)" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_leftovers_of_killed_saves_are_cleaned_up_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    first = run_cli("run", TINY, *SMALL, "--set", f"run.output_dir={out}", "--set", "train.max_steps=2",
                    "--set", "train.save_every=1")
    assert first.returncode == 0, first.stderr
    # a single-file save killed before its rename, a sharded save killed before its rename,
    # and a sharded save killed between moving the old version aside and renaming the new one
    (out / ".llama_step_3.pt.k2j4h1.tmp").write_bytes(b"PK half")
    (out / ".llama_step_3.pt.tmp").mkdir()
    (out / ".llama_step_3.pt.tmp" / "__0_0.distcp").write_bytes(b"x")
    os.replace(out / "llama_step_2.pt", out / ".llama_step_2.pt.old")
    proc = run_cli("run", TINY, *SMALL, "--set", f"run.output_dir={out}", "--set", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    assert "restored llama_step_2.pt (a save was interrupted)" in proc.stdout
    assert "removed .llama_step_3.pt.k2j4h1.tmp (left by an interrupted save)" in proc.stdout
    assert "Resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".phase7fw.lock"]
