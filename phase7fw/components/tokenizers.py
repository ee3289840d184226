"""Built-in tokenizers.

``bytes``: one token per UTF-8 byte plus an end-of-document token; needs nothing.
``bpe``: byte-level BPE trained (``tokenizers`` library) on a weighted sample of the data mix;
the trained file is kept in ``<cache_dir>/tokenizers/`` and found again by the sample's
identity, so it is trained once per (options, data).
``file``: any ``tokenizer.json`` (Hugging Face tokenizers format), e.g. GPT-2's.

``state()`` holds the whole tokenizer JSON, so a checkpoint rebuilds its tokenizer without
data, cache or the original file (factories receive it as ``state=``).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import attrs
import numpy as np

from phase7fw.errors import Phase7Error
from phase7fw.fileio import digest, write_text_atomic
from phase7fw.hookspecs import hookimpl
from phase7fw.interfaces import Tokenizer
from phase7fw.recipe.options import option, positive

DEFAULT_EOS = "<|endoftext|>"


@attrs.frozen
class BytesConfig:
    pass


class BytesTokenizer(Tokenizer):
    """Byte-level tokenizer: ids 0-255 are bytes, 256 is end-of-document. Needs no training."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes-v1"

    def hf_tokenizer(self) -> tuple[str, str]:
        """A byte-level BPE without merges: every byte is one token whose id is the byte's
        value (the GPT-2 byte-to-character map names them), EOS is the special token 256."""
        tk = _tokenizers()
        chars = _byte_chars()
        tok = tk.Tokenizer(tk.models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = tk.decoders.ByteLevel()
        tok.add_special_tokens([tk.AddedToken(DEFAULT_EOS, special=True)])
        return tok.to_str(), DEFAULT_EOS


def _byte_chars() -> list[str]:
    """The printable character that byte-level tokenizers use for each byte value: printable
    Latin-1 bytes stand for themselves, the others for 256, 257, ... in order."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_bytes(config, **context):
    return BytesTokenizer()


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise Phase7Error("this tokenizer needs the tokenizers library: pip install 'phase7fw[data]'") from None
    return tokenizers


def _from_json(text: str, where: str):
    try:
        return _tokenizers().Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions for bad files
        raise Phase7Error(f"{where} is not a valid tokenizer.json: {exc}") from None


def read_utf8(path: Path) -> str:
    """A tokenizer.json's text; a file that is not UTF-8 (binary, damaged) is a Phase7Error."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Phase7Error(f"{path} is not a tokenizer.json: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise Phase7Error(f"cannot read {path}: {exc}") from None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _JsonTokenizer(Tokenizer):
    """Shared encode/decode over a ``tokenizers.Tokenizer`` held in ``self._tok``."""

    _tok = None

    def _require(self):
        if self._tok is None:
            raise Phase7Error(
                "the bpe tokenizer is not trained yet: it is trained on the recipe's data when the data is"
                " loaded (phase7fw data prepare RECIPE, or phase7fw run RECIPE)"
            )
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._require().encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        tok = self._require()
        n = tok.get_vocab_size(with_added_tokens=True)
        return tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=True)

    def hf_tokenizer(self) -> tuple[str, str]:
        self._require()
        return self._json, self.eos_token


# ---------------------------------------------------------------------------------- bpe
def _check_vocab(v):
    return None if 257 <= v < 1 << 32 else f"must be at least 257 (256 bytes + EOS), got {v!r}"


@attrs.frozen
class BPEConfig:
    vocab_size: int = option(8192, check=_check_vocab, help="vocabulary size with EOS; the model's vocab follows it")
    min_frequency: int = option(2, check=positive, help="merge only pairs seen at least this often")
    sample_chars: int = option(20_000_000, check=positive,
                               help="characters of the data mix to train on (shared by source weight)")
    eos_token: str = option(DEFAULT_EOS, help="the end-of-document special token (id 0)")


