"""Loading, checking and splitting training data.

Everything here fails early, before a model is loaded or a step is trained, with a message that
names the bad rows and says what to do. Local files and Hub dataset ids go through
``datasets.load_dataset`` alike, so the Hub cache and ``HF_HUB_OFFLINE=1`` behave as usual.

The bundled offline datasets (SST-2, TREC, AG News, self-instruct, GSM8K) live in a
``shared/data`` folder; see :func:`data_dir`.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import html
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from adapterkit.errors import DataError, InvalidOptionError, did_you_mean

logger = logging.getLogger(__name__)

#: File extension -> ``datasets`` packaged builder.
FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

#: Policies of :func:`check_lengths`.
LENGTH_POLICIES = ("truncate", "error")

_OFFLINE_HINT = (
    "Pass a local file (.csv, .tsv, .jsonl, .json, .parquet) instead, or set HF_HUB_OFFLINE=1 "
    "with a cache that already holds the dataset."
)
_SHOW = 5  # offending values / row indexes quoted in an error message

# Recipes and the `adapterkit` command read the same errors as the Python API, but their users set
# options as flags: hints must say `--length-policy truncate` there and `length_policy="truncate"` here.
_CLI_SPELLING: contextvars.ContextVar[bool] = contextvars.ContextVar("adapterkit_cli_spelling", default=False)
_NO_VALUE = object()


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Within, error hints name options as command-line flags (``--max-length 128``)."""
    token = _CLI_SPELLING.set(True)
    try:
        yield
    finally:
        _CLI_SPELLING.reset(token)


def option_hint(name: str, value: Any = _NO_VALUE) -> str:
    """How to set option ``name`` (to ``value``), spelt for the reader: a flag or a keyword.

    Example:
        ``option_hint("length_policy", "truncate")`` is ``length_policy="truncate"`` from Python
        and ``--length-policy truncate`` under :func:`cli_spelling`.
    """
    if _CLI_SPELLING.get():
        flag = "--" + name.replace("_", "-")
        if value is _NO_VALUE:
            return flag
        return f"{flag} {value if isinstance(value, str) else json.dumps(value)}"
    if value is _NO_VALUE:
        return f"{name}="
    return f"{name}={json.dumps(value) if isinstance(value, str) else repr(value)}"


# --- loading ---------------------------------------------------------------------------------
def _looks_local(source: str) -> bool:
    # Hub ids are "owner/name"; anything with a data-file extension or an explicit path prefix
    # is meant as a file, so a typo there must not turn into a Hub request.
    path = Path(source).expanduser()
    if path.exists():
        return True
    if source.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", source):
        return True
    return path.suffix.lower() in {*FORMATS, ".txt", ".xlsx", ".xls", ".gz", ".zip", ".bz2", ".xz", ".arrow"}


