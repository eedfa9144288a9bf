"""train(): fine-tune the active adapter with transformers' Trainer.

Built on Trainer so that ``torchrun`` / ``accelerate launch`` (DDP, FSDP, DeepSpeed) scale the
same call out. adapterkit adds: tokenization for its data shapes, dynamic padding with
length-grouped batches (padding is wasted compute), per-strategy defaults, adapter-only
checkpoints that resume, the 4-bit CPU fix, and metrics recorded in the adapter's sidecar.

Data shapes (a ``datasets.Dataset`` or a list of dicts):

- ``text`` + ``label``: sequence classification;
- ``prompt`` + ``completion``: causal LM, loss on the completion only (instruction tuning,
  few-shot label words);
- ``text`` alone: causal LM on the whole text;
- ``prompt`` + ``completion`` on an encoder-decoder (T5, BART): the encoder reads the prompt,
  the decoder learns the completion + EOS (teacher forcing on the labels shifted right).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.compat import transformers as transformers_compat
from adapterkit.errors import DataError, InvalidOptionError, did_you_mean

logger = logging.getLogger(__name__)

#: Learning rates that worked on the reference runs (MiniLM SST-2, SmolLM2): LoRA needs a
#: much larger step than full fine-tuning (2e-3 reached 0.809 where 5e-4 stayed at 0.596).
DEFAULT_LEARNING_RATES = {"lora": 2e-3, "prefix": 1e-2, "head": 5e-3, "full": 5e-5}
FALLBACK_LEARNING_RATE = 1e-3
#: max_length when none is given, capped at the model's position limit (the classic BERT recipe's 128).
DEFAULT_MAX_LENGTH = 128
STRATEGIES = ("no", "steps", "epoch")
_SHOW = 5  # row indexes quoted in an error message


@dataclasses.dataclass(kw_only=True)
class TrainSettings:
    """Settings of :func:`train`; every field can be given as a keyword.

    Attributes:
        output_dir: where checkpoints go (a temporary folder when None).
        learning_rate: None picks the strategy's default.
        num_epochs: passes over the training data.
        max_steps: stop after this many optimizer steps (overrides num_epochs when > 0).
        batch_size: per device.
        eval_batch_size: per device, for evaluation.
        gradient_accumulation_steps: optimizer step every N batches.
        max_length: tokens per example after truncation; None is 128, or the model's position
            limit (``max_position_embeddings``) when that is lower. Above the limit is an error.
        max_target_length: encoder-decoder models only: tokens per completion (its EOS included);
            None is max_length. ``max_length`` then budgets the prompt, the encoder's input.
        length_policy: ``"truncate"`` cuts longer texts (with a warning), ``"error"`` refuses them.
        warmup_ratio: linear warmup as a fraction of the steps.
        weight_decay: AdamW weight decay.
        seed: for weights, data order and dropout.
        group_by_length: batch examples of similar length together.
        gradient_checkpointing: trade compute for activation memory.
        optim: a Trainer optimizer name (``adamw_torch``, ``paged_adamw_8bit``, ...).
        eval_strategy: ``"epoch"``, ``"steps"`` or ``"no"``.
        save_strategy: checkpoints: ``"epoch"``, ``"steps"`` or ``"no"``.
        save_steps / eval_steps / logging_steps: step intervals.
        resume_from_checkpoint: a checkpoint folder, or True for the latest in output_dir.
        bf16: bf16 autocast (CUDA, or CPUs with AMX/AVX512-BF16).
        cache_features: run a frozen backbone once per example and train the head on its
            cached outputs; None does it whenever the adapter leaves the backbone frozen
            (the ``head`` strategy on a classifier).
        show_progress: Trainer's progress bars.
    """

    output_dir: str | None = None
    learning_rate: float | None = None
    num_epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 16
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_length: int | None = None
    max_target_length: int | None = None
    length_policy: str = "truncate"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    seed: int = 0
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    eval_strategy: str = "epoch"
    save_strategy: str = "no"
    save_steps: int = 500
    eval_steps: int = 500
    logging_steps: int = 50
    resume_from_checkpoint: str | bool | None = None
    bf16: bool = False
    cache_features: bool | None = None
    show_progress: bool = True

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainSettings:
        """Build settings from keywords; unknown ones are an error naming the valid ones."""
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = [k for k in options if k not in valid]
        if unknown:
            hints = "; ".join(f"'{k}'{did_you_mean(k, valid)}" for k in unknown)
            raise InvalidOptionError(f"Unknown training settings: {hints}. Valid: {', '.join(valid)}.")
        return cls(**options)

    def problems(self, position_limit: int | None) -> list[str]:
        """Every bad value, spelt as the caller sets it (a flag in recipes, a keyword in Python)."""
        from adapterkit.data import LENGTH_POLICIES, option_hint  # imports `datasets`: only when training

        out: list[str] = []

        def bad(name: str, expected: str) -> None:
            out.append(f"{option_hint(name)} must be {expected}, got {getattr(self, name)!r}")

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.learning_rate is not None and not (number(self.learning_rate) and self.learning_rate > 0):
            bad("learning_rate", "a positive number (or None for the strategy's default)")
        if not (whole(self.max_steps) and (self.max_steps == -1 or self.max_steps > 0)):
            bad("max_steps", "a positive int, or -1 to train num_epochs")
        elif self.max_steps == -1 and not (number(self.num_epochs) and self.num_epochs > 0):
            bad("num_epochs", "a positive number (or set max_steps)")
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "save_steps", "eval_steps",
                     "logging_steps"):
            if not (whole(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, "a positive int")
        if self.max_length is not None:
            if not (whole(self.max_length) and self.max_length > 0):
                bad("max_length", "a positive int (or None for the default)")
            elif position_limit is not None and self.max_length > position_limit:
                bad("max_length", f"at most the model's position limit of {position_limit} tokens "
                    "(its config's max_position_embeddings)")
        if self.max_target_length is not None and not (whole(self.max_target_length) and self.max_target_length > 0):
            bad("max_target_length", "a positive int (or None for max_length)")
        if self.length_policy not in LENGTH_POLICIES:
            bad("length_policy", " or ".join(repr(p) for p in LENGTH_POLICIES))
        if not (number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            bad("warmup_ratio", "a fraction of the steps in [0, 1)")
        if not (number(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "a number >= 0")
        if not (whole(self.seed) and 0 <= self.seed < 2**32):
            bad("seed", "an int in [0, 2**32)")
        for name in ("eval_strategy", "save_strategy"):
            if getattr(self, name) not in STRATEGIES:
                bad(name, " or ".join(repr(v) for v in STRATEGIES))
        for name in ("group_by_length", "gradient_checkpointing", "bf16", "show_progress"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.cache_features is not None and not isinstance(self.cache_features, bool):
            bad("cache_features", "True, False or None (automatic)")
        optimizers = _optimizer_names()
        if self.optim not in optimizers:
            hint = did_you_mean(str(self.optim), optimizers)
            out.append(f"{option_hint('optim')} must be a Trainer optimizer name such as 'adamw_torch', "
                       f"got {self.optim!r}.{hint}")
        resume = self.resume_from_checkpoint
        if resume is not None and not isinstance(resume, bool):
            if not isinstance(resume, (str, os.PathLike)) or not Path(resume).is_dir():
                bad("resume_from_checkpoint", "an existing checkpoint folder, or True for the latest in output_dir")
        if self.output_dir is not None and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            bad("output_dir", "a folder (it is an existing file)")
        return out


def _optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return sorted(o.value for o in OptimizerNames)


def position_limit(config: Any) -> int | None:
    """The most tokens the model's position embeddings index, or None when it has no such limit."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "mpnet"):
                # These offset positions by padding_idx + 1: 514 embeddings hold 512 tokens.
                value -= (getattr(config, "pad_token_id", None) or 1) + 1
            return value
    return None


