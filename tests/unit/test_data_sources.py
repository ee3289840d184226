"""Data sources: hf_dataset on local files of every format, its errors, offline use; text_files."""

from __future__ import annotations

import json
import socket

import pytest

from phase7fw.components import data_sources
from phase7fw.components.data_sources import HFDataset, HFDatasetConfig, TextFiles, TextFilesConfig
from phase7fw.errors import Phase7Error

datasets = pytest.importorskip("datasets")
DOCS = ["first document", "second, with a comma", "third one"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Never the network; datasets' own Arrow cache in the test's folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read these variables at import: set their flags too.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)


def write(fmt: str) -> dict:
    """Write DOCS in one format; returns the hf_dataset options that read it."""
    if fmt == "json":
        with open("d.json", "w") as f:
            json.dump([{"body": d, "n": i} for i, d in enumerate(DOCS)], f)
        return {"path": "d.json", "text_field": "body"}
    if fmt == "jsonl":
        with open("d.jsonl", "w") as f:
            f.write("\n".join(json.dumps({"text": d}) for d in DOCS))
        return {"path": "json", "data_files": ["*.jsonl"]}
    if fmt == "parquet":
        datasets.Dataset.from_dict({"text": DOCS}).to_parquet("d.parquet")
        return {"path": "d.parquet"}
    if fmt == "csv":
        datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2, 3]}).to_csv("d.csv", index=False)
        return {"path": "csv", "data_files": ["d.csv"]}
    if fmt == "text":  # the text builder: one document per line
        with open("d.txt", "w") as f:
            f.write("\n".join(DOCS) + "\n")
        return {"path": "d.txt"}
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv", "text"])
def test_hf_dataset_reads_local_files(fmt):
    src = HFDataset(HFDatasetConfig(**write(fmt)))
    assert list(src.texts()) == DOCS
    assert src.num_documents() == 3
    assert src.cache_identity()["files"]


def test_max_documents_and_identity_follow_the_files():
    opts = write("jsonl")
    src = HFDataset(HFDatasetConfig(**opts, max_documents=2))
    assert list(src.texts()) == DOCS[:2]
    before = src.cache_identity()
    with open("d.jsonl", "a") as f:
        f.write("\n" + json.dumps({"text": "a fourth"}))
    assert HFDataset(HFDatasetConfig(**opts)).cache_identity() != before


def test_missing_text_field_names_the_fields():
    write("json")
    src = HFDataset(HFDatasetConfig(path="d.json", text_field="text"))
    with pytest.raises(Phase7Error, match=r"no text field 'text'; its fields are 'body', 'n'; set text_field"):
        list(src.texts())


def test_missing_local_files_fail_when_built():
    with pytest.raises(Phase7Error, match=r"no file matches 'nothing/\*\.jsonl'"):
        HFDataset(HFDatasetConfig(path="json", data_files=["nothing/*.jsonl"]))
    with pytest.raises(Phase7Error, match="reads local files; list them in data_files"):
        HFDataset(HFDatasetConfig(path="parquet"))
    with pytest.raises(Phase7Error, match="no such file or folder './missing.jsonl'"):
        HFDataset(HFDatasetConfig(path="./missing.jsonl"))


def test_unreachable_hub_is_one_clear_message(monkeypatch):
    calls = []

    def no_network(path, **kwargs):
        calls.append(path)
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as exc:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)") from exc

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    src = HFDataset(HFDatasetConfig(path="someone/some_corpus", config="en"))  # building never loads
    assert calls == []
    with pytest.raises(Phase7Error) as info:
        list(src.texts())
    msg = str(info.value)
    assert calls == ["someone/some_corpus"]
    assert "cannot be reached and the dataset is not in the local cache" in msg
    assert "HF_DATASETS_OFFLINE=1" in msg and 'data_files = ["data/*.jsonl"]' in msg


def test_offline_mode_uncached_hub_dataset_is_the_same_message():
    # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set: datasets answers without the network.
    src = HFDataset(HFDatasetConfig(path="someone/not_cached_anywhere"))
    with pytest.raises(Phase7Error, match="cannot be reached and the dataset is not in the local cache"):
        list(src.texts())


def test_other_load_failures_are_wrapped(monkeypatch):
    def broken(path, **kwargs):
        raise ValueError("BuilderConfig 'xx' not found")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(Phase7Error, match="datasets.load_dataset failed: ValueError: BuilderConfig 'xx'"):
        list(HFDataset(HFDatasetConfig(path="someone/x", config="xx")).texts())


def test_connection_error_detection_walks_the_cause_chain():
    class OfflineModeIsEnabled(Exception):
        pass

    try:
        try:
            raise OfflineModeIsEnabled("offline")
        except OfflineModeIsEnabled as inner:
            raise FileNotFoundError("not cached") from inner
    except FileNotFoundError as outer:
        assert data_sources._is_connection_error(outer)
    assert not data_sources._is_connection_error(ValueError("bad config"))


def test_text_files_errors(tmp_path):
    with pytest.raises(Phase7Error, match="no file matches"):
        TextFiles(TextFilesConfig(paths=[str(tmp_path / "*.none")]))
    with pytest.raises(Phase7Error, match="'paths' is empty"):
        TextFiles(TextFilesConfig(paths=[]))


def test_data_files_and_paths_accept_one_string_like_load_dataset():
    from phase7fw.plugins import load_plugins
    from phase7fw.recipe import load_recipe, recipe_to_dict

    write("jsonl")
    with open("notes.txt", "w") as f:
        f.write("a plain text document")
    plugins = load_plugins()
    recipe = load_recipe({"data": {"sources": [{"name": "hf_dataset", "path": "json", "data_files": "*.jsonl"},
                                               {"name": "text_files", "paths": "*.txt"}]}}, plugins=plugins)
    hf, txt = recipe.data.sources
    assert hf.config.data_files == ["*.jsonl"] and txt.config.paths == ["*.txt"]
    assert recipe_to_dict(recipe)["data"]["sources"][0]["data_files"] == ["*.jsonl"]  # saved as an array
    built = [plugins.registry.build("data_source", s.name, s.config, cache_dir="", seed=0) for s in (hf, txt)]
    assert list(built[0].texts()) == DOCS
    assert list(built[1].texts()) == ["a plain text document"]
    with pytest.raises(Phase7Error, match=r"data.sources\[0\].data_files: expected a str or an array of them, got int 3"):
        load_recipe({"data": {"sources": [{"name": "hf_dataset", "path": "json", "data_files": 3}]}}, plugins=plugins)


def test_python_packages_reads_every_module_of_the_named_packages(tmp_path, monkeypatch):
    from phase7fw.components.data_sources import PythonPackages, PythonPackagesConfig

    pkg = tmp_path / "p7fw_corpus_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("A = 1\n")
    (pkg / "sub" / "mod.py").write_text("def f():\n    return 2\n")
    (pkg / "notes.txt").write_text("not code")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = PythonPackages(PythonPackagesConfig(packages=["p7fw_corpus_pkg"]))
    assert list(source.texts()) == ["A = 1\n", "def f():\n    return 2\n"]
    assert source.num_documents() == 2 and "2 files of p7fw_corpus_pkg" in source.describe()
    with pytest.raises(Phase7Error, match=r"python_packages: 'no_such_pkg_p7' is not an installed package"):
        PythonPackages(PythonPackagesConfig(packages=["no_such_pkg_p7"]))
    with pytest.raises(Phase7Error, match="'packages' is empty"):
        PythonPackages(PythonPackagesConfig(packages=[]))
