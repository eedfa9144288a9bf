"""Training on transformers' Trainer: settings, task shapes, the loop, the feature cache.

- :mod:`.settings`: :class:`TrainSettings`, adapterkit's options on top of ``TrainingArguments``;
- :mod:`.tasks`: the task shapes (classification, pair classification, causal LM, seq2seq) and
  :func:`register_task` to add one;
- :mod:`.trainer`: :func:`train`;
- :mod:`.features`: head-only training on a frozen backbone's cached outputs.

``adapterkit.train`` is the function :func:`train` (the top-level API); this package is reached
with ``from adapterkit.training import ...`` or ``import adapterkit.training.tasks``.
"""

from adapterkit.training.settings import TrainSettings, position_limit
from adapterkit.training.tasks import Task, check_data, get_task, list_tasks, register_task, tokenize
from adapterkit.training.trainer import TrainResult, train

__all__ = [
    "Task",
    "TrainResult",
    "TrainSettings",
    "check_data",
    "get_task",
    "list_tasks",
    "position_limit",
    "register_task",
    "tokenize",
    "train",
]
