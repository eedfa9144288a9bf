"""adapterkit.training's task shapes, settings on TrainingArguments, and what train() returns.

Real tiny models and Trainer throughout; the old hand-written collator's batches are computed
here from first principles (pad to the longest row with the pad id, mask 0, label -100).
"""

from __future__ import annotations

import copy
import json
import pickle
import random

import datasets
import pytest
import torch
import transformers
from transformers import AutoTokenizer, TrainerCallback

import adapterkit as ak
from adapterkit.training import Task, get_task, list_tasks, register_task, tasks, tokenize
from tests.test_training import toy_rows
from tests.tiny import TINY, save_tiny

QUIET = dict(show_progress=False, logging_steps=1000, max_length=16)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {arch: AutoTokenizer.from_pretrained(save_tiny(arch, tmp_path_factory.mktemp(arch))) for arch in ("bert", "llama")}


@pytest.fixture
def tok(tokenizers):
    return tokenizers["bert"]


@pytest.fixture
def llama_tok(tokenizers):
    return tokenizers["llama"]


def bert_with(strategy: str = "lora", **options):
    torch.manual_seed(0)
    return ak.attach(TINY["bert"](), strategy, **options)


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


# --- the registry ----------------------------------------------------------------------------
def test_builtin_shapes_are_registered_and_picked_by_model_task_and_columns():
    assert {"classification", "pair-classification", "completion", "text", "seq2seq"} <= set(list_tasks())
    pick = {
        ("classification", ("text", "label")): "classification",
        ("classification", ("text", "text_pair", "label")): "pair-classification",
        ("causal-lm", ("prompt", "completion")): "completion",
        ("causal-lm", ("text",)): "text",
        ("seq2seq", ("prompt", "completion")): "seq2seq",
    }
    for (model_task, columns), name in pick.items():
        ds = datasets.Dataset.from_dict({c: ["w3"] for c in columns})
        assert tasks.find_task(model_task, ds).name == name
    assert get_task("seq2seq").name == "seq2seq"
    with pytest.raises(ak.InvalidOptionError, match="Did you mean 'seq2seq'"):
        get_task("seq2seqq")


def test_a_shape_no_model_task_has_is_named(tok):
    ds = datasets.Dataset.from_dict({"text": ["w3"]})
    with pytest.raises(ak.DataError, match="No task shape trains a 'image-classification' model.*register_task"):
        tasks.find_task("image-classification", ds)


# A toy shape registered from outside the library: one tag per word, on a token classifier.
class Tagging(Task):
    model_tasks = ("feature-extraction",)
    columns = ("tokens", "tags")

    def check(self, train_ds, eval_ds, *, num_labels):
        for ds in (train_ds, eval_ds):
            if ds is not None and any(len(t) != len(g) for t, g in zip(ds["tokens"], ds["tags"])):
                raise ak.DataError("every word needs one tag")

    def check_lengths(self, ds, tokenizer, *, max_length, max_target_length, policy, what):
        pass

    def tokenize(self, ds, tokenizer, *, max_length, max_target_length=None, num_labels=None, what="data"):
        def encode(batch):
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
            enc["labels"] = [[-100 if w is None else tags[w] for w in enc.word_ids(i)]
                             for i, tags in enumerate(batch["tags"])]
            return enc

        return ds.map(encode, batched=True, remove_columns=ds.column_names)

    def collator(self, tokenizer, model):
        return transformers.DataCollatorForTokenClassification(tokenizer)


@pytest.fixture
def tagging(monkeypatch):
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))  # the registration ends with the test
    register_task("tagging")(Tagging)
    return Tagging


def tag_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(3, 40) for _ in range(rng.randrange(2, 8))]
        rows.append({"tokens": [f"w{i}" for i in ids], "tags": [i % 2 for i in ids]})  # the tag is the parity
    return rows


def test_a_registered_shape_trains_a_token_tagger_without_editing_the_library(tok, tagging):
    torch.manual_seed(0)
    config = TINY["bert"]().config
    config.num_labels = 2
    model = ak.attach(transformers.BertForTokenClassification(config), "full")
    row = tag_rows(1)
    # the shape's own tokenize, reached through the model's task and the columns
    assert tokenize(datasets.Dataset.from_list(row), tok, task="feature-extraction",
                    max_length=16)[0]["labels"] == row[0]["tags"]
    data, held_out = tag_rows(64), tag_rows(16)
    first = Losses()
    metrics = ak.train(model, tok, data, held_out, callbacks=[first], num_epochs=4, batch_size=8,
                       learning_rate=5e-3, **{**QUIET, "logging_steps": 1})
    assert metrics["eval_loss"] < 0.6 * first.losses[0]
    with pytest.raises(ak.InvalidOptionError, match="already registered"):
        register_task("tagging")(Tagging)


