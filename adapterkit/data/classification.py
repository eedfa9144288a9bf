"""Checking classification data before training, and sampling or splitting it by class.

Everything here fails early, before a model is loaded or a step is trained, with a message that
names the bad rows and says what to do.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import datasets

from adapterkit.errors import DataError, InvalidOptionError, did_you_mean, option_hint

logger = logging.getLogger(__name__)

#: Policies of :func:`check_lengths`.
LENGTH_POLICIES = ("truncate", "error")

_SHOW = 5  # offending values / row indexes quoted in an error message


def _shown(items: Sequence) -> str:
    return f"{list(items[:_SHOW])}{' ...' if len(items) > _SHOW else ''}"


def require_columns(dataset: datasets.Dataset, *columns: str) -> None:
    """Raise :class:`DataError` naming the first of ``columns`` that ``dataset`` lacks."""
    available = dataset.column_names
    for column in columns:
        if column not in available:
            raise DataError(f"No column {column!r}; available columns: {available}.{did_you_mean(column, available)}")


def column_values(dataset: datasets.Dataset, name: str) -> list:
    """Column ``name`` as a plain list, whatever format ``dataset`` is set to."""
    # Slicing the Column materialises it in one Arrow call; iterating it row by row is ~1000x slower.
    return list(dataset.with_format(None)[name][:])


def _texts(dataset: datasets.Dataset, column: str) -> list[str]:
    texts = column_values(dataset, column)
    bad_rows = [i for i, t in enumerate(texts) if t is None or (isinstance(t, str) and not t.strip())]
    if bad_rows:
        raise DataError(
            f"{len(bad_rows)} of {len(texts)} rows have an empty or missing {column!r} "
            f"(row indexes {_shown(bad_rows)}); drop or fill them first."
        )
    # Numbers in a text column (e.g. a CSV of ids) are still text to a tokenizer.
    return [t if isinstance(t, str) else str(t) for t in texts]


def _as_label_id(value: Any) -> int | str | None:
    """An int for int-like values, the string for strings, None for missing values."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    try:
        return int(value) if int(value) == value else None  # numpy integers
    except (TypeError, ValueError):
        return None


