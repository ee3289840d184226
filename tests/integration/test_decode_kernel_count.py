"""benchmarks/decode_kernel_count.py: the kernels of the compiled static decode step, per layer
(the CPU proxy behind P9's bound in benchmarks/RESULTS.md)."""

from __future__ import annotations

from tests.conftest import ROOT, load_benchmark


def _load():
    return load_benchmark("decode_kernel_count")


def test_fused_input_projections_remove_four_matmuls_per_layer():
    """q, k, v, the SSM's output gate and the mixer gate (an addmm: it has a bias) become one
    addmm: four library calls fewer in each of phase7_tiny's hybrid blocks."""
    bench = _load()
    recipe = str(ROOT / "recipes" / "phase7_tiny.toml")
    before, after = bench.count(recipe, fuse=False), bench.count(recipe, fuse=True)
    assert before["fused_blocks"] == 0 and after["fused_blocks"] == after["layers"] == 4
    calls_before, calls_after = before["library_calls_by_name"], after["library_calls_by_name"]
    assert calls_before["extern_kernels.mm"] - calls_after["extern_kernels.mm"] == 4 * 4
    assert calls_after["extern_kernels.addmm"] == calls_before["extern_kernels.addmm"] == 4
    assert after["per_layer"] < before["per_layer"] and before["fused_kernels"] > 0


def test_missing_recipe_is_exit_2(capsys):
    assert _load().main(["nope.toml"]) == 2
    assert "recipe nope.toml not found" in capsys.readouterr().err
