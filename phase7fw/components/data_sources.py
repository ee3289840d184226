"""Built-in data sources: local text files, Hugging Face datasets, the Python standard
library (the default corpus), synthetic tokens.

Besides ``texts()``, sources answer two optional questions the tokenized cache asks:
``cache_identity()`` (what identifies the documents beyond the recipe options, e.g. file
sizes and mtimes, so edited files are tokenized again) and ``num_documents()`` (for the
progress bar; None when unknown).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

import attrs
import numpy as np

from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.interfaces import DataSource
from phase7fw.recipe.options import non_negative, option, positive


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise Phase7Error(f"cannot read data file {path}: {exc}") from None


def _files_identity(files) -> str:
    """A hash of the files' paths, sizes and modification times (changes when one is edited)."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
        except OSError as exc:
            raise Phase7Error(f"cannot read data file {f}: {exc}") from None
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _expand(patterns, who: str) -> list[str]:
    """Files matching the glob patterns, in order, each once; a pattern matching none is an error."""
    files = []
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matched:
            raise Phase7Error(f"{who}: no file matches {pattern!r} (from {os.getcwd()})")
        files += matched
    return list(dict.fromkeys(files))


@attrs.frozen
class TextFilesConfig:
    paths: list[str] = option(help="glob patterns of plain-text files (** allowed), relative to the working"
                                   " directory; one pattern or an array", one_or_many=True)


class TextFiles(DataSource):
    """Every file matching ``paths`` is one document. A file with NUL bytes is binary and
    skipped; one that is not UTF-8 is decoded with replacement characters; both are counted
    and reported by :meth:`read_warnings` (the data log shows them, with examples)."""

    def __init__(self, config: TextFilesConfig):
        if not config.paths:
            raise Phase7Error("text_files: 'paths' is empty; give at least one glob pattern")
        self.patterns = list(config.paths)
        self.files = [Path(f) for f in _expand(self.patterns, "text_files")]
        self.binary: list[Path] = []
        self.not_utf8: list[Path] = []

    def texts(self):
        self.binary, self.not_utf8 = [], []
        for path in self.files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise Phase7Error(f"cannot read data file {path}: {exc}") from None
            if b"\0" in data:
                self.binary.append(path)
                continue
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError:
                self.not_utf8.append(path)
                yield data.decode("utf-8", errors="replace")

    def read_warnings(self) -> list[str]:
        """What the last pass over the files found: binary files skipped, non-UTF-8 files."""
        def some(paths):
            names = ", ".join(str(p) for p in paths[:3])
            return names + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

        n, out = len(self.files), []
        if self.binary:
            out.append(f"skipped {len(self.binary)} of {n} files that are binary, not text (NUL bytes): "
                       f"{some(self.binary)}")
        if self.not_utf8:
            out.append(f"{len(self.not_utf8)} of {n} files are not UTF-8 and were read with replacement characters"
                       f" (U+FFFD): {some(self.not_utf8)}; convert them to UTF-8 to train on their exact text")
        return out

    def cache_identity(self):
        return _files_identity(self.files)

    def num_documents(self):
        return len(self.files)

    def describe(self) -> str:
        return f"text_files({len(self.files)} files from {', '.join(self.patterns)})"


class _PythonFiles(DataSource):
    """A source whose documents are the ``.py`` files in ``self.files`` (set by the subclass)."""

    files: list[Path]

    def texts(self):
        for path in self.files:
            yield _read_text(path)

    def num_documents(self):
        return len(self.files)


@attrs.frozen
class PythonStdlibConfig:
    max_files: int = option(0, check=non_negative, help="use only the first N files (sorted); 0: all")
    include_tests: bool = option(True, help="include the test/ packages of the standard library")


class PythonStdlib(_PythonFiles):
    """The standard library's own ``.py`` files: ~30 MB of real code with its test packages,
    ~11-12 MB where the Python install ships without them (Debian/Ubuntu packages)."""

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

    def cache_identity(self):
        return {"python": sys.version, "files": _files_identity(self.files)}

    def describe(self) -> str:
        return f"python_stdlib({len(self.files)} files under {self.root})"