# --- collators: the same batches as the hand-written collator they replace --------------------
def old_collate(features: list[dict], pad_id: int, side: str) -> dict[str, list]:
    """What adapterkit's _Collator produced: every sequence padded to the longest row, on ``side``,
    input ids with the pad id, masks and token types with 0, per-token labels with -100."""
    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, list] = {}
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0), ("labels", -100)):
        if key not in features[0]:
            continue
        rows = []
        for f in features:
            seq = f[key]
            if not isinstance(seq, list):  # a class id
                rows.append(seq)
                continue
            pad = [value] * (width - len(seq))
            rows.append(pad + seq if side == "left" else seq + pad)
        out[key] = rows
    return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape,model_task,rows", [
    ("classification", "classification", toy_rows(6)),
    ("pair-classification", "classification", [{"text": "w3 w4", "text_pair": "w5 w6 w7 w8", "label": 1},
                                                {"text": "w9", "text_pair": "w10", "label": 0}]),
    ("completion", "causal-lm", [{"prompt": "w3 w4 ->", "completion": " w5"}, {"prompt": "", "completion": " w6 w7 w8"}]),
    ("text", "causal-lm", [{"text": "w3 w4 w5 w6"}, {"text": "w7"}]),
])
def test_collated_batches_equal_the_old_padding(tok, llama_tok, side, shape, model_task, rows):
    sided = copy.deepcopy(llama_tok if model_task == "causal-lm" else tok)
    sided.padding_side = side
    task = get_task(shape)
    features = list(task.tokenize(datasets.Dataset.from_list(rows), sided, max_length=16))
    assert task.name == tasks.find_task(model_task, datasets.Dataset.from_list(rows)).name
    batch = task.collator(sided, None)([dict(f) for f in features])
    expected = old_collate([dict(f) for f in features], sided.pad_token_id, side)
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert batch[key].tolist() == value, key


def test_causal_collator_pads_with_eos_when_the_tokenizer_has_no_pad_token(llama_tok):
    bare = copy.deepcopy(llama_tok)
    bare.pad_token = None
    task = get_task("completion")
    rows = [{"prompt": "w3", "completion": " w4 w5"}, {"prompt": "w6", "completion": " w7"}]
    features = list(task.tokenize(datasets.Dataset.from_list(rows), bare, max_length=16))
    batch = task.collator(bare, None)(features)
    assert bare.pad_token is None  # the caller's tokenizer is left as it was
    assert batch["input_ids"][1].tolist()[-1] == bare.eos_token_id and batch["labels"][1].tolist()[-1] == -100


