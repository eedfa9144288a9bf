"""The bundled offline datasets: SST-2, TREC, AG News, self-instruct (and GSM8K for the metrics).

They live in a ``shared/data`` folder (see :func:`data_dir`) as the files their authors
published; this module reads them with :func:`~adapterkit.data.loading.load_table` and
prepares them like any other classification data.
"""

from __future__ import annotations

import html
import logging
import os
import re
from pathlib import Path

import datasets

from adapterkit.data.classification import column_values, prepare_classification, stratified_split
from adapterkit.data.loading import load_table
from adapterkit.errors import DataError, did_you_mean

logger = logging.getLogger(__name__)

SST2_LABELS = ["negative", "positive"]
TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
#: Bundled classification sets and their splits.
LOCAL_SPLITS = {"sst2": ("train", "dev", "test"), "trec": ("train", "test"), "ag_news": ("train", "test")}
AG_NEWS_TEST_ROWS = 1600


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
        table = load_table(root / "sst2" / f"{split}.tsv")
        return prepare_classification(table, text_column="sentence", label_column="label", label_names=SST2_LABELS)
    if name == "trec":
        table = load_table(root / "trec" / f"{split}.tsv")
        return prepare_classification(
            table, text_column="question", label_column="label_coarse", label_names=TREC_LABELS
        )
    # classes.txt is a list of four names, one a line, not a table.
    classes = (root / "ag_news" / "classes.txt").read_text(encoding="utf-8")
    names = [line.strip() for line in classes.splitlines() if line.strip()]
    table = load_table(root / "ag_news" / "test.csv", column_names=["label", "title", "description"])
    rows = {
        "text": [_ag_news_text(t, d) for t, d in zip(column_values(table, "title"), column_values(table, "description"))],
        "label": [int(c) - 1 for c in column_values(table, "label")],  # classes are numbered from 1 in the file
    }
    full, names = prepare_classification(
        datasets.Dataset.from_dict(rows), text_column="text", label_column="label", label_names=names
    )
    train, test = stratified_split(full, AG_NEWS_TEST_ROWS, seed=0)
    return (train if split == "train" else test), names


def load_instructions(path: str | os.PathLike | None = None) -> datasets.Dataset:
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
    records = load_table(file)
    if len(records) == 0:
        raise DataError(f"{str(file)!r} holds no records.")
    out: dict[str, list[str]] = {"instruction": [], "input": [], "output": []}
    for n, record in enumerate(records.with_format(None), 1):
        instances = record.get("instances")
        first = instances[0] if isinstance(instances, list) and instances else record
        instruction, output = record.get("instruction"), first.get("output")
        if not isinstance(instruction, str) or not instruction.strip() or output is None:
            keys = sorted(key for key, value in record.items() if value is not None)
            raise DataError(
                f"Record {n} of {str(file)!r} needs a non-empty 'instruction' and an 'output' "
                f"(or 'instances'); has keys {keys}."
            )
        out["instruction"].append(instruction)
        out["input"].append(str(first.get("input") or ""))
        out["output"].append(str(output))
    logger.info("Loaded %d instructions from %s", len(records), file)
    return datasets.Dataset.from_dict(out)
