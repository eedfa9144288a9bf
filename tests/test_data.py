"""adapterkit.data: loading files and Hub ids, checks before training, splits, bundled datasets."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter

import datasets
import pytest
from transformers import PreTrainedTokenizerFast

import adapterkit.data as data
from adapterkit.data import bundled
from adapterkit.data import (
    check_lengths,
    data_dir,
    few_shot,
    load_instructions,
    load_table,
    local_dataset,
    prepare_classification,
    stratified_split,
)
from adapterkit.errors import DataError, InvalidOptionError


def _shared_data():
    try:
        return data_dir()
    except DataError as exc:
        return exc


SHARED = _shared_data()


def needs_shared(*files: str):
    """Skip unless the shared data folder is found and holds ``files`` (a partial copy is skipped too)."""
    if isinstance(SHARED, DataError):
        reason = f"shared data folder not found (set ADAPTERKIT_DATA_DIR or check out ../shared): {SHARED}"
    else:
        missing = [f for f in files if not (SHARED / f).is_file()]
        reason = f"{SHARED} lacks {missing}" if missing else ""
    return pytest.mark.skipif(bool(reason), reason=reason)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- load_table: local files ------------------------------------------------------------------
def test_csv_with_header(tmp_path):
    ds = load_table(write(tmp_path / "a.csv", 'text,label\n"hello, world",pos\nNA,neg\n'))
    assert ds.column_names == ["text", "label"]
    # "NA" is a word here, not a missing value
    assert ds["text"][:] == ["hello, world", "NA"]


def test_headerless_csv_with_column_names(tmp_path):
    path = write(tmp_path / "b.csv", '"3","Title","Body, with comma"\n"1","T2","B2"\n')
    ds = load_table(path, column_names=["label", "title", "body"])
    assert ds.column_names == ["label", "title", "body"]
    assert len(ds) == 2 and ds[0] == {"label": 3, "title": "Title", "body": "Body, with comma"}


def test_tsv_keeps_quotes(tmp_path):
    path = write(tmp_path / "c.tsv", 'label\tsentence\n1\ta "quoted" `` word \'\'\n0\t"starts with a quote\n')
    ds = load_table(path)
    assert ds["sentence"][:] == ['a "quoted" `` word \'\'', '"starts with a quote']
    assert ds["label"][:] == [1, 0]


def test_jsonl_json_and_parquet(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 1}]
    jsonl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    as_list = write(tmp_path / "e.json", json.dumps(rows))
    parquet = tmp_path / "f.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    for source in (jsonl, as_list, str(parquet)):
        assert load_table(source).to_list() == rows
    assert load_table(jsonl, split="train[:2]")["text"][:] == ["a", "b"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        load_table(str(tmp_path / "nope.csv"))
    assert "nope.csv" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load_table("./relative/without/extension")


def test_unsupported_extension(tmp_path):
    with pytest.raises(DataError, match=r"Unsupported data file type '\.txt'") as err:
        load_table(write(tmp_path / "g.txt", "hello\n"))
    assert ".csv" in str(err.value) and ".parquet" in str(err.value)


def test_local_split_and_options(tmp_path):
    path = write(tmp_path / "h.csv", "text,label\na,0\n")
    with pytest.raises(DataError, match="one split, 'train'"):
        load_table(path, split="validation")
    jsonl = write(tmp_path / "i.jsonl", '{"a": 1}\n')
    with pytest.raises(InvalidOptionError, match="only for CSV/TSV"):
        load_table(jsonl, column_names=["x"])


def test_reader_options_pass_through(tmp_path):
    latin = tmp_path / "k.csv"
    latin.write_bytes("text,label\ncaf\xe9,0\n".encode("latin-1"))
    assert load_table(str(latin), encoding="latin-1")["text"][:] == ["caf\u00e9"]
    # a TSV that really uses CSV quoting can opt back in
    quoted = write(tmp_path / "l.tsv", 'text\tlabel\n"a\tb"\t1\n')
    assert load_table(quoted, quoting=csv.QUOTE_MINIMAL)["text"][:] == ["a\tb"]
    with pytest.raises(InvalidOptionError, match="Option not understood .*no_such_option"):
        load_table(quoted, no_such_option=1)
    with pytest.raises(InvalidOptionError, match="streaming=True is not supported"):
        load_table(quoted, streaming=True)
    with pytest.raises(InvalidOptionError, match="data_files"):
        load_table(quoted, data_files="x.csv")


def test_unparsable_file(tmp_path):
    with pytest.raises(DataError, match="Could not"):
        load_table(write(tmp_path / "j.jsonl", '{"a": 1}\nnot json at all\n'))


def test_empty_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"is empty \(0 bytes\)"):
        load_table(write(tmp_path / "none.jsonl", ""))
    with pytest.raises(DataError, match="is a folder; pass one data file"):
        load_table(tmp_path)


# --- load_table: Hub ids ----------------------------------------------------------------------
def test_hub_unreachable_offline(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the real load_dataset fail at once instead of retrying the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_table("adapterkit-tests/no-such-dataset")
    msg = str(err.value)
    assert "adapterkit-tests/no-such-dataset" in msg
    assert "local file" in msg and "HF_HUB_OFFLINE=1" in msg


def test_hub_options_and_config_errors(monkeypatch):
    seen = {}

    def fake(path, split=None, **kwargs):
        if "name" not in kwargs:
            raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['cola', 'sst2']")
        if kwargs.get("bogus"):
            raise TypeError("GlueConfig.__init__() got an unexpected keyword argument 'bogus'")
        seen.update(path=path, split=split, **kwargs)
        return datasets.Dataset.from_dict({"sentence": ["a"], "label": [1]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert len(load_table("nyu-mll/glue", split="train", name="sst2", revision="abc")) == 1
    assert seen == {"path": "nyu-mll/glue", "split": "train", "name": "sst2", "revision": "abc"}
    with pytest.raises(DataError, match=r"(?s)several configurations; choose one with name=.*'sst2'"):
        load_table("nyu-mll/glue", split="train")
    with pytest.raises(InvalidOptionError, match="bogus"):
        load_table("nyu-mll/glue", name="sst2", bogus=True)


def test_hub_unknown_dataset(monkeypatch):
    def not_found(path, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(DataError, match="No dataset 'someone/typo'") as err:
        load_table("someone/typo")
    assert "HF_HUB_OFFLINE=1" in str(err.value)


def test_hub_split_choice(monkeypatch):
    train = datasets.Dataset.from_dict({"x": [1, 2]})
    other = datasets.Dataset.from_dict({"x": [3]})
    calls = []

    def fake(path, split=None, **kwargs):
        calls.append((path, split))
        if split is not None:
            return train
        return datasets.DatasetDict({"validation": other, "train": train}) if path == "a/b" else datasets.DatasetDict(
            {"validation": other, "test": other}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_table("a/b")["x"][:] == [1, 2]
    assert load_table("a/b", split="train[:1]")["x"][:] == [1, 2] and calls[-1] == ("a/b", "train[:1]")
    with pytest.raises(DataError, match=r"splits \['validation', 'test'\]; pass split="):
        load_table("c/d")
    with pytest.raises(InvalidOptionError, match="rename_columns"):
        load_table("a/b", column_names=["y"])


def _datasets_endpoint(monkeypatch, hub_env):
    # datasets copies the endpoint at import, beside huggingface_hub's own copies that hub_env patches.
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", constants.ENDPOINT)
    monkeypatch.setattr(
        datasets.config, "HUB_DATASETS_URL", constants.ENDPOINT + "/datasets/{repo_id}/resolve/{revision}/{path}"
    )
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


def test_hub_dataset_from_loopback_hub(hub_env, monkeypatch, tmp_path):
    repo_id = hub_env.repo_id("tiny-sentiment")
    repo = hub_env.server.create_repo(repo_id, "dataset")
    hub_env.server.commit(
        repo, "main", {"data/train.csv": b"text,label\ngood,1\nbad,0\nfine,1\n", "data/test.csv": b"text,label\nok,1\n"}
    )
    _datasets_endpoint(monkeypatch, hub_env)
    cache = str(tmp_path / "ds_cache")
    ds = load_table(repo_id, split="train", cache_dir=cache)
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "fine", "label": 1}]
    assert ds.to_list() == rows
    assert any(repo_id in path for _, path in hub_env.server.requests)
    # the advice in the "unreachable" message holds: offline mode serves a cached dataset
    hub_env.unreachable()
    _datasets_endpoint(monkeypatch, hub_env)
    hub_env.offline()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert load_table(repo_id, split="train", cache_dir=cache).to_list() == rows


def test_hub_unknown_dataset_on_loopback_hub(hub_env, monkeypatch, tmp_path):
    _datasets_endpoint(monkeypatch, hub_env)
    with pytest.raises(DataError, match="No dataset 'me/never-created'") as err:
        load_table("me/never-created", cache_dir=str(tmp_path / "ds_cache"))
    assert "Check the id" in str(err.value)


def test_hub_unreachable_for_real(hub_env, monkeypatch, tmp_path):
    hub_env.unreachable()  # a closed port: connections are refused, retries do not sleep
    _datasets_endpoint(monkeypatch, hub_env)
    with pytest.raises(DataError) as err:
        load_table("me/anything", split="train", cache_dir=str(tmp_path / "ds_cache"))
    msg = str(err.value)
    assert "Could not reach the Hugging Face Hub" in msg and "'me/anything'" in msg
    assert "Pass a local file" in msg and "HF_HUB_OFFLINE=1" in msg


def test_invalid_hub_id_is_refused_before_any_request(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    with pytest.raises(DataError, match="neither an existing path nor a valid Hub repo id"):
        load_table("not a dataset id")
    with pytest.raises(DataError, match="does not exist"):
        load_table("data/train/part.csv")


# --- sources of classification data -------------------------------------------------------------
def test_a_bundled_name_beats_a_same_named_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sst2").mkdir()
    assert data.dataset_source("sst2").kind == "alias"
    assert data.data_source(dataset="sst2")["eval_data"] == "sst2 (dev)"
    assert data.data_source(dataset="owner/set")["eval_data"] == "owner/set (validation)"
    with pytest.raises(DataError, match="does not exist"):
        data.data_source(dataset="./nowhere")


def test_a_local_file_as_dataset_says_to_pass_train_file(tmp_path):
    path = write(tmp_path / "rows.csv", "text,label\na,0\nb,1\n")
    with pytest.raises(DataError, match=r"is a local path.*train_file="):
        data.classification_splits(dataset=path)


# --- prepare_classification --------------------------------------------------------------------
def test_prepare_string_labels():
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "y": ["pos", "neg", "pos"], "extra": [1, 2, 3]})
    out, names = prepare_classification(ds, text_column="sentence", label_column="y")
    assert names == ["neg", "pos"]
    assert out.column_names == ["text", "label"] and out["label"][:] == [1, 0, 1]
    assert out.features["text"].dtype == "string" and out.features["label"].dtype == "int64"
    out, names = prepare_classification(ds, text_column="sentence", label_column="y", label_names=["pos", "neg"])
    assert names == ["pos", "neg"] and out["label"][:] == [0, 1, 0]


def test_prepare_int_labels_and_classlabel():
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [2, 0, 2]})
    out, names = prepare_classification(ds, text_column="text", label_column="label")
    assert names == ["0", "1", "2"] and out["label"][:] == [2, 0, 2]
    out, names = prepare_classification(ds, text_column="text", label_column="label", label_names=["x", "y", "z"])
    assert names == ["x", "y", "z"]
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["bad", "good"])})
    cl = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=feats)
    assert prepare_classification(cl, text_column="text", label_column="label")[1] == ["bad", "good"]
    # a list of dicts works too
    out, _ = prepare_classification([{"t": "a", "l": 0}, {"t": "b", "l": 1}], text_column="t", label_column="l")
    assert out["label"][:] == [0, 1]


def test_prepare_missing_column():
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError) as err:
        prepare_classification(ds, text_column="sentense", label_column="label")
    msg = str(err.value)
    assert "'sentense'" in msg and "['sentence', 'label']" in msg and "Did you mean 'sentence'?" in msg


def test_prepare_text_pair():
    ds = datasets.Dataset.from_dict(
        {"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"], "label": ["yes", "no", "yes"], "id": [1, 2, 3]}
    )
    out, names = prepare_classification(
        ds, text_column="premise", text_pair_column="hypothesis", label_column="label"
    )
    assert names == ["no", "yes"] and out.column_names == ["text", "text_pair", "label"]
    assert out.to_list()[1] == {"text": "b", "text_pair": "y", "label": 0}
    assert out.features["text_pair"].dtype == "string"
    with pytest.raises(DataError, match="No column 'hypotesis'.*Did you mean 'hypothesis'"):
        prepare_classification(ds, text_column="premise", text_pair_column="hypotesis", label_column="label")
    holes = ds.map(lambda r, i: {"hypothesis": "" if i == 2 else r["hypothesis"]}, with_indices=True)
    with pytest.raises(DataError, match=r"1 of 3 rows have an empty or missing 'hypothesis' \(row indexes \[2\]\)"):
        prepare_classification(holes, text_column="premise", text_pair_column="hypothesis", label_column="label")


def test_prepare_empty():
    ds = datasets.Dataset.from_dict({"text": [], "label": []})
    with pytest.raises(DataError, match="empty"):
        prepare_classification(ds, text_column="text", label_column="label")


def test_prepare_labels_outside_set():
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": ["pos", "neg", "meh", "meh"]})
    with pytest.raises(DataError) as err:
        prepare_classification(ds, text_column="text", label_column="label", label_names=["neg", "pos"])
    msg = str(err.value)
    assert "2 rows" in msg and "'meh'" in msg and "0='neg', 1='pos'" in msg
    ints = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 5]})
    with pytest.raises(DataError, match=r"1 rows .* outside the label set .*: 5"):
        prepare_classification(ints, text_column="text", label_column="label", label_names=["neg", "pos"])
    negative = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, -1]})
    with pytest.raises(DataError, match="-1"):
        prepare_classification(negative, text_column="text", label_column="label")


def test_prepare_mixed_labels_and_bad_label_names():
    ds = datasets.Dataset.from_list([{"text": "a", "label": 0}, {"text": "b", "label": 1.5}])
    with pytest.raises(DataError, match="all class ids .* or all class names"):
        prepare_classification(ds, text_column="text", label_column="label")
    # A missing label is said as such, not as a type mix.
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [None, 1]})
    with pytest.raises(DataError, match=r"1 of 2 rows have an empty or missing label .*\[0\]"):
        prepare_classification(ds, text_column="text", label_column="label")
    ok = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(InvalidOptionError, match="unique"):
        prepare_classification(ok, text_column="text", label_column="label", label_names=["a", "a"])


def test_prepare_single_class():
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["pos", "pos"]})
    with pytest.raises(DataError, match=r"Only one class \('pos'\) .* at least two"):
        prepare_classification(ds, text_column="text", label_column="label")


def test_prepare_empty_texts():
    ds = datasets.Dataset.from_dict({"text": ["ok", "", None, "  ", "fine"], "label": [0, 1, 0, 1, 0]})
    with pytest.raises(DataError) as err:
        prepare_classification(ds, text_column="text", label_column="label")
    msg = str(err.value)
    assert "3 of 5 rows" in msg and "[1, 2, 3]" in msg


# --- few_shot / stratified_split --------------------------------------------------------------
@pytest.fixture
def toy():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    return datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(100)], "label": labels})


def test_few_shot(toy):
    a = few_shot(toy, 4, seed=1)
    assert Counter(a["label"][:]) == {0: 4, 1: 4, 2: 4}
    assert a["text"][:] == few_shot(toy, 4, seed=1)["text"][:]
    assert a["text"][:] != few_shot(toy, 4, seed=2)["text"][:]
    with pytest.raises(DataError) as err:
        few_shot(toy, 25, seed=0)
    assert "{2: 20}" in str(err.value) and "k=25" in str(err.value)
    with pytest.raises(InvalidOptionError, match="positive int"):
        few_shot(toy, 0, seed=0)
    with pytest.raises(DataError, match="No column 'label'"):
        few_shot(toy.rename_column("label", "y"), 1, seed=0)


def test_few_shot_and_split_on_other_column(toy):
    named = toy.map(lambda r: {"topic": "abc"[r["label"]]}).remove_columns("label")
    shots = few_shot(named, 3, seed=0, label_column="topic")
    assert Counter(shots["topic"][:]) == {"a": 3, "b": 3, "c": 3}
    with pytest.raises(DataError, match=r"'c': 20"):
        few_shot(named, 21, seed=0, label_column="topic")
    train, test = stratified_split(named, 10, 0, label_column="topic")  # seed may be positional
    assert Counter(test["topic"][:]) == {"a": 5, "b": 3, "c": 2} and len(train) == 90
    unlabelled = datasets.Dataset.from_dict({"y": [0, None, 1]})
    with pytest.raises(DataError, match=r"'y' mix types .*prepare_classification"):
        few_shot(unlabelled, 1, seed=0, label_column="y")


def test_stratified_split(toy):
    train, test = stratified_split(toy, 0.2, seed=0)
    assert len(train) == 80 and len(test) == 20
    assert Counter(test["label"][:]) == {0: 10, 1: 6, 2: 4}
    assert sorted(train["text"][:] + test["text"][:]) == sorted(toy["text"][:])
    assert test["text"][:] == stratified_split(toy, 0.2, seed=0)[1]["text"][:]
    assert test["text"][:] != stratified_split(toy, 0.2, seed=1)[1]["text"][:]
    # an exact count is kept even when the per-class quotas are fractional
    _, test = stratified_split(toy, 7, seed=0)
    assert len(test) == 7 and Counter(test["label"][:]) == {0: 4, 1: 2, 2: 1}


@pytest.mark.parametrize("bad", [0, 100, 1.0, 0.0, True, "0.2"])
def test_stratified_split_bad_size(toy, bad):
    with pytest.raises(InvalidOptionError, match="test_size"):
        stratified_split(toy, bad, seed=0)


def test_stratified_split_keeps_rows_and_features(toy):
    # Labels that are neither 0..n-1 nor a ClassLabel stay exactly as they were, features too.
    odd = toy.map(lambda r: {"label": [5, 2, 9][r["label"]]})
    train, test = stratified_split(odd, 0.2, seed=0)
    assert Counter(test["label"][:]) == {5: 10, 2: 6, 9: 4} and train.features == odd.features
    names = datasets.ClassLabel(names=["a", "b", "c"])
    classes = toy.cast_column("label", names)
    train, test = stratified_split(classes, 10, seed=3)
    assert test.features["label"] == names and Counter(test["label"][:]) == {0: 5, 1: 3, 2: 2}
    assert sorted(train["text"][:] + test["text"][:]) == sorted(toy["text"][:])


def test_stratified_split_refuses_what_it_cannot_stratify(toy):
    lonely = datasets.Dataset.from_dict({"text": list("abcde"), "label": [0, 0, 1, 1, 2]})
    with pytest.raises(DataError, match=r"classes \[2\] have a single row"):
        stratified_split(lonely, 2, seed=0)
    with pytest.raises(DataError, match="each side needs at least 3 rows"):
        stratified_split(toy, 2, seed=0)
    with pytest.raises(DataError, match="each side needs at least 3 rows"):
        data.subset(toy, 2, seed=0)
    assert len(data.subset(toy, 3, seed=0)) == 3 and data.subset(toy, None, seed=0) is toy


# --- check_lengths ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 50)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", model_max_length=64)


def test_check_lengths(word_tokenizer):
    texts = ["w2 w3", "w2 " * 10, "w4 " * 7, "w5"]
    assert check_lengths(texts, word_tokenizer, 8) == 1
    assert check_lengths(texts, word_tokenizer, 6) == 2
    assert check_lengths(texts, word_tokenizer, 10) == 0
    assert check_lengths([], word_tokenizer, 1, policy="error") == 0
    with pytest.raises(DataError) as err:
        check_lengths(texts, word_tokenizer, 6, policy="error")
    msg = str(err.value)
    assert "2 of 4 rows" in msg and "longest: 10" in msg and "max_length=6" in msg
    assert "maximum of 64" in msg and 'policy="truncate"' in msg


def test_check_lengths_model_maximum(word_tokenizer, caplog):
    texts = ["w2 " * 70, "w3", "w4 " * 80]
    # max_length defaults to the tokenizer's model_max_length (64)
    assert check_lengths(texts, word_tokenizer) == 2
    with pytest.raises(DataError) as err:
        check_lengths(texts, word_tokenizer, None, "error")
    msg = str(err.value)
    assert "2 of 3 rows" in msg and "longest: 80" in msg and "at most 64 tokens: shorten or split" in msg
    with caplog.at_level(logging.WARNING, logger="adapterkit.data"):
        assert check_lengths(texts, word_tokenizer, 100) == 0
    assert "above the model's maximum of 64" in caplog.text
    with pytest.raises(InvalidOptionError, match="positive int"):
        check_lengths(texts, word_tokenizer, 0)


def test_check_lengths_unknown_limit(word_tokenizer):
    from copy import copy

    unlimited = copy(word_tokenizer)
    unlimited.model_max_length = int(1e30)  # what tokenizers without a known limit report
    with pytest.raises(InvalidOptionError, match="pass max_length="):
        check_lengths(["w2"], unlimited)
    with pytest.raises(DataError, match="max_position_embeddings"):
        check_lengths(["w2 w3 w4"], unlimited, 2, policy="error")


def test_check_lengths_unknown_policy(word_tokenizer):
    with pytest.raises(InvalidOptionError) as err:
        check_lengths(["w2"], word_tokenizer, 8, policy="truncat")
    assert "['truncate', 'error']" in str(err.value) and "Did you mean 'truncate'?" in str(err.value)


# --- data_dir ---------------------------------------------------------------------------------
def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERKIT_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv("ADAPTERKIT_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="ADAPTERKIT_DATA_DIR=.*is not a folder"):
        data_dir()


def test_data_dir_walks_up(monkeypatch, tmp_path):
    monkeypatch.delenv("ADAPTERKIT_DATA_DIR", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    deep = tmp_path / "main" / "sub"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    monkeypatch.setattr(bundled, "__file__", str(tmp_path / "elsewhere" / "bundled.py"))
    assert data_dir() == tmp_path / "shared" / "data"


def test_data_dir_not_found(monkeypatch, tmp_path):
    monkeypatch.delenv("ADAPTERKIT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bundled, "__file__", str(tmp_path / "pkg" / "bundled.py"))
    if any((p / "shared" / "data").is_dir() for p in tmp_path.parents):
        pytest.skip("a shared/data folder sits above the temporary folder")
    with pytest.raises(DataError, match="Set ADAPTERKIT_DATA_DIR"):
        data_dir()


# --- bundled datasets (real files) ------------------------------------------------------------
def test_local_dataset_bad_name_or_split():
    with pytest.raises(DataError) as err:
        local_dataset("sst", "train")
    assert "['ag_news', 'sst2', 'trec']" in str(err.value) and "Did you mean 'sst2'?" in str(err.value)
    with pytest.raises(DataError, match=r"splits \['train', 'test'\], not 'dev'"):
        local_dataset("trec", "dev")


@needs_shared("sst2/train.tsv", "sst2/dev.tsv", "sst2/test.tsv")
@pytest.mark.parametrize(
    "split, rows, counts",
    [("train", 6920, {0: 3310, 1: 3610}), ("dev", 872, {0: 428, 1: 444}), ("test", 1821, {0: 912, 1: 909})],
)
def test_sst2(split, rows, counts):
    ds, names = local_dataset("sst2", split)
    assert names == ["negative", "positive"] and len(ds) == rows and Counter(ds["label"][:]) == counts
    if split == "train":
        # PTB-style quotes must survive the TSV reader untouched
        assert "this is no `` waterboy ! ''" in ds["text"][:]


@needs_shared("trec/train.tsv", "trec/test.tsv")
def test_trec():
    train, names = local_dataset("trec", "train")
    test, _ = local_dataset("trec", "test")
    assert names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(train) == 5452 and Counter(train["label"][:])[0] == 86
    assert len(test) == 500 and [Counter(test["label"][:])[i] for i in range(6)] == [9, 138, 94, 65, 81, 113]


@needs_shared("ag_news/test.csv", "ag_news/classes.txt")
def test_ag_news():
    train, names = local_dataset("ag_news", "train")
    test, _ = local_dataset("ag_news", "test")
    assert names == ["World", "Sports", "Business", "Sci/Tech"]
    assert len(train) == 6000 and len(test) == 1600
    assert Counter(test["label"][:]) == {0: 400, 1: 400, 2: 400, 3: 400}
    texts = train["text"][:] + test["text"][:]
    assert not any("\\" in t for t in texts)
    assert not any("#36;" in t or "#39;" in t for t in texts)
    assert any("$10 million Ansari X Prize" in t for t in texts)
    # "\\$" is an escaped dollar, other backslashes are line breaks
    assert any("Lenovo will pay US$1.25 billion" in t for t in texts)
    assert any("manufacturer General Electric Co." in t for t in texts)
    assert test["text"][:] == local_dataset("ag_news", "test")[0]["text"][:]


@needs_shared("self_instruct/seed_tasks.jsonl", "self_instruct/user_oriented_instructions.jsonl")
def test_load_instructions_real():
    seed = load_instructions()
    assert len(seed) == 175 and seed.column_names == ["instruction", "input", "output"]
    assert all(seed["instruction"][:]) and all(o.strip() for o in seed["output"][:])
    user = load_instructions(str(SHARED / "self_instruct" / "user_oriented_instructions.jsonl"))
    assert len(user) == 252 and any(user["input"][:])


def test_load_instructions_files(tmp_path):
    rows = [
        {"instruction": "Add", "instances": [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]},
        {"instruction": "Greet", "output": "hi"},
    ]
    ds = load_instructions(write(tmp_path / "i.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert ds.to_list() == [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Greet", "input": "", "output": "hi"},
    ]
    with pytest.raises(DataError, match="does not exist"):
        load_instructions(str(tmp_path / "none.jsonl"))
    with pytest.raises(DataError, match="not valid JSON"):
        load_instructions(write(tmp_path / "bad.jsonl", '{"instruction": "x"\n'))
    with pytest.raises(DataError, match="Record 1 .* needs a non-empty 'instruction'"):
        load_instructions(write(tmp_path / "noinst.jsonl", '{"output": "x"}\n'))
    as_list = load_instructions(write(tmp_path / "list.json", json.dumps(rows)))
    assert as_list.to_list() == ds.to_list()
    with pytest.raises(DataError, match="Record 2 .* has keys \\['instruction'\\]"):
        load_instructions(write(tmp_path / "nooutput.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n'))