def load_table(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    column_names: list[str] | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """Load a local data file or a Hugging Face Hub dataset as one ``Dataset``.

    Args:
        source: A ``.csv``, ``.tsv``, ``.jsonl``, ``.json`` or ``.parquet`` file, or a Hub dataset id.
        split: Split to load, slicing allowed (``"train[:100]"``). Local files have one split,
            ``"train"``; for a Hub dataset the default is ``"train"`` or its only split.
        column_names: Column names for a CSV/TSV file without a header row.
        **kwargs: Passed on to ``datasets.load_dataset``: a Hub config (``name="sst2"``),
            ``revision=``, or reader options for a file (``encoding="latin-1"``, ``quoting=`` ...).

    Returns:
        The rows. TSV is read without quote handling, so quotes in the text survive; cells such as
        ``NA`` or ``null`` stay text and empty cells stay empty strings.

    Raises:
        DataError: The file is missing, of an unsupported type or unparsable; the Hub is unreachable,
            the dataset unknown or the split absent.
        InvalidOptionError: ``column_names`` given for a source that is not CSV/TSV, ``streaming=True``,
            or an option the reader does not know.
    """
    source = os.fspath(source)
    if kwargs.get("streaming"):
        raise InvalidOptionError(
            "streaming=True is not supported: load_table returns an in-memory Dataset. "
            "Use split='train[:N]' to load a slice, or call datasets.load_dataset directly."
        )
    kwargs.pop("streaming", None)
    if _looks_local(source):
        clash = sorted({"path", "data_files"} & set(kwargs))
        if clash:
            raise InvalidOptionError(f"{clash} cannot be combined with a local file; pass the file as source.")
        return _load_file(Path(source).expanduser(), split=split, column_names=column_names, options=kwargs)
    if column_names is not None:
        raise InvalidOptionError(
            f"column_names is for local CSV/TSV files without a header; {source!r} is a Hub dataset id. "
            "Rename columns afterwards with dataset.rename_columns({...})."
        )
    return _load_hub(source, split=split, options=kwargs)


def _bad_option(exc: TypeError, source: str) -> InvalidOptionError | None:
    # load_dataset forwards unknown keywords to the builder config, which fails with a bare TypeError.
    if "unexpected keyword argument" in str(exc):
        return InvalidOptionError(f"Option not understood when loading {source!r}: {exc}.")
    return None


def _load_file(
    path: Path, *, split: str | None, column_names: list[str] | None, options: dict[str, Any]
) -> datasets.Dataset:
    if not path.exists():
        raise DataError(f"Data file {str(path)!r} does not exist (looked in {str(path.resolve().parent)!r}).")
    if path.is_dir():
        raise DataError(f"{str(path)!r} is a folder; pass one data file ({', '.join(sorted(FORMATS))}).")
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise DataError(
            f"Unsupported data file type {ext or '(no extension)'!r} for {str(path)!r}; "
            f"supported: {', '.join(sorted(FORMATS))}."
        )
    kwargs: dict[str, Any] = {}
    if FORMATS[ext] == "csv":
        # keep_default_na=False: words such as "NA", "nan" or "null" are text, not missing values.
        kwargs["keep_default_na"] = False
        if ext == ".tsv":
            # QUOTE_NONE: SST-2-style text has unbalanced quotes (`` '' " ) that must survive verbatim.
            kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)
        if column_names is not None:
            kwargs.update(column_names=list(column_names), header=None)
    elif column_names is not None:
        raise InvalidOptionError(f"column_names is only for CSV/TSV files without a header, not {ext!r} files.")
    kwargs.update(options)  # the caller's reader options win over the defaults above
    try:
        ds = datasets.load_dataset(FORMATS[ext], data_files=str(path), split=split or "train", **kwargs)
    except TypeError as exc:
        bad = _bad_option(exc, str(path))
        if bad is None:
            raise
        raise bad from exc
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(
                f"A local file has one split, 'train' (slicing such as 'train[:100]' works); got {split!r}."
            ) from exc
        raise DataError(f"Could not read {str(path)!r}: {exc}") from exc
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc
        raise DataError(f"Could not parse {str(path)!r} as {ext[1:].upper()}: {cause}") from exc
    logger.info("Loaded %d rows from %s (columns %s)", len(ds), path, ds.column_names)
    return ds


