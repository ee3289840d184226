"""The tokenized data cache: each source's documents, tokenized once, as a memory-mapped shard.

Layout, under ``<cache_dir>/tokens/``::

    <source>-<key>/tokens.bin    token ids, one flat array (uint16 when the vocabulary fits, else uint32)
                   index.npy     int64 end offset of every document (its EOS included)
                   meta.json     what was tokenized with what, token, document and UTF-8 byte counts, max id

``key`` hashes the source's name and options, what the source says identifies its data
(``cache_identity()``: file sizes and mtimes, a dataset fingerprint, ...), the tokenizer's
fingerprint, the dtype and the format version, so any change that would change the ids
gives a new entry and an unchanged recipe finds the old one. A shard is written into a
temporary folder and renamed into place only when complete, so an interrupted run leaves
no half-written entry. Tokenization runs on every core, in document chunks, in order.

An entry is checked whenever it is opened (:func:`check_entry`): meta.json readable and
complete, tokens.bin exactly ``n_tokens`` ids long, index.npy consistent with both, and a
checksum of evenly spaced blocks of tokens.bin written at preparation (a few MiB read, so
a random or overwritten file is caught without reading a huge shard) plus a token-range
check of those blocks. A damaged entry is never trained on: it is moved aside and the
source is tokenized again, and the data log says which file was damaged and how.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import attrs
import numpy as np
from tqdm import tqdm

from phase7fw.errors import Phase7Error
from phase7fw.fileio import digest, disk_error

FORMAT = 1
CHUNK_CHARS = 4_000_000  # text per worker task: large enough to amortize pickling
_WORKER_TOKENIZER = None


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def default_workers() -> int:
    """The cores this process may use, shared with the other ranks of this host under torchrun
    (each rank prepares the data; the first to finish a source publishes it, the rest find it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def source_identity(name: str, raw_config: dict, source) -> dict:
    """What identifies a source's documents: its options plus the source's own answer."""
    ident = getattr(source, "cache_identity", None)
    return {"name": name, "config": raw_config, "data": ident() if callable(ident) else None}


@attrs.define
class CachedTokens:
    tokens: np.ndarray  # read-only memmap
    doc_ends: np.ndarray
    meta: dict
    path: Path
    status: str  # "cached", "prepared" or "rebuilt (...)"


class DamagedEntry(Exception):
    """A cache entry failed its check; the message names the file and the problem."""


def cached_tokens(
    label: str,
    identity: dict,
    texts: Iterable[str],
    tokenizer,
    cache_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    total: int | Callable[[], int | None] | None = None,
    warnings: Callable[[], list[str]] | None = None,
) -> CachedTokens:
    """The source's tokens from the cache, tokenizing ``texts`` first when they are not there.

    ``texts`` is only iterated on a cache miss; ``total`` (the number of documents, or a
    function giving it, called only on a miss) sizes the progress bar; ``warnings()``
    (called after ``texts`` was read) gives lines kept in meta.json, so a cached entry
    reports them too.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    key = digest({"format": FORMAT, "source": identity, "tokenizer": tokenizer.fingerprint(), "dtype": dtype.str})
    root = Path(cache_dir).expanduser() / "tokens"
    final = root / f"{_safe(identity['name'])}-{key}"
    rebuilt = ""
    if final.exists():
        try:
            return _with_byte_count(_open(final, "cached", key), texts)
        except DamagedEntry as exc:
            rebuilt = f"rebuilt (the cached entry was damaged: {exc})"
            _discard(final)
    tmp = root / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise disk_error(exc, final) from None
    try:
        if callable(total):
            total = total()
        try:
            meta = _write_shard(tmp, label, texts, tokenizer, dtype, workers or default_workers(), total)
        except OSError as exc:  # full disk, read-only cache: one message (the folder is removed below)
            raise disk_error(exc, final) from None
        meta.update(format=FORMAT, key=key, source=identity, tokenizer=tokenizer.fingerprint(),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), warnings=list(warnings() if warnings else []))
        try:
            _write_json(tmp / "meta.json", meta)
            os.rename(tmp, final)
        except OSError as exc:
            if not (final / "meta.json").is_file():  # not a concurrent writer winning the race
                raise disk_error(exc, final) from None
            shutil.rmtree(tmp, ignore_errors=True)
            return _open(final, "cached", key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        return _open(final, rebuilt or "prepared", key)
    except DamagedEntry as exc:  # just written: the disk or the filesystem misbehaves
        raise Phase7Error(f"{label}: the token cache entry written just now fails its check ({exc}); check the"
                          f" disk holding {root}") from None


def _with_byte_count(got: CachedTokens, texts: Iterable[str]) -> CachedTokens:
    """Entries written before byte counts were recorded get theirs now (bits per byte needs
    it): the texts are read once, not tokenized, and meta.json is rewritten in place."""
    if "n_bytes" in got.meta:
        return got
    try:
        got.meta["n_bytes"] = sum(len(t.encode("utf-8")) for t in texts)
    except Phase7Error:  # the source cannot be read any more: no bits per byte for it
        return got
    tmp = got.path / f".meta.json.{os.getpid()}.tmp"
    _write_json(tmp, got.meta)
    os.replace(tmp, got.path / "meta.json")
    return got


def _open(path: Path, status: str, key: str | None = None) -> CachedTokens:
    meta, doc_ends = check_entry(path, key)
    tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["n_tokens"],))
    return CachedTokens(tokens, doc_ends, meta, path, status)


_META_FIELDS = {"dtype": str, "n_tokens": int, "n_docs": int, "max_id": int, "vocab_size": int, "format": int}


def check_entry(path: Path, key: str | None = None) -> tuple[dict, np.ndarray]:
    """meta.json and the document index of a cache entry, after checking every file against
    them; raises :class:`DamagedEntry` naming the damaged file."""
    try:
        meta = json.loads((path / "meta.json").read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DamagedEntry(f"{path / 'meta.json'} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DamagedEntry(f"{path / 'meta.json'} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DamagedEntry(f"{path / 'meta.json'} is not a JSON object")
    for field, kind in _META_FIELDS.items():
        if type(meta.get(field)) is not kind:
            raise DamagedEntry(f"{path / 'meta.json'}: {field} is missing or not {kind.__name__}")
    if meta["format"] != FORMAT or (key is not None and meta.get("key") != key):
        raise DamagedEntry(f"{path / 'meta.json'} describes another entry (format or key differ)")
    if meta["dtype"] not in (np.dtype(np.uint16).str, np.dtype(np.uint32).str) or meta["n_tokens"] < 1:
        raise DamagedEntry(f"{path / 'meta.json'}: dtype {meta['dtype']!r} / n_tokens {meta['n_tokens']} are invalid")
    dtype = np.dtype(meta["dtype"])
    bin_path = path / "tokens.bin"
    expected = meta["n_tokens"] * dtype.itemsize
    size = bin_path.stat().st_size if bin_path.is_file() else None
    if size != expected:
        got = "missing" if size is None else f"{size:,} bytes"
        raise DamagedEntry(f"{bin_path} is {got}; meta.json says {meta['n_tokens']:,} tokens x {dtype.itemsize} bytes"
                           f" = {expected:,} bytes (truncated or replaced)")
    try:
        doc_ends = np.load(path / "index.npy", allow_pickle=False)
    except FileNotFoundError:
        raise DamagedEntry(f"{path / 'index.npy'} is missing") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DamagedEntry(f"{path / 'index.npy'} is unreadable ({exc})") from None
    if (doc_ends.ndim != 1 or doc_ends.dtype != np.int64 or len(doc_ends) != meta["n_docs"] or not len(doc_ends)
            or doc_ends[-1] != meta["n_tokens"] or doc_ends[0] < 1 or np.any(np.diff(doc_ends) < 1)):
        raise DamagedEntry(f"{path / 'index.npy'} does not describe {meta['n_docs']:,} documents ending at token"
                           f" {meta['n_tokens']:,}")
    blocks = _sample_blocks(bin_path, size)
    want = meta.get("sample_sha256")
    if want is not None and _sample_digest(size, blocks) != want:
        raise DamagedEntry(f"{bin_path} does not match the checksum written when it was prepared (overwritten or"
                           " corrupted)")
    ids = np.frombuffer(b"".join(b[: len(b) - len(b) % dtype.itemsize] for b in blocks), dtype=dtype)
    if len(ids) and int(ids.max()) >= meta["vocab_size"]:
        raise DamagedEntry(f"{bin_path} holds token id {int(ids.max())}, outside the vocabulary ({meta['vocab_size']})")
    return meta, doc_ends


SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 1 << 16


def _sample_blocks(path: Path, size: int) -> list[bytes]:
    """``SAMPLE_BLOCKS`` evenly spaced blocks (the whole file when it is small)."""
    with open(path, "rb") as fh:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            return [fh.read()]
        out = []
        for i in range(SAMPLE_BLOCKS):
            offset = (size - SAMPLE_BYTES) * i // (SAMPLE_BLOCKS - 1)
            offset -= offset % 4  # keep ids whole for both dtypes
            fh.seek(offset)
            out.append(fh.read(SAMPLE_BYTES))
        return out


def _sample_digest(size: int, blocks: list[bytes]) -> str:
    h = hashlib.sha256(str(size).encode())
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def _discard(entry: Path) -> None:
    """Move a damaged entry out of the way (a reader may still map it), then delete it."""
    aside = entry.with_name(f".damaged-{entry.name}-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:  # another process moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _write_shard(tmp: Path, label, texts, tokenizer, dtype, workers, total) -> dict:
    eos, vocab = tokenizer.eos_id, tokenizer.vocab_size
    doc_lengths: list[np.ndarray] = []
    n_tokens, n_bytes, max_id = 0, 0, -1
    bar = tqdm(total=total, desc=f"tokenize {label}", unit="doc", disable=None, leave=False, file=sys.stderr)
    with open(tmp / "tokens.bin", "wb") as out:
        for ids, lengths, chunk_bytes in _encode_all(_chunks(texts), tokenizer, dtype, workers):
            if len(ids):
                max_id = max(max_id, int(ids.max()))
                if max_id >= vocab:
                    raise Phase7Error(f"{label}: token id {max_id} is outside the tokenizer's vocabulary ({vocab})")
            out.write(ids.tobytes())
            n_tokens += len(ids)
            n_bytes += chunk_bytes
            doc_lengths.append(lengths)
            bar.update(len(lengths))
        out.flush()
        os.fsync(out.fileno())
    bar.close()
    size = (tmp / "tokens.bin").stat().st_size
    n_docs = sum(len(x) for x in doc_lengths)
    if n_tokens == n_docs:  # nothing but the EOS of each document
        raise Phase7Error(f"{label}: the source is empty ({n_docs} documents, no text)")
    ends = np.cumsum(np.concatenate(doc_lengths)).astype(np.int64)
    np.save(tmp / "index.npy", ends)
    # n_bytes: UTF-8 bytes of the text these tokens came from, for bits per byte (data.py).
    return {"dtype": dtype.str, "n_tokens": n_tokens, "n_docs": n_docs, "n_bytes": n_bytes, "max_id": max_id,
            "eos_id": eos, "vocab_size": vocab, "label": label,
            "sample_sha256": _sample_digest(size, _sample_blocks(tmp / "tokens.bin", size))}


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        if not isinstance(text, str):
            raise Phase7Error(f"a data source yielded a {type(text).__name__} document; documents must be str")
        chunk.append(text)  # an empty document still adds its EOS, as DataSource.load_tokens does
        size += len(text)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunk(docs: list[str], tokenizer=None, dtype=None) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids of the documents, each followed by EOS, each document's length, and the
    documents' size in UTF-8 bytes."""
    if tokenizer is None:  # in a pool worker
        tokenizer, dtype = _WORKER_TOKENIZER
    eos = np.asarray([tokenizer.eos_id], dtype=np.int64)
    parts = []
    for doc in docs:
        ids = np.asarray(tokenizer.encode_array(doc), dtype=np.int64)
        if len(ids) and (ids.min() < 0):
            raise Phase7Error(f"tokenizer {tokenizer.fingerprint()} produced a negative id")
        parts += [ids, eos]
    lengths = np.asarray([len(p) for p in parts[0::2]], dtype=np.int64) + 1
    ids = np.concatenate(parts)
    # Ids above the dtype's range would wrap: clamp to a value the caller's range check rejects.
    ids = np.minimum(ids, np.iinfo(dtype).max).astype(dtype)
    return ids, lengths, sum(len(doc.encode("utf-8")) for doc in docs)


def _init_worker(tokenizer, dtype) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = (tokenizer, dtype)


def _encode_all(chunks: Iterator[list[str]], tokenizer, dtype, workers: int):
    """Encoded chunks in input order. One chunk (small sources) or one worker: in-process;
    otherwise a process pool with a bounded number of chunks in flight (memory stays flat
    however large the source)."""
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    if second is None or workers <= 1:
        yield _encode_chunk(first, tokenizer, dtype)
        if second is not None:
            yield _encode_chunk(second, tokenizer, dtype)
            for chunk in chunks:
                yield _encode_chunk(chunk, tokenizer, dtype)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # The tokenizers library disables (and warns about) its own threads in forked children
    # unless this is set; each worker is single-threaded anyway.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer, dtype))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        pending: deque = deque()
        for chunk in _chain(first, second, chunks):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chain(*parts):
    yield parts[0]
    yield parts[1]
    yield from parts[2]


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _remove_stale_temps(root: Path) -> None:
    """Remove temporary folders that processes of this host left when they were killed."""
    host = socket.gethostname()
    for tmp in [*root.glob(".tmp-*"), *root.glob(".damaged-*")]:
        head, _, pid = tmp.name.rpartition("-")
        if not head.endswith(f"-{host}") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
