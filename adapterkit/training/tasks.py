"""Task shapes: what rows :func:`~adapterkit.train` takes, and how they become batches.

A task shape owns the columns it needs (with the checks and their errors), tokenization, the
collator and the evaluation metrics. :func:`~adapterkit.train` picks the shape from the model's
task (:func:`adapterkit.model_info.task_of`) and the data's columns, and has no per-shape code.
The built-ins:

- ``classification``: ``text`` + ``label`` on a sequence classifier;
- ``pair-classification``: ``text`` + ``text_pair`` + ``label``, tokenized as a pair;
- ``completion``: ``prompt`` + ``completion`` on a causal LM, loss on the completion only;
- ``text``: ``text`` on a causal LM, loss on every token;
- ``seq2seq``: ``prompt`` + ``completion`` on an encoder-decoder (T5, BART): the encoder reads the
  prompt, the decoder learns the completion + EOS (teacher forcing on the labels shifted right).

Add one without editing adapterkit:

    >>> @register_task("tagging")
    ... class Tagging(Task):
    ...     model_tasks = ("feature-extraction",)
    ...     columns = ("tokens", "tags")
    ...     def tokenize(self, ds, tokenizer, *, max_length, max_target_length=None, num_labels=None, what="data"): ...
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import datasets
import transformers  # a lazy module: its collators load on first use, not on import adapterkit

import adapterkit._version as version
from adapterkit.compat import datasets as datasets_compat
from adapterkit.data import check_lengths
from adapterkit.errors import DataError, InvalidOptionError, did_you_mean, option_hint
from adapterkit.metrics import compute_metrics

logger = logging.getLogger(__name__)

_SHOW = 5  # row indexes quoted in an error message


class Task:
    """A task shape. Subclass it, set the class attributes, implement :meth:`tokenize`, and
    register it with :func:`register_task`; override the other methods where the defaults
    (non-empty string columns, every text within ``max_length``, padding of every column) do not fit.
    """

    #: set by :func:`register_task`.
    name: ClassVar[str] = ""
    #: the model tasks (``adapterkit.model_info.task_of``) this shape trains.
    model_tasks: ClassVar[tuple[str, ...]] = ()
    #: the columns rows must have. Among the shapes of a model task, the one needing the most
    #: columns that the data has wins (``text`` + ``text_pair`` + ``label`` over ``text`` + ``label``).
    columns: ClassVar[tuple[str, ...]] = ()
    #: the string columns that must be non-empty text (checked by :meth:`check`).
    text_columns: ClassVar[tuple[str, ...]] = ()
    #: a sentence added to the error when no shape fits the data.
    hint: ClassVar[str] = ""
    #: whether the backbone's outputs depend on ``input_ids`` alone, so a frozen one may be cached.
    cacheable: ClassVar[bool] = False
    #: ``Trainer``'s ``compute_metrics``, or None for the loss alone.
    compute_metrics: ClassVar[Callable[[Any], dict[str, float]] | None] = None

    def needs(self) -> str:
        """The columns, as error messages name them."""
        quoted = [f"'{c}'" for c in self.columns]
        return "columns " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1])

    def check(self, train_ds, eval_ds, *, num_labels: int | None) -> None:
        """Refuse rows no training step could use (raise :class:`~adapterkit.errors.DataError`)."""
        for ds, what in _named(train_ds, eval_ds):
            for column in self.text_columns:
                check_texts(ds, column, what)

    def check_lengths(self, ds, tokenizer, *, max_length: int, max_target_length: int | None, policy: str,
                      what: str) -> None:
        """Warn about (or, under ``policy="error"``, refuse) rows longer than the token budget."""
        for column in self.text_columns[:1]:
            check_lengths(ds.with_format(None)[column][:], tokenizer, max_length, policy=policy, option="length_policy")

    def tokenize(self, ds, tokenizer, *, max_length: int, max_target_length: int | None = None,
                 num_labels: int | None = None, what: str = "data"):
        """The dataset of model inputs (``input_ids``, ``labels``...) Trainer batches."""
        raise NotImplementedError

    def collator(self, tokenizer, model) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """Pads a list of tokenized rows into a batch (to the longest row: dynamic padding)."""
        return transformers.DataCollatorWithPadding(_with_pad_token(tokenizer))

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics derived from Trainer's evaluation (e.g. perplexity from the loss)."""
        return {}