@attrs.frozen
class PythonPackagesConfig:
    packages: list[str] = option(factory=lambda: ["torch"], help="installed packages whose .py files are read")


class PythonPackages(_PythonFiles):
    """The ``.py`` files of installed packages (default: torch, ~45 MB, installed wherever
    phase7fw runs): more code than a standard library shipped without its tests (~11 MB), so a
    benchmark can train 25M tokens without repeating text."""

    def __init__(self, config: PythonPackagesConfig):
        if not config.packages:
            raise Phase7Error("python_packages: 'packages' is empty; name at least one installed package")
        files = []
        for name in config.packages:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise Phase7Error(f"python_packages: {name!r} is not an installed package (pip install {name})")
            for root in spec.submodule_search_locations:
                files += sorted(p for p in Path(root).rglob("*.py") if "__pycache__" not in p.parts)
        self.packages, self.files = list(config.packages), files

    def cache_identity(self):
        return {"packages": self.packages, "files": _files_identity(self.files)}

    def describe(self) -> str:
        return f"python_packages({len(self.files)} files of {', '.join(self.packages)})"


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


_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
             ".txt": "text", ".text": "text", ".md": "text", ".arrow": "arrow"}
_HUB_HELP = (
    "download it once with network access (datasets keeps it under ~/.cache/huggingface; then set"
    " HF_DATASETS_OFFLINE=1 to use that copy), or point at local files: path = \"data/train.jsonl\","
    " or path = \"json\" (or \"parquet\", \"csv\", \"text\") with data_files = [\"data/*.jsonl\"]"
)


@attrs.frozen
class HFDatasetConfig:
    path: str = option(help='hub name ("user/name"), a builder ("json", "parquet", "csv", "text") used with'
                            " data_files, a local folder, or a local data file")
    config: str = option("", help='the dataset configuration ("": its default)')
    split: str = option("train", help='split to read; slices work ("train[:10%]")')
    data_files: list[str] = option(factory=list, help="data files or glob patterns (local ones relative to the"
                                                      " working directory); one string or an array", one_or_many=True)
    text_field: str = option("text", help="the column that holds each document's text")
    revision: str = option("", help="hub revision (branch, tag or commit) to pin; \"\": the default branch")
    streaming: bool = option(False, help="stream instead of downloading the whole dataset first")
    max_documents: int = option(0, check=non_negative, help="read only the first N documents (0: all)")


