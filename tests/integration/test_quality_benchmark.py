"""benchmarks/quality.py: the CPU smoke setting end to end, and the report's arithmetic."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, load_benchmark

SCRIPT = ROOT / "benchmarks" / "quality.py"


def _load():
    return load_benchmark("quality")


def _run(name, seed, val, bpt=1.0, tok_s=1000.0):
    """A fake worker result: val = [(step, tokens, train_seconds, loss)]."""
    return {"name": name, "seed": seed, "params": 100, "bytes_per_token": bpt, "tokens": val[-1][1],
            "train_seconds": val[-1][2], "tokens_per_s": tok_s, "peak_memory_gib": None, "device": "cpu",
            "torch": "x", "val": [{"step": s, "tokens": t, "train_seconds": ts, "loss": loss} for s, t, ts, loss in val]}


def test_summary_equal_tokens_equal_time_and_bits_per_byte():
    q = _load()
    fast = _run("llama_100m", 0, [(1, 10, 1.0, 3.0), (2, 20, 2.0, 2.0), (3, 30, 3.0, 1.5)])
    slow = [_run("phase7_100m", s, [(1, 10, 2.0, 2.8 + d), (2, 20, 4.0, 1.8 + d), (3, 30, 6.0, 1.4 + d)], bpt=2.0)
            for s, d in ((0, 0.0), (1, 0.2))]
    summary = q.summarize([fast, *slow], jobs=1)
    rows = {r["name"]: r for r in summary["rows"]}
    assert summary["baseline"] == "llama_100m" and summary["time_budget_s"] == 3.0
    p7 = rows["phase7_100m"]
    assert p7["val_loss_end"] == pytest.approx(1.5)  # mean of 1.4 and 1.6
    assert p7["val_loss_end_std"] == pytest.approx(math.sqrt(0.02))
    assert p7["val_loss_early"] == pytest.approx(2.9)  # a third of the run: step 1
    assert p7["bpb_end"] == pytest.approx(1.5 / math.log(2) / 2.0)  # loss / ln 2 x tokens / bytes
    # equal wall clock: 3.0 s, halfway between the evaluations at 2 s and 4 s of each seed
    assert p7["val_loss_equal_time"] == pytest.approx((2.3 + 2.5) / 2)
    assert p7["vs_baseline"] == pytest.approx(1.5 / 1.5 - 1)
    assert rows["llama_100m"]["val_loss_equal_time"] == pytest.approx(1.5)
    md = q.markdown(summary)
    assert "| phase7_100m | 0.0M | 2 |" in md and "1.5000 ± 0.1414" in md


def test_equal_time_at_solo_speeds_when_the_runs_shared_the_device():
    """--speed-steps: with every recipe's tokens/s measured alone, equal wall clock is each
    evaluation's tokens / that speed (the runs' own shared-device times are ignored)."""
    q = _load()
    # the runs' own times say phase7 was faster (it shared the device with fewer runs) ...
    fast = _run("llama_100m", 0, [(1, 10, 5.0, 3.0), (2, 20, 10.0, 2.0), (3, 30, 15.0, 1.5)])
    slow = _run("phase7_100m", 0, [(1, 10, 1.0, 2.8), (2, 20, 2.0, 1.8), (3, 30, 3.0, 1.4)])
    assert q.summarize([fast, slow], jobs=2)["time_budget_s"] == 3.0
    # ... alone, llama reads 10 tokens/s and phase7 5: llama's 30 tokens take 3 s, in which
    # phase7 reads 15 tokens, halfway between its evaluations at 10 and 20 tokens
    summary = q.summarize([fast, slow], jobs=2, speeds={"llama_100m": 10.0, "phase7_100m": 5.0})
    rows = {r["name"]: r for r in summary["rows"]}
    assert summary["time_budget_s"] == pytest.approx(3.0) and summary["equal_time_from"] == "solo speeds"
    assert rows["phase7_100m"]["val_loss_equal_time"] == pytest.approx(2.3)
    assert rows["llama_100m"]["val_loss_equal_time"] == pytest.approx(1.5)
    md = q.markdown(summary)
    assert "equal wall clock = 3 s at each recipe's tokens/s measured alone" in md and "| 1,000 (5) |" in md
    # a speed missing for one recipe: back to the runs' own times, and the header warns
    partial = q.summarize([fast, slow], jobs=2, speeds={"llama_100m": 10.0})
    assert partial["equal_time_from"] == "training times" and partial["time_budget_s"] == 3.0
    assert "their times compare nothing unless the runs were alike (--speed-steps)" in q.markdown(partial)


def test_merged_report_keeps_the_solo_speeds(tmp_path):
    q = _load()
    a = tmp_path / "a"
    a.mkdir()
    runs = [_final(_run("llama_100m", 0, [(1, 10, 9.0, 2.0), (2, 20, 9.5, 1.0)])),
            _final(_run("phase7_100m", 0, [(1, 10, 1.0, 1.5), (2, 20, 2.0, 0.9)]))]
    (a / "quality.json").write_text(json.dumps({"summary": {"jobs": 2, "solo_tokens_per_s": {
        "llama_100m": 20.0, "phase7_100m": 10.0}}, "runs": runs}))
    assert q.main(["--report", str(a / "quality.json")]) == 0
    summary = json.loads((a / "quality.json").read_text())["summary"]
    assert summary["equal_time_from"] == "solo speeds" and summary["time_budget_s"] == pytest.approx(1.0)
    assert {r["name"]: r["val_loss_equal_time"] for r in summary["rows"]} == pytest.approx(
        {"llama_100m": 1.0, "phase7_100m": 1.5})


def _final(run):
    run["final_val_loss"] = run["val"][-1]["loss"]
    return run


def test_each_seed_against_the_baseline_of_the_same_seed():
    q = _load()
    base = [_final(_run("llama_100m", s, [(1, 10, 1.0, loss)])) for s, loss in ((0, 2.0), (1, 1.0))]
    better = [_final(_run("phase7_100m", s, [(1, 10, 1.0, loss)])) for s, loss in ((0, 1.8), (1, 0.95))]
    mixed = [_final(_run("phase7_100m_x", s, [(1, 10, 1.0, loss)])) for s, loss in ((0, 2.2), (2, 0.5))]
    summary = q.summarize([*base, *better, *mixed], jobs=1)
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["phase7_100m"]["vs_baseline_per_seed"] == pytest.approx({0: -0.1, 1: -0.05})
    assert rows["phase7_100m_x"]["vs_baseline_per_seed"] == pytest.approx({0: 0.1})  # seed 2 has no baseline run
    assert rows["llama_100m"]["vs_baseline_per_seed"] == {}
    md = q.markdown(summary)
    assert "- phase7_100m: seed 0 -10.0%, seed 1 -5.0% (better in every seed)" in md
    assert "- phase7_100m_x: seed 0 +10.0%\n" in md


def test_report_merges_the_runs_of_several_calls_and_refuses_a_run_given_twice(tmp_path):
    q = _load()
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, runs in ((a, [_final(_run("llama_100m", 0, [(1, 10, 1.0, 2.0)]))]),
                         (b, [_final(_run("phase7_100m", 0, [(1, 10, 2.0, 1.5)]))])):
        folder.mkdir()
        (folder / "quality.json").write_text(json.dumps({"summary": {"jobs": 2}, "runs": runs}))
    merged = tmp_path / "merged"
    assert q.main(["--report", str(a / "quality.json"), str(b / "quality.json"), "--out", str(merged)]) == 0
    data = json.loads((merged / "quality.json").read_text())
    assert [r["name"] for r in data["summary"]["rows"]] == ["llama_100m", "phase7_100m"]
    assert data["summary"]["rows"][1]["vs_baseline"] == pytest.approx(-0.25)
    assert "- phase7_100m: seed 0 -25.0%\n" in (merged / "quality.md").read_text()  # one seed: no "every seed"
    # a worker's own result (logs/NAME_sSEED.json, left by a call that ran out of time) is one run
    (tmp_path / "phase7_100m_x_s1.json").write_text(json.dumps(_final(_run("phase7_100m_x", 1, [(1, 10, 2.0, 3.0)]))))
    assert q.main(["--report", str(a / "quality.json"), str(tmp_path / "phase7_100m_x_s1.json"), "--out",
                   str(tmp_path / "m2")]) == 0
    assert [r["name"] for r in json.loads((tmp_path / "m2" / "quality.json").read_text())["summary"]["rows"]] == \
        ["llama_100m", "phase7_100m_x"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--report", str(a / "quality.json"), str(a / "quality.json"),
                           "--out", str(merged)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "llama_100m seed 0 is in both" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--report", str(tmp_path / "none.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "none.json: cannot read it as a quality.json" in proc.stderr
    (tmp_path / "other.json").write_text(json.dumps({"seed": 0}))
    assert q.main(["--report", str(tmp_path / "other.json"), "--out", str(tmp_path / "m3")]) == 2


def test_gate_means_per_layer_first_and_last_step_mean_over_seeds():
    q = _load()
    runs = []
    for seed, g in ((0, 0.8), (1, 0.6)):
        run = _run("phase7_100m", seed, [(10, 100, 1.0, 2.0)])
        # layer 1 has no gate (an attention-only block of ssm_every = 2); step 20 is in between
        run["diag"] = [{"step": s, "split": "diag", "L0.gate_mean": g + s / 100, "L1.attn.entropy": 1.0,
                        "L2.gate_mean": g - s / 100} for s in (10, 20, 30)]
        runs.append(run)
    summary = q.summarize([*runs, _run("llama_100m", 0, [(10, 100, 1.0, 2.0)])], jobs=1)
    gates = summary["gates"]
    assert list(gates) == ["phase7_100m"] and list(gates["phase7_100m"]) == [10, 30]
    first, last = gates["phase7_100m"][10], gates["phase7_100m"][30]
    assert first[0] == pytest.approx(0.8) and first[2] == pytest.approx(0.6) and first[1] is None
    assert last[0] == pytest.approx(1.0) and last[2] == pytest.approx(0.4)
    md = q.markdown(summary)
    assert "| step | L0 | L1 | L2 |" in md and "| 30 | 1.000 | - | 0.400 |" in md


def test_summary_shows_overfitting_best_and_late_training_loss():
    """A run whose validation loss rises at the end: the best value and where it was, and the
    training loss over the last tenth of the steps."""
    q = _load()
    run = _run("phase7_100m", 0, [(10, 100, 1.0, 2.0), (20, 200, 2.0, 1.2), (30, 300, 3.0, 1.6)])
    run["train"] = [{"step": s, "loss": 2.0 - s / 30} for s in range(1, 31)]  # steps 28-30 are the last tenth
    row = q.summarize([run], jobs=1)["rows"][0]
    assert row["val_loss_best"] == pytest.approx(1.2) and row["tokens_best"] == 200
    assert row["train_loss_end"] == pytest.approx(2.0 - (28 + 29 + 30) / 3 / 30)
    assert "| 1.2000 (@ 0.2k) | 1.0333 |" in q.markdown(q.summarize([run], jobs=1))


@pytest.mark.slow
def test_tiny_setting_trains_two_recipes_and_writes_the_report(tmp_path):
    out = tmp_path / "q"
    recipes = [str(ROOT / "recipes" / "quality" / f) for f in ("llama_100m.toml", "phase7_100m.toml")]
    diagnostics = 'callbacks=[{name="diagnostics", every=4}]'  # llama has none: says so, trains on
    proc = subprocess.run([sys.executable, str(SCRIPT), *recipes, "--setting", "tiny", "--out", str(out),
                           "--set", diagnostics, "--speed-steps", "4"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # how often the schedule reads the corpus: 8 steps x 4 x 64 tokens of 20 files
    assert re.search(r"data: data\.sources\[0\] \(python_stdlib\).*: [\d,]+ training tokens; 2,048 tokens read "
                     r"0\.\d\d epochs of it\n", proc.stdout), proc.stdout[:2000]
    data = json.loads((out / "quality.json").read_text())
    names = [r["name"] for r in data["summary"]["rows"]]
    assert names == ["llama_100m", "phase7_100m"]
    for run in data["runs"]:
        assert [v["step"] for v in run["val"]] == [4, 8]  # tiny: 8 steps, evaluation every 4
        assert all(math.isfinite(v["loss"]) and v["loss"] > 0 for v in run["val"])
        assert run["bytes_per_token"] == pytest.approx(1.0)  # byte tokens
        assert run["final_val_loss"] == run["val"][-1]["loss"]
    # --speed-steps 4: each recipe timed alone afterwards, equal wall clock at those speeds
    assert "timing each recipe alone for 4 steps" in proc.stdout
    assert sorted(data["summary"]["solo_tokens_per_s"]) == names and data["summary"]["equal_time_from"] == "solo speeds"
    assert all(v > 0 for v in data["summary"]["solo_tokens_per_s"].values())
    speeds = data["summary"]["solo_tokens_per_s"]
    assert data["summary"]["time_budget_s"] == pytest.approx(min(2048 / v for v in speeds.values()))
    fastest = max(speeds, key=speeds.get)  # its whole run is the budget: its equal-time loss is its last
    row = next(r for r in data["summary"]["rows"] if r["name"] == fastest)
    assert row["val_loss_equal_time"] == pytest.approx(row["val_loss_end"])
    md = (out / "quality.md").read_text()
    assert "| llama_100m |" in md and "| phase7_100m |" in md and "bits/byte" in md
    assert md in proc.stdout
    # the gate starts at sigmoid(2) (the default) and has moved little after 8 tiny steps
    gates = data["summary"]["gates"]
    assert list(gates) == ["phase7_100m"] and sorted(gates["phase7_100m"]) == ["4", "8"]
    assert all(abs(g - 0.8808) < 0.02 for g in gates["phase7_100m"]["4"])
    assert "Mixer gate mean per layer, phase7_100m" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "quality.png").stat().st_size > 1000
    # --report re-renders from the JSON alone
    (out / "quality.md").unlink()
    again = subprocess.run([sys.executable, str(SCRIPT), "--report", str(out / "quality.json")],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 0 and (out / "quality.md").read_text() == md


def test_missing_recipe_is_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope.toml"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "nope.toml not found" in proc.stderr
