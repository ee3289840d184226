"""A damaged token cache entry is detected when it is opened, named, and rebuilt: never
trained on, never a traceback."""

import json
import os

import numpy as np
import pytest

from phase7fw.components.tokenizers import BPEConfig, BPETokenizer, BytesTokenizer, FileConfig, FileTokenizer
from phase7fw.data.cache import cached_tokens
from phase7fw.errors import Phase7Error

DOCS = [f"document number {i}: " + "some text " * (i % 7 + 1) for i in range(200)]


def truncate(entry):
    path = entry / "tokens.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "tokens.bin is"


def zero_bytes(entry):
    (entry / "tokens.bin").write_bytes(b"")
    return "tokens.bin is 0 bytes"


def random_same_size(entry):
    path = entry / "tokens.bin"
    path.write_bytes(os.urandom(path.stat().st_size))
    return "does not match the checksum written when it was prepared"


def corrupt_meta(entry):
    (entry / "meta.json").write_text('{"dtype": "<u2", "n_tok')
    return "meta.json is not valid JSON"


def binary_meta(entry):
    (entry / "meta.json").write_bytes(b"\xff\xfe\x00garbage")
    return "meta.json is not valid JSON"


def wrong_count(entry):
    meta = json.loads((entry / "meta.json").read_text())
    meta["n_tokens"] += 1000
    (entry / "meta.json").write_text(json.dumps(meta))
    return "truncated or replaced"


def missing_index(entry):
    (entry / "index.npy").unlink()
    return "index.npy is missing"


def missing_meta(entry):
    (entry / "meta.json").unlink()
    return "meta.json is missing"


def bad_index(entry):
    np.save(entry / "index.npy", np.arange(3, dtype=np.int64))
    return "index.npy does not describe"


DAMAGE = [truncate, zero_bytes, random_same_size, corrupt_meta, binary_meta, wrong_count, missing_index,
          missing_meta, bad_index]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_a_damaged_entry_is_named_and_rebuilt(tmp_path, damage):
    first = cached_tokens("src", {"name": "t"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    original, entry = np.array(first.tokens), first.path
    del first
    expected = damage(entry)
    again = cached_tokens("src", {"name": "t"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    assert again.status.startswith("rebuilt (the cached entry was damaged: ")
    assert expected in again.status and str(entry) in again.status
    assert np.array_equal(np.asarray(again.tokens), original)  # the same data again
    healthy = cached_tokens("src", {"name": "t"}, iter(()), BytesTokenizer(), tmp_path, workers=1)
    assert healthy.status == "cached"  # and the rebuilt entry is used from then on
    assert not [p for p in (tmp_path / "tokens").iterdir() if p.name.startswith(".")]  # nothing left aside


def test_an_old_entry_without_a_checksum_is_still_range_checked(tmp_path):
    first = cached_tokens("src", {"name": "t"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    entry = first.path
    meta = json.loads((entry / "meta.json").read_text())
    del meta["sample_sha256"]  # written by an earlier phase7fw
    (entry / "meta.json").write_text(json.dumps(meta))
    assert cached_tokens("src", {"name": "t"}, iter(()), BytesTokenizer(), tmp_path, workers=1).status == "cached"
    (entry / "tokens.bin").write_bytes(np.full(meta["n_tokens"], 9999, dtype=np.uint16).tobytes())
    again = cached_tokens("src", {"name": "t"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    assert "holds token id 9999, outside the vocabulary (257)" in again.status


def test_a_damaged_cached_bpe_tokenizer_is_trained_again(tmp_path):
    pytest.importorskip("tokenizers")
    config = BPEConfig(vocab_size=300, sample_chars=10_000)
    tok = BPETokenizer(config, str(tmp_path))
    tok.prepare(DOCS)
    fingerprint, path = tok.fingerprint(), tok.path
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff binary garbage")
    again = BPETokenizer(config, str(tmp_path))
    again.prepare(DOCS)
    assert "the cached file was damaged" in again.status and "not UTF-8" in again.status
    assert again.fingerprint() == fingerprint  # the same tokenizer again
    assert path.read_text(encoding="utf-8").startswith("{")


def test_a_non_utf8_tokenizer_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b"{\"model\": \xff\xfe}")
    with pytest.raises(Phase7Error, match=f"{bad} is not a tokenizer.json: not UTF-8 text"):
        FileTokenizer(FileConfig(path=str(bad)))


def test_a_full_disk_while_tokenizing_is_one_message_and_leaves_no_partial_entry(tmp_path, monkeypatch):
    import errno

    import phase7fw.data.cache as data_cache
    from phase7fw.fileio import DiskError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_cache.np, "save", full)
    with pytest.raises(DiskError, match=r"no space left on .* while writing .*/tokens/src-"):
        cached_tokens("src", {"name": "src"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    assert list((tmp_path / "tokens").iterdir()) == []
