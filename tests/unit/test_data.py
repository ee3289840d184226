"""The mixture sampler, the validation split and the tokenized cache (phase7fw.data.mixture, data_cache)."""

from __future__ import annotations

import numpy as np
import pytest

import phase7fw.data.cache as data_cache
from phase7fw.components.data_sources import TextFiles, TextFilesConfig
from phase7fw.components.tokenizers import BytesTokenizer
from phase7fw.data.mixture import MixtureSampler, SourceTokens, split_tokens
from phase7fw.data.cache import cached_tokens, source_identity, token_dtype
from phase7fw.errors import Phase7Error

DOCS = [f"document number {i}: " + "x" * (i % 7) for i in range(50)]


def _sources(weights, n=5000):
    return [SourceTokens(f"s{i}", w, np.full(n, i, dtype=np.uint16), np.full(n // 10, i, dtype=np.uint16))
            for i, w in enumerate(weights)]


def test_mixing_proportions_follow_the_weights():
    weights = [1.0, 2.0, 5.0]
    sampler = MixtureSampler(_sources(weights), seq_len=8, batch_size=32, seed=1)
    counts = np.zeros(3)
    for i in range(400):
        x, _ = sampler.batch(i)
        counts += np.bincount(x[:, 0].numpy(), minlength=3)  # each source is filled with its index
    share = counts / counts.sum()
    assert np.allclose(share, np.asarray(weights) / sum(weights), atol=0.02), share


def test_sampler_resume_continues_exactly():
    def make():
        rng = np.random.default_rng(0)
        srcs = [SourceTokens(f"s{i}", w, rng.integers(0, 257, 3000).astype(np.uint16), np.zeros(0, np.uint16))
                for i, w in enumerate([1.0, 3.0])]
        return MixtureSampler(srcs, seq_len=16, batch_size=4, seed=7)

    a = make()
    first = [next(a) for _ in range(10)]
    b = make()
    for _ in range(4):
        next(b)
    state = b.state_dict()
    c = make()
    c.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(first[4:], (next(c) for _ in range(6))):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    with pytest.raises(Phase7Error, match="seed"):
        MixtureSampler(_sources([1.0]), seq_len=8, batch_size=2, seed=99).load_state_dict(state)


def test_windows_come_from_memmaps_without_copying_them(tmp_path):
    got = cached_tokens("src", {"name": "t"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    assert isinstance(got.tokens, np.memmap)
    src = split_tokens("src", 1.0, got.tokens, 0.1, 17)
    assert isinstance(src.train, np.memmap) and isinstance(src.val, np.memmap)  # views, not copies
    sampler = MixtureSampler([src], seq_len=16, batch_size=8, seed=0)
    x, y = sampler.batch(3)
    flat = np.asarray(got.tokens, dtype=np.int64)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        hits = [s for s in range(len(src.train) - 16) if np.array_equal(flat[s:s + 16], row_x)]
        assert hits and np.array_equal(flat[hits[0] + 1:hits[0] + 17], row_y)


def test_validation_split_is_the_tail_of_each_source(tmp_path):
    got = cached_tokens("src", {"name": "t"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    src = split_tokens("src", 1.0, got.tokens, 0.2, 9)
    assert len(src.val) == int(0.2 * len(got.tokens)) and len(src.train) + len(src.val) == len(got.tokens)
    assert np.array_equal(np.asarray(src.val), np.asarray(got.tokens[len(src.train):]))
    assert got.doc_ends[-1] == len(got.tokens) and src.val[-1] == BytesTokenizer.eos_id
    with pytest.raises(Phase7Error, match="too few for training windows"):
        split_tokens("src", 1.0, got.tokens[:30], 0.0, 64)
    with pytest.raises(Phase7Error, match="its validation split .* is shorter than one window"):
        split_tokens("src", 1.0, got.tokens, 0.01, 64)


def test_token_dtype_fits_the_vocabulary(tmp_path):
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32

    class Big(BytesTokenizer):
        vocab_size = 70_000

        def encode_array(self, text):
            return np.asarray([69_999] + list(text.encode()), dtype=np.int64)

        def fingerprint(self):
            return "big"

    small = cached_tokens("a", {"name": "a"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    big = cached_tokens("a", {"name": "a"}, iter(DOCS), Big(), tmp_path, workers=1)
    assert small.tokens.dtype == np.uint16 and big.tokens.dtype == np.uint32
    assert int(big.tokens.max()) == 69_999  # not wrapped
    assert (big.path / "tokens.bin").stat().st_size == 4 * len(big.tokens)


def _never():
    raise AssertionError("the cache should not read the texts again")
    yield  # pragma: no cover


def test_cache_is_reused_and_keyed_by_tokenizer(tmp_path):
    first = cached_tokens("s", {"name": "s"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    assert first.status == "prepared" and first.meta["n_docs"] == len(DOCS)
    again = cached_tokens("s", {"name": "s"}, _never(), BytesTokenizer(), tmp_path, workers=1)
    assert again.status == "cached" and again.path == first.path
    assert np.array_equal(np.asarray(again.tokens), np.asarray(first.tokens))
    other = cached_tokens("s", {"name": "s", "config": {"x": 1}}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    assert other.path != first.path


def test_parallel_tokenization_matches_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(data_cache, "CHUNK_CHARS", 100)  # many chunks, so the pool is used
    serial = cached_tokens("s", {"name": "serial"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    parallel = cached_tokens("s", {"name": "parallel"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=2)
    assert np.array_equal(np.asarray(serial.tokens), np.asarray(parallel.tokens))
    assert np.array_equal(serial.doc_ends, parallel.doc_ends)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_prepare_leaves_no_cache(tmp_path, monkeypatch, error):
    monkeypatch.setattr(data_cache, "CHUNK_CHARS", 100)

    def dying():
        yield from DOCS[:30]
        raise error("killed mid-way")

    with pytest.raises(error):
        cached_tokens("s", {"name": "s"}, dying(), BytesTokenizer(), tmp_path, workers=2)
    assert list((tmp_path / "tokens").iterdir()) == []  # neither an entry nor a temporary folder
    done = cached_tokens("s", {"name": "s"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    assert done.status == "prepared"


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    import socket

    stale = tmp_path / "tokens" / f".tmp-s-abc-{socket.gethostname()}-999999999"
    stale.mkdir(parents=True)
    (stale / "tokens.bin").write_bytes(b"half")
    cached_tokens("s", {"name": "s"}, iter(DOCS), BytesTokenizer(), tmp_path, workers=1)
    assert not stale.exists()


def test_edited_files_are_tokenized_again_and_empty_sources_fail(tmp_path):
    (tmp_path / "a.txt").write_text("first version")
    src = TextFiles(TextFilesConfig(paths=[str(tmp_path / "*.txt")]))
    ident = source_identity("text_files", {"paths": ["*.txt"]}, src)
    first = cached_tokens("t", ident, src.texts(), BytesTokenizer(), tmp_path / "c", workers=1)
    (tmp_path / "a.txt").write_text("second, longer version")
    ident2 = source_identity("text_files", {"paths": ["*.txt"]}, src)
    second = cached_tokens("t", ident2, src.texts(), BytesTokenizer(), tmp_path / "c", workers=1)
    assert second.status == "prepared" and second.path != first.path
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(Phase7Error, match="empty"):
        cached_tokens("t", source_identity("text_files", {}, src), src.texts(), BytesTokenizer(), tmp_path / "c")
    assert not [p for p in (tmp_path / "c" / "tokens").iterdir() if p.name.startswith(".tmp")]


def test_ranks_read_slices_of_the_global_batch():
    rng = np.random.default_rng(1)
    srcs = [SourceTokens(f"s{i}", w, rng.integers(0, 257, 4000).astype(np.uint16), np.zeros(0, np.uint16))
            for i, w in enumerate([1.0, 2.0])]
    one = MixtureSampler(srcs, seq_len=8, batch_size=4, seed=3)
    ranks = [MixtureSampler(srcs, seq_len=8, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for i in range(5):
        x, _ = one.batch(i)
        assert np.array_equal(x.numpy(), np.concatenate([s.batch(i)[0].numpy() for s in ranks]))
    with pytest.raises(Phase7Error, match="rank 2 is outside a world of 2"):
        MixtureSampler(srcs, seq_len=8, batch_size=2, seed=3, rank=2, world_size=2)


# ----------------------------------------------------------------------------- data.sampling = "epochs"
def _position_sources(lengths, weights):
    """Sources whose token at position p is p (mod 2**16) plus 20000 * source: a window names its start."""
    return [SourceTokens(f"s{i}", w, (np.arange(n) + 20000 * i).astype(np.uint16), np.zeros(0, np.uint16))
            for i, (n, w) in enumerate(zip(lengths, weights))]


def _starts(sampler, n_batches):
    """(source, start) of every row of the first n_batches, in draw order."""
    out = []
    for i in range(n_batches):
        x, y = sampler.batch(i)
        assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
        out += [(int(t) // 20000, int(t) % 20000) for t in x[:, 0]]
    return out


def test_epochs_use_every_window_once_before_repeating():
    seq = 16
    (src,) = _position_sources([1000], [1.0])
    sampler = MixtureSampler([src], seq_len=seq, batch_size=4, seed=5, sampling="epochs")
    n_windows = (1000 - seq - 1) // seq + 1  # 61
    starts = [s for _, s in _starts(sampler, 40)]  # 160 draws: two whole epochs and part of a third
    for epoch in (starts[:n_windows], starts[n_windows:2 * n_windows]):
        assert len(set(epoch)) == n_windows  # no window twice within an epoch
        phase = epoch[0] % seq
        assert all(s % seq == phase and s + seq + 1 <= 1000 for s in epoch)  # one grid, inside the source
    assert starts[:n_windows] != starts[n_windows:2 * n_windows]  # a new order each epoch
    # the default draws uniform offsets: windows repeat and overlap long before 61 draws
    random = [s for _, s in _starts(MixtureSampler([src], seq_len=seq, batch_size=4, seed=5), 15)]
    assert len({s // seq for s in random}) < len(random)


def test_epochs_with_several_sources_and_exact_resume():
    srcs = _position_sources([700, 1500, 400], [1.0, 2.0, 1.0])
    make = lambda: MixtureSampler(srcs, seq_len=8, batch_size=6, seed=2, sampling="epochs")  # noqa: E731
    draws = _starts(make(), 60)
    for s, length in enumerate((700, 1500, 400)):
        mine = [start for src, start in draws if src == s]
        n_windows = (length - 9) // 8 + 1
        first_epoch = mine[:n_windows]
        assert len(set(first_epoch)) == len(first_epoch), s  # distinct until the source is used up
    counts = np.bincount([s for s, _ in draws], minlength=3)
    assert np.allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.05)  # weights as before
    # any batch is the same whether reached in order, at random, or after a resume
    a = make()
    in_order = [a.batch(i)[0] for i in range(30)]
    b = make()
    b._EVERY = 4  # keep source counts every 4 batches: later look-ups start from those
    assert np.array_equal(b.batch(29)[0], in_order[29]) and np.array_equal(b.batch(3)[0], in_order[3])
    assert sorted(b._counts_at) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert np.array_equal(b.batch(13)[0], in_order[13])
    c = make()
    c.load_state_dict({**a.state_dict(), "position": 17})
    assert np.array_equal(next(c)[0], in_order[17])
    with pytest.raises(Phase7Error, match="data.sampling must be 'random' or 'epochs'"):
        MixtureSampler(srcs, seq_len=8, batch_size=2, seed=0, sampling="shuffle")


def test_resume_under_the_other_sampler_is_refused_with_the_setting_that_continues_it():
    srcs = _sources([1.0, 2.0])
    epochs = MixtureSampler(srcs, seq_len=8, batch_size=2, seed=0, sampling="epochs")
    rand = MixtureSampler(srcs, seq_len=8, batch_size=2, seed=0)
    assert epochs.state_dict()["sampling"] == "epochs"
    with pytest.raises(Phase7Error) as info:
        epochs.load_state_dict(rand.state_dict())
    assert str(info.value) == ("the checkpoint's data order was drawn with data.sampling = 'random', the recipe now"
                               " says 'epochs'; resume with --set data.sampling='\"random\"' (or start a new run)")
    old = {k: v for k, v in rand.state_dict().items() if k != "sampling"}  # written before the key existed
    with pytest.raises(Phase7Error, match="drawn with data.sampling = 'random'"):
        epochs.load_state_dict({**old, "position": 3})
    rand.load_state_dict({**old, "position": 3})
    assert rand.position == 3


def test_the_recipe_key_reaches_the_training_sampler(tmp_path):
    from phase7fw import Engine
    from tests.conftest import RECIPES

    over = {"data.sampling": "epochs", "run.output_dir": str(tmp_path / "run"), "data.cache_dir": str(tmp_path / "c")}
    engine = Engine.from_recipe(RECIPES / "llama_tiny.toml", over, dummy_data=True, resume="never", quiet=True)
    assert engine.train_sampler.sampling == "epochs" and engine.val_sampler.sampling == "random"
    with pytest.raises(Phase7Error, match="data.sampling"):
        Engine.from_recipe(RECIPES / "llama_tiny.toml", {**over, "data.sampling": "shuffle"}, dummy_data=True, quiet=True)


@pytest.mark.parametrize("seq_len,expected", [(128, 1_000_000), (40_000, 4_000_100)])
def test_dummy_data_holds_two_validation_windows_at_any_sequence_length(tmp_path, seq_len, expected):
    """--dummy-data (and phase7fw bench) at 32k+ tokens per sequence: the synthetic stream grows
    so that its 2% validation tail is two windows long (it was a fixed 1M tokens: 20k of them)."""
    from phase7fw import load_recipe
    from phase7fw.data.mixture import build_sources
    from phase7fw.plugins import load_plugins
    from tests.conftest import RECIPES

    recipe = load_recipe(RECIPES / "phase8_tiny.toml", {"model.seq_len": seq_len})
    (source,) = build_sources(recipe, load_plugins().registry, cache_dir=str(tmp_path), dummy_data=True)
    assert source.name == "synthetic" and source.source.config.n_tokens == expected
