"""ak.train refuses bad settings and bad rows with a clear error before any Trainer is built.

A catalog: every case is a real ``ak.train`` call on a tiny model that must raise the named
adapterkit error, leave the adapter's weights untouched and never reach Trainer (a real
``TrainerCallback`` records Trainer's ``on_init_end``).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

import adapterkit as ak
from tests.tiny import TINY, save_tiny

QUIET = dict(show_progress=False, logging_steps=1000, max_steps=1, batch_size=4, max_length=16)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tiny("bert", tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tiny("llama", tmp_path_factory.mktemp("ltok")))


def rows(n: int = 8, labels=(0, 1), seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(f"w{rng.randrange(3, 60)}" for _ in range(4)), "label": labels[i % len(labels)]}
            for i in range(n)]


class Built(TrainerCallback):
    """Records whether a Trainer was ever built with it."""

    built = False

    def on_init_end(self, args, state, control, **kwargs):
        self.built = True


def bert_with_lora():
    torch.manual_seed(0)
    return ak.attach(TINY["bert"](), "lora", r=2)


def refused(model, tokenizer, train_data, eval_data=None, *, error, match, tmp_path, **settings):
    """Run ak.train, expect ``error`` matching ``match``; check nothing trained and no Trainer was built."""
    before = {k: v.detach().clone() for k, v in ak.trainable_parameters(model, "default").items()}
    spy = Built()
    out = tmp_path / "out"
    options = {**QUIET, "output_dir": str(out), **settings}
    with pytest.raises(error, match=match) as info:
        ak.train(model, tokenizer, train_data, eval_data, callbacks=[spy], **options)
    assert not spy.built, "a Trainer was built before the input was checked"
    assert not out.exists()
    for key, value in ak.trainable_parameters(model, "default").items():
        assert torch.equal(value.detach(), before[key]), f"{key} changed"
    assert "Traceback" not in str(info.value)
    return str(info.value)


# --- settings -------------------------------------------------------------------------------
BAD_SETTINGS = [
    ("batch_size", 0, "batch_size= must be a positive int"),
    ("batch_size", -4, "batch_size= must be a positive int"),
    ("batch_size", 2.5, "batch_size= must be a positive int"),
    ("batch_size", True, "batch_size= must be a positive int"),
    ("eval_batch_size", 0, "eval_batch_size= must be a positive int"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps= must be a positive int"),
    ("learning_rate", -1e-3, "learning_rate= must be a positive number"),
    ("learning_rate", 0.0, "learning_rate= must be a positive number"),
    ("learning_rate", math.nan, "learning_rate= must be a positive number"),
    ("learning_rate", math.inf, "learning_rate= must be a positive number"),
    ("learning_rate", "1e-3", "learning_rate= must be a positive number"),
    ("max_length", 0, "max_length= must be a positive int"),
    ("max_length", -8, "max_length= must be a positive int"),
    ("max_length", 65, "at most the model's position limit of 64"),  # tiny bert: max_position_embeddings=64
    ("max_length", 100_000, "at most the model's position limit of 64"),
    ("max_steps", 0, "max_steps= must be a positive int, or -1"),
    ("max_steps", -2, "max_steps= must be a positive int, or -1"),
    ("warmup_ratio", 1.5, r"warmup_ratio= must be a fraction of the steps in \[0, 1\)"),
    ("warmup_ratio", -0.1, r"warmup_ratio= must be a fraction"),
    ("weight_decay", -0.01, "weight_decay= must be a number >= 0"),
    ("seed", -1, r"seed= must be an int in \[0, 2\*\*32\)"),
    ("seed", 2**32, r"seed= must be an int"),
    ("eval_strategy", "epochs", "eval_strategy= must be 'no' or 'steps' or 'epoch'"),
    ("save_strategy", "always", "save_strategy= must be"),
    ("logging_steps", 0, "logging_steps= must be a positive int"),
    ("eval_steps", -5, "eval_steps= must be a positive int"),
    ("save_steps", 0, "save_steps= must be a positive int"),
    ("optim", "adamw", "optim= must be a Trainer optimizer name.*Did you mean"),
    ("length_policy", "cut", "length_policy= must be 'truncate' or 'error'"),
    ("group_by_length", "yes", "group_by_length= must be True or False"),
    ("cache_features", "auto", "cache_features= must be True, False or None"),
    ("resume_from_checkpoint", "/nonexistent/checkpoint-6", "resume_from_checkpoint= must be an existing checkpoint"),
]


@pytest.mark.parametrize("key,value,message", BAD_SETTINGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_before_training(tok, tmp_path, key, value, message):
    refused(bert_with_lora(), tok, rows(), error=ak.InvalidOptionError, match=message, tmp_path=tmp_path,
            **{key: value})


def test_num_epochs_must_be_positive_unless_max_steps_decides(tok, tmp_path):
    for epochs in (0, -1.0):
        refused(bert_with_lora(), tok, rows(), error=ak.InvalidOptionError, match="num_epochs= must be a positive",
                tmp_path=tmp_path, num_epochs=epochs, max_steps=-1)
    # With max_steps set, num_epochs is not used: 0 is fine.
    metrics = ak.train(bert_with_lora(), tok, rows(), **{**QUIET, "num_epochs": 0})
    assert metrics["train_loss"] > 0


def test_output_dir_that_is_a_file(tok, tmp_path):
    path = tmp_path / "taken"
    path.write_text("user file")
    model = bert_with_lora()
    with pytest.raises(ak.InvalidOptionError, match="output_dir= must be a folder"):
        ak.train(model, tok, rows(), **{**QUIET, "output_dir": str(path)})
    assert path.read_text() == "user file"


def test_every_bad_setting_is_listed_at_once(tok, tmp_path):
    message = refused(bert_with_lora(), tok, rows(), error=ak.InvalidOptionError, match="Invalid training settings",
                      tmp_path=tmp_path, batch_size=0, learning_rate=-1.0, max_length=0)
    assert all(k in message for k in ("batch_size=", "learning_rate=", "max_length="))


def test_missing_tokenizer_and_unknown_adapter_name(tok, tmp_path):
    refused(bert_with_lora(), None, rows(), error=ak.InvalidOptionError, match="tokenizer must be", tmp_path=tmp_path)
    model = bert_with_lora()
    with pytest.raises(ak.InvalidOptionError, match="No adapter named 'defualt'.*Did you mean 'default'"):
        ak.train(model, tok, rows(), name="defualt", **QUIET)


def test_default_max_length_fits_the_model(tok):
    """Left unset, max_length is 128 capped at the model's 64 positions: no error, and recorded."""
    model = bert_with_lora()
    settings = {k: v for k, v in QUIET.items() if k != "max_length"}
    ak.train(model, tok, rows(), **settings)
    from adapterkit.state import get_store, unwrap

    record = get_store(unwrap(model)).record("default")
    assert record.meta["recipe"]["train_settings"]["max_length"] == 64


