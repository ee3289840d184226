"""phase7fw eval --tasks: lm-evaluation-harness on tiny local tasks, no network."""

import json
import math
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F

from phase7fw import Engine
from phase7fw.inference.lm_harness import continuation_logprob, rolling_logprob, split_context
from tests.conftest import RECIPES, run_cli

pytestmark = pytest.mark.skipif(find_spec("lm_eval") is None, reason="needs the eval extra: pip install 'phase7fw[eval]'")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

QUESTIONS = [
    {"question": "def add(a, b):\n    return a", "choices": [" + b", " - b", " * b"], "answer": 0},
    {"question": "import os\nprint(os.path.", "choices": ["join('a', 'b'))", "nothing", "))))"], "answer": 0},
    {"question": "for i in range(", "choices": ["10):", "ten):"], "answer": 0},
]
TEXTS = [{"text": "def main():\n    print('hello world')\n" * 3}, {"text": "x = 1\n"}]


def _tasks(folder):
    folder.mkdir()
    (folder / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TEXTS))

    def task(name, data, body):
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\n"
            f"test_split: test\n{body}")

    task("p7_mc", "mc.jsonl", "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
         "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    task("p7_ppl", "texts.jsonl", "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
         "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    task("p7_gen", "mc.jsonl", "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
         "doc_to_target: \"{{choices[answer]}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n"
         "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm_eval")
    out = {}
    for recipe, extra in (("llama_tiny.toml", {"model.seq_len": 32}), ("phase7_tiny.toml", {"model.seq_len": 32})):
        over = {"run.output_dir": str(base / recipe), "train.max_steps": 2, "train.batch_size": 2,
                "train.eval_every": 0, "train.save_every": 0, "train.eval_batches": 1,
                "data.sources": [{"name": "python_stdlib", "max_files": 20}], **extra}
        engine = Engine.from_recipe(RECIPES / recipe, over, quiet=True)
        out[engine.model_name] = engine.fit()["final_checkpoint"]
    return out


def _direct(engine, ids):
    """log p of every token after the first, from one plain forward (no cache)."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids[:-1]]))[0].float()
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("kind", ["llama", "phase7"])
def test_harness_loglikelihoods_equal_the_engine(checkpoints, tmp_path, monkeypatch, kind):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    from phase7fw.inference.lm_harness import run_tasks

    engine = Engine.from_checkpoint(checkpoints[kind])
    folder = _tasks(tmp_path / "tasks")
    out = tmp_path / "results.json"
    results = run_tasks(engine, ["p7_mc", "p7_ppl", "p7_gen"], include_paths=[str(folder)], output=out,
                        log_samples=True)
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"p7_mc", "p7_ppl", "p7_gen"} and saved["phase7fw"]["step"] == 2
    tok = engine.tokenizer

    # multiple choice: each (context, choice) log-likelihood = the engine's own, from a plain forward
    for sample in results["samples"]["p7_mc"]:
        q = QUESTIONS[sample["doc_id"]]
        assert len(sample["arguments"]) == len(q["choices"])
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            assert context == q["question"]
            ctx, cont = split_context(tok, context, continuation)
            assert ctx == [tok.eos_id] + tok.encode(context) and tok.decode(cont) == continuation
            ids = ctx + cont
            if kind == "llama":  # context limit seq_len: the last seq_len tokens predict the rest
                ids = ids[-(engine.seq_len + 1):]
            expected = float(_direct(engine, ids)[-len(cont):].sum())
            assert resp[0][0] == pytest.approx(expected, abs=1e-4)
            assert resp[0][0] == pytest.approx(continuation_logprob(engine, ctx, cont)[0], abs=1e-6)

    # rolling: the whole text after the document-start token; for llama past seq_len in windows
    for sample in results["samples"]["p7_ppl"]:
        ids = tok.encode(TEXTS[sample["doc_id"]]["text"])
        if len(ids) < engine.seq_len:
            expected = float(_direct(engine, [tok.eos_id] + ids).sum())
            assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-4)
        elif kind == "phase7":  # no context limit: one pass, the cache carries the state
            expected = float(_direct(engine, [tok.eos_id] + ids).sum())
            assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-3)
        assert sample["resps"][0][0] == pytest.approx(rolling_logprob(engine, ids), abs=1e-6)
    n_bytes = sum(len(t["text"].encode()) for t in TEXTS)
    total = sum(rolling_logprob(engine, tok.encode(t["text"])) for t in TEXTS)
    assert results["results"]["p7_ppl"]["bits_per_byte,none"] == pytest.approx(-total / math.log(2) / n_bytes,
                                                                               rel=1e-6)

    # generation: the engine's greedy text, stopped at the newline
    for sample in results["samples"]["p7_gen"]:
        q = QUESTIONS[sample["doc_id"]]
        assert sample["resps"][0][0] == engine.generate(q["question"], max_new_tokens=6, temperature=0.0,
                                                        stop=["\n"])


def test_registry_tasks_offline_say_which_dataset(tmp_path, monkeypatch):
    for k, v in {**OFFLINE, "HF_HOME": str(tmp_path / "hf-home")}.items():  # an empty datasets cache
        monkeypatch.setenv(k, v)
    from phase7fw.errors import Phase7Error
    from phase7fw.inference.lm_harness import load_tasks

    with pytest.raises(Phase7Error, match=r"task 'arc_easy': could not reach dataset 'allenai/ai2_arc' \(no network"):
        load_tasks(["arc_easy"], [])
    with pytest.raises(Phase7Error, match=r"unknown lm-eval task 'arc_eazy'; did you mean arc_easy"):
        load_tasks(["arc_eazy"], [])
    assert not (tmp_path / "hf-home" / "hub").exists()  # nothing was downloaded


def test_eval_cli_on_a_local_task_writes_results(checkpoints, tmp_path):
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf-home")}
    folder = _tasks(tmp_path / "tasks")
    out = tmp_path / "r.json"
    proc = run_cli("eval", checkpoints["phase7"], "--tasks", "p7_mc", "--include-path", folder, "--output", out,
                   env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "p7_mc" in proc.stdout and f"wrote {out}" in proc.stdout
    assert 0.0 <= json.loads(out.read_text())["results"]["p7_mc"]["acc,none"] <= 1.0
    proc = run_cli("eval", checkpoints["phase7"], "--tasks", "p7_mc", "--include-path", tmp_path / "nope", env=env)
    assert proc.returncode == 2 and "--include-path: no such folder" in proc.stderr