# --- data ----------------------------------------------------------------------------
def _as_dataset(data: Any, what: str):
    import datasets

    if data is None:
        return None
    if isinstance(data, datasets.Dataset):
        ds = data
    elif isinstance(data, list):
        ds = datasets.Dataset.from_list(data)
    elif isinstance(data, dict):
        ds = datasets.Dataset.from_dict(data)
    else:
        raise DataError(f"{what} must be a datasets.Dataset, a list of dicts or a dict of lists, got {type(data).__name__}.")
    if len(ds) == 0:
        raise DataError(f"{what} is empty: nothing to train or evaluate on.")
    return ds


def _shape(ds, task: str, what: str) -> str:
    cols = set(ds.column_names)
    if task == "classification":
        missing = {"text", "label"} - cols
        if missing:
            raise DataError(
                f"{what} for classification needs columns 'text' and 'label'; missing {sorted(missing)} "
                f"(has {sorted(cols)}). adapterkit.data.prepare_classification renames and checks them."
            )
        return "classification"
    if task == "seq2seq":
        if {"prompt", "completion"} <= cols:
            return "seq2seq"
        raise DataError(
            f"{what} for a seq2seq model needs 'prompt' (the encoder's input) and 'completion' (the target the "
            f"decoder learns) columns (has {sorted(cols)}); a 'text' column alone gives no target."
        )
    if {"prompt", "completion"} <= cols:
        return "completion"
    if "text" in cols:
        return "text"
    raise DataError(
        f"{what} for a {task} model needs 'prompt' and 'completion' columns, or a 'text' column (has {sorted(cols)})."
    )