def test_max_length_at_the_limit_is_accepted(tok):
    metrics = ak.train(bert_with_lora(), tok, rows(), **{**QUIET, "max_length": 64})
    assert metrics["train_loss"] > 0


@pytest.mark.parametrize("spelling", ["python", "cli"])
def test_setting_hints_follow_the_caller(tok, tmp_path, spelling):
    from adapterkit.errors import cli_spelling

    model = bert_with_lora()
    with pytest.raises(ak.InvalidOptionError) as info:
        if spelling == "cli":
            with cli_spelling():
                ak.train(model, tok, rows(), **{**QUIET, "batch_size": 0})
        else:
            ak.train(model, tok, rows(), **{**QUIET, "batch_size": 0})
    text = str(info.value)
    assert ("--batch-size must be" in text) == (spelling == "cli")
    assert ("batch_size= must be" in text) == (spelling == "python")


# --- rows -----------------------------------------------------------------------------------
def with_row(row: dict, n: int = 8) -> list[dict]:
    data = rows(n)
    data[3] = row
    return data


BAD_CLASSIFICATION_ROWS = [
    ("one class", [{"text": f"w{i + 3} w4", "label": 1} for i in range(8)], None, "one class only"),
    ("empty text", with_row({"text": "", "label": 0}), None, r"empty 'text' \(row indexes \[3\]\)"),
    ("blank text", with_row({"text": "   ", "label": 0}), None, r"empty 'text' \(row indexes \[3\]\)"),
    ("None text", with_row({"text": None, "label": 0}), None, r"'text' that is not a string \(NoneType"),
    ("int texts", [{"text": i, "label": i % 2} for i in range(8)], None, r"'text' that is not a string \(int"),
    ("empty label cell", [{"text": f"w{i + 3}", "label": "" if i == 2 else str(i % 2)} for i in range(8)], None,
     r"empty or missing label \(row indexes \[2\]\)"),
    ("None label", [{"text": f"w{i + 3}", "label": None if i == 5 else i % 2} for i in range(8)], None,
     r"empty or missing label \(row indexes \[5\]\)"),
    ("class names", [{"text": f"w{i + 3}", "label": ["neg", "pos"][i % 2]} for i in range(8)], None,
     "not class ids.*prepare_classification"),
    ("float label", [{"text": f"w{i + 3}", "label": 0.5 + i % 2} for i in range(8)], None, "not class ids"),
    ("label above num_labels", with_row({"text": "w5", "label": 3}), None, r"labels outside 0..2.*num_labels=3"),
    ("negative label", with_row({"text": "w5", "label": -1}), None, r"labels outside 0..2"),
    ("eval label above num_labels", rows(), with_row({"text": "w5", "label": 7}), r"eval_data has labels outside 0..2"),
    ("eval label train never shows", rows(labels=(0, 1)), rows(labels=(0, 2)),
     r"eval_data has labels \[2\] that train_data never shows"),
    ("eval empty text", rows(), with_row({"text": "", "label": 1}), r"eval_data have an empty 'text'"),
    ("empty train list", [], None, "train_data is empty"),
    ("empty eval list", rows(), [], "eval_data is empty"),
    ("wrong columns", [{"sentence": "w3", "label": 0}] * 4, None, "needs columns 'text' and 'label'"),
    ("text_pair None", [{"text": "w3", "text_pair": None if i == 1 else "w4", "label": i % 2} for i in range(8)],
     None, r"'text_pair' that is not a string"),
]


