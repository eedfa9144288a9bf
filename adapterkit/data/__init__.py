"""Loading, checking and splitting training data.

- :mod:`~adapterkit.data.loading`: local files and Hub datasets through ``datasets.load_dataset``.
- :mod:`~adapterkit.data.classification`: label checks, few-shot sampling, stratified splits,
  token-length checks.
- :mod:`~adapterkit.data.bundled`: the offline datasets in ``shared/data`` (SST-2, TREC, AG News,
  self-instruct).
- :mod:`~adapterkit.data.splits`: train/evaluation splits from any of those sources.
"""

from adapterkit.data.bundled import (
    AG_NEWS_TEST_ROWS,
    LOCAL_SPLITS,
    SST2_LABELS,
    TREC_LABELS,
    data_dir,
    load_instructions,
    local_dataset,
)
from adapterkit.data.classification import (
    LENGTH_POLICIES,
    check_lengths,
    few_shot,
    prepare_classification,
    stratified_split,
    subset,
)
from adapterkit.data.loading import FORMATS, load_table
from adapterkit.data.splits import classification_splits, data_source, dataset_source
from adapterkit.errors import option_hint

__all__ = [
    "AG_NEWS_TEST_ROWS",
    "FORMATS",
    "LENGTH_POLICIES",
    "LOCAL_SPLITS",
    "SST2_LABELS",
    "TREC_LABELS",
    "check_lengths",
    "classification_splits",
    "data_dir",
    "data_source",
    "dataset_source",
    "few_shot",
    "load_instructions",
    "load_table",
    "local_dataset",
    "option_hint",
    "prepare_classification",
    "stratified_split",
    "subset",
]
