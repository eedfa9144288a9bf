"""Loading a local data file or a Hub dataset as one ``datasets.Dataset``.

Both go through ``datasets.load_dataset``, so the Hub cache and ``HF_HUB_OFFLINE=1`` behave as
they do for any ``datasets`` user; this module only chooses the reader and turns its failures
into errors that say what to do.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import datasets

from adapterkit.errors import DataError, InvalidOptionError
from adapterkit.sources import resolve_source

logger = logging.getLogger(__name__)

#: File extension -> ``datasets`` packaged builder.
FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

_FORMAT_NAMES = {"csv": "CSV/TSV", "json": "JSON/JSONL", "parquet": "Parquet"}

OFFLINE_HINT = (
    "Pass a local file (.csv, .tsv, .jsonl, .json, .parquet) instead, or set HF_HUB_OFFLINE=1 "
    "with a cache that already holds the dataset."
)


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
    if kwargs.pop("streaming", False):
        raise InvalidOptionError(
            "streaming=True is not supported: load_table returns an in-memory Dataset. "
            "Use split='train[:N]' to load a slice, or call datasets.load_dataset directly."
        )
    where = resolve_source(source, what="data file or Hub dataset", error=DataError)
    if where.path is not None:
        clash = sorted({"path", "data_files"} & set(kwargs))
        if clash:
            raise InvalidOptionError(f"{clash} cannot be combined with a local file; pass the file as source.")
        return _load_file(where.path, split=split, column_names=column_names, options=kwargs)
    if column_names is not None:
        raise InvalidOptionError(
            f"column_names is for local CSV/TSV files without a header; {where.text!r} is a Hub dataset id. "
            "Rename columns afterwards with dataset.rename_columns({...})."
        )
    return _load_hub(where.text, split=split, options=kwargs)


def _load_dataset(source: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset``, with an unknown reader option reported as such."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except TypeError as exc:
        # load_dataset forwards unknown keywords to the builder config, which fails with a bare TypeError.
        if "unexpected keyword argument" not in str(exc):
            raise
        raise InvalidOptionError(f"Option not understood when loading {source!r}: {exc}.") from exc


def _reader_options(ext: str, column_names: list[str] | None) -> dict[str, Any]:
    """The ``load_dataset`` options that make a file of type ``ext`` read as adapterkit documents."""
    if FORMATS[ext] != "csv":
        if column_names is not None:
            raise InvalidOptionError(f"column_names is only for CSV/TSV files without a header, not {ext!r} files.")
        return {}
    # keep_default_na=False: words such as "NA", "nan" or "null" are text, not missing values.
    options: dict[str, Any] = {"keep_default_na": False}
    if ext == ".tsv":
        # QUOTE_NONE: SST-2-style text has unbalanced quotes (`` '' " ) that must survive verbatim.
        options.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    if column_names is not None:
        options["column_names"] = list(column_names)
    return options


def _load_file(
    path: Path, *, split: str | None, column_names: list[str] | None, options: dict[str, Any]
) -> datasets.Dataset:
    if path.is_dir():
        raise DataError(f"{str(path)!r} is a folder; pass one data file ({', '.join(sorted(FORMATS))}).")
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise DataError(
            f"Unsupported data file type {ext or '(no extension)'!r} for {str(path)!r}; "
            f"supported: {', '.join(sorted(FORMATS))}."
        )
    if path.stat().st_size == 0:
        # The JSON reader fails on an empty file with a bare StopIteration.
        raise DataError(f"The data file {str(path)!r} is empty (0 bytes): there is nothing to train or evaluate on.")
    kwargs = {**_reader_options(ext, column_names), **options}  # the caller's reader options win
    try:
        ds = _load_dataset(str(path), FORMATS[ext], data_files=str(path), split=split or "train", **kwargs)
    except InvalidOptionError:  # a ValueError too, but already says what to do
        raise
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(
                f"A local file has one split, 'train' (slicing such as 'train[:100]' works); got {split!r}."
            ) from exc
        raise DataError(f"Could not read {str(path)!r}: {exc}") from exc
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc
        raise DataError(
            f"Could not parse {str(path)!r}: it is not valid {_FORMAT_NAMES[FORMATS[ext]]} ({cause})."
        ) from exc
    logger.info("Loaded %d rows from %s (columns %s)", len(ds), path, ds.column_names)
    return ds


def _load_hub(source: str, *, split: str | None, options: dict[str, Any]) -> datasets.Dataset:
    try:
        loaded = _load_dataset(source, source, split=split, **options)
    except InvalidOptionError:
        raise
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataError(
            f"No dataset {source!r} on the Hub or in the local cache (or it is private/gated). "
            f"Check the id, log in for gated data, or: {OFFLINE_HINT}"
        ) from exc
    except (ConnectionError, OSError) as exc:
        raise DataError(
            f"Could not reach the Hugging Face Hub for dataset {source!r} ({exc}). {OFFLINE_HINT}"
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
