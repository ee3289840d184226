"""Built-in data sources: local text files, the Python standard library, synthetic tokens."""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

import attrs
import numpy as np

from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.interfaces import DataSource
from phase7fw.recipe import non_negative, option, positive


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise Phase7Error(f"cannot read data file {path}: {exc}") from None


@attrs.frozen
class TextFilesConfig:
    paths: list[str] = option(help="glob patterns of plain-text files (** allowed), relative to the working directory")


class TextFiles(DataSource):
    """Every file matching ``paths`` is one document."""

    def __init__(self, config: TextFilesConfig):
        if not config.paths:
            raise Phase7Error("text_files: 'paths' is empty; give at least one glob pattern")
        self.patterns = list(config.paths)
        files = []
        for pattern in self.patterns:
            matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not matched:
                raise Phase7Error(f"text_files: no file matches {pattern!r} (from {os.getcwd()})")
            files += matched
        self.files = [Path(f) for f in dict.fromkeys(files)]

    def texts(self):
        for path in self.files:
            yield _read_text(path)

    def describe(self) -> str:
        return f"text_files({len(self.files)} files from {', '.join(self.patterns)})"


@attrs.frozen
class PythonStdlibConfig:
    max_files: int = option(0, check=non_negative, help="use only the first N files (sorted); 0: all")
    include_tests: bool = option(True, help="include the test/ packages of the standard library")


class PythonStdlib(DataSource):
    """The standard library's own ``.py`` files: ~30 MB of real code on every machine."""

    def __init__(self, config: PythonStdlibConfig):
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "dist-packages", "__pycache__"}
        if not config.include_tests:
            skip |= {"test", "tests", "idle_test"}
        files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
        if config.max_files:
            files = files[: config.max_files]
        if not files:
            raise Phase7Error(f"python_stdlib: no .py files found under {root}")
        self.root, self.files = root, files

    def texts(self):
        for path in self.files:
            yield _read_text(path)

    def describe(self) -> str:
        return f"python_stdlib({len(self.files)} files under {self.root})"


@attrs.frozen
class SyntheticConfig:
    n_tokens: int = option(1_000_000, check=positive, help="length of the random token stream")
    seed: int = option(0, check=non_negative, help="seed of the stream (independent of run.seed)")


class Synthetic(DataSource):
    """Uniform random tokens (what ``--dummy-data`` trains on): tests the machinery, not the model."""

    def __init__(self, config: SyntheticConfig):
        self.config = config

    def load_tokens(self, tokenizer) -> np.ndarray:
        rng = np.random.default_rng(self.config.seed)
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
        return rng.integers(0, tokenizer.vocab_size, size=self.config.n_tokens, dtype=np.int64).astype(dtype)

    def describe(self) -> str:
        return f"synthetic({self.config.n_tokens} random tokens)"


@hookimpl
def register_components(register):
    register("data_source", "text_files", lambda c, **_: TextFiles(c), TextFilesConfig,
             description="local plain-text files, one document each")
    register("data_source", "python_stdlib", lambda c, **_: PythonStdlib(c), PythonStdlibConfig,
             description="the Python standard library's source (the default corpus, no download)")
    register("data_source", "synthetic", lambda c, **_: Synthetic(c), SyntheticConfig,
             description="random tokens, for --dummy-data runs")
