"""Built-in trackers: jsonl, wandb (offline only, never the network) and tensorboard."""

from __future__ import annotations

import glob
import json
import math
import os
import time
import socket
import sys

import numpy as np
import pytest
import torch

from phase7fw.components import trackers
from phase7fw.errors import Phase7Error
from phase7fw.registry import Registry

RECIPE = {"run": {"name": "tracker-test", "seed": 3}, "model": {"name": "llama", "d_model": 64}}


def build(name, config=None, *, tmp_path, **context):
    cls = {"jsonl": trackers.JsonlConfig, "wandb": trackers.WandbConfig,
           "tensorboard": trackers.TensorboardConfig}[name]
    factory = {"jsonl": trackers.build_jsonl, "wandb": trackers.build_wandb,
               "tensorboard": trackers.build_tensorboard}[name]
    context = {"run_dir": str(tmp_path), "run_name": "tracker-test", "recipe": RECIPE,
               "resume_state": None, **context}
    return factory(config or cls(), **context)


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_registered_under_tracker_kind():
    registry = Registry()
    trackers.register_components(register=registry.register)
    assert registry.names("tracker") == ["jsonl", "tensorboard", "wandb"]


def test_recipe_tables_are_validated():
    from phase7fw.recipe.convert import structure_component

    registry = Registry()
    trackers.register_components(register=registry.register)
    errors = []
    ok = structure_component({"name": "wandb", "mode": "offline", "tags": ["a"], "entity": "me"},
                             "tracker", registry, "trackers[0]", errors)
    assert errors == []
    assert ok.config == trackers.WandbConfig(entity="me", mode="offline", tags=["a"])
    bad = structure_component({"name": "wandb", "mode": "cloud", "tags": "a"}, "tracker", registry,
                              "trackers[1]", errors)
    assert bad is None
    assert [e.split(":")[0] for e in errors] == ["trackers[1].mode", "trackers[1].tags"]


# --------------------------------------------------------------------------- jsonl


def test_jsonl_rows_are_valid_json(tmp_path):
    t = build("jsonl", tmp_path=tmp_path)
    t.log({"step": 1, "split": "train", "loss": torch.tensor(2.5), "ppl": np.float32(12.0),
           "lr": 1e-3, "grad_norm": float("nan"), "tokens_per_s": float("inf"),
           "ranks": torch.tensor([1, 2]), "note": "warmup"})
    # Written before finish(): a crash right after log() loses nothing.
    rows = read_rows(tmp_path / "training_log.jsonl")
    t.log({"step": 1, "split": "val", "loss": 2.4, "ppl": math.exp(2.4)})
    t.finish()
    t.finish()  # idempotent

    assert rows == [{"step": 1, "split": "train", "loss": 2.5, "ppl": 12.0, "lr": 1e-3,
                     "grad_norm": None, "tokens_per_s": None, "ranks": [1, 2], "note": "warmup"}]
    lines = (tmp_path / "training_log.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        json.dumps(json.loads(line), allow_nan=False)  # strict JSON, no NaN/Infinity tokens


def test_jsonl_resume_drops_rows_after_the_checkpoint(tmp_path):
    t = build("jsonl", tmp_path=tmp_path)
    for step in range(1, 6):
        t.log({"step": step, "split": "train", "loss": 1.0 / step})
    t.log({"step": 4, "split": "val", "loss": 0.3})
    t.finish()
    with open(tmp_path / "training_log.jsonl", "a") as f:
        f.write('{"step": 6, "split": "tr')  # a row cut short by a crash

    t = build("jsonl", tmp_path=tmp_path, resume_step=3)
    t.log({"step": 4, "split": "train", "loss": 0.2})
    t.finish()
    rows = read_rows(tmp_path / "training_log.jsonl")
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (3, "train"), (4, "train")]
    assert rows[-1]["loss"] == 0.2
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_jsonl_filename_option(tmp_path):
    t = build("jsonl", trackers.JsonlConfig(filename="metrics.jsonl"), tmp_path=tmp_path)
    t.log({"step": 0, "split": "train", "loss": 1.0})
    t.finish()
    assert read_rows(tmp_path / "metrics.jsonl") == [{"step": 0, "split": "train", "loss": 1.0}]