# --- results stay what the old training code gave ---------------------------------------------
def test_first_losses_and_eval_metrics_match_the_pre_restructuring_run(tok, llama_tok):
    """Pinned from adapterkit/training.py (before adapterkit/training/) on this tiny run: same steps, same numbers."""
    losses = Losses()
    metrics = ak.train(bert_with("lora", r=2), tok, toy_rows(24), toy_rows(12, seed=1), callbacks=[losses],
                       num_epochs=1, batch_size=4, learning_rate=1e-2, **{**QUIET, "logging_steps": 1})
    assert losses.losses[:4] == pytest.approx([1.098042607, 1.096539139, 1.088435053, 1.070790529], rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(1.037737011, rel=1e-4) and metrics["eval_accuracy"] == 0.5

    torch.manual_seed(0)
    model = ak.attach(TINY["llama"](), "lora", r=2)
    data = [{"prompt": "w3 w4 w5 ->", "completion": " w9 w12"}, {"prompt": "w6 ->", "completion": " w10"},
            {"prompt": "w7 w8 w9 w10 w11 ->", "completion": " w13"}] * 4
    losses = Losses()
    metrics = ak.train(model, llama_tok, data, data[:6], callbacks=[losses], num_epochs=1, batch_size=4,
                       learning_rate=1e-2, **{**QUIET, "logging_steps": 1})
    assert losses.losses[:3] == pytest.approx([4.151854038, 4.145917892, 4.164763450], rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(4.138717651, rel=1e-4)


# --- TrainResult ------------------------------------------------------------------------------
def test_train_returns_the_metrics_with_the_trainer_beside_them(tok):
    result = ak.train(bert_with(), tok, toy_rows(8), max_steps=1, batch_size=4, **QUIET)
    assert isinstance(result, dict) and isinstance(result.trainer, transformers.Trainer)
    assert result.trainer.is_world_process_zero()
    plain = dict(result)
    assert result == plain and json.loads(json.dumps(result)) == plain
    assert "trainer" not in result
    for copied in (pickle.loads(pickle.dumps(result)), copy.deepcopy(result), copy.copy(result)):
        assert copied == plain and not hasattr(copied, "trainer")


# --- settings: TrainingArguments is the source of truth ---------------------------------------
def test_other_trainingarguments_fields_pass_through_and_unknown_ones_are_refused(tok):
    result = ak.train(bert_with(), tok, toy_rows(8), max_steps=2, batch_size=4, lr_scheduler_type="constant",
                      max_grad_norm=0.5, **QUIET)
    args = result.trainer.args
    assert args.lr_scheduler_type == "constant" and args.max_grad_norm == 0.5
    # adapterkit's defaults and friendly names land on the TrainingArguments fields
    assert args.per_device_train_batch_size == 4 and args.weight_decay == 0.01 and args.seed == 0
    assert args.train_sampling_strategy == "group_by_length" and args.learning_rate == 2e-3  # LoRA's default
    with pytest.raises(ak.InvalidOptionError, match=r"'lr_scheduler_typ' Did you mean 'lr_scheduler_type'.*max_grad_norm"):
        ak.train(bert_with(), tok, toy_rows(8), lr_scheduler_typ="constant")
    with pytest.raises(ak.InvalidOptionError, match="'per_device_train_batch_size' is batch_size= here"):
        ak.train(bert_with(), tok, toy_rows(8), per_device_train_batch_size=4)
    with pytest.raises(ak.InvalidOptionError, match="TrainingArguments refused them.*lr_scheduler_type|SchedulerType"):
        ak.train(bert_with(), tok, toy_rows(8), lr_scheduler_type="sideways", **QUIET)


def test_a_ready_trainingarguments_is_used_and_keywords_beside_it_still_apply(tok, tmp_path):
    ready = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                           learning_rate=3e-3, seed=7, logging_steps=1000, report_to="none",
                                           disable_tqdm=True, lr_scheduler_type="constant")
    result = ak.train(bert_with(), tok, toy_rows(8), args=ready, max_length=16, seed=5)
    args = result.trainer.args
    assert args.learning_rate == 3e-3 and args.per_device_train_batch_size == 2 and args.max_steps == 2
    assert args.seed == 5 and args.output_dir == str(tmp_path / "run") and args.lr_scheduler_type == "constant"
    assert ready.seed == 7  # the caller's object is not changed
    result = ak.train(bert_with(), tok, toy_rows(8), args=ready, batch_size=4, learning_rate=1e-2, max_length=16)
    assert result.trainer.args.per_device_train_batch_size == 4 and result.trainer.args.learning_rate == 1e-2
    with pytest.raises(ak.InvalidOptionError, match="args= must be a transformers.TrainingArguments"):
        ak.train(bert_with(), tok, toy_rows(8), args={"max_steps": 2})


def test_settings_read_trainingarguments_fields_by_name():
    settings = ak.TrainSettings(seed=3, lr_scheduler_type="cosine", batch_size=8)
    assert settings.seed == 3 and settings.batch_size == 8 and settings.optim == transformers.TrainingArguments(output_dir="x").optim
    assert settings.adam_beta1 == transformers.TrainingArguments(output_dir="x").adam_beta1
    assert settings == ak.TrainSettings(batch_size=8, lr_scheduler_type="cosine", seed=3)
    assert pickle.loads(pickle.dumps(settings)) == settings


# --- pair rows and the feature cache ----------------------------------------------------------
def test_pair_rows_are_not_trained_on_cached_features(tok):
    """The cache keys rows by token ids and runs the backbone without token types: pairs skip it."""
    pairs = [{"text": r["text"], "text_pair": r["text"], "label": r["label"]} for r in toy_rows(8)]
    metrics = ak.train(bert_with("head"), tok, pairs, max_steps=1, batch_size=4, **QUIET)
    assert metrics["cached_features"] is False
    with pytest.raises(ak.InvalidOptionError, match="cache_features=True cannot serve 'pair-classification' rows"):
        ak.train(bert_with("head"), tok, pairs, max_steps=1, cache_features=True, **QUIET)


def test_tokenized_data_is_named_by_its_input_tokenizer_and_settings(tokenizers):
    """The cheap fingerprint is stable (datasets' caches can be reused) and changes with anything
    that changes the tokens: the rows, the tokenizer, its special tokens, the settings."""
    from adapterkit.compat.datasets import fingerprint

    rows = datasets.Dataset.from_list([{"text": "w3 w4 w5", "label": 0}, {"text": "w6 w7", "label": 1}])
    other_rows = datasets.Dataset.from_list([{"text": "w3 w4", "label": 0}, {"text": "w6 w7", "label": 1}])

    def name(ds, tok, **options):
        return fingerprint(tokenize(ds, tok, task="classification", **{"max_length": 16, **options}))

    bert = tokenizers["bert"]
    first = name(rows, bert)
    assert name(rows, bert) == first
    changed = copy.deepcopy(bert)
    changed.add_tokens(["w99"])
    renamed = copy.deepcopy(bert)
    renamed.pad_token = "</s>"
    others = {name(other_rows, bert), name(rows, bert, max_length=2), name(rows, changed), name(rows, renamed),
              name(rows, bert, what="eval_data")}
    assert first not in others and len(others) == 5
    # and the result is the plain tokenization
    assert tokenize(rows, bert, task="classification", max_length=2)["input_ids"] == bert(
        ["w3 w4 w5", "w6 w7"], truncation=True, max_length=2)["input_ids"]
