"""Bits per byte: recorded byte counts, per-batch bytes, and the value next to every val loss."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from phase7fw import Engine
from phase7fw.core.console import bits_per_byte, val_line
from tests.conftest import RECIPES, tiny_overrides

# Multi-byte characters, so bytes, characters and byte-tokenizer tokens all differ.
DOC = "def grüß(x):\n    return '✓ naïve ∑ café' * x  # ünïcödé\n" * 40


def test_formula():
    assert bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 300, 600) == pytest.approx(2.0 / math.log(2) * 0.5)
    assert bits_per_byte(2.0, 300, None) is None
    assert val_line(7, 1.0, 1.5) == "Val       7 | Loss: 1.0000 | PPL: 2.72 | BPB: 1.5000"
    assert val_line(7, 1.0) == "Val       7 | Loss: 1.0000 | PPL: 2.72"


def _engine(tmp_path, quiet=True, **extra):
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    for i in range(6):
        if not (docs / f"{i}.txt").exists():  # rewriting would change the cache key (mtimes)
            (docs / f"{i}.txt").write_text(DOC, encoding="utf-8")
    over = tiny_overrides(tmp_path, **{"data.sources": [{"name": "text_files", "paths": [str(docs / "*.txt")]}],
                                       "data.val_fraction": 0.2, "train.eval_batches": 3, **extra})
    return Engine.from_recipe(RECIPES / "llama_tiny.toml", over, quiet=quiet)


def test_bits_per_byte_on_a_known_text(tmp_path):
    engine = _engine(tmp_path)
    source = engine.sources[0]
    n_bytes = 6 * len(DOC.encode("utf-8"))
    assert source.info["n_bytes"] == n_bytes
    n_tokens = 6 * (len(DOC.encode("utf-8")) + 1)  # byte tokenizer: one token a byte, one EOS a document
    assert source.info["n_tokens"] == n_tokens
    assert source.bytes_per_token == pytest.approx(n_bytes / n_tokens)

    metrics = engine.evaluate()
    # The loss, recomputed here from the model and the validation batches.
    losses = []
    with torch.no_grad():
        for i in range(3):
            x, y = engine.val_sampler.batch(i)
            losses.append(F.cross_entropy(engine.model(x).flatten(0, 1), y.flatten()).item())
    loss = sum(losses) / 3
    tokens = 3 * engine.val_sampler.batch_size * engine.seq_len
    text_bytes = tokens * n_bytes / n_tokens
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["tokens"] == tokens
    assert metrics["bpb"] == pytest.approx(loss / math.log(2) * tokens / text_bytes, rel=1e-5)


def test_bpb_is_logged_printed_and_kept_in_checkpoints(tmp_path, capsys):
    engine = _engine(tmp_path, quiet=False, **{"train.max_steps": 3, "train.eval_every": 0, "train.save_every": 0})
    summary = engine.fit()
    out = capsys.readouterr().out
    val_lines = [line for line in out.splitlines() if line.startswith("Val")]
    assert val_lines and " | BPB: " in val_lines[-1]
    rows = [json.loads(r) for r in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"][-1]
    assert val["bpb"] == pytest.approx(bits_per_byte(val["loss"], 1, engine.sources[0].bytes_per_token))
    assert summary["best_val_bpb"] == val["bpb"] and summary["final_val_bpb"] == val["bpb"]
    reloaded = Engine.from_checkpoint(tmp_path / "run" / "llama_final.pt")
    assert reloaded.best_val_bpb == val["bpb"] and reloaded.last_val["bpb"] == val["bpb"]


def test_old_cache_entries_get_their_byte_count(tmp_path):
    _engine(tmp_path)
    import os
    from pathlib import Path

    metas = (Path(os.environ["PHASE7FW_CACHE_DIR"]) / "tokens").glob("text_files-*/meta.json")
    meta_path = next(p for p in metas if str(tmp_path) in json.dumps(json.loads(p.read_text())["source"]))
    meta = json.loads(meta_path.read_text())
    del meta["n_bytes"]  # as written by a phase7fw before bits per byte
    meta_path.write_text(json.dumps(meta))
    engine = _engine(tmp_path)
    assert engine.sources[0].info["status"] == "cached"
    assert engine.sources[0].info["n_bytes"] == 6 * len(DOC.encode("utf-8"))
    assert json.loads(meta_path.read_text())["n_bytes"] == 6 * len(DOC.encode("utf-8"))