def _missing_label(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def _label_set(label_names: Sequence[str]) -> str:
    names = list(label_names)
    shown = ", ".join(f"{i}={n!r}" for i, n in enumerate(names[:20]))
    return f"[{shown}{', ...' if len(names) > 20 else ''}]"


def _default_label_names(dataset: datasets.Dataset, label_column: str, raw: list, values: list) -> list[str]:
    """A ``ClassLabel`` feature's names, the sorted string labels, or ``"0".."max"`` for int labels."""
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if values and all(isinstance(v, str) for v in values):
        return sorted(set(values))
    if values and all(isinstance(v, int) and v >= 0 for v in values):
        return [str(i) for i in range(max(values) + 1)]
    kinds = sorted({type(v).__name__ for v in raw})
    examples = sorted({repr(v) for v, c in zip(raw, values) if not isinstance(c, int) or c < 0})[:_SHOW]
    raise DataError(
        f"Labels in {label_column!r} must be all class ids (ints >= 0) or all class names (strings); "
        f"found types {kinds}, e.g. {', '.join(examples) or 'mixed ints and strings'}. "
        f"Pass {option_hint('label_names')} to say which names map to which ids."
    )


def _checked_label_names(label_names: Sequence[Any]) -> list[str]:
    names = [str(n) for n in label_names]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    blank = [n for n in names if not n.strip()]
    if dupes or blank or not names:
        raise InvalidOptionError(
            f"label_names must be a non-empty list of unique, non-blank names; got {names}"
            + (f" (duplicates {dupes})" if dupes else "") + (" (blank names)" if blank else "") + "."
        )
    return names


def _label_ids(raw: list, values: list, label_names: list[str], label_column: str) -> list[int]:
    index = {name: i for i, name in enumerate(label_names)}
    ids: list[int] = []
    offending: Counter = Counter()
    for value, orig in zip(values, raw):
        if isinstance(value, str) and value in index:
            ids.append(index[value])
        elif isinstance(value, int) and 0 <= value < len(label_names):
            ids.append(value)
        else:
            offending[repr(orig)] += 1
    if offending:
        shown = ", ".join(v for v, _ in offending.most_common(_SHOW))
        raise DataError(
            f"{sum(offending.values())} rows have labels in {label_column!r} outside the label set "
            f"{_label_set(label_names)}: {shown}{' ...' if len(offending) > _SHOW else ''}. "
            f"Give {option_hint('label_names')} that cover them (names, or ids 0..n-1), or drop those rows."
        )
    present = sorted(set(ids))
    if len(present) < 2:
        raise DataError(
            f"Only one class ({label_names[present[0]]!r}) appears in {len(ids)} rows of {label_column!r}; "
            "classification needs at least two classes."
        )
    return ids


def prepare_classification(
    dataset: datasets.Dataset,
    *,
    text_column: str,
    label_column: str,
    label_names: list[str] | None = None,
    text_pair_column: str | None = None,
) -> tuple[datasets.Dataset, list[str]]:
    """Check a classification dataset and reduce it to columns ``text`` (str) and ``label`` (int).

    Args:
        dataset: The rows (a ``Dataset``, a list of dicts or a dict of lists).
        text_column: Column holding the text.
        label_column: Column holding the label, as class ids or class names.
        label_names: Class names in id order. String labels map to their position here; int labels
            must lie in ``range(len(label_names))``. Default: a ``ClassLabel`` feature's names, the
            sorted unique string labels, or ``"0".."max"`` for int labels.
        text_pair_column: Column holding a second text for sentence-pair tasks (NLI, paraphrase);
            kept as column ``text_pair``, between ``text`` and ``label``.

    Returns:
        The new dataset and the label names.

    Raises:
        DataError: A column is missing, the data is empty, a label is outside the label set, only one
            class is present, or some texts are empty.
    """
    if isinstance(dataset, list):
        dataset = datasets.Dataset.from_list(dataset)
    elif isinstance(dataset, dict):
        dataset = datasets.Dataset.from_dict(dataset)
    require_columns(dataset, text_column, label_column, *([text_pair_column] if text_pair_column else []))
    if len(dataset) == 0:
        raise DataError("The dataset is empty: there is nothing to train or evaluate on.")

    columns: dict[str, list] = {"text": _texts(dataset, text_column)}
    if text_pair_column:
        columns["text_pair"] = _texts(dataset, text_pair_column)

    raw = column_values(dataset, label_column)
    missing = [i for i, v in enumerate(raw) if _missing_label(v)]
    if missing:
        # An empty cell is a missing label, never a class named ''.
        raise DataError(
            f"{len(missing)} of {len(raw)} rows have an empty or missing label in {label_column!r} "
            f"(row indexes {_shown(missing)}); label or drop them first."
        )
    values = [_as_label_id(v) for v in raw]
    if label_names is None:
        label_names = _default_label_names(dataset, label_column, raw, values)
    else:
        label_names = _checked_label_names(label_names)
    columns["label"] = _label_ids(raw, values, label_names, label_column)

    features = {name: datasets.Value("string") for name in columns}
    features["label"] = datasets.Value("int64")
    out = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    logger.info("Prepared %d rows, %d classes: %s", len(out), len(label_names), label_names)
    return out, label_names


def _rows_by_label(dataset: datasets.Dataset, label_column: str) -> dict[Any, list[int]]:
    """Row indexes per class, classes in sorted order."""
    require_columns(dataset, label_column)
    groups: dict[Any, list[int]] = {}
    for i, label in enumerate(column_values(dataset, label_column)):
        groups.setdefault(label, []).append(i)
    try:
        return dict(sorted(groups.items()))
    except TypeError:
        raise DataError(
            f"Labels in {label_column!r} mix types ({sorted({type(v).__name__ for v in groups})}); "
            "map them to class ids with prepare_classification first."
        ) from None


def few_shot(dataset: datasets.Dataset, k: int, *, seed: int, label_column: str = "label") -> datasets.Dataset:
    """Sample ``k`` rows of every class, reproducibly.

    Args:
        dataset: Rows with a label column.
        k: Rows per class.
        seed: Same seed, same rows (and the same order, classes interleaved).
        label_column: The column whose values are the classes.

    Raises:
        DataError: A class has fewer than ``k`` rows, or there is no label column.
        InvalidOptionError: ``k`` is not a positive int.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidOptionError(f"k must be a positive int (rows per class), got {k!r}.")
    groups = _rows_by_label(dataset, label_column)
    short = {label: len(rows) for label, rows in groups.items() if len(rows) < k}
    if short:
        raise DataError(
            f"few_shot(k={k}) needs {k} rows per class, but classes {short} (label: rows) have fewer. "
            "Lower k (the recipes' --k or --shots) or add rows for those classes."
        )
    rng = random.Random(seed)
    picked = [i for rows in groups.values() for i in rng.sample(rows, k)]
    rng.shuffle(picked)  # interleave classes so a prefix of the sample is balanced-ish too
    return dataset.select(picked)


def _test_rows(test_size: int | float, n: int) -> int:
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise InvalidOptionError(f"test_size must be an int count or a float fraction, got {test_size!r}.")
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise InvalidOptionError(f"test_size as a fraction must be in (0, 1), got {test_size}.")
        n_test = round(test_size * n)
    else:
        n_test = test_size
    if not 1 <= n_test <= n - 1:
        raise InvalidOptionError(
            f"test_size={test_size!r} gives {n_test} test rows of {n}; need between 1 and {n - 1}."
        )
    return n_test


def stratified_split(
    dataset: datasets.Dataset, test_size: int | float, seed: int, *, label_column: str = "label"
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split into train and test keeping the class proportions (``Dataset.train_test_split``).

    Args:
        dataset: Rows with a label column (class ids, names, or a ``ClassLabel``).
        test_size: Test rows, as a count (``int``) or a fraction in (0, 1). The total is exact;
            per-class counts are proportional, rounded by largest remainder.
        seed: Same seed, same split.
        label_column: The column whose values are the classes.

    Returns:
        ``(train, test)``, each shuffled, with the rows and features of ``dataset``.

    Raises:
        InvalidOptionError: ``test_size`` is not a count in [1, n-1] or a fraction in (0, 1).
        DataError: There is no label column, a class has a single row, or one side would have
            fewer rows than there are classes.
    """
    n = len(dataset)
    n_test = _test_rows(test_size, n)
    groups = _rows_by_label(dataset, label_column)
    single = [label for label, rows in groups.items() if len(rows) < 2]
    if single:
        raise DataError(
            f"Cannot split {label_column!r} by class: classes {single[:_SHOW]} have a single row, so they cannot "
            "appear on both sides. Add rows for them or drop them first."
        )
    if min(n_test, n - n_test) < len(groups):
        raise DataError(
            f"Cannot split {n} rows into {n - n_test} + {n_test} keeping all {len(groups)} classes of "
            f"{label_column!r} on both sides: each side needs at least {len(groups)} rows. "
            "Use more rows, or a test size nearer the middle."
        )
    # Stratify on a side table of class ids (train_test_split needs a ClassLabel column) and select the
    # rows from the original, so its label values and features stay as they are.
    class_of = [0] * n
    for class_id, rows in enumerate(groups.values()):
        for row in rows:
            class_of[row] = class_id
    side = datasets.Dataset.from_dict(
        {"class": class_of, "row": list(range(n))},
        features=datasets.Features({"class": datasets.ClassLabel(num_classes=len(groups)), "row": datasets.Value("int64")}),
    )
    parts = side.train_test_split(test_size=n_test, stratify_by_column="class", seed=seed)
    train_rows, test_rows = parts["train"]["row"][:], parts["test"]["row"][:]
    in_test = Counter(class_of[row] for row in test_rows)
    lonely = [label for class_id, (label, rows) in enumerate(groups.items()) if in_test[class_id] in (0, len(rows))]
    if lonely:
        logger.warning("Classes %s appear on only one side of the split (too few rows to stratify).", lonely)
    return dataset.select(train_rows), dataset.select(test_rows)


def subset(dataset: datasets.Dataset, rows: int | None, *, seed: int) -> datasets.Dataset:
    """A stratified subset of ``rows`` rows (the whole set when ``rows`` is None or larger)."""
    if rows is None or rows >= len(dataset):
        return dataset
    return stratified_split(dataset, len(dataset) - rows, seed=seed)[0]


def _model_max_length(tokenizer: Any) -> int | None:
    value = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a known limit report a huge sentinel (int(1e30)) as model_max_length.
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


def check_lengths(
    texts: Sequence[str],
    tokenizer: Any,
    max_length: int | None = None,
    policy: str = "truncate",
    *,
    option: str = "policy",
) -> int:
    """Count texts longer than ``max_length`` tokens (special tokens included).

    Args:
        texts: The texts.
        tokenizer: A Hugging Face tokenizer.
        max_length: The token budget per text. Default: the tokenizer's ``model_max_length``.
        policy: ``"truncate"`` (log a warning, the texts will be cut) or ``"error"``.
        option: how the caller names ``policy`` in hints (``train`` and the recipes call it
            ``length_policy``).

    Returns:
        How many texts exceed ``max_length``.

    Raises:
        InvalidOptionError: Unknown ``policy``, or no ``max_length`` and the tokenizer knows no limit.
        DataError: ``policy="error"`` and some text is too long.
    """
    if policy not in LENGTH_POLICIES:
        raise InvalidOptionError(
            f"Unknown length policy {policy!r} ({option_hint(option)}); choose one of {list(LENGTH_POLICIES)}."
            + did_you_mean(policy, LENGTH_POLICIES)
        )
    model_max = _model_max_length(tokenizer)
    if max_length is None:
        if model_max is None:
            raise InvalidOptionError(
                f"The tokenizer does not state its model's maximum length; pass {option_hint('max_length')} "
                "(the model config's max_position_embeddings)."
            )
        max_length = model_max
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise InvalidOptionError(f"{option_hint('max_length')} must be a positive int, got {max_length!r}.")
    if model_max is not None and max_length > model_max:
        # Longer inputs than the position embeddings index errors or garbage, not a clean failure.
        logger.warning(
            "max_length=%d is above the model's maximum of %d tokens; rows longer than %d may fail.",
            max_length, model_max, model_max,
        )
    texts = list(texts)
    if not texts:
        return 0
    # verbose=False: the per-call "sequence longer than maximum" warning is what we report better.
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    too_long = sum(length > max_length for length in lengths)
    if not too_long:
        logger.info("All %d rows fit in max_length=%d tokens (longest %d).", len(texts), max_length, max(lengths))
        return 0
    longest = max(lengths)
    if policy == "error":
        if model_max is None:
            fix = f"Raise {option_hint('max_length')} (up to the model's max_position_embeddings), shorten those texts"
        elif max_length < model_max:
            fix = f"Raise {option_hint('max_length')} (up to the model's maximum of {model_max}), shorten those texts"
        else:
            fix = f"The model takes at most {model_max} tokens: shorten or split those texts"
        raise DataError(
            f"{too_long} of {len(texts)} rows are longer than max_length={max_length} tokens (longest: {longest}). "
            f"{fix}, or pass {option_hint(option, 'truncate')} to cut them."
        )
    logger.warning(
        "%d of %d rows exceed max_length=%d tokens (longest %d); they will be truncated.",
        too_long, len(texts), max_length, longest,
    )
    return too_long
