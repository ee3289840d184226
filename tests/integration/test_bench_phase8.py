"""benchmarks/phase8_vs_phase7.py on the CPU: the table, the JSON and Markdown files, equal
parameter counts, and a length that does not fit reported as "out of memory"."""

import json

from tests.conftest import ROOT, load_benchmark


def _script():
    return load_benchmark("phase8_vs_phase7")


def test_bench_phase8_vs_phase7_on_tiny_sizes(tmp_path, capsys, monkeypatch):
    import phase7fw.cli.benchmark

    real = phase7fw.cli.benchmark.bench_recipe

    def bench_or_oom(recipe, overrides, **kw):  # the longest length "does not fit"
        if overrides["model.seq_len"] == 64:
            return {"oom": True, "error": "CUDA out of memory. Tried to allocate 2.00 GiB"}
        return real(recipe, overrides, **kw)

    monkeypatch.setattr(phase7fw.cli.benchmark, "bench_recipe", bench_or_oom)
    out = tmp_path / "res" / "cmp"
    argv = ["--lengths", "32,64", "--tokens-per-step", "64", "--steps", "1", "--warmup", "0", "--d-model", "32",
            "--quality-tokens", "128", "--quality-seq-len", "32", "--quality-files", "5", "--out", str(out)]
    assert _script().main(argv) == 0
    text = capsys.readouterr().out
    assert "CPU run: tiny sizes" in text and "| T |" in text and "out of memory" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["environment"]["cpu"] is True and data["lengths"] == [32, 64]
    speed = {(r["model"], r["seq_len"]): r for r in data["speed"]}
    assert len(speed) == 6
    assert all(speed[m, 64]["oom"] for m in ("phase7 (window)", "phase8 (linear)", "llama (sdpa)"))
    ran = [speed[m, 32] for m in ("phase7 (window)", "phase8 (linear)", "llama (sdpa)")]
    assert all(r["tokens_per_s"] > 0 and r["batch_size"] == 2 and not r["oom"] for r in ran)
    params = [r["params"] for r in ran]
    assert max(params) / min(params) < 1.05  # equal parameter counts (llama's FFN matched)
    quality = data["quality"]
    assert [q["model"] for q in quality] == ["phase7 (window)", "phase8 (linear)", "llama (sdpa)"]
    assert all(q["tokens"] == 128 and q["val_loss"] > 0 for q in quality)
    md = out.with_suffix(".md").read_text()
    assert "out of memory" in md and "Validation loss" in md


def test_bad_lengths_are_one_message(capsys):
    assert _script().main(["--lengths", "1k,2k"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_set_overrides_reach_every_model_and_a_bad_one_is_one_message(tmp_path, capsys, monkeypatch):
    import phase7fw.cli.benchmark

    seen = {}

    def fake_bench(recipe, overrides, **kw):
        seen[recipe.name] = overrides
        return {"oom": False, "tokens_per_s": 1.0, "params": 1, "peak_memory_gib": None}

    monkeypatch.setattr(phase7fw.cli.benchmark, "bench_recipe", fake_bench)
    chunks = 'kernels.ar_ssm_scan={impl="auto", schedule="chunks"}'
    argv = ["--lengths", "32", "--tokens-per-step", "32", "--steps", "1", "--d-model", "32", "--quality-tokens", "0",
            "--out", str(tmp_path / "cmp"), "--set", chunks, "--set", "train.log_every=7"]
    assert _script().main(argv) == 0
    assert sorted(seen) == ["llama_tiny.toml", "phase7_small.toml", "phase8_small.toml"]
    for over in seen.values():
        assert over["kernels.ar_ssm_scan"] == {"impl": "auto", "schedule": "chunks"}
        assert over["train.log_every"] == 7
    capsys.readouterr()
    bad = ["--lengths", "32", "--set", 'kernels.ar_ssm_scan={impl="triton", schedule="diagonal"}']
    assert _script().main(bad) == 2
    err = capsys.readouterr().err
    assert "kernels.ar_ssm_scan.schedule: expected one of 'auto', 'rows', 'chunks', got 'diagonal'" in err
    assert "Traceback" not in err


def test_quality_runs_use_the_quality_benchmarks_corpus_on_the_gpu():
    """--quality-files 0 (the GPU default): the same non-repeating corpus as benchmarks/quality.py."""
    from phase7fw import load_recipe

    script = _script()
    gpu = load_recipe(script.RECIPES["phase8 (linear)"], {"data.sources": script.quality_sources(0)})
    common = load_recipe(ROOT / "recipes" / "quality" / "common.toml")
    assert [(s.name, s.weight, s.config) for s in gpu.data.sources] == \
        [(s.name, s.weight, s.config) for s in common.data.sources]
    assert common.data.sampling == "epochs"
    cpu = load_recipe(script.RECIPES["phase8 (linear)"], {"data.sources": script.quality_sources(5)})
    assert [(s.name, s.config.max_files) for s in cpu.data.sources] == [("python_stdlib", 5)]
