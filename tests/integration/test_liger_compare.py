"""benchmarks/liger_compare.py without a GPU: the refusal, the install hint, the table."""

import sys

import pytest
import torch

from tests.conftest import ROOT, load_benchmark


def _script():
    return load_benchmark("liger_compare")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_a_gpu(capsys):
    assert _script().main(["--out", "unused"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_missing_liger_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, "liger_kernel.transformers.functional", raising=False)
    impls, why = _script()._liger()
    assert impls is None and "pip install liger-kernel" in why


def test_table_has_both_ratios_and_names_failures():
    def ok(ms, graph=None):
        r = {"errors": {"out": 1e-3, "d0": 4e-3}, "fwd_bwd_ms": ms, "peak_extra_mib": 64.0}
        return r if graph is None else {**r, "graph_ms": graph}

    res = {"environment": {"liger": "0.8.5", "gpu": "GPU", "torch": "t", "triton": "tr", "date": "d"}, "rows": 8192,
           "ops": {"swiglu": {"reference": ok(3.0, 0.5), "ours": ok(1.0, 0.2), "liger": ok(0.8, 0.25)},
                   "rmsnorm": {"reference": ok(2.0), "ours": ok(1.0), "liger": {"error": "RuntimeError: boom"}}}}
    table = _script().markdown(res)
    assert ("| swiglu | 3.000 ms, graph 0.500 ms, err 4.0e-03, 64 MiB | 1.000 ms, graph 0.200 ms, err 4.0e-03,"
            " 64 MiB | 0.800 ms, graph 0.250 ms, err 4.0e-03, 64 MiB | 1.25, 0.80 |") in table
    # no graph time (capture failed): said in the cell, and no graph ratio
    assert "| rmsnorm | 2.000 ms, graph capture failed, err 4.0e-03, 64 MiB |" in table
    assert "failed: RuntimeError: boom | -, - |" in table