def _rows(indexes: list[int]) -> str:
    return f"{indexes[:_SHOW]}{' ...' if len(indexes) > _SHOW else ''}"


def _check_texts(ds, column: str, what: str, *, allow_empty: bool = False) -> None:
    values = ds.with_format(None)[column][:]
    wrong = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if wrong:
        kinds = sorted({type(values[i]).__name__ for i in wrong})
        raise DataError(
            f"{len(wrong)} of {len(values)} rows of {what} have a {column!r} that is not a string ({', '.join(kinds)}; "
            f"row indexes {_rows(wrong)}). Fill or drop missing rows and convert the rest to text first "
            "(adapterkit.data.prepare_classification does both for classification data)."
        )
    if not allow_empty:
        empty = [i for i, v in enumerate(values) if not v.strip()]
        if empty:
            raise DataError(
                f"{len(empty)} of {len(values)} rows of {what} have an empty {column!r} (row indexes {_rows(empty)}); "
                "there is nothing to learn from them: drop or fill them first."
            )


def _check_labels(ds, what: str, num_labels: int | None) -> list[int]:
    labels = ds.with_format(None)["label"][:]
    empty = [i for i, v in enumerate(labels) if v is None or (isinstance(v, str) and not v.strip())]
    if empty:
        raise DataError(
            f"{len(empty)} of {len(labels)} rows of {what} have an empty or missing label (row indexes {_rows(empty)}); "
            "an empty cell is not a class. Label or drop those rows."
        )
    names = [i for i, v in enumerate(labels) if not isinstance(v, int) or isinstance(v, bool)]
    if names:
        shown = sorted({repr(labels[i]) for i in names})[:_SHOW]
        raise DataError(
            f"{what} has labels that are not class ids (ints), e.g. {', '.join(shown)} (row indexes {_rows(names)}). "
            "Map class names to ids with adapterkit.data.prepare_classification."
        )
    limit = num_labels or 10**9
    outside = sorted({v for v in labels if not 0 <= v < limit})
    if outside:
        raise DataError(
            f"{what} has labels outside 0..{(num_labels or 0) - 1} (e.g. {[str(v) for v in outside[:_SHOW]]}); "
            f"the model was loaded with num_labels={num_labels}. Map labels to ids with "
            "adapterkit.data.prepare_classification, or load the base with the right num_labels."
        )
    return labels