def tokenized(ds, encode: Callable[[dict[str, list]], dict[str, list]], tokenizer, what: str, **settings: Any):
    """``ds.map(encode, batched=True)`` over every column, fingerprinted cheaply.

    datasets names a map's result by dill-pickling the function, closure included: for ``encode``
    closing over a fast tokenizer that pickles the whole vocabulary on every call (0.9 s of a
    2,000-row minilm-l6 training run, more than the tokenizing itself). The input's fingerprint,
    the tokenizer's own serialized form, its special tokens, ``encode``'s code and ``settings``
    name the same result, in milliseconds (80 ms for smollm2-135m's tokenizer). Without a fast
    tokenizer or an input fingerprint datasets hashes as usual.
    """
    backend, source = getattr(tokenizer, "backend_tokenizer", None), datasets_compat.fingerprint(ds)
    fingerprint = None
    if backend is not None and source is not None:
        serialized = backend.to_str()
        # Its leading "truncation" and "padding" fields are whatever the last call left: transformers
        # sets both on every call, so they say nothing about this one (and would change the name).
        serialized = serialized[max(serialized.find('"added_tokens"'), 0):]
        digest = hashlib.sha256()
        for part in (source, version.__version__, type(tokenizer).__name__, serialized,
                     repr(sorted(tokenizer.special_tokens_map.items())), tokenizer.padding_side,
                     tokenizer.truncation_side, what, repr(sorted(settings.items()))):
            digest.update(part.encode() + b"\0")
        digest.update(encode.__code__.co_code + repr(encode.__code__.co_consts).encode())
        fingerprint = digest.hexdigest()[:32]
    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {what}",
                  new_fingerprint=fingerprint)


S = TypeVar("S", bound=type[Task])
_TASKS: dict[str, type[Task]] = {}


def register_task(name: str, *, override: bool = False) -> Callable[[S], S]:
    """Class decorator registering a :class:`Task` shape under ``name``."""

    def decorator(cls: S) -> S:
        if name in _TASKS and not override:
            raise InvalidOptionError(
                f"A task shape named '{name}' is already registered ({_TASKS[name].__qualname__}); "
                "pass override=True to replace it."
            )
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorator


def list_tasks() -> list[str]:
    """Names of the registered task shapes, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """The task shape registered under ``name``."""
    if name not in _TASKS:
        raise InvalidOptionError(f"Unknown task shape '{name}'.{did_you_mean(name, _TASKS)} Known: {', '.join(list_tasks())}.")
    return _TASKS[name]()


def find_task(model_task: str, ds, what: str = "train_data") -> Task:
    """The task shape for a ``model_task`` model and the columns of ``ds``."""
    cols = set(ds.column_names)
    # Registered last first among equals: a user's shape wins over a built-in one of the same columns.
    shapes = [cls() for cls in reversed(_TASKS.values()) if model_task in cls.model_tasks]
    for shape in sorted(shapes, key=lambda s: -len(s.columns)):
        if set(shape.columns) <= cols:
            return shape
    if not shapes:
        raise DataError(
            f"No task shape trains a {model_task!r} model (known shapes: {', '.join(list_tasks())}); "
            "register one with adapterkit.training.register_task."
        )
    needs = ", or ".join(s.needs() for s in sorted(shapes, key=lambda s: len(s.columns)))
    hints = " ".join(dict.fromkeys(s.hint for s in shapes if s.hint))
    raise DataError(f"{what} for a {model_task} model needs {needs} (has {sorted(cols)}). {hints}".rstrip())


def check_data(train_ds, eval_ds, *, task: str, num_labels: int | None) -> Task:
    """Refuse rows no training step could use: wrong types, empty cells, labels that do not fit.

    Returns:
        The task shape both datasets have.
    """
    shape = find_task(task, train_ds, "train_data")
    if eval_ds is not None:
        other = find_task(task, eval_ds, "eval_data")
        if other.name != shape.name:
            raise DataError(
                f"eval_data has the {other.name!r} shape (columns {sorted(eval_ds.column_names)}) but train_data the "
                f"{shape.name!r} one (columns {sorted(train_ds.column_names)}); give both the same columns."
            )
    shape.check(train_ds, eval_ds, num_labels=num_labels)
    return shape


def tokenize(ds, tokenizer, *, task: str, max_length: int, num_labels: int | None = None, what: str = "data",
             max_target_length: int | None = None):
    """Tokenize ``ds`` as the task shape of a ``task`` model and its columns."""
    shape = find_task(task, ds, what)
    return shape.tokenize(ds, tokenizer, max_length=max_length, max_target_length=max_target_length,
                          num_labels=num_labels, what=what)


# --- checks ----------------------------------------------------------------------------------
def _named(train_ds, eval_ds):
    return [(ds, what) for ds, what in ((train_ds, "train_data"), (eval_ds, "eval_data")) if ds is not None]


def _rows(indexes: list[int]) -> str:
    return f"{indexes[:_SHOW]}{' ...' if len(indexes) > _SHOW else ''}"


def check_texts(ds, column: str, what: str, *, allow_empty: bool = False) -> None:
    """Refuse a ``column`` holding non-strings, or (unless ``allow_empty``) blank strings."""
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


def check_labels(ds, what: str, num_labels: int | None) -> list[int]:
    """The class ids of ``ds``'s ``label`` column; refuse empty cells, names and ids out of range."""
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


