"""What a run checks and sets before it allocates: the memory plan against the machine, the
CPU step-time bound, precision "auto", CPU threads (phase7fw/core/preflight.py, phase7fw/core/threads.py)."""

from __future__ import annotations

import pytest
import torch

from phase7fw.core import preflight, threads
from phase7fw.core.build import resolve_precision
from phase7fw.plugins import load_plugins
from phase7fw.recipe import load_recipe
from tests.conftest import RECIPES


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def test_precision_auto_follows_the_device(plugins):
    small = load_recipe(RECIPES / "phase7_small.toml", plugins=plugins)
    assert small.train.precision == "auto"  # the shipped CPU-capable recipe chooses per device
    assert resolve_precision(small, torch.device("cpu")).train.precision == "fp32"
    bf16_weights = load_recipe(RECIPES / "phase7_1.5b.toml", {"train.precision": "auto"}, plugins=plugins)
    assert resolve_precision(bf16_weights, torch.device("cpu")).train.precision == "bf16"  # bf16 weights need it
    fixed = load_recipe(RECIPES / "phase7_tiny.toml", {"train.precision": "bf16"}, plugins=plugins)
    assert resolve_precision(fixed, torch.device("cpu")) is fixed


def test_threads_stay_within_the_cpus_of_this_process(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "available_cpus", lambda: 1)
        torch.set_num_threads(4)
        assert threads.configure("cpu") == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is kept
        torch.set_num_threads(3)
        assert threads.configure("cpu") == 3
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.prepare_environment()
    import os

    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prepare_environment()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert threads.available_cpus() >= 1


def test_memory_plan_against_the_machine(plugins, monkeypatch):
    recipe = load_recipe(RECIPES / "llama_tiny.toml", {"train.batch_size": 4}, plugins=plugins)
    model, optimizer = preflight.meta_model(recipe, plugins, 257, {})
    assert next(model.parameters()).device.type == "meta"
    out = preflight.check_machine(recipe, model, optimizer, 257, torch.device("cpu"))
    assert out["host_bytes"] > 16 * sum(p.numel() for p in model.parameters())  # fp32 weights, grads, AdamW
    monkeypatch.setattr(preflight, "host_memory_available", lambda: int(out["host_bytes"] * 0.9))
    with pytest.raises(preflight.ResourceError, match=r"needs about .* GiB of host memory") as info:
        preflight.check_machine(recipe, model, optimizer, 257, torch.device("cpu"))
    assert info.value.kind == "memory"
    monkeypatch.setattr(preflight, "host_memory_available", lambda: int(out["host_bytes"] * 1.1))
    preflight.check_machine(recipe, model, optimizer, 257, torch.device("cpu"))


def test_step_time_bound_counts_recomputation(plugins):
    base = load_recipe(RECIPES / "llama_tiny.toml", plugins=plugins)
    model, _ = preflight.meta_model(base, plugins, 257, {})
    flops = preflight.step_flops(model, base)
    tokens = base.train.batch_size * base.model.config.seq_len
    assert flops > 6 * model.matmul_params() * tokens  # 6 N per token plus attention
    ckpt = load_recipe(RECIPES / "llama_tiny.toml", {"train.activation_checkpointing": True}, plugins=plugins)
    assert preflight.step_flops(model, ckpt) == pytest.approx(flops * 4 / 3)
    assert preflight.cpu_matmul_flops() > 1e8  # any CPU does more than 0.1 GFLOP/s


def test_host_memory_is_known_on_linux():
    import sys

    avail = preflight.host_memory_available()
    if sys.platform.startswith("linux"):
        assert avail is not None and avail > 2**26