class BPETokenizer(_JsonTokenizer):
    """Byte-level BPE. ``vocab_size`` is the configured size from the start (the model can be
    built before training); a smaller trained vocabulary leaves the top ids unused."""

    trainings = 0  # how many times this process trained one (tests check reuse with it)

    def __init__(self, config: BPEConfig, cache_dir: str | None = None, state: dict | None = None):
        self.config = config
        self.vocab_size = config.vocab_size
        self.eos_id = 0
        self.eos_token = config.eos_token
        self.sample_chars = config.sample_chars
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.path: Path | None = None
        self.status = "not trained"
        if state and state.get("json"):
            if state.get("vocab_size") != config.vocab_size:
                raise Phase7Error(f"the checkpoint's bpe tokenizer has vocab_size {state.get('vocab_size')}, the recipe"
                                  f" says data.tokenizer.vocab_size = {config.vocab_size}")
            self._load(state["json"], "the checkpoint's tokenizer")
            self.status = "from the checkpoint"

    def _load(self, text: str, where: str) -> None:
        tok = _from_json(text, where)
        if tok.token_to_id(self.config.eos_token) != 0:
            raise Phase7Error(f"{where}: its EOS token {self.config.eos_token!r} is not id 0")
        if tok.get_vocab_size(with_added_tokens=True) > self.vocab_size:
            raise Phase7Error(f"{where} has {tok.get_vocab_size(with_added_tokens=True)} tokens, more than"
                              f" data.tokenizer.vocab_size = {self.vocab_size}")
        self._tok, self._json = tok, text

    def prepare(self, texts) -> None:
        """Load the tokenizer trained on this sample before, or train it now and keep it."""
        if self._tok is not None or getattr(texts, "empty", False):
            return  # trained already, or nothing to train on (--dummy-data: random ids need no text)
        identity = getattr(texts, "identity", None)
        if identity is None:  # a plain iterable: its content is its identity
            texts = list(texts)
            identity = _sha("\0".join(texts))
        name = f"bpe-{digest({'config': attrs.asdict(self.config), 'sample': identity, 'format': 1})}.json"
        self.path = self.cache_dir / "tokenizers" / name if self.cache_dir else None
        damaged = ""
        if self.path is not None and self.path.is_file():
            try:  # a cache file: when damaged, train again rather than stop
                self._load(read_utf8(self.path), str(self.path))
                self.status = f"loaded from {self.path}"
                return
            except Phase7Error as exc:
                damaged = f" (the cached file was damaged: {exc})"
        self._train(texts)
        if self.path is not None:
            write_text_atomic(self.path, self._json)
        self.status = (f"trained, saved to {self.path}" if self.path else "trained") + damaged

    def _train(self, texts) -> None:
        tk = _tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=self.vocab_size, min_frequency=self.config.min_frequency,
            special_tokens=[self.config.eos_token], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=sys.stderr.isatty(),
        )
        tok.train_from_iterator(iter(texts), trainer)
        BPETokenizer.trainings += 1
        self._load(tok.to_str(), "the trained tokenizer")

    def state(self) -> dict:
        return {"json": getattr(self, "_json", None), "vocab_size": self.vocab_size}

    def fingerprint(self) -> str:
        if self._tok is None:
            return f"bpe-untrained-{self.vocab_size}"
        return f"bpe-{_sha(self._json + str(self.vocab_size))}"


def build_bpe(config, *, cache_dir=None, state=None, **_):
    return BPETokenizer(config, cache_dir, state)


# --------------------------------------------------------------------------------- file
@attrs.frozen
class FileConfig:
    path: str = option(help="a tokenizer.json file (Hugging Face tokenizers format), e.g. GPT-2's")
    eos_token: str = option("", help=f'the end-of-document token; "": {DEFAULT_EOS!r}, which the file must have')


class FileTokenizer(_JsonTokenizer):
    """A ready-made tokenizer loaded from a file; needs no training."""

    def __init__(self, config: FileConfig, state: dict | None = None):
        if state and state.get("json"):
            text, where = state["json"], "the checkpoint's tokenizer"
        else:
            path = Path(config.path).expanduser()
            if not path.is_file():
                raise Phase7Error(f"data.tokenizer.path: no such file {config.path!r}")
            text, where = read_utf8(path), config.path
        self._tok, self._json = _from_json(text, where), text
        self.eos_token = config.eos_token or DEFAULT_EOS
        eos = self._tok.token_to_id(self.eos_token)
        if eos is None:
            special = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
            have = f"its special tokens are {', '.join(map(repr, special))}" if special else "it has no special tokens"
            how = "choose one" if special else "name a token of its vocabulary"
            raise Phase7Error(f"{where} has no end-of-document token {self.eos_token!r} ({have}); {how} with"
                              f" data.tokenizer.eos_token = \"...\"")
        self.eos_id = eos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def state(self) -> dict:
        return {"json": self._json}

    def fingerprint(self) -> str:
        return f"file-{_sha(self._json + chr(0) + self.eos_token)}"


def build_file(config, *, state=None, **_):
    return FileTokenizer(config, state)


@hookimpl
def register_components(register):
    register("tokenizer", "bytes", build_bytes, BytesConfig, description="UTF-8 bytes + EOS (vocab 257)")
    register("tokenizer", "bpe", build_bpe, BPEConfig,
             description="byte-level BPE trained on a sample of the data mix (cached, reused)")
    register("tokenizer", "file", build_file, FileConfig,
             description="any tokenizer.json (Hugging Face tokenizers format), e.g. GPT-2's")