def check_data(train_ds, eval_ds, *, task: str, num_labels: int | None) -> None:
    """Refuse rows no training step could use: wrong types, empty cells, labels that do not fit."""
    train_shape = _shape(train_ds, task, "train_data")
    eval_shape = _shape(eval_ds, task, "eval_data") if eval_ds is not None else None
    if eval_shape is not None and eval_shape != train_shape:
        raise DataError(
            f"eval_data has the {eval_shape!r} shape (columns {sorted(eval_ds.column_names)}) but train_data the "
            f"{train_shape!r} one (columns {sorted(train_ds.column_names)}); give both the same columns."
        )
    for ds, what in ((train_ds, "train_data"), (eval_ds, "eval_data")):
        if ds is None:
            continue
        if train_shape in ("completion", "seq2seq"):
            # A causal LM may continue from nothing; an encoder needs something to read.
            _check_texts(ds, "prompt", what, allow_empty=train_shape == "completion")
            _check_texts(ds, "completion", what)
        else:
            _check_texts(ds, "text", what)
            if train_shape == "classification" and "text_pair" in ds.column_names:
                _check_texts(ds, "text_pair", what)
    if train_shape != "classification":
        return
    seen = sorted(set(_check_labels(train_ds, "train_data", num_labels)))
    if len(seen) < 2:
        raise DataError(
            f"train_data holds one class only (label {seen[0]}) in {len(train_ds)} rows; a classifier needs "
            "examples of at least two classes."
        )
    if eval_ds is not None:
        unseen = sorted(set(_check_labels(eval_ds, "eval_data", num_labels)) - set(seen))
        if unseen:
            raise DataError(
                f"eval_data has labels {unseen} that train_data never shows (train labels {seen}); the adapter "
                "cannot learn them. Split train and evaluation rows from the same labelled data "
                "(adapterkit.data.stratified_split)."
            )


def _target_ids(tokenizer, completions: list[str]) -> list[list[int]]:
    """Token ids of seq2seq targets, each ending in EOS (T5's tokenizer appends it, others may not)."""
    eos = tokenizer.eos_token_id
    targets = tokenizer(text_target=completions, add_special_tokens=True)["input_ids"]
    if eos is None:
        return [list(ids) for ids in targets]
    return [list(ids) if ids and ids[-1] == eos else [*ids, eos] for ids in targets]


def _fit_target(ids: list[int], max_target_length: int, eos: int | None) -> list[int]:
    if len(ids) <= max_target_length:
        return ids
    # Keep the EOS, as transformers' truncation does for T5: the decoder still learns to stop.
    return ids[: max_target_length - 1] + [eos] if eos is not None else ids[:max_target_length]


def check_seq2seq_lengths(ds, tokenizer, max_length: int, max_target_length: int, *, policy: str, what: str) -> None:
    """Count prompts over ``max_length`` and targets over ``max_target_length``: warn, or refuse under "error"."""
    from adapterkit.data import option_hint  # imports `datasets`: only when training

    rows = ds.with_format(None)
    prompts = tokenizer(rows["prompt"][:], verbose=False)["input_ids"]
    sides = (
        ("prompt", "max_length", max_length, [len(ids) for ids in prompts], ""),
        ("completion", "max_target_length", max_target_length,
         [len(ids) for ids in _target_ids(tokenizer, rows["completion"][:])], ", its EOS included"),
    )
    for column, option, limit, lengths, note in sides:
        too_long = sum(n > limit for n in lengths)
        if not too_long:
            continue
        said = (f"{too_long} of {len(lengths)} rows of {what} have a {column!r} longer than {option}={limit} tokens "
                f"(longest: {max(lengths)}{note})")
        if policy == "error":
            raise DataError(f"{said}. Raise {option_hint(option)}, shorten those texts, or pass "
                            f"{option_hint('length_policy', 'truncate')} to cut them.")
        logger.warning("%s; they are cut to %d tokens.", said, limit)