def _load_hub(source: str, *, split: str | None, options: dict[str, Any]) -> datasets.Dataset:
    try:
        loaded = datasets.load_dataset(source, split=split, **options)
    except TypeError as exc:
        bad = _bad_option(exc, source)
        if bad is None:
            raise
        raise bad from exc
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataError(
            f"No dataset {source!r} on the Hub or in the local cache (or it is private/gated). "
            f"Check the id, log in for gated data, or: {_OFFLINE_HINT}"
        ) from exc
    except (ConnectionError, OSError) as exc:
        raise DataError(
            f"Could not reach the Hugging Face Hub for dataset {source!r} ({exc}). {_OFFLINE_HINT}"
        ) from exc
    except ValueError as exc:
        if "config name is missing" in str(exc).lower():
            raise DataError(
                f"Dataset {source!r} has several configurations; choose one with name=... ({exc})"
            ) from exc
        if "split" in str(exc).lower():
            raise DataError(f"Dataset {source!r} has no split {split!r}: {exc}") from exc
        raise DataError(f"Could not load dataset {source!r}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(names) == 1:
            loaded = loaded[names[0]]
        else:
            raise DataError(f"Dataset {source!r} has splits {names}; pass split= to choose one.")
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(
            f"Dataset {source!r} loaded as {type(loaded).__name__}, not a Dataset (streaming is not supported)."
        )
    logger.info("Loaded %d rows from Hub dataset %s (columns %s)", len(loaded), source, loaded.column_names)
    return loaded


# --- checking ---------------------------------------------------------------------------------
def _require_columns(dataset: datasets.Dataset, *columns: str) -> None:
    available = dataset.column_names
    for column in columns:
        if column not in available:
            raise DataError(f"No column {column!r}; available columns: {available}.{did_you_mean(column, available)}")


def _column(dataset: datasets.Dataset, name: str) -> list:
    # Slicing the Column materialises it in one Arrow call; iterating it row by row is ~1000x slower.
    return list(dataset.with_format(None)[name][:])


def _texts(dataset: datasets.Dataset, column: str) -> list[str]:
    texts = _column(dataset, column)
    bad_rows = [i for i, t in enumerate(texts) if t is None or (isinstance(t, str) and not t.strip())]
    if bad_rows:
        raise DataError(
            f"{len(bad_rows)} of {len(texts)} rows have an empty or missing {column!r} "
            f"(row indexes {bad_rows[:_SHOW]}{' ...' if len(bad_rows) > _SHOW else ''}); drop or fill them first."
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
    _require_columns(dataset, text_column, label_column, *([text_pair_column] if text_pair_column else []))
    if len(dataset) == 0:
        raise DataError("The dataset is empty: there is nothing to train or evaluate on.")

    texts = _texts(dataset, text_column)
    pairs = _texts(dataset, text_pair_column) if text_pair_column else None

    raw = _column(dataset, label_column)
    missing = [i for i, v in enumerate(raw) if _missing_label(v)]
    if missing:
        # An empty cell is a missing label, never a class named ''.
        raise DataError(
            f"{len(missing)} of {len(raw)} rows have an empty or missing label in {label_column!r} "
            f"(row indexes {missing[:_SHOW]}{' ...' if len(missing) > _SHOW else ''}); label or drop them first."
        )
    values = [_as_label_id(v) for v in raw]
    if label_names is None:
        feature = dataset.features.get(label_column)
        if isinstance(feature, datasets.ClassLabel):
            label_names = list(feature.names)
        elif values and all(isinstance(v, str) for v in values):
            label_names = sorted(set(values))
        elif values and all(isinstance(v, int) and v >= 0 for v in values):
            label_names = [str(i) for i in range(max(values) + 1)]
        else:
            kinds = sorted({type(v).__name__ for v in raw})
            examples = sorted({repr(v) for v, c in zip(raw, values) if not isinstance(c, int) or c < 0})[:_SHOW]
            raise DataError(
                f"Labels in {label_column!r} must be all class ids (ints >= 0) or all class names (strings); "
                f"found types {kinds}, e.g. {', '.join(examples) or 'mixed ints and strings'}. "
                f"Pass {option_hint('label_names')} to say which names map to which ids."
            )
    else:
        label_names = [str(n) for n in label_names]
        dupes = sorted(n for n, c in Counter(label_names).items() if c > 1)
        blank = [n for n in label_names if not n.strip()]
        if dupes or blank or not label_names:
            raise InvalidOptionError(
                f"label_names must be a non-empty list of unique, non-blank names; got {label_names}"
                + (f" (duplicates {dupes})" if dupes else "") + (" (blank names)" if blank else "") + "."
            )

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
    columns: dict[str, list] = {"text": texts}
    if pairs is not None:
        columns["text_pair"] = pairs
    columns["label"] = ids
    features = {name: datasets.Value("string") for name in columns}
    features["label"] = datasets.Value("int64")
    out = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    logger.info("Prepared %d rows, %d classes: %s", len(out), len(label_names), label_names)
    return out, label_names


def _rows_by_label(dataset: datasets.Dataset, label_column: str) -> dict[Any, list[int]]:
    _require_columns(dataset, label_column)
    groups: dict[Any, list[int]] = {}
    for i, label in enumerate(_column(dataset, label_column)):
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


def stratified_split(
    dataset: datasets.Dataset, test_size: int | float, seed: int, *, label_column: str = "label"
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split into train and test keeping the class proportions.

    Args:
        dataset: Rows with a label column.
        test_size: Test rows, as a count (``int``) or a fraction in (0, 1). The total is exact;
            per-class counts are proportional, rounded by largest remainder.
        seed: Same seed, same split.
        label_column: The column whose values are the classes.

    Returns:
        ``(train, test)``, each shuffled.

    Raises:
        InvalidOptionError: ``test_size`` is not a count in [1, n-1] or a fraction in (0, 1).
        DataError: There is no label column.
    """
    n = len(dataset)
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
    groups = _rows_by_label(dataset, label_column)
    quotas = {label: n_test * len(rows) / n for label, rows in groups.items()}
    counts = {label: math.floor(q) for label, q in quotas.items()}
    by_remainder = sorted(groups, key=lambda label: (-(quotas[label] - counts[label]), label))
    for label in by_remainder[: n_test - sum(counts.values())]:
        counts[label] += 1
    rng = random.Random(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for label, rows in groups.items():
        rows = rows[:]
        rng.shuffle(rows)
        test_idx += rows[: counts[label]]
        train_idx += rows[counts[label] :]
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    lonely = [label for label, rows in groups.items() if counts[label] in (0, len(rows))]
    if lonely:
        logger.warning("Classes %s appear on only one side of the split (too few rows to stratify).", lonely)
    return dataset.select(train_idx), dataset.select(test_idx)


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


# --- bundled offline datasets -------------------------------------------------------------------
def data_dir() -> Path:
    """The folder of bundled datasets.

    ``$ADAPTERKIT_DATA_DIR`` if set; else the first ``shared/data`` found walking up from the current
    directory and from this package's folder (a checkout with ``../shared`` beside it finds it).

    Raises:
        DataError: Not found, or ``ADAPTERKIT_DATA_DIR`` points nowhere.
    """
    env = os.environ.get("ADAPTERKIT_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(
                f"ADAPTERKIT_DATA_DIR={env!r} is not a folder; point it at the shared data folder "
                "(the one holding sst2/, trec/, ...)."
            )
        return path
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    raise DataError(
        f"No shared/data folder found above {[str(s) for s in starts]}. "
        "Set ADAPTERKIT_DATA_DIR to the folder holding sst2/, trec/, ag_news/, ..."
    )


SST2_LABELS = ["negative", "positive"]
TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
LOCAL_SPLITS = {"sst2": ("train", "dev", "test"), "trec": ("train", "test"), "ag_news": ("train", "test")}
AG_NEWS_TEST_ROWS = 1600


def _ag_news_text(title: str, description: str) -> str:
    text = f"{title}. {description}"
    # The corpus marks line breaks with a bare backslash ("General\Electric"), and escapes "$" as "\$"
    # ("US\$1.25"); a "\n" is never a newline escape (all 11 are a break before a word starting with n).
    text = re.sub(r"\\+(?=\$)", "", text)
    text = re.sub(r"\\+", " ", text)
    # Entities lost their "&": "#36;" is "&#36;" ("$"), "#39;" an apostrophe.
    text = re.sub(r"(?<!&)#(\d+);", r"&#\1;", text)
    return " ".join(html.unescape(text).split())


def local_dataset(name: str, split: str) -> tuple[datasets.Dataset, list[str]]:
    """A bundled classification dataset, prepared as ``text`` + ``label``.

    Args:
        name: ``"sst2"`` (train/dev/test), ``"trec"`` (coarse labels; train/test) or ``"ag_news"``
            (a stratified 6,000/1,600 train/test split of the 7,600 original test rows, seed 0).
        split: The split.

    Returns:
        The dataset and its label names.

    Raises:
        DataError: Unknown name or split, or the data folder is missing.
    """
    if name not in LOCAL_SPLITS:
        raise DataError(
            f"No local dataset {name!r}; available: {sorted(LOCAL_SPLITS)}." + did_you_mean(name, LOCAL_SPLITS)
        )
    if split not in LOCAL_SPLITS[name]:
        raise DataError(f"Local dataset {name!r} has splits {list(LOCAL_SPLITS[name])}, not {split!r}.")
    root = data_dir()
    if name == "sst2":
        table = load_table(str(root / "sst2" / f"{split}.tsv"))
        return prepare_classification(table, text_column="sentence", label_column="label", label_names=SST2_LABELS)
    if name == "trec":
        table = load_table(str(root / "trec" / f"{split}.tsv"))
        return prepare_classification(
            table, text_column="question", label_column="label_coarse", label_names=TREC_LABELS
        )
    classes = (root / "ag_news" / "classes.txt").read_text(encoding="utf-8")
    names = [line.strip() for line in classes.splitlines() if line.strip()]
    table = load_table(str(root / "ag_news" / "test.csv"), column_names=["label", "title", "description"])
    rows = {
        "text": [_ag_news_text(t, d) for t, d in zip(_column(table, "title"), _column(table, "description"))],
        "label": [int(c) - 1 for c in _column(table, "label")],  # classes are numbered from 1 in the file
    }
    full, names = prepare_classification(
        datasets.Dataset.from_dict(rows), text_column="text", label_column="label", label_names=names
    )
    train, test = stratified_split(full, AG_NEWS_TEST_ROWS, seed=0)
    return (train if split == "train" else test), names


def load_instructions(path: str | None = None) -> datasets.Dataset:
    """Instruction data with columns ``instruction``, ``input`` and ``output``.

    Args:
        path: A JSONL file (or JSON list) of self-instruct rows (``instruction`` plus an ``instances``
            list of ``{input, output}``; the first instance is used) or flat rows with ``input`` and
            ``output``. Default: the bundled ``self_instruct/seed_tasks.jsonl``.

    Raises:
        DataError: The file is missing or unreadable, or a row lacks an instruction or an output.
    """
    file = Path(path).expanduser() if path is not None else data_dir() / "self_instruct" / "seed_tasks.jsonl"
    if not file.is_file():
        raise DataError(f"Instruction file {str(file)!r} does not exist.")
    text = file.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"{str(file)!r} is not valid JSON/JSONL: {exc}") from exc
    out: dict[str, list[str]] = {"instruction": [], "input": [], "output": []}
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"Record {n} of {str(file)!r} is not a JSON object: {record!r:.80}")
        instances = record.get("instances")
        first = instances[0] if isinstance(instances, list) and instances else record
        instruction, output = record.get("instruction"), first.get("output")
        if not isinstance(instruction, str) or not instruction.strip() or output is None:
            raise DataError(
                f"Record {n} of {str(file)!r} needs a non-empty 'instruction' and an 'output' "
                f"(or 'instances'); has keys {sorted(record)}."
            )
        out["instruction"].append(instruction)
        out["input"].append(str(first.get("input") or ""))
        out["output"].append(str(output))
    if not records:
        raise DataError(f"{str(file)!r} holds no records.")
    logger.info("Loaded %d instructions from %s", len(records), file)
    return datasets.Dataset.from_dict(out)


def classification_splits(
    *,
    dataset: str | None = None,
    train_file: str | None = None,
    eval_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
    seed: int = 0,
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Train and evaluation splits (``text`` + ``label``) and the label names, from any source.

    ``train_file`` (+ ``eval_file``, else 10% held out, stratified) wins; otherwise ``dataset``
    is a bundled set (``sst2`` evaluates on dev, ``trec``/``ag_news`` on test) or a Hub id
    (``train`` / ``validation`` splits).

    Raises:
        DataError: no source given, or the data does not fit (see :func:`prepare_classification`).
        InvalidOptionError: ``eval_file`` without ``train_file``.
    """
    data_source(dataset=dataset, train_file=train_file, eval_file=eval_file)  # refuses half-given files

    def prepared(table, names=None):
        return prepare_classification(table, text_column=text_column, label_column=label_column, label_names=names)

    if train_file:
        train, labels = prepared(load_table(train_file), label_names)
        if eval_file:
            return train, prepared(load_table(eval_file), labels)[0], labels
        return (*stratified_split(train, 0.1, seed=seed), labels)
    if dataset in LOCAL_SPLITS:
        train, labels = local_dataset(dataset, "train")
        return train, local_dataset(dataset, "dev" if "dev" in LOCAL_SPLITS[dataset] else "test")[0], labels
    if dataset:
        train, labels = prepared(load_table(dataset, split="train"), label_names)
        return train, prepared(load_table(dataset, split="validation"), labels)[0], labels
    raise DataError(
        f"No data given: pass {option_hint('dataset')} (sst2, trec, ag_news or a Hub dataset id) "
        f"or {option_hint('train_file')}."
    )


def data_source(
    *, dataset: str | None = None, train_file: str | None = None, eval_file: str | None = None
) -> dict[str, str | None]:
    """What :func:`classification_splits` reads for these arguments, to record with results.

    Returns:
        ``{"dataset", "train_file", "eval_file", "eval_data"}``: ``dataset`` is None when a
        ``train_file`` wins over it, and ``eval_data`` says where the evaluation rows come from.

    Raises:
        InvalidOptionError: ``eval_file`` without ``train_file`` (it would silently evaluate a
            model trained on ``dataset`` on other data).
    """
    if eval_file and not train_file:
        raise InvalidOptionError(
            f"{option_hint('eval_file')} needs {option_hint('train_file')} too: an evaluation file alone would "
            f"train on {dataset or 'no data'!r} and evaluate on other data. Pass both files, or neither "
            f"(and choose {option_hint('dataset')})."
        )
    if train_file:
        held_out = f"10% of {train_file}, held out (stratified)"
        return {"dataset": None, "train_file": str(train_file), "eval_file": eval_file, "eval_data": eval_file or held_out}
    if dataset in LOCAL_SPLITS:
        split = "dev" if "dev" in LOCAL_SPLITS[dataset] else "test"
    else:
        split = "validation"
    return {"dataset": dataset, "train_file": None, "eval_file": None,
            "eval_data": f"{dataset} ({split})" if dataset else None}


def subset(dataset: datasets.Dataset, rows: int | None, *, seed: int) -> datasets.Dataset:
    """A stratified subset of ``rows`` rows (the whole set when ``rows`` is None or larger)."""
    if rows is None or rows >= len(dataset):
        return dataset
    return stratified_split(dataset, len(dataset) - rows, seed=seed)[0]
