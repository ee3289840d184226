"""benchmarks/decode_profile.py: the per-kernel time of the static decode step (P9's profile),
run on the CPU where it profiles operators."""

from __future__ import annotations

import json

from tests.conftest import ROOT, load_benchmark


def _load():
    return load_benchmark("decode_profile")


def test_profile_counts_the_static_steps_operators_per_token(tmp_path, capsys):
    out = tmp_path / "prof.json"
    recipe = str(ROOT / "recipes" / "phase7_tiny.toml")
    assert _load().main([recipe, "--tokens", "3", "--top", "5", "--json", str(out)]) == 0
    (res,) = json.loads(out.read_text())["results"]
    assert res["model"] == "phase7" and res["path"] == "static-eager" and res["tokens"] == 3
    by_name = {r["name"]: r for r in res["rows"]}
    # phase7_tiny has 4 blocks: every token runs at least one matmul per block, the same count each token
    mm = by_name["aten::mm"]
    assert mm["calls"] % 3 == 0 and mm["calls_per_token"] >= 4
    assert 0 < res["kernel_ms_per_token"] and res["kernels_per_token"] == sum(r["calls"] for r in res["rows"]) / 3
    printed = capsys.readouterr().out
    assert "| aten::mm |" in printed and "phase7_tiny (phase7), static-eager" in printed


def test_missing_recipe_is_exit_2(capsys):
    assert _load().main(["nope.toml"]) == 2
    assert "recipe nope.toml not found" in capsys.readouterr().err