def tokenize(
    ds,
    tokenizer,
    *,
    task: str,
    max_length: int,
    num_labels: int | None = None,
    what: str = "data",
    max_target_length: int | None = None,
):
    """Tokenize one of the data shapes; labels are checked before any training.

    For seq2seq rows ``input_ids`` is the prompt (at most ``max_length`` tokens) and ``labels``
    the completion + EOS (at most ``max_target_length``, default ``max_length``); the collator
    derives the decoder's inputs from the labels.
    """
    shape = _shape(ds, task, what)
    if shape == "seq2seq":
        target_limit = max_target_length or max_length
        eos = tokenizer.eos_token_id

        def encode(batch):
            enc = tokenizer(batch["prompt"], truncation=True, max_length=max_length)
            enc["labels"] = [_fit_target(ids, target_limit, eos) for ids in _target_ids(tokenizer, batch["completion"])]
            return enc

    elif shape == "classification":
        _check_labels(ds, what, num_labels)
        pairs = "text_pair" in ds.column_names

        def encode(batch):
            second = batch["text_pair"] if pairs else None
            enc = tokenizer(batch["text"], second, truncation=True, max_length=max_length)
            enc["labels"] = batch["label"]
            return enc

    else:
        eos = tokenizer.eos_token or ""

        def encode(batch):
            if shape == "text":
                enc = tokenizer([t + eos for t in batch["text"]], truncation=True, max_length=max_length)
                enc["labels"] = [list(ids) for ids in enc["input_ids"]]
                return enc
            prompts = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
            full = tokenizer([p + c + eos for p, c in zip(batch["prompt"], batch["completion"])], add_special_tokens=True)
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for p_ids, ids in zip(prompts, full["input_ids"]):
                # Truncate from the left: the completion is what the loss is about.
                drop = max(0, len(ids) - max_length)
                ids = ids[drop:]
                n_prompt = max(0, len(p_ids) - drop)
                labels = [-100] * n_prompt + ids[n_prompt:]
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(labels)
            return out

    remove = ds.column_names
    out = ds.map(encode, batched=True, remove_columns=remove, desc=f"Tokenizing {what}")
    return out


class _Collator:
    """Pads to the longest row of the batch (dynamic padding); labels pad with -100."""

    def __init__(self, tokenizer, multiple_of: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.multiple_of = multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(f["input_ids"]) for f in features)
        if self.multiple_of:
            length = math.ceil(length / self.multiple_of) * self.multiple_of
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        batch: dict[str, list] = {"input_ids": [], "attention_mask": []}
        seq_labels = isinstance(features[0]["labels"], list)
        labels: list = []
        extra = [k for k in features[0] if k not in ("input_ids", "attention_mask", "labels")]
        for key in extra:
            batch[key] = []
        for f in features:
            n = len(f["input_ids"])
            pad = length - n

            def padded(seq, value):
                return [value] * pad + list(seq) if left else list(seq) + [value] * pad

            batch["input_ids"].append(padded(f["input_ids"], pad_id))
            batch["attention_mask"].append(padded(f.get("attention_mask", [1] * n), 0))
            for key in extra:
                batch[key].append(padded(f[key], 0))
            labels.append(padded(f["labels"], -100) if seq_labels else f["labels"])
        out = {k: torch.tensor(v) for k, v in batch.items()}
        out["labels"] = torch.tensor(labels)
        return out


def _seq2seq_collator(tokenizer, model: nn.Module):
    """transformers' seq2seq collator: labels pad with -100, decoder inputs are the labels shifted right."""
    import copy

    from transformers import DataCollatorForSeq2Seq

    if getattr(tokenizer, "padding_side", "right") != "right":
        # The collator pads labels on the tokenizer's side; left-padded labels would put pads
        # between the decoder's start token and the target. The caller's tokenizer stays as it is.
        tokenizer = copy.copy(tokenizer)
        tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)


# --- trainer -------------------------------------------------------------------------
def _last_evaluation():
    """A TrainerCallback that remembers Trainer's latest evaluation and the step it ran at."""
    from transformers import TrainerCallback

    class LastEvaluation(TrainerCallback):
        step: int | None = None
        metrics: dict[str, float] = {}

        def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
            self.step = state.global_step
            self.metrics = dict(metrics or {})

    return LastEvaluation()


def _save_checkpoint(trainer: Any, output_dir: str) -> None:
    from adapterkit.artifacts import save

    os.makedirs(output_dir, exist_ok=True)
    save(trainer.model, Path(output_dir) / "adapter", name=trainer.adapter_name)


def _load_checkpoint(trainer: Any, checkpoint: str, model: nn.Module) -> None:
    from adapterkit.artifacts import restore_weights

    folder = Path(checkpoint) / "adapter"
    if not folder.is_dir():
        raise DataError(f"{checkpoint} is not an adapterkit checkpoint (no adapter/ folder).")
    restore_weights(model, trainer.adapter_name, folder)


def _trainer_class():
    class AdapterTrainer(transformers_compat.checkpoint_trainer_class(_save_checkpoint, _load_checkpoint)):
        """Trainer whose checkpoints hold the adapter only, and resume from it."""

        adapter_name: str = "default"

    return AdapterTrainer