def _with_pad_token(tokenizer, side: str | None = None):
    """``tokenizer``, or a copy that pads (with EOS when it has no pad token) on ``side``.

    Pads are masked out of attention and carry label -100, so which id fills them does not change
    the loss. The caller's tokenizer stays as it is.
    """
    needs_pad = tokenizer.pad_token is None
    if not needs_pad and (side is None or tokenizer.padding_side == side):
        return tokenizer
    # A shallow copy shares the special-token table with the original: setting pad_token needs a deep one.
    tokenizer = copy.deepcopy(tokenizer) if needs_pad else copy.copy(tokenizer)
    if needs_pad:
        if tokenizer.eos_token is None:
            raise DataError("The tokenizer has neither a pad nor an EOS token to pad batches with; set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    if side is not None:
        tokenizer.padding_side = side
    return tokenizer


# --- the built-in shapes ---------------------------------------------------------------------
@register_task("classification")
class Classification(Task):
    """``text`` + ``label`` on a sequence classifier; accuracy and macro-F1."""

    model_tasks = ("classification",)
    columns = ("text", "label")
    text_columns = ("text",)
    hint = "adapterkit.data.prepare_classification renames and checks them."
    cacheable = True
    compute_metrics = staticmethod(compute_metrics)

    def check(self, train_ds, eval_ds, *, num_labels: int | None) -> None:
        super().check(train_ds, eval_ds, num_labels=num_labels)
        seen = sorted(set(check_labels(train_ds, "train_data", num_labels)))
        if len(seen) < 2:
            raise DataError(
                f"train_data holds one class only (label {seen[0]}) in {len(train_ds)} rows; a classifier needs "
                "examples of at least two classes."
            )
        if eval_ds is not None:
            unseen = sorted(set(check_labels(eval_ds, "eval_data", num_labels)) - set(seen))
            if unseen:
                raise DataError(
                    f"eval_data has labels {unseen} that train_data never shows (train labels {seen}); the adapter "
                    "cannot learn them. Split train and evaluation rows from the same labelled data "
                    "(adapterkit.data.stratified_split)."
                )

    def tokenize(self, ds, tokenizer, *, max_length, max_target_length=None, num_labels=None, what="data"):
        check_labels(ds, what, num_labels)
        columns = self.text_columns

        def encode(batch):
            enc = tokenizer(*(batch[c] for c in columns), truncation=True, max_length=max_length)
            enc["labels"] = batch["label"]
            return enc

        return tokenized(ds, encode, tokenizer, what, task=self.name, max_length=max_length,
                         max_target_length=max_target_length)


@register_task("pair-classification")
class PairClassification(Classification):
    """``text`` + ``text_pair`` + ``label`` (entailment, paraphrase...): both texts, tokenized as a pair."""

    columns = ("text", "text_pair", "label")
    text_columns = ("text", "text_pair")
    # The cache keys rows by input_ids and runs the backbone without token_type_ids, which tell
    # the two texts apart.
    cacheable = False


class _CausalLM(Task):
    model_tasks = ("causal-lm", "feature-extraction")

    def collator(self, tokenizer, model):
        # DataCollatorForSeq2Seq pads the per-token labels with -100 on the tokenizer's side, as
        # the inputs; without a model it adds no decoder inputs, which a decoder-only model needs.
        return transformers.DataCollatorForSeq2Seq(_with_pad_token(tokenizer), label_pad_token_id=-100)

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        return _perplexity(metrics)


@register_task("text")
class Text(_CausalLM):
    """``text`` on a causal LM: the loss covers every token (and the EOS appended)."""

    columns = ("text",)
    text_columns = ("text",)

    def tokenize(self, ds, tokenizer, *, max_length, max_target_length=None, num_labels=None, what="data"):
        eos = tokenizer.eos_token or ""

        def encode(batch):
            enc = tokenizer([t + eos for t in batch["text"]], truncation=True, max_length=max_length)
            enc["labels"] = [list(ids) for ids in enc["input_ids"]]
            return enc

        return tokenized(ds, encode, tokenizer, what, task=self.name, max_length=max_length,
                         max_target_length=max_target_length)


@register_task("completion")
class Completion(_CausalLM):
    """``prompt`` + ``completion`` on a causal LM: the loss covers the completion (and EOS) only."""

    columns = ("prompt", "completion")

    def check(self, train_ds, eval_ds, *, num_labels):
        for ds, what in _named(train_ds, eval_ds):
            check_texts(ds, "prompt", what, allow_empty=True)  # a causal LM may continue from nothing
            check_texts(ds, "completion", what)

    def check_lengths(self, ds, tokenizer, *, max_length, max_target_length, policy, what):
        """Rows are cut from the left on purpose: the completion is what the loss is about."""

    def tokenize(self, ds, tokenizer, *, max_length, max_target_length=None, num_labels=None, what="data"):
        eos = tokenizer.eos_token or ""

        def encode(batch):
            prompts = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
            full = tokenizer([p + c + eos for p, c in zip(batch["prompt"], batch["completion"])], add_special_tokens=True)
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for p_ids, ids in zip(prompts, full["input_ids"]):
                drop = max(0, len(ids) - max_length)
                ids = ids[drop:]
                n_prompt = max(0, len(p_ids) - drop)
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append([-100] * n_prompt + ids[n_prompt:])
            return out

        return tokenized(ds, encode, tokenizer, what, task=self.name, max_length=max_length,
                         max_target_length=max_target_length)


@register_task("seq2seq")
class Seq2Seq(Task):
    """``prompt`` + ``completion`` on an encoder-decoder: encoder input = prompt, labels = completion + EOS."""

    model_tasks = ("seq2seq",)
    columns = ("prompt", "completion")
    hint = "A 'text' column alone gives no target."

    def needs(self) -> str:
        return "'prompt' (the encoder's input) and 'completion' (the target the decoder learns) columns"

    def check(self, train_ds, eval_ds, *, num_labels):
        for ds, what in _named(train_ds, eval_ds):
            check_texts(ds, "prompt", what)  # an encoder needs something to read
            check_texts(ds, "completion", what)

    def check_lengths(self, ds, tokenizer, *, max_length, max_target_length, policy, what):
        """Prompts count against ``max_length``, targets against ``max_target_length``."""
        rows = ds.with_format(None)
        prompts = tokenizer(rows["prompt"][:], verbose=False)["input_ids"]
        sides = (
            ("prompt", "max_length", max_length, [len(ids) for ids in prompts], ""),
            ("completion", "max_target_length", max_target_length or max_length,
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

    def tokenize(self, ds, tokenizer, *, max_length, max_target_length=None, num_labels=None, what="data"):
        """``input_ids`` is the prompt (at most ``max_length`` tokens), ``labels`` the completion + EOS
        (at most ``max_target_length``, default ``max_length``); the collator derives the decoder's inputs."""
        target_limit = max_target_length or max_length
        eos = tokenizer.eos_token_id

        def encode(batch):
            enc = tokenizer(batch["prompt"], truncation=True, max_length=max_length)
            enc["labels"] = [_fit_target(ids, target_limit, eos) for ids in _target_ids(tokenizer, batch["completion"])]
            return enc

        return tokenized(ds, encode, tokenizer, what, task=self.name, max_length=max_length,
                         max_target_length=max_target_length)

    def collator(self, tokenizer, model):
        # Labels pad with -100 on the tokenizer's side: left-padded labels would put pads between
        # the decoder's start token and the target, so the copy used here pads on the right.
        return transformers.DataCollatorForSeq2Seq(_with_pad_token(tokenizer, "right"), model=model,
                                                   label_pad_token_id=-100)

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        return _perplexity(metrics)


def _perplexity(metrics: dict[str, float]) -> dict[str, float]:
    if "eval_loss" not in metrics:
        return {}
    return {"eval_perplexity": float(math.exp(min(metrics["eval_loss"], 50)))}


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


def as_dataset(data: Any, what: str):
    """``data`` (a ``datasets.Dataset``, a list of dicts or a dict of lists) as a non-empty Dataset; None stays None."""
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
