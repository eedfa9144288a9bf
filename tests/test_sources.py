"""adapterkit.sources: one answer to "is this a path, a Hub id or an alias?" for every caller."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterkit.errors import DataError, InvalidOptionError
from adapterkit.sources import looks_like_path, resolve_source


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A current directory holding a folder ``runs/`` and a file ``train.csv``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "train.csv").write_text("text,label\n")
    return tmp_path


def test_existing_folder_and_file(here):
    folder = resolve_source("runs", what="adapter")
    assert (folder.kind, folder.path, folder.is_local) == ("folder", Path("runs"), True)
    file = resolve_source("train.csv", what="dataset")
    assert (file.kind, file.path, file.repo_id) == ("file", Path("train.csv"), None)
    assert resolve_source(here / "runs", what="adapter").kind == "folder"  # a Path
    assert resolve_source(str(here / "train.csv"), what="dataset").kind == "file"  # absolute


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "adapters").mkdir()
    assert resolve_source("~/adapters", what="adapter").path == tmp_path / "adapters"


@pytest.mark.parametrize("text", ["owner/name", "gpt2", "sentence-transformers/all-MiniLM-L6-v2", "me/model.v2"])
def test_hub_ids(here, text):
    source = resolve_source(text, what="model")
    assert (source.kind, source.repo_id, source.path, source.is_local) == ("hub", text, None, False)


@pytest.mark.parametrize("text", ["./missing", "a/b/c", "x.csv", "~/nothing/here", "../up", "C:\\data\\x", "C:/data"])
def test_a_missing_path_is_never_a_hub_id(here, text):
    with pytest.raises(InvalidOptionError) as info:
        resolve_source(text, what="adapter")
    msg = str(info.value)
    assert f"No such adapter: the path {text} does not exist" in msg and "not a Hub repo id" in msg
    assert str(here) in msg or Path(text).expanduser().is_absolute()


def test_a_path_object_that_does_not_exist_is_a_missing_path(here):
    # Even when its text would be a valid Hub id: a Path is always meant as a path.
    with pytest.raises(InvalidOptionError, match="the path owner/name does not exist"):
        resolve_source(Path("owner/name"), what="model")


@pytest.mark.parametrize("text", ["bad name", "-x", "x--y", "a" * 97, "owner/"])
def test_an_invalid_hub_id(here, text):
    with pytest.raises(DataError, match=r"neither an existing path nor a valid Hub repo id or one of \['sst2'\]"):
        resolve_source(text, what="dataset", aliases=["sst2"], error=DataError)


@pytest.mark.parametrize("value", [None, 3, b"runs", ["runs"]])
def test_not_a_string(value):
    with pytest.raises(InvalidOptionError, match=f"got {type(value).__name__}"):
        resolve_source(value, what="adapter")


@pytest.mark.parametrize("text", ["", "   "])
def test_empty(text):
    with pytest.raises(InvalidOptionError, match="name is empty"):
        resolve_source(text, what="adapter")


def test_an_alias_wins_over_a_same_named_folder_and_the_hub(here):
    (here / "sst2").mkdir()
    alias = resolve_source("sst2", what="dataset", aliases={"sst2": ..., "trec": ...})
    assert (alias.kind, alias.alias, alias.path) == ("alias", "sst2", None)
    # ./sst2 and a Path name the folder; an unknown name is still a Hub id.
    assert resolve_source("./sst2", what="dataset", aliases=["sst2"]).kind == "folder"
    assert resolve_source(here / "sst2", what="dataset", aliases=["sst2"]).kind == "folder"
    assert resolve_source("trec", what="dataset", aliases=[]).kind == "hub"


def test_the_callers_error_class():
    with pytest.raises(DataError):
        resolve_source("./missing.csv", what="dataset", error=DataError)


@pytest.mark.parametrize(
    "text, path_like",
    [("./x", True), ("/abs", True), ("~/x", True), ("a\\b", True), ("a/b/c", True), ("x.jsonl", True),
     ("C:/x", True), ("owner/name", False), ("gpt2", False), ("owner/model.v2", False)],
)
def test_looks_like_path(text, path_like):
    assert looks_like_path(text) is path_like
