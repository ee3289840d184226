"""chat / generate / eval from checkpoints: auto-detection, the non-TTY REPL, streaming, errors."""

import json
import os
import subprocess
import sys

import pytest

from phase7fw import Engine
from phase7fw.core.checkpoint import find_checkpoint
from phase7fw.errors import Phase7Error
from tests.conftest import RECIPES, ROOT, run_cli

P7_TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 48,
           "model.attention.window": 8, "model.ssm.n_heads": 2, "model.ssm.chunk_size": 8,
           "train.batch_size": 2, "train.max_steps": 2, "train.eval_every": 0, "train.save_every": 0,
           "train.eval_batches": 2, "train.log_every": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/phase7_tiny with a trained (2 steps) phase7 checkpoint."""
    root = tmp_path_factory.mktemp("chat") / "runs"
    engine = Engine.from_recipe(RECIPES / "phase7_tiny.toml", {**P7_TINY, "run.output_dir": str(root / "p7")},
                                dummy_data=True, quiet=True)
    engine.fit()
    return root


def chat(args, text):
    return subprocess.run([sys.executable, "-m", "phase7fw", "chat", *map(str, args)], input=text, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())


# ----------------------------------------------------------------------------- auto-detection
def touch(path, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))


def test_checkpoint_detection_order(tmp_path):
    runs = tmp_path / "runs"
    touch(runs / "old" / "phase7_best.pt", 100)
    touch(runs / "new" / "phase7_step_2.pt", 200)
    touch(runs / "new" / "phase7_step_10.pt", 210)  # numeric, not lexical: 10 > 2
    touch(runs / "new" / "resolved_recipe.toml", 50)
    assert find_checkpoint(None, str(runs)) == runs / "new" / "phase7_step_10.pt"  # newest run, latest step
    touch(runs / "new" / "phase7_final.pt", 205)
    assert find_checkpoint(str(runs / "new")) == runs / "new" / "phase7_final.pt"  # final > steps
    touch(runs / "new" / "phase7_best.pt", 150)
    assert find_checkpoint(None, str(runs)) == runs / "new" / "phase7_best.pt"  # best > final
    touch(runs / "old" / "llama_step_1.pt", 300)  # "old" now holds the newest checkpoint
    assert find_checkpoint(None, str(runs)) == runs / "old" / "phase7_best.pt"
    assert find_checkpoint(str(runs / "x.pt")) == runs / "x.pt"  # a file is taken as is
    (runs / "sharded" / "llama_final.pt").mkdir(parents=True)
    assert find_checkpoint(str(runs / "sharded" / "llama_final.pt")) == runs / "sharded" / "llama_final.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(Phase7Error, match="no checkpoints"):
        find_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(Phase7Error, match="does not exist"):
        find_checkpoint(None, str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- chat REPL
def test_chat_over_a_pipe(runs):
    script = "def f():\n/set temperature 0\n/set top_k many\nreturn\n/reset\nreturn\n/bogus\n/exit\nnever answered\n"
    proc = chat(["--runs-dir", runs, "--max-new-tokens", "12", "--seed", "3"], script)
    assert proc.returncode == 0, proc.stderr
    assert "p7/phase7_best.pt" in proc.stderr.splitlines()[0]  # found the newest run, its best checkpoint
    lines = proc.stdout.split("\n")
    assert lines[1] == "temperature = 0.0"
    assert lines[3] == "(conversation reset)"
    # Greedy, same message, fresh conversation (the cache was reset): the same answer.
    assert lines[2] == lines[4]
    assert len(lines) == 6 and lines[5] == ""  # 3 answers + 2 command lines; nothing after /exit
    assert "error: top_k expects an integer, got 'many'" in proc.stderr
    assert "error: unknown command /bogus" in proc.stderr


def test_chat_session_keeps_the_transcript_in_the_context(runs):
    from phase7fw.inference.chat import ChatSession
    from phase7fw.inference.generation import SamplingParams

    engine = Engine.from_checkpoint(find_checkpoint(None, str(runs)))
    session = ChatSession(engine, SamplingParams(max_new_tokens=8, temperature=0.0))
    for i in range(8):
        session.reply(f"message number {i}")
        assert len(session.decoder.ids) <= engine.seq_len  # 48 tokens: old turns were dropped
    assert 0 < len(session.turns) < 8
    # Cached and uncached sessions give the same replies.
    plain = ChatSession(engine, SamplingParams(max_new_tokens=8, temperature=0.0), use_cache=False)
    cached = ChatSession(engine, SamplingParams(max_new_tokens=8, temperature=0.0))
    assert [plain.reply(m) for m in ("a", "bc", "d")] == [cached.reply(m) for m in ("a", "bc", "d")]


def test_chat_without_checkpoints_is_a_clean_error(tmp_path):
    proc = chat(["--runs-dir", tmp_path], "hi\n")
    assert proc.returncode == 2 and proc.stderr.startswith("error: no checkpoints") and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- generate / eval
def test_generate_streams_and_matches_the_engine(runs):
    ckpt = find_checkpoint(None, str(runs))
    proc = run_cli("generate", runs / "p7", "--prompt", "def ", "--max-new-tokens", "10", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    engine = Engine.from_checkpoint(ckpt)
    expected = engine.generate("def ", max_new_tokens=10, temperature=0.0)
    # the CLI writes the bytes as generated; reading stdout as text turns "\r" into "\n"
    assert proc.stdout == ("def " + expected + "\n").replace("\r\n", "\n").replace("\r", "\n")
    assert engine.generate("def ", max_new_tokens=10, temperature=0.0, use_cache=False) == expected
    assert engine.generate("def ", max_new_tokens=10, temperature=0.0, cuda_graph="off") == expected
    sampled = [engine.generate("x", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5) for _ in range(2)]
    assert sampled[0] == sampled[1]
    if expected:
        stop = expected[len(expected) // 2 :][:2]
        cut = engine.generate("def ", max_new_tokens=10, temperature=0.0, stop=stop)
        assert cut == expected[: expected.find(stop)]


def test_generate_bad_arguments_exit_2(runs, capsys):
    from phase7fw.cli import main

    ckpt = find_checkpoint(None, str(runs))
    for args, msg in ((["--temperature", "-1"], "temperature must be >= 0"),
                      (["--top-p", "1.5"], "top_p must be in"),
                      (["--max-new-tokens", "-3"], "max_new_tokens must be"),
                      (["--cuda-graph", "on"], "--cuda-graph on needs a CUDA device"),
                      (["--cuda-graph", "on", "--no-cache"], "cannot be combined with --no-cache"),
                      (["--compile-step"], "--compile-step compiles the decode step that a CUDA graph captures")):
        assert main(["generate", str(ckpt), "--prompt", "x", *args]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and msg in captured.err, captured.err
        assert captured.out == ""  # nothing echoed before the error
    with pytest.raises(SystemExit) as exc:  # argparse: --prompt is required
        main(["generate", str(ckpt)])
    assert exc.value.code == 2


def test_eval_a_run_folder(runs):
    proc = run_cli("eval", runs / "p7", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "phase7_best.pt (step 2): val loss" in proc.stdout
    metrics = json.loads(proc.stdout.splitlines()[-1])
    assert metrics["step"] == 2 and abs(metrics["ppl"] - 2.718281828 ** metrics["loss"]) < 1e-6 * metrics["ppl"]