# --------------------------------------------------------------------------- wandb


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a wandb test tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(trackers.socket, "create_connection", refuse)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch, no_network):
    """A wandb that stays on this machine: no key, no netrc, files under tmp_path."""
    pytest.importorskip("wandb")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    return tmp_path


def test_wandb_offline_run_and_resume_reuses_id(wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = wandb_env / "run"
    t = build("wandb", trackers.WandbConfig(mode="offline", tags=["unit"]), tmp_path=run_dir)
    state = t.state()
    run_id = state["run_id"]
    assert t.run.config["run"] == RECIPE["run"]
    t.log({"step": 1, "split": "train", "loss": 2.0, "lr": 1e-3, "note": "ignored"})
    t.log({"step": 1, "split": "val", "loss": 2.1, "ppl": torch.tensor(8.2)})
    t.finish()

    run_dirs = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1
    # wandb's own service process writes the file; on a loaded machine the records can land a
    # moment after finish() returns (seen: only the file header), so wait for them (up to 30 s).
    path, expected = os.path.join(run_dirs[0], f"run-{run_id}.wandb"), (b"tracker-test", b"train/loss", b"val/ppl")
    deadline = time.monotonic() + 30
    while True:
        data = open(path, "rb").read()
        if all(e in data for e in expected) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(e in data for e in expected), data[:200]

    again = build("wandb", trackers.WandbConfig(mode="offline"), tmp_path=run_dir, resume_state=state,
                  resume_step=1)
    assert again.state() == {"run_id": run_id}
    again.log({"step": 2, "split": "train", "loss": 1.5})
    again.finish()


def test_wandb_auto_without_api_key_is_offline(wandb_env, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert trackers.resolve_wandb_mode("auto")[0] == "offline"

    t = build("wandb", trackers.WandbConfig(mode="auto"), tmp_path=wandb_env / "run")
    assert "offline" in capsys.readouterr().err
    t.finish()
    assert glob.glob(str(wandb_env / "run" / "wandb" / "offline-run-*"))


def test_wandb_mode_resolution(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.resolve_wandb_mode("auto") == (None, "WANDB_MODE=disabled is set")
    assert trackers.resolve_wandb_mode("online")[0] == "online"

    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k3y\n")
    monkeypatch.setattr(trackers, "_reachable", lambda host, port, timeout=2.0: False)
    mode, why = trackers.resolve_wandb_mode("auto")
    assert mode == "offline" and "api.wandb.ai:443" in why
    monkeypatch.setattr(trackers, "_reachable", lambda host, port, timeout=2.0: True)
    assert trackers.resolve_wandb_mode("auto")[0] == "online"

    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.local:8080")
    assert trackers._wandb_host() == ("wandb.local", 8080)
    assert trackers.resolve_wandb_mode("auto")[0] == "offline"  # netrc has no entry for that host


def test_wandb_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(Phase7Error, match=r"pip install 'phase7fw\[wandb\]'"):
        build("wandb", tmp_path=tmp_path)


# --------------------------------------------------------------------------- tensorboard


def test_tensorboard_writes_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    t = build("tensorboard", tmp_path=tmp_path)
    t.log({"step": 1, "split": "train", "loss": torch.tensor(2.0), "note": "ignored"})
    t.log({"step": 1, "split": "val", "loss": 2.2})
    t.finish()

    events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "val/loss"]
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0]


def test_tensorboard_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(Phase7Error, match=r"pip install 'phase7fw\[tensorboard\]'"):
        build("tensorboard", tmp_path=tmp_path)