def train(
    model: nn.Module,
    tokenizer: Any,
    train_data: Any,
    eval_data: Any = None,
    *,
    name: str | None = None,
    recipe: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    **settings: Any,
) -> dict[str, float]:
    """Train the active adapter (or ``name``) with transformers' Trainer.

    Args:
        model: a model with an adapter attached or loaded.
        tokenizer: its tokenizer.
        train_data: rows of ``text``+``label`` (classification), ``prompt``+``completion`` or
            ``text`` (causal LM), ``prompt``+``completion`` (seq2seq: the prompt is the encoder's
            input, the completion the decoder's target).
        eval_data: the same shape, evaluated each epoch and at the end.
        name: the adapter to train (default: the active one).
        recipe: settings to record in the adapter's sidecar.
        callbacks: ``transformers.TrainerCallback`` objects (early stopping, logging, ...).
        **settings: see :class:`TrainSettings` (``learning_rate``, ``num_epochs``, ``batch_size``,
            ``max_length``, ``seed``, ``output_dir``, ``resume_from_checkpoint``, ...).

    Returns:
        Metrics: ``train_loss``, ``train_runtime`` (Trainer's loop), ``train_seconds`` (wall time of
        training, the feature cache included), and ``eval_*`` (accuracy and macro-F1 for
        classification, loss for language modelling). The metrics proper (losses, accuracy, F1,
        perplexity; no timings or epoch counts) are also recorded on the adapter.

    Raises:
        InvalidOptionError: a setting is unknown or out of range (all listed at once).
        DataError: rows no training step could use: empty or non-string texts, empty or
            out-of-range labels, a single class, evaluation labels the training data lacks.
        Both are raised before any Trainer is built or any weight changes.
    """
    import tempfile

    import transformers

    from adapterkit.api import _strategy, activate, trainable_parameters
    from adapterkit.data import check_lengths
    from adapterkit.metrics import compute_metrics, quality_metrics
    from adapterkit.quantized import keep_4bit_trainable, quantization_of
    from adapterkit.state import freeze_all_but, require_store, unwrap

    cfg = TrainSettings.from_options(settings)
    base = unwrap(model)
    store = require_store(base)
    name = name or store.active
    if name is None:
        raise InvalidOptionError(f"No adapter is active; pass name= (loaded: {', '.join(sorted(store.records))}).")
    if name not in store.records:
        raise InvalidOptionError(
            f"No adapter named {name!r} on this model.{did_you_mean(name, store.records)} "
            f"Loaded: {', '.join(sorted(store.records))}."
        )
    limit = position_limit(base.config)
    problems = cfg.problems(limit)
    if tokenizer is None or not callable(tokenizer):
        problems.append(f"the tokenizer must be the model's tokenizer (from adapterkit.load_base), got {tokenizer!r}")
    if problems:
        raise InvalidOptionError("Invalid training settings:\n  - " + "\n  - ".join(problems))
    if cfg.max_length is None:
        cfg.max_length = min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    record = store.record(name)
    task = record.meta.get("task") or "causal-lm"
    num_labels = len(record.meta.get("label_names") or []) or getattr(base.config, "num_labels", None)
    train_ds = _as_dataset(train_data, "train_data")
    eval_ds = _as_dataset(eval_data, "eval_data")
    check_data(train_ds, eval_ds, task=task, num_labels=num_labels)
    shape = _shape(train_ds, task, "train_data")
    if shape == "seq2seq":
        cfg.max_target_length = cfg.max_target_length or cfg.max_length
        for ds, what in ((train_ds, "train_data"), (eval_ds, "eval_data")):
            if ds is not None:
                check_seq2seq_lengths(ds, tokenizer, cfg.max_length, cfg.max_target_length, policy=cfg.length_policy,
                                      what=what)
    elif shape != "completion":  # prompt + completion rows are cut from the left on purpose
        for ds in (train_ds, eval_ds):
            if ds is not None:
                check_lengths(ds.with_format(None)["text"][:], tokenizer, cfg.max_length, policy=cfg.length_policy,
                              option="length_policy")
    activate(base, name)
    transformers.set_seed(cfg.seed)
    lengths = dict(max_length=cfg.max_length, max_target_length=cfg.max_target_length)
    train_tok = tokenize(train_ds, tokenizer, task=task, num_labels=num_labels, what="train_data", **lengths)
    eval_tok = (
        tokenize(eval_ds, tokenizer, task=task, num_labels=num_labels, what="eval_data", **lengths)
        if eval_ds is not None
        else None
    )
    params = trainable_parameters(base, name)
    freeze_all_but(base, list(params.values()))
    if quantization_of(base):
        keep_4bit_trainable(base)
    lr = cfg.learning_rate or DEFAULT_LEARNING_RATES.get(record.strategy, FALLBACK_LEARNING_RATE)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    output_dir = cfg.output_dir or tempfile.mkdtemp(prefix="adapterkit-train-")
    has_eval = eval_tok is not None and cfg.eval_strategy != "no"
    args = transformers.TrainingArguments(
        output_dir=output_dir,
        learning_rate=lr,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        optim=cfg.optim,
        eval_strategy=cfg.eval_strategy if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_only_model=False,
        logging_steps=cfg.logging_steps,
        report_to="none",
        disable_tqdm=not cfg.show_progress,
        bf16=cfg.bf16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    if quantization_of(base) and not transformers_compat.is_marked_peft_loaded(base):
        # Trainer refuses a quantized model unless it knows adapters are attached; they are,
        # injected in place rather than through a PeftModel wrapper. Unset after training.
        transformers_compat.mark_peft_loaded(base)
    trainer_cls = _trainer_class()
    last_eval = _last_evaluation()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_tok,
        eval_dataset=eval_tok if has_eval else None,
        data_collator=_seq2seq_collator(tokenizer, base) if shape == "seq2seq" else _Collator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics if task == "classification" else None,
        callbacks=[*(callbacks or []), last_eval],
    )
    trainer.adapter_name = name
    logger.info(
        "Training adapter '%s' (%s): %d trainable parameters, lr %g, %s epochs",
        name, record.strategy, sum(p.numel() for p in params.values()), lr, cfg.num_epochs,
    )
    use_cache = cfg.cache_features
    if use_cache and not _strategy(record.strategy).backbone_frozen(base, name):
        raise InvalidOptionError(
            f"cache_features=True runs the backbone once and trains only the head, but adapter '{name}' "
            f"({record.strategy}) trains backbone layers too. Leave cache_features unset (automatic) or False."
        )
    if use_cache is None:
        use_cache = task == "classification" and _strategy(record.strategy).backbone_frozen(base, name)
    cache_seconds = 0.0
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if use_cache:
            from adapterkit.features import cached_backbone

            stack.enter_context(
                cached_backbone(base, [d for d in (train_tok, eval_tok) if d is not None], batch_size=cfg.eval_batch_size)
            )
            cache_seconds = time.perf_counter() - started
        result = trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
        train_seconds = time.perf_counter() - started
        if eval_tok is None:
            evaluated = {}
        elif last_eval.step == trainer.state.global_step:
            # Trainer just evaluated the final weights (end of the last epoch): running the dev set
            # again would double the evaluation cost for the same numbers.
            evaluated = last_eval.metrics
        else:
            evaluated = trainer.evaluate(eval_tok)
    transformers_compat.unmark_peft_loaded(base)
    metrics: dict[str, float] = {
        "train_loss": float(result.training_loss),
        "train_runtime": float(result.metrics.get("train_runtime", 0.0)),
        "train_samples": len(train_tok),
        "cached_features": bool(use_cache),
        # The one backbone pass that caching costs is outside Trainer's train_runtime.
        "feature_cache_seconds": round(cache_seconds, 3),
        "train_seconds": round(train_seconds, 3),
    }
    if eval_tok is not None:
        metrics.update({k: float(v) for k, v in evaluated.items() if isinstance(v, (int, float))})
        if task != "classification" and "eval_loss" in metrics:
            metrics["eval_perplexity"] = float(math.exp(min(metrics["eval_loss"], 50)))
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_disable()
    base.eval()
    record.meta.setdefault("metrics", {}).update(quality_metrics(metrics))
    settings_record = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("output_dir", "resume_from_checkpoint", "show_progress")}
    settings_record["learning_rate"] = lr
    record.meta["recipe"] = {**(recipe or {}), "train_settings": settings_record}
    return metrics
