"""TrainSettings: adapterkit's own training options on top of transformers' ``TrainingArguments``.

``TrainingArguments`` is the source of truth for everything Trainer does. adapterkit adds what
Trainer has no notion of (token budgets, the length policy, the feature cache, "the strategy's
learning rate"), a few friendly names (``num_epochs`` for ``num_train_epochs``...), and its own
defaults where the reference runs chose differently from Trainer's. Any other ``TrainingArguments``
field is passed through by name; a ready ``TrainingArguments`` may be given as ``args``.
:func:`training_arguments` is the one place that maps settings onto ``TrainingArguments``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from pathlib import Path
from typing import Any

import torch
import transformers  # a lazy module: TrainingArguments itself loads on first use, not on import adapterkit

from adapterkit.data import LENGTH_POLICIES
from adapterkit.errors import InvalidOptionError, did_you_mean, option_hint

#: max_length when none is given, capped at the model's position limit (the classic BERT recipe's 128).
DEFAULT_MAX_LENGTH = 128
STRATEGIES = ("no", "steps", "epoch")

#: adapterkit's names for TrainingArguments fields.
ALIASES = {
    "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "warmup_ratio": "warmup_steps",  # a float in [0, 1) is a ratio of the total steps
    "group_by_length": "train_sampling_strategy",
    "show_progress": "disable_tqdm",
}
#: TrainingArguments fields adapterkit handles itself (the setting of the same name, or its alias).
OWNED = {
    "output_dir": "output_dir",  # None: a temporary folder
    "learning_rate": "learning_rate",  # None: the strategy's default
    "gradient_checkpointing": "gradient_checkpointing",  # enabled with input grads for frozen embeddings
    "resume_from_checkpoint": "resume_from_checkpoint",  # handed to Trainer.train()
    **{field: alias for alias, field in ALIASES.items()},
}
#: Where adapterkit's defaults differ from TrainingArguments' (the reference runs' choices).
TRAINER_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.01,
    "seed": 0,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "eval_steps": 500,
    "logging_steps": 50,
    "report_to": "none",
    # Task collators choose the batch's columns; a registered task may keep ones the model's
    # forward does not name.
    "remove_unused_columns": False,
}
_POSITIVE_INTS = ("gradient_accumulation_steps", "save_steps", "eval_steps", "logging_steps")
#: TrainingArguments fields recorded in the adapter's sidecar beside adapterkit's own settings.
_RECORDED = ("max_steps", "gradient_accumulation_steps", "weight_decay", "seed", "optim", "eval_strategy",
             "save_strategy", "save_steps", "eval_steps", "logging_steps", "bf16")


def trainer_fields() -> list[str]:
    """Names of the ``TrainingArguments`` fields of the installed transformers."""
    return sorted(f.name for f in dataclasses.fields(transformers.TrainingArguments) if f.init)


@dataclasses.dataclass(kw_only=True, init=False)
class TrainSettings:
    """Settings of :func:`~adapterkit.train`; every field can be given as a keyword, and so can
    any other ``transformers.TrainingArguments`` field (``lr_scheduler_type="cosine"``, ``fp16=True``,
    ``save_total_limit=2``...), which Trainer then receives as it is.

    adapterkit's defaults differ from Trainer's for ``weight_decay`` (0.01), ``seed`` (0),
    ``eval_strategy`` (``"epoch"``), ``save_strategy`` (``"no"``),
    ``eval_steps`` (500), ``logging_steps`` (50) and ``report_to`` (``"none"``); see
    :data:`TRAINER_DEFAULTS`. Without an accelerator ``dataloader_pin_memory`` is False.

    Attributes:
        args: a ready ``transformers.TrainingArguments``: Trainer runs with it, adapterkit's
            defaults aside; keywords given beside it (``batch_size=8``, ``seed=1``...) still
            replace its values. Without ``learning_rate=`` its ``learning_rate`` is used.
        output_dir: where checkpoints go (a temporary folder when None).
        learning_rate: None picks the strategy's default.
        num_epochs: passes over the training data (``num_train_epochs``).
        batch_size: per device (``per_device_train_batch_size``).
        eval_batch_size: per device, for evaluation (``per_device_eval_batch_size``).
        warmup_ratio: linear warmup as a fraction of the steps (``warmup_steps`` < 1).
        group_by_length: batch examples of similar length together (``train_sampling_strategy``).
        show_progress: Trainer's progress bars (``disable_tqdm``).
        gradient_checkpointing: trade compute for activation memory (input embeddings are made to
            require grads so a frozen embedding layer still lets gradients through).
        max_length: tokens per example after truncation; None is 128, or the model's position
            limit (``max_position_embeddings``) when that is lower. Above the limit is an error.
        max_target_length: encoder-decoder models only: tokens per completion (its EOS included);
            None is max_length. ``max_length`` then budgets the prompt, the encoder's input.
        length_policy: ``"truncate"`` cuts longer texts (with a warning), ``"error"`` refuses them.
        resume_from_checkpoint: a checkpoint folder, or True for the latest in output_dir.
        cache_features: run a frozen backbone once per example and train the head on its
            cached outputs; None does it whenever the adapter leaves the backbone frozen
            (the ``head`` strategy on a classifier).
        fast_dropout: on the CPU, draw dropout masks in bulk from numpy's PCG64 instead of torch's
            element-by-element generator (:mod:`adapterkit.training.dropout`): the same dropout
            rate and scaling from another random stream, 10-15% less time per step on BERT-style
            models. None does it on the CPU unless torch's own masks are vectorized there (an MKL
            build on an Intel CPU).
        trainer_args: the other ``TrainingArguments`` fields given by name (``seed``, ``optim``...).
    """

    args: Any = None
    output_dir: str | None = None
    learning_rate: float | None = None
    num_epochs: float = 3.0
    batch_size: int = 16
    eval_batch_size: int = 64
    warmup_ratio: float = 0.06
    group_by_length: bool = True
    show_progress: bool = True
    gradient_checkpointing: bool = False
    max_length: int | None = None
    max_target_length: int | None = None
    length_policy: str = "truncate"
    resume_from_checkpoint: str | bool | None = None
    cache_features: bool | None = None
    fast_dropout: bool | None = None
    trainer_args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __init__(self, **options: Any) -> None:
        own = [f for f in dataclasses.fields(self) if f.name != "trainer_args"]
        #: the settings given by keyword: beside ``args`` only those replace its values. Not a
        #: field, so equality and repr see the values only.
        self.given = frozenset(f.name for f in own if f.name in options)
        for f in own:
            setattr(self, f.name, options.pop(f.name) if f.name in options else f.default)
        self.trainer_args = _trainer_options(options)

    def __getattr__(self, name: str) -> Any:
        """A ``TrainingArguments`` field's value as training will use it (``settings.seed``)."""
        if name.startswith("_") or name in ("given", "trainer_args", "args"):
            raise AttributeError(name)
        if name in self.trainer_args:
            return self.trainer_args[name]
        if self.args is not None and hasattr(self.args, name):
            return getattr(self.args, name)
        if name in TRAINER_DEFAULTS:
            return TRAINER_DEFAULTS[name]
        field = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}.get(name)
        if field is None or field.default is dataclasses.MISSING:
            raise AttributeError(f"TrainSettings has no setting {name!r}")
        return field.default

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainSettings:
        """Build settings from keywords; unknown ones are an error naming the valid ones."""
        return cls(**options)

    def record(self, *, learning_rate: float, max_length: int) -> dict[str, Any]:
        """The settings as recorded in the adapter's sidecar (paths and display options left out),
        with the learning rate and max_length training used."""
        skip = {"args", "output_dir", "resume_from_checkpoint", "show_progress", "trainer_args"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        for name in (*_RECORDED, *self.trainer_args):
            out[name] = _plain(getattr(self, name))
        out.update(learning_rate=learning_rate, max_length=max_length)
        return out

    def problems(self, position_limit: int | None) -> list[str]:
        """Every bad value, spelt as the caller sets it (a flag in recipes, a keyword in Python)."""
        out: list[str] = []

        def bad(name: str, expected: str) -> None:
            out.append(f"{option_hint(name)} must be {expected}, got {getattr(self, name)!r}")

        def checked(name: str) -> bool:
            # A ready TrainingArguments was checked by transformers; keywords beside it are ours to check.
            return self.args is None or name in self.given or name in self.trainer_args

        if self.args is not None and not isinstance(self.args, transformers.TrainingArguments):
            out.append(f"{option_hint('args')} must be a transformers.TrainingArguments, got {type(self.args).__name__}")
            return out
        if self.learning_rate is not None and not (_number(self.learning_rate) and self.learning_rate > 0):
            bad("learning_rate", "a positive number (or None for the strategy's default)")
        if checked("max_steps") and not (_whole(self.max_steps) and (self.max_steps == -1 or self.max_steps > 0)):
            bad("max_steps", "a positive int, or -1 to train num_epochs")
        elif checked("num_epochs") and self.max_steps == -1 and not (_number(self.num_epochs) and self.num_epochs > 0):
            bad("num_epochs", "a positive number (or set max_steps)")
        for name in ("batch_size", "eval_batch_size", *_POSITIVE_INTS):
            if checked(name) and not (_whole(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, "a positive int")
        if self.max_length is not None:
            if not (_whole(self.max_length) and self.max_length > 0):
                bad("max_length", "a positive int (or None for the default)")
            elif position_limit is not None and self.max_length > position_limit:
                bad("max_length", f"at most the model's position limit of {position_limit} tokens "
                    "(its config's max_position_embeddings)")
        if self.max_target_length is not None and not (_whole(self.max_target_length) and self.max_target_length > 0):
            bad("max_target_length", "a positive int (or None for max_length)")
        if self.length_policy not in LENGTH_POLICIES:
            bad("length_policy", " or ".join(repr(p) for p in LENGTH_POLICIES))
        if checked("warmup_ratio") and not (_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            bad("warmup_ratio", "a fraction of the steps in [0, 1)")
        if checked("weight_decay") and not (_number(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "a number >= 0")
        if checked("seed") and not (_whole(self.seed) and 0 <= self.seed < 2**32):
            bad("seed", "an int in [0, 2**32)")
        for name in ("eval_strategy", "save_strategy"):
            if checked(name) and getattr(self, name) not in STRATEGIES:
                bad(name, " or ".join(repr(v) for v in STRATEGIES))
        for name in ("group_by_length", "gradient_checkpointing", "show_progress", "bf16"):
            if (name != "bf16" or checked(name)) and not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        for name in ("cache_features", "fast_dropout"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                bad(name, "True, False or None (automatic)")
        optimizers = sorted(o.value for o in transformers.training_args.OptimizerNames)
        if checked("optim") and self.optim not in optimizers:
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


def training_arguments(settings: TrainSettings, *, output_dir: str, learning_rate: float,
                       evaluate: bool) -> transformers.TrainingArguments:
    """The ``TrainingArguments`` Trainer runs with: the one place settings map onto its fields.

    Args:
        settings: checked settings (:meth:`TrainSettings.problems` found nothing).
        output_dir: the checkpoint folder (``settings.output_dir`` or a temporary one).
        learning_rate: the learning rate to use (the caller resolved the strategy's default).
        evaluate: whether there is evaluation data; without it Trainer must not evaluate.

    Raises:
        InvalidOptionError: transformers refused a value passed through by name.
    """
    mapped = {
        "num_train_epochs": settings.num_epochs,
        "per_device_train_batch_size": settings.batch_size,
        "per_device_eval_batch_size": settings.eval_batch_size,
        "warmup_steps": settings.warmup_ratio,
        "train_sampling_strategy": "group_by_length" if settings.group_by_length else "random",
        "disable_tqdm": not settings.show_progress,
    }
    if settings.args is None:
        values = {**TRAINER_DEFAULTS, **mapped, "data_seed": settings.seed, **_cpu_backend(), **_cpu_loader(),
                  **settings.trainer_args}
    else:
        values = {field: mapped[field] for field, alias in OWNED.items()
                  if field in mapped and alias in settings.given}
        values.update(settings.trainer_args)
        values["remove_unused_columns"] = False
    values.update(output_dir=output_dir, learning_rate=learning_rate, save_only_model=False)
    if not evaluate:
        values["eval_strategy"] = "no"
    try:
        if settings.args is None:
            return transformers.TrainingArguments(**values)
        return dataclasses.replace(settings.args, **values)
    except (ValueError, TypeError) as err:
        raise InvalidOptionError(f"Invalid training settings: transformers.TrainingArguments refused them: {err}") from err


def _cpu_backend() -> dict[str, str]:
    """``ddp_backend="gloo"`` when torchrun starts several CPU processes: without a backend Trainer
    (transformers 5.24) leaves each process training alone, every one its own world process zero."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        return {"ddp_backend": "gloo"}
    return {}


def _cpu_loader() -> dict[str, bool]:
    """``dataloader_pin_memory=False`` without an accelerator: pinned memory only speeds copies to
    one, and torch warns on every DataLoader that asks for it without one."""
    return {} if torch.accelerator.is_available() else {"dataloader_pin_memory": False}


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


def resolved_max_length(settings: TrainSettings, limit: int | None) -> int:
    """``settings.max_length``, or the default capped at the model's position limit."""
    if settings.max_length is not None:
        return settings.max_length
    return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH


def _trainer_options(options: dict[str, Any]) -> dict[str, Any]:
    """Check that every leftover keyword names a ``TrainingArguments`` field adapterkit does not own."""
    fields = set(trainer_fields())
    valid = sorted({f.name for f in dataclasses.fields(TrainSettings)} - {"trainer_args"} | (fields - set(OWNED)))
    owned = [f"'{name}' is {option_hint(OWNED[name])} here" for name in options if name in OWNED]
    unknown = [f"'{name}'{did_you_mean(name, valid)}" for name in options if name not in OWNED and name not in fields]
    if owned:
        raise InvalidOptionError(
            f"Training settings under adapterkit's names: {'; '.join(owned)}. Pass those, or the field inside "
            f"{option_hint('args')}transformers.TrainingArguments(...)."
        )
    if unknown:
        raise InvalidOptionError(
            f"Unknown training settings: {'; '.join(unknown)}. Valid: adapterkit's own settings and any "
            f"transformers.TrainingArguments field: {', '.join(valid)}."
        )
    return dict(options)


def _plain(value: Any) -> Any:
    """A JSON-ready form of a TrainingArguments value (its enums as their strings)."""
    if isinstance(value, enum.Enum):
        return value.value
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