class HFDataset(DataSource):
    """Anything ``datasets.load_dataset`` reads. Local files are checked when the source is
    built; the dataset itself is loaded only when its texts are needed (a cached source,
    or a trained tokenizer found again, never loads it)."""

    def __init__(self, config: HFDatasetConfig):
        if not config.path:
            raise Phase7Error("hf_dataset: 'path' is empty; give a hub name, a builder or a local file")
        self.config = config
        # files: the local files behind the dataset (for the cache key); local_files: those
        # handed to load_dataset as data_files (None: hub names and folders resolve their own)
        self.builder, self.files, self.local_files = config.path, None, None
        local = Path(os.path.expanduser(config.path))
        if local.is_file():
            self.builder = _BUILDERS.get(local.suffix.lower())
            if self.builder is None:
                raise Phase7Error(f"hf_dataset: cannot tell the format of {config.path!r} from its extension;"
                                  f" use one of {', '.join(sorted(_BUILDERS))} or set path to a builder"
                                  " (\"json\", \"csv\", ...) and data_files")
            self.files = self.local_files = [str(local)] + _expand(config.data_files, "hf_dataset data_files")
        elif config.path in set(_BUILDERS.values()):
            if not config.data_files:
                raise Phase7Error(f"hf_dataset: path = {config.path!r} reads local files; list them in data_files")
            self.files = self.local_files = _expand(config.data_files, "hf_dataset data_files")
        elif local.is_dir():
            self.files = _expand([str(local / "**" / "*")], "hf_dataset")
        elif config.path.startswith((".", "/", "~")) or local.suffix.lower() in _BUILDERS:
            raise Phase7Error(f"hf_dataset: no such file or folder {config.path!r} (from {os.getcwd()})")
        for f in self.local_files or ():
            if os.path.getsize(f) == 0:
                raise Phase7Error(f"hf_dataset: {f} is empty (0 bytes); remove it from the source or fill it")
        self._dataset = None

    def _load(self):
        if self._dataset is not None:
            return self._dataset
        try:
            import datasets
        except ImportError:
            raise Phase7Error("hf_dataset needs the datasets library: pip install 'phase7fw[data]'") from None
        if not sys.stderr.isatty():
            datasets.disable_progress_bars()  # its bars would flood logs and error output
        c = self.config
        kwargs = {"split": c.split, "streaming": c.streaming}
        if c.config:
            kwargs["name"] = c.config
        if c.revision:
            kwargs["revision"] = c.revision
        if self.local_files is not None:
            kwargs["data_files"] = self.local_files
        elif c.data_files:  # relative to the hub repository or the folder: datasets resolves them
            kwargs["data_files"] = list(c.data_files)
        try:
            ds = datasets.load_dataset(self.builder, **kwargs)
        except StopIteration:  # what datasets raises for files without a single row
            raise Phase7Error(f"hf_dataset {c.path!r}: no rows could be read (empty or only blank lines?)") from None
        except Exception as exc:  # noqa: BLE001 - a user's dataset can fail in many ways; name it
            raise self._load_error(exc) from None
        fields = ds.column_names
        if fields is None and c.streaming:  # unknown features: look at the first row
            first = next(iter(ds), {})
            fields = list(first)
        if c.text_field not in (fields or []):
            raise Phase7Error(f"hf_dataset {c.path!r}: no text field {c.text_field!r}; its fields are"
                              f" {', '.join(map(repr, fields or [])) or '(none)'}; set text_field to one of them")
        if c.max_documents:
            ds = ds.take(c.max_documents) if c.streaming else ds.select(range(min(c.max_documents, len(ds))))
        self._dataset = ds
        return ds

    def _load_error(self, exc: BaseException) -> Phase7Error:
        where = f"hf_dataset {self.config.path!r}"
        if self.files is None and _is_connection_error(exc):
            return Phase7Error(f"{where}: the Hugging Face Hub cannot be reached and the dataset is not in the local"
                               f" cache ({type(exc).__name__}: {exc}). To use it, {_HUB_HELP}")
        return Phase7Error(f"{where}: datasets.load_dataset failed: {type(exc).__name__}: {exc}")

    def texts(self):
        ds, field = self._load(), self.config.text_field
        batches = ds.select_columns([field]).iter(batch_size=1000)
        for batch in batches:
            for text in batch[field]:
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise Phase7Error(f"hf_dataset {self.config.path!r}: text_field {field!r} holds"
                                      f" {type(text).__name__} values, not text")
                yield text

    def cache_identity(self):
        return {"files": _files_identity(self.files) if self.files is not None else None}

    def num_documents(self):
        ds = self._load()
        return None if self.config.streaming else len(ds)

    def describe(self) -> str:
        c = self.config
        what = f"{len(self.files)} files" if self.files is not None else c.path
        return f"hf_dataset({what}{', ' + c.config if c.config else ''}, split {c.split}, field {c.text_field})"


def _is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the network or the hub could not be reached."""
    names = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError",
             "ConnectTimeout", "ReadTimeout", "Timeout", "ProxyError"}
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in names:
            return True
        if "Couldn't reach" in str(exc) or "offline mode" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False



@hookimpl
def register_components(register):
    register("data_source", "hf_dataset", lambda c, **_: HFDataset(c), HFDatasetConfig,
             description="a Hugging Face dataset: hub name, or local json/jsonl/parquet/csv/text files")
    register("data_source", "text_files", lambda c, **_: TextFiles(c), TextFilesConfig,
             description="local plain-text files, one document each")
    register("data_source", "python_stdlib", lambda c, **_: PythonStdlib(c), PythonStdlibConfig,
             description="the Python standard library's source (the default corpus, no download)")
    register("data_source", "python_packages", lambda c, **_: PythonPackages(c), PythonPackagesConfig,
             description="the .py files of installed packages (default: torch), no download")
    register("data_source", "synthetic", lambda c, **_: Synthetic(c), SyntheticConfig,
             description="random tokens, for --dummy-data runs")
