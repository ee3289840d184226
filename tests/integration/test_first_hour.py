"""The first hour of a new user on a CPU-only machine: no silent wait, no silent fresh start,
no misleading number (issue 20). Each test follows what a user types."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import RECIPES, ROOT, run_cli, tiny_overrides

PHASE7 = RECIPES / "phase7_tiny.toml"
LLAMA = RECIPES / "llama_tiny.toml"
# phase7_tiny at a few seconds per run, with a curvature schedule that moves every step
P7_SMALL = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
            "--set", "model.seq_len=32", "--set", "model.attention.window=16", "--set", "model.ssm.n_heads=2",
            "--set", "model.ssm.chunk_size=8", "--set", "model.embedding.rank=4", "--set", "train.batch_size=2",
            "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.save_every=0",
            "--set", "train.eval_batches=2", "--set", "curvature_scheduler.warmup_steps=5",
            "--set", 'data.sources=[{name = "python_stdlib", max_files = 5}]']


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def snapshot(folder) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- item 1
def run_measured(*args):
    """The CLI in a child process that reports its own peak memory (ru_maxrss, KiB)."""
    code = ("import resource, sys\nfrom phase7fw.cli import main\nrc = main(sys.argv[1:])\n"
            "print(f'maxrss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
            "sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    rss = int(proc.stderr.rsplit("maxrss_kib=", 1)[1].split()[0]) * 1024
    proc.stderr = proc.stderr.rsplit("maxrss_kib=", 1)[0]
    return proc, time.perf_counter() - t0, rss


def test_gpu_sized_recipe_on_a_cpu_stops_at_once_without_allocating(tmp_path):
    # make train-phase7-1.5b-test on a machine without a GPU
    out = tmp_path / "run"
    proc, seconds, rss = run_measured("run", RECIPES / "phase7_1.5b.toml", "--dummy-data", "--set",
                                      "train.max_steps=20", "--set", f"run.output_dir={out}", "--resume", "never")
    assert_clean_error(proc, "run 'phase7_1.5b' is GPU-sized (1.51B parameters", "one step needs at least",
                       "phase7fw run recipes/phase7_quickstart.toml", "--allow-cpu")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert rss < 1.5 * 2**30, f"{rss / 2**30:.2f} GiB: the 1.5B model (3 GiB in bf16) was allocated"
    assert seconds < 60 and not out.exists()  # nothing written either
    # bench (make bench-phase7-1.5b) stops the same way
    proc = run_cli("bench", RECIPES / "phase7_1.5b_standard.toml", "--steps", "1", "--warmup", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: run 'phase7_1.5b_standard' is GPU-sized" in proc.stderr and "--allow-cpu" in proc.stderr


def test_batch_size_beyond_memory_stops_before_the_sampler_hangs(tmp_path):
    args = ["run", LLAMA, "--dummy-data", "--set", "train.batch_size=1000000000", "--set", f"run.output_dir={tmp_path}/run"]
    proc, seconds, rss = run_measured(*args)
    assert_clean_error(proc, "run 'llama_tiny' is GPU-sized", "batch 1000000000 x accum 1", "GiB of memory")
    assert seconds < 60 and rss < 1.5 * 2**30
    # insisting on the CPU does not get past the memory plan
    proc, seconds, rss = run_measured(*args, "--allow-cpu")
    assert_clean_error(proc, "run 'llama_tiny' needs about", "GiB of host memory", "batch 1000000000 x accum 1",
                       "lower train.batch_size")
    assert seconds < 60 and rss < 1.5 * 2**30


def test_allow_cpu_lets_a_slow_recipe_build(tmp_path, monkeypatch):
    from phase7fw import Engine
    from phase7fw.core import preflight

    # a tiny recipe made "GPU-sized" by lowering the limit: the same check, no big allocation
    monkeypatch.setattr(preflight, "CPU_STEP_LIMIT_S", 1e-12)
    with pytest.raises(preflight.ResourceError, match="is GPU-sized") as info:
        Engine.from_recipe(LLAMA, tiny_overrides(tmp_path), quiet=True, device="cpu")
    assert info.value.kind == "speed" and info.value.exit_code == 2
    engine = Engine.from_recipe(LLAMA, tiny_overrides(tmp_path), quiet=True, device="cpu", allow_cpu=True)
    assert engine.machine["min_step_s"] > 0 and engine.machine["cpu_flops"] > 1e8


def ctrl_c_during_call(n: int, loss_fn):
    """``loss_fn`` whose n-th call (step n) would take a minute, with Ctrl-C coming 0.3 s into it."""
    calls = 0

    def slow(x, y):
        nonlocal calls
        calls += 1
        if calls == n:
            threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            for _ in range(600):
                time.sleep(0.1)
        return loss_fn(x, y)

    return slow


def test_ctrl_c_in_a_long_first_step_stops_at_once(tmp_path, capsys):
    from phase7fw import Engine

    engine = Engine.from_recipe(LLAMA, tiny_overrides(tmp_path, **{"train.max_steps": 3}), quiet=False)
    engine._loss_fn = ctrl_c_during_call(1, engine._loss_fn)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        engine.fit()
    assert time.perf_counter() - t0 < 10  # one Ctrl-C, no minute-long wait
    assert "during the first step (step 1): nothing new to save" in capsys.readouterr().out
    assert not list((tmp_path / "run").glob("*.pt"))  # the start has nothing to save


def test_ctrl_c_in_a_long_later_step_saves_the_step_before_and_resumes_exactly(tmp_path, monkeypatch):
    import phase7fw.core.trainer
    from phase7fw import Engine

    monkeypatch.setattr(phase7fw.core.trainer, "ROLLBACK_AFTER_S", -1.0)  # every step counts as long
    over = tiny_overrides(tmp_path, **{"train.max_steps": 5, "train.eval_every": 0, "train.save_every": 0})

    def train_losses(folder):
        rows = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["split"] == "train"]

    Engine.from_recipe(LLAMA, {**over, "run.output_dir": str(tmp_path / "ref")}, quiet=True).fit()
    engine = Engine.from_recipe(LLAMA, over, quiet=True)
    engine._loss_fn = ctrl_c_during_call(3, engine._loss_fn)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        engine.fit()
    assert time.perf_counter() - t0 < 30
    assert [p.name for p in (tmp_path / "run").glob("*.pt")] == ["llama_step_2.pt"]
    resumed = Engine.from_recipe(LLAMA, over, quiet=True)  # --resume auto
    assert resumed.step == 2
    resumed.fit()
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "ref")  # the dropped step, redone exactly


# ----------------------------------------------------------------------------- items 2 and 3
def test_resume_latest_with_nothing_to_resume_is_an_error(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("run", LLAMA, "--resume", "latest", "--set", f"run.output_dir={out}")
    assert_clean_error(proc, f"--resume latest: {out} holds no checkpoint to resume")
    assert not out.exists()
    # the make target resumes with "latest" unless CHECKPOINT= names a file
    dry = subprocess.run(["make", "-n", "train-phase7-1.5b-resume"], cwd=ROOT, capture_output=True, text=True)
    assert "--resume latest" in dry.stdout


def test_a_finished_run_run_again_trains_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    args = ["run", LLAMA, "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
            "--set", "model.seq_len=32", "--set", "model.ffn_hidden=64", "--set", "train.batch_size=2",
            "--set", "train.max_steps=2", "--set", 'data.sources=[{name = "python_stdlib", max_files = 5}]',
            "--set", f"run.output_dir={out}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert f"{out}: already complete at step 2 (train.max_steps = 2)" in again.stdout
    assert "raise train.max_steps to continue" in again.stdout.lower() and "nan" not in again.stdout
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- item 7
def test_eval_gives_the_runs_own_val_number(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("run", PHASE7, *P7_SMALL, "--set", "train.max_steps=3", "--set", f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    val = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    [val] = [r for r in val if r["split"] == "val"]
    ev = run_cli("eval", out / "phase7_final.pt", "--json")
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout.splitlines()[-1])
    assert got["step"] == 3 and got["loss"] == val["loss"]  # same weights, batches, curvature, precision
    # the last line labels each loss: the logged window mean and the last step are different numbers
    done = proc.stdout.strip().splitlines()[-1]
    assert "train loss" in done and "(mean of step 3)" in done and "last step's loss" in done
    assert f"val loss {val['loss']:.4f}" in done


def test_bench_on_a_cpu_prints_numbers_that_mean_something():
    proc = run_cli("bench", LLAMA, "--steps", "1", "--warmup", "0", "--set", "model.n_layers=1",
                   "--set", "model.seq_len=32", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    gemm = next(line for line in proc.stdout.splitlines() if line.startswith("measured GEMM"))
    assert "GFLOP/s" in gemm and " 0.0 " not in gemm
    mfu = next(line for line in proc.stdout.splitlines() if line.strip().startswith("MFU"))
    assert "of the measured GEMM" in mfu and "989.4" not in mfu


def test_the_kernels_line_is_printed_once(tmp_path):
    proc = run_cli("run", LLAMA, "--set", "kernels.rmsnorm=\"auto\"", "--set", "model.d_model=32",
                   "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "model.seq_len=32",
                   "--set", "model.ffn_hidden=64", "--set", "train.max_steps=1", "--dummy-data",
                   "--set", f"run.output_dir={tmp_path}/run", env={"TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    [line] = [l for l in proc.stdout.splitlines() if l.startswith("kernels:")]
    assert "rmsnorm=reference" in line and "auto:" in line  # and why "auto" chose the reference


# ----------------------------------------------------------------------------- item 8
def test_every_command_survives_a_closed_pipe(tmp_path):
    def closed_stdout(*args):
        proc = subprocess.Popen([sys.executable, "-m", "phase7fw", *map(str, args)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # the reader is gone before the first line (phase7fw ... | head -0)
        _, err = proc.communicate(timeout=300)
        return proc.returncode, err

    for args in (["components"], ["recipe", "show", LLAMA]):
        rc, err = closed_stdout(*args)
        assert rc == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    out = tmp_path / "run"
    rc, err = closed_stdout("run", LLAMA, "--set", "model.d_model=32", "--set", "model.n_layers=1",
                            "--set", "model.n_heads=2", "--set", "model.seq_len=32", "--set", "model.ffn_hidden=64",
                            "--set", "train.max_steps=2", "--dummy-data", "--set", f"run.output_dir={out}")
    assert rc == 0 and "Traceback" not in err, err
    assert (out / "llama_final.pt").exists()  # the run itself went on and saved


# ----------------------------------------------------------------------------- item 6
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_targets_pass_args_and_find_the_environment(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")

    def dry(*args):
        return subprocess.run(["make", "-n", *args], cwd=tmp_path, capture_output=True, text=True).stdout

    assert "python3 -m phase7fw run recipes/phase7_small.toml --set train.max_steps=50" in dry(
        "train-phase7-small", "ARGS=--set train.max_steps=50")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").write_text("")
    assert ".venv/bin/python -m phase7fw doctor" in dry("check-phase7-env")  # used even when not activated
    # a python without phase7fw: one line saying what to do
    proc = subprocess.run(["make", "check-phase7-env", "PY=python3 -S -I"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "phase7fw is not installed for python3 -S -I" in proc.stderr
    # and for real: ARGS reach the command
    proc = subprocess.run(["make", "-C", str(ROOT), "train-phase7-small", f"PY={sys.executable}",
                           f"ARGS=--dummy-data --set train.max_steps=1 --set model.d_model=32 --set model.n_layers=1"
                           f" --set model.seq_len=32 --set model.attention.window=16 --set model.ssm.chunk_size=8"
                           f" --set run.output_dir={tmp_path}/run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "steps 1 |" in proc.stdout and (tmp_path / "run" / "phase7_final.pt").exists()


def test_doctor_without_torch_says_so():
    code = "import sys; sys.modules['torch'] = None\nfrom phase7fw.cli import main\nsys.exit(main(['doctor']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_clean_error(proc, "torch is not installed", "pip install torch==2.13.0")
    assert "warning" not in proc.stderr


# ----------------------------------------------------------------------------- item 4: the README
def readme_blocks() -> list[str]:
    """The fenced bash blocks of README.md, in order (.ci/run runs the second)."""
    blocks, inside, current = [], False, []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip() == "```bash":
            inside, current = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    return blocks


def test_readme_first_command_trains_and_shows_a_sample(tmp_path):
    first = readme_blocks()[0]
    run = next(part.strip() for part in first.split("&&") if part.strip().startswith("phase7fw run "))
    recipe = run.split()[2]
    assert (ROOT / recipe).is_file()
    out = tmp_path / "quickstart"
    # the first command's recipe, for a few steps (the whole run is about two minutes on 2 cores)
    proc = run_cli("run", recipe, "--set", "train.max_steps=3", "--set", "train.log_every=1",
                   "--set", "train.eval_every=0", "--set", "train.eval_batches=1", "--set", f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Samples at step 3"))
    assert all(lines[at + i].lstrip().startswith("def ") for i in (1, 2, 3, 4))  # 4 samples of the prompt
    assert lines[-1].startswith("Done: 3 steps")
    # the README's next suggestion works on what the first command wrote
    text = (ROOT / "README.md").read_text()
    gen = text.split("Then try `", 1)[1].split("`", 1)[0]
    assert gen.startswith("phase7fw generate runs/phase7_quickstart/phase7_final.pt")
    args = gen.replace("runs/phase7_quickstart", str(out)).split()[1:]
    import shlex

    proc = run_cli(*shlex.split(" ".join(args)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lstrip().startswith("def ") and len(proc.stdout.strip()) > len("def ") + 3


# ----------------------------------------------------------------------------- item 10: the docs
def test_docs_name_only_files_that_exist():
    import re

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
    names = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    problems = []
    for doc in docs:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # markdown links
            if not target.startswith(("http://", "https://")) and not (doc.parent / target).exists():
                problems.append(f"{doc.name}: link to {target}")
        for mention in re.findall(r"[\w./-]*[A-Za-z]\w*\.md\b", text):  # files named in the text
            if mention.rsplit("/", 1)[-1] not in names:
                problems.append(f"{doc.name}: names {mention}")
    assert not problems, problems
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    assert "not in this version" not in recipes
    assert "Not yet measured on a GPU" not in (ROOT / "docs" / "performance.md").read_text()


def test_docs_wizard_example_runs_as_written(tmp_path):
    line = next(l for l in (ROOT / "docs" / "data.md").read_text().splitlines()
                if l.startswith("printf ") and "recipe new --interactive" in l)
    out = tmp_path / "mix.toml"
    command = line.replace("/tmp/mix.toml", str(out)).replace("| phase7fw ", f"| {sys.executable} -m phase7fw ")
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import tomllib

    ref = tomllib.loads(out.read_text())["extends"]
    assert (out.parent / ref).resolve() == (ROOT / "recipes" / "phase7_tiny.toml").resolve()
    assert not ref.startswith("../" * (len(out.parent.resolve().parts) - 1))  # never climbs to the root
    proc = run_cli("recipe", "validate", out, cwd=tmp_path)  # from anywhere
    assert proc.returncode == 0, proc.stderr
    # the README's wizard example runs on a fresh checkout: every file it names is shipped
    block = next(b for b in readme_blocks() if "recipe new --preset" in b)
    command = block.replace("\\\n", " ").splitlines()
    command = next(c for c in command if "recipe new --preset" in c)
    command = command.replace("--output my.toml", f"--output {tmp_path / 'my.toml'}")
    command = command.replace("phase7fw recipe new", f"{sys.executable} -m phase7fw recipe new", 1)
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {tmp_path / 'my.toml'}: valid" in proc.stdout


def test_sample_callback_prints_reproducible_one_line_samples(tmp_path, capsys):
    from phase7fw import Engine
    from phase7fw.components.sampling import Sample, SampleConfig, printable

    engine = Engine.from_recipe(LLAMA, tiny_overrides(tmp_path, **{"train.max_steps": 2}), dummy_data=True, quiet=True)
    cb = Sample(SampleConfig(prompt="x = ", count=3, stop="\n", max_new_tokens=20, seed=5))
    first, again = cb.samples(engine), cb.samples(engine)
    assert first == again and len(first) == 3  # seeds 5, 6, 7: the same samples for the same weights
    assert all(s.startswith("x = ") and "\n" not in s for s in first)
    engine.console.enabled = True
    cb.on_run_end(engine, {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Samples at step 0 (end of the run; temperature 0.5, top-k 20, seeds 5-7, one line each):"
    assert lines[1:4] == ["  " + printable(s) for s in first] and lines[4] == "-" * 40
