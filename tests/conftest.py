"""Shared fixtures: installable fake plugin distributions, tiny recipes, a CLI runner, a torch
stand-in for flash-linear-attention's GLA."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from phase7fw.core.threads import prepare_environment

# Before any test imports torch: OpenMP threads sleep while they wait, as in the CLI (the
# suite's own subprocesses share the same few cores with this process).
prepare_environment()

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def load_benchmark(name: str):
    """The script benchmarks/<name>.py as a module (by path: benchmarks/ is not a package, and
    a package of the same name may be installed), under a name of its own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"phase7fw_benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tokenized-data caches go to a temporary folder, never the user's ~/.cache."""
    old = os.environ.get("PHASE7FW_CACHE_DIR")
    os.environ["PHASE7FW_CACHE_DIR"] = str(tmp_path_factory.mktemp("phase7fw-cache"))
    yield
    if old is None:
        os.environ.pop("PHASE7FW_CACHE_DIR", None)
    else:
        os.environ["PHASE7FW_CACHE_DIR"] = old


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Make an installed-looking distribution with a ``phase7fw`` entry point.

    ``fake_dist("name", "module source")`` writes ``<name>_mod.py`` and a dist-info folder on a
    fresh ``sys.path`` entry, so ``importlib.metadata`` discovers it like a pip-installed plugin.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(name: str, source: str, version: str = "1.0") -> str:
        module = f"{name.replace('-', '_')}_mod"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[phase7fw]\n{name} = {module}\n")
        sys.modules.pop(module, None)
        return module

    return make


def tiny_overrides(tmp_path, **extra) -> dict:
    """Overrides that make llama_tiny run in a few seconds in ``tmp_path``."""
    out = {
        "run.output_dir": str(tmp_path / "run"),
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.seq_len": 32,
        "model.ffn_hidden": 64,
        "train.batch_size": 4,
        "train.max_steps": 6,
        "train.log_every": 1,
        "train.eval_every": 3,
        "train.eval_batches": 2,
        "train.save_every": 3,
        "data.sources": [{"name": "python_stdlib", "max_files": 20}],
        "data.val_fraction": 0.05,
        "lr_scheduler.warmup_steps": 2,
    }
    out.update(extra)
    return out


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run ``python -m phase7fw ARGS`` in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "phase7fw", *map(str, args)], cwd=cwd or ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


class TorchGLA:
    """fla's ``chunk_simple_gla`` convention in plain torch (the T x T masked form): q, k
    (B, T, H, K), v (B, T, H, V), g (B, T, H) natural-log decays or None;
    o_t = sum_{s <= t} exp(g_{s+1} + ... + g_t) scale (q_t . k_s) v_s. Records its calls. Stands
    in for fla's kernels, which do not run on a CPU, in the tests of the ops' fla backends."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, g=None, *, scale=None, chunk_size=64, **kwargs):
        import torch  # (imported here: torch is first imported after prepare_environment)

        self.calls.append(dict(q=q.shape, k=k.shape, v=v.shape, g=None if g is None else g.shape, scale=scale,
                               chunk_size=chunk_size, dtype=q.dtype, kwargs=kwargs))
        T = q.shape[1]
        G = torch.zeros(q.shape[:3], dtype=q.dtype) if g is None else g.cumsum(1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]
        decay = (G[:, :, None, :] - G[:, None, :, :]).masked_fill(~causal, float("-inf")).exp()  # (B, t, s, H)
        w = torch.einsum("bthk,bshk->btsh", q, k) * scale * decay
        return torch.einsum("btsh,bshv->bthv", w, v), None


def without_fla(monkeypatch) -> None:
    """Make ``import fla...`` fail as it does where fla-core is not installed."""
    from phase7fw.kernels import _fla

    for name in ("fla", "fla.ops", "fla.ops.simple_gla"):
        monkeypatch.setitem(sys.modules, name, None)
    _fla.import_gla.cache_clear()


@pytest.fixture
def no_fla(monkeypatch):
    """As if fla-core were not installed (:func:`without_fla`), for one test."""
    from phase7fw.kernels import _fla

    without_fla(monkeypatch)
    yield
    monkeypatch.undo()
    _fla.import_gla.cache_clear()  # a later test imports the real one, if installed
