"""phase7fw bench on the CPU: the report, the JSON, FLOP counts, the max-params search, errors."""

import json

import pytest

from phase7fw import build_model, load_recipe
from phase7fw.cli.benchmark import search_max
from phase7fw.cli import main
from tests.conftest import RECIPES

P7 = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.attention.window=8",
      "model.ssm.n_heads=2", "model.ssm.chunk_size=8"]
LLAMA = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_hidden=64"]


def sets(flag, items):
    return [a for item in items for a in (flag, item)]


def test_cpu_bench_with_compare_and_generate_writes_json(tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    argv = ["bench", str(RECIPES / "phase7_tiny.toml"), *sets("--set", P7), "--batch-size", "2", "--steps", "2",
            "--warmup", "1", "--compare", str(RECIPES / "llama_tiny.toml"), *sets("--compare-set", LLAMA),
            "--generate", "--gen-tokens", "4", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "[dynamic-cache]" in text
    assert "CPU numbers" in text and "tokens/s" in text and "MFU" in text and "ratio tokens_per_s" in text
    data = json.loads(out.read_text())
    assert data["environment"]["cpu"] is True and data["environment"]["torch"]
    assert {"environment", "gemm", "runs", "compare", "peak_tflops", "memory_cap_gib"} <= set(data)
    p7, llama = data["runs"]
    assert (p7["model"], llama["model"]) == ("phase7", "llama")
    keys = {"tokens_per_s", "step_time_s", "split_s", "mfu", "mfu_vs_gemm", "flops_per_token", "peak_memory_gib",
            "sdpa_backend", "attention", "params", "matmul_params", "generate", "batch_size", "seq_len"}
    for run in (p7, llama):
        assert keys <= set(run) and not run["oom"]
        assert run["batch_size"] == 2 and run["tokens_per_s"] > 0 and run["peak_memory_gib"] is None
        assert set(run["split_s"]) == {"data", "forward", "backward", "optimizer"}
        assert all(v > 0 for v in run["split_s"].values())
        assert sum(run["split_s"].values()) <= run["step_time_s"] * 1.05
        assert run["generate"]["tokens_per_s"] > 0 and run["generate"]["cache"] is True
        assert (run["generate"]["cuda_graph"], run["generate"]["path"]) == ("auto", "dynamic-cache")  # default, CPU
    assert (p7["attention"], llama["attention"]) == ("hyperbolic", "sdpa")
    assert data["compare"]["tokens_per_s"] == pytest.approx(p7["tokens_per_s"] / llama["tokens_per_s"])


def test_cpu_bench_decodes_with_int8_weights(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", str(RECIPES / "llama_tiny.toml"), *sets("--set", LLAMA), "--steps", "1", "--warmup", "0",
            "--generate", "--gen-tokens", "4", "--int8", "--json", str(out)]
    assert main(argv) == 0
    assert "[dynamic-cache, int8 weights]" in capsys.readouterr().out
    gen = json.loads(out.read_text())["runs"][0]["generate"]
    assert gen["int8"] is True and gen["tokens_per_s"] > 0


def test_cpu_bench_profile_writes_trace_and_ops_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", str(RECIPES / "llama_tiny.toml"), *sets("--set", LLAMA), "--batch-size", "2", "--steps", "1",
            "--warmup", "0", "--profile", str(tmp_path / "prof"), "--json", str(out)]
    assert main(argv) == 0
    assert "aten ops/step; top: " in capsys.readouterr().out
    prof = json.loads(out.read_text())["runs"][0]["profile"]
    assert prof["steps"] == 2 and prof["aten_ops_per_step"] > 10
    trace = json.loads((tmp_path / "prof" / "llama_llama_tiny.trace.json").read_text())
    assert trace["traceEvents"]
    table = (tmp_path / "prof" / "llama_llama_tiny.ops.txt").read_text().splitlines()
    assert table[0].startswith("op") and "self CPU ms/step" in table[0] and len(table) > 5
    top = [row["self_ms_per_step"] for row in prof["top"]]
    assert top == sorted(top, reverse=True) and any(row["op"].startswith("aten::") for row in prof["top"])


def test_cpu_bench_repeat_times_windows_and_reports_their_spread(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", str(RECIPES / "llama_tiny.toml"), *sets("--set", LLAMA), "--batch-size", "2", "--steps", "2",
            "--warmup", "1", "--repeat", "3", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    run = json.loads(out.read_text())["runs"][0]
    rates = run["tokens_per_s_windows"]
    assert run["repeat"] == 3 and len(rates) == 3 and all(r > 0 for r in rates)
    # the mean rate is total tokens over total time: between the slowest and the fastest window
    assert min(rates) <= run["tokens_per_s"] <= max(rates)
    assert run["tokens_per_s_spread"] == pytest.approx((max(rates) - min(rates)) / run["tokens_per_s"])
    assert 3 * 2 * 2 * 32 / run["tokens_per_s"] == pytest.approx(run["step_time_s"] * 6)  # 6 steps of 2 x 32 tokens
    assert "| 3 x 2 steps after 1 warm-up" in text
    assert f"spread {100 * run['tokens_per_s_spread']:.1f}%" in text


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps"),
    (["--repeat", "0"], "--repeat"),
    (["--max-params"], "--max-params needs --memory-cap-gib"),
    (["--memory-cap-gib", "8"], "needs a CUDA device"),
    (["--generate", "--cuda-graph", "on"], "--cuda-graph on needs a CUDA device"),
    (["--generate", "--compile-step"], "--compile-step compiles the decode step that a CUDA graph captures"),
    (["--compile-step"], "--compile-step compiles the decode step: it needs --generate"),
    (["--int8"], "--int8 quantizes the weights for decoding: it needs --generate"),
    (["--compare", "nope.toml"], "nope.toml"),
    (["--set", "train.batch_size=0"], "train.batch_size: must be > 0"),
])
def test_bench_bad_arguments_exit_2(args, message, capsys):
    assert main(["bench", str(RECIPES / "llama_tiny.toml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_flops_per_token_follows_performance_md():
    llama = build_model(load_recipe(RECIPES / "llama_1.5b.toml"), "meta")
    f = llama.flops_per_token(1024)
    assert f["total"] == 6 * llama.matmul_params() + 12 * 24 * 1024 * 2048
    p7 = build_model(load_recipe(RECIPES / "phase7_1.5b.toml"), "meta")
    f = p7.flops_per_token(1024)
    assert f["attention"] == 12 * 24 * 256 * 2048  # T_eff = the window
    assert f["ssm"] == 12 * 16 * 2048 * 24  # 12 r d_inner per layer
    assert f["total"] == 6 * p7.matmul_params() + f["attention"] + f["ssm"]


def test_search_max_finds_the_largest_fitting_size():
    for limit, start in ((37, 24), (5, 24), (100, 1), (0, 8), (512, 24)):
        best, trials = search_max(lambda n: n <= limit, start, upper=512)
        assert best == limit
        assert len(trials) <= 2 * 10  # logarithmic
