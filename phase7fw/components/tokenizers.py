"""Built-in tokenizers. ``bytes``: one token per UTF-8 byte plus an end-of-document token."""

from __future__ import annotations

import attrs
import numpy as np

from phase7fw.hookspecs import hookimpl
from phase7fw.interfaces import Tokenizer


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


def build_bytes(config, **context):
    return BytesTokenizer()


@hookimpl
def register_components(register):
    register("tokenizer", "bytes", build_bytes, BytesConfig, description="UTF-8 bytes + EOS (vocab 257)")