@pytest.mark.parametrize("case,train,evaluation,message", BAD_CLASSIFICATION_ROWS,
                         ids=[c[0] for c in BAD_CLASSIFICATION_ROWS])
def test_bad_classification_rows_are_refused(tok, tmp_path, case, train, evaluation, message):
    refused(bert_with_lora(), tok, train, evaluation, error=ak.DataError, match=message, tmp_path=tmp_path)


def test_unsupported_data_type(tok, tmp_path):
    refused(bert_with_lora(), tok, "train.csv", error=ak.DataError, match="must be a datasets.Dataset", tmp_path=tmp_path)


BAD_LM_ROWS = [
    ("empty completion", [{"prompt": "w3 w4", "completion": ""}] * 4, None, r"empty 'completion'"),
    ("None completion", [{"prompt": "w3", "completion": None}, {"prompt": "w4", "completion": " w5"}], None,
     r"'completion' that is not a string"),
    ("None prompt", [{"prompt": None, "completion": " w5"}, {"prompt": "w4", "completion": " w5"}], None,
     r"'prompt' that is not a string"),
    ("empty text", [{"text": "w3 w4"}, {"text": ""}], None, r"empty 'text' \(row indexes \[1\]\)"),
    ("eval of another shape", [{"prompt": "w3", "completion": " w4"}] * 4, [{"text": "w3 w4"}] * 2,
     "eval_data has the 'text' shape.*train_data the 'completion' one"),
]


@pytest.mark.parametrize("case,train,evaluation,message", BAD_LM_ROWS, ids=[c[0] for c in BAD_LM_ROWS])
def test_bad_causal_lm_rows_are_refused(llama_tok, tmp_path, case, train, evaluation, message):
    torch.manual_seed(0)
    model = ak.attach(TINY["llama"](), "lora", r=2)
    refused(model, llama_tok, train, evaluation, error=ak.DataError, match=message, tmp_path=tmp_path)


def test_empty_prompt_is_fine(llama_tok):
    torch.manual_seed(0)
    model = ak.attach(TINY["llama"](), "lora", r=2)
    metrics = ak.train(model, llama_tok, [{"prompt": "", "completion": " w5 w6"}] * 4, **QUIET)
    assert metrics["train_loss"] > 0


@pytest.mark.parametrize("spelling", ["python", "cli"])
def test_over_long_text_with_error_policy(tok, tmp_path, spelling):
    from adapterkit.errors import cli_spelling

    data = with_row({"text": " ".join(["w9"] * 40), "label": 0})
    model = bert_with_lora()
    with pytest.raises(ak.DataError, match="longer than max_length=16") as info:
        if spelling == "cli":
            with cli_spelling():
                ak.train(model, tok, data, length_policy="error", **QUIET)
        else:
            ak.train(model, tok, data, length_policy="error", **QUIET)
    hint = "--length-policy truncate" if spelling == "cli" else 'length_policy="truncate"'
    assert hint in str(info.value)


def test_text_pair_is_tokenized_as_a_pair(tok):
    """Rows from prepare_classification(text_pair_column=...) train on both texts, not on the first alone."""
    import datasets

    from adapterkit.training import tokenize

    ds = datasets.Dataset.from_list([{"text": "w3 w4", "text_pair": "w5 w6 w7", "label": 0}])
    ids = tokenize(ds, tok, task="classification", max_length=16, num_labels=3)["input_ids"][0]
    assert ids == tok("w3 w4", "w5 w6 w7")["input_ids"]
