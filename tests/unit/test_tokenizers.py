"""Tokenizers: bpe (trained once on the mix, cached, reused), file (any tokenizer.json), bytes."""

from __future__ import annotations

import numpy as np
import pytest

from phase7fw.components.tokenizers import (
    BPEConfig,
    BPETokenizer,
    BytesTokenizer,
    FileConfig,
    FileTokenizer,
    build_bpe,
    build_file,
)
from phase7fw.errors import Phase7Error

tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i, 'héllo wörld ✓')\n",
] * 20
TEXT = "def main():\n    print('round trip: ünïcode ✓ 🙂')\n"


class Sample(list):
    """What the engine hands to prepare(): an iterable with an identity (see phase7fw.data.mixture.TextSample)."""

    identity = "sample-1"
    empty = False


def test_bpe_vocab_is_known_before_training():
    tok = build_bpe(BPEConfig(vocab_size=1000), cache_dir=None, state=None)  # what build_model(meta) does
    assert tok.vocab_size == 1000 and tok.eos_id == 0
    assert tok.fingerprint() == "bpe-untrained-1000"
    with pytest.raises(Phase7Error, match="not trained yet"):
        tok.encode("x")


def test_bpe_trains_once_then_reuses_the_cached_file(tmp_path):
    before = BPETokenizer.trainings
    tok = BPETokenizer(BPEConfig(vocab_size=600), tmp_path)
    tok.prepare(Sample(CORPUS))
    assert BPETokenizer.trainings == before + 1
    assert tok.path.parent == tmp_path / "tokenizers" and tok.path.is_file()
    mtime = tok.path.stat().st_mtime_ns
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == 600 and max(ids) < 600  # a smaller trained vocab leaves the top ids unused

    again = BPETokenizer(BPEConfig(vocab_size=600), tmp_path)
    again.prepare(Sample([]))  # same identity: loaded, the (here empty) texts are not used
    assert BPETokenizer.trainings == before + 1 and tok.path.stat().st_mtime_ns == mtime
    assert again.status.startswith("loaded from") and again.encode(TEXT) == ids
    assert again.fingerprint() == tok.fingerprint()

    other = Sample(CORPUS)
    other.identity = "sample-2"
    third = BPETokenizer(BPEConfig(vocab_size=600), tmp_path)
    third.prepare(other)  # another data mix: its own tokenizer file
    assert BPETokenizer.trainings == before + 2 and third.path != tok.path


def test_bpe_fingerprint_is_stable_and_changes_with_the_ids(tmp_path):
    a = BPETokenizer(BPEConfig(vocab_size=600), None)
    a.prepare(list(CORPUS))
    b = BPETokenizer(BPEConfig(vocab_size=600), None)
    b.prepare(list(CORPUS))
    assert a.fingerprint() == b.fingerprint()  # training is deterministic
    c = BPETokenizer(BPEConfig(vocab_size=700), None)
    c.prepare(list(CORPUS))
    assert c.fingerprint() != a.fingerprint()


def test_bpe_state_rebuilds_without_data_or_cache(tmp_path):
    tok = BPETokenizer(BPEConfig(vocab_size=600), tmp_path)
    tok.prepare(Sample(CORPUS))
    state = tok.state()
    assert isinstance(state["json"], str)
    rebuilt = build_bpe(BPEConfig(vocab_size=600), cache_dir=None, state=state)
    assert rebuilt.encode(TEXT) == tok.encode(TEXT) and rebuilt.fingerprint() == tok.fingerprint()
    rebuilt.prepare(_ExplodingTexts())  # already has its vocabulary: nothing to train
    with pytest.raises(Phase7Error, match="vocab_size 600, the recipe says data.tokenizer.vocab_size = 800"):
        build_bpe(BPEConfig(vocab_size=800), cache_dir=None, state=state)


class _ExplodingTexts:
    identity = "x"

    def __iter__(self):
        raise AssertionError("texts read")


def test_bpe_eos_is_a_special_token_and_arrays_match(tmp_path):
    tok = BPETokenizer(BPEConfig(vocab_size=600), tmp_path)
    tok.prepare(Sample(CORPUS))
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    assert np.array_equal(tok.encode_array(TEXT), np.asarray(tok.encode(TEXT)))
    assert tok.decode(tok.encode(TEXT) + [tok.eos_id, 599]) == TEXT  # EOS and unused ids decode to nothing


def _tokenizer_json(tmp_path, special=("<|endoftext|>",)):
    tk = tokenizers
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=400, special_tokens=list(special),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_file_tokenizer_loads_a_tokenizer_json(tmp_path):
    path = _tokenizer_json(tmp_path, special=("<pad>", "<|endoftext|>"))
    tok = build_file(FileConfig(path=str(path)), cache_dir=str(tmp_path), state=None)
    assert tok.eos_id == 1 and tok.vocab_size == tokenizers.Tokenizer.from_file(str(path)).get_vocab_size()
    assert tok.decode(tok.encode(TEXT)) == TEXT
    rebuilt = build_file(FileConfig(path="/gone/tokenizer.json"), state=tok.state())  # the file is not needed
    assert rebuilt.encode(TEXT) == tok.encode(TEXT) and rebuilt.fingerprint() == tok.fingerprint()
    custom = FileTokenizer(FileConfig(path=str(path), eos_token="<pad>"))
    assert custom.eos_id == 0 and custom.fingerprint() != tok.fingerprint()


def test_file_tokenizer_errors(tmp_path):
    path = _tokenizer_json(tmp_path, special=("[SEP]", "[PAD]"))
    with pytest.raises(Phase7Error, match=r"no end-of-document token '<\|endoftext\|>' \(its special tokens are"
                                          r" '\[SEP\]', '\[PAD\]'\); choose one with data.tokenizer.eos_token"):
        FileTokenizer(FileConfig(path=str(path)))
    assert FileTokenizer(FileConfig(path=str(path), eos_token="[SEP]")).eos_id == 0
    with pytest.raises(Phase7Error, match="no such file"):
        FileTokenizer(FileConfig(path=str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(Phase7Error, match="is not a valid tokenizer.json"):
        FileTokenizer(FileConfig(path=str(bad)))


def test_bytes_tokenizer_unchanged():
    tok = BytesTokenizer()
    assert tok.decode(tok.encode(TEXT)) == TEXT and tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.fingerprint() == "bytes-v1"
