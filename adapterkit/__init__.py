"""adapterkit: parameter-efficient adapters for Hugging Face models.

Attach an adapter strategy to any base model, train it cheaply, save and share it through
the Hugging Face Hub, and switch between many adapters on one loaded base.

Example:
    >>> import adapterkit as ak
    >>> model, tokenizer = ak.load_base("minilm-l6", task="classification", num_labels=2)
    >>> model = ak.attach(model, "lora", r=8)
    >>> print(ak.summary(model))
"""

from adapterkit import strategies as _strategies  # noqa: F401  (registers the built-ins)
from adapterkit._version import __version__
from adapterkit.api import (
    AdapterSummary,
    ModelSummary,
    attach,
    detach,
    get_active_adapter,
    get_adapter_record,
    list_adapters,
    load,
    summary,
    trainable_parameters,
    use,
)
from adapterkit.artifacts import save
from adapterkit.base_model import load_base
from adapterkit.compose import compose
from adapterkit.evaluate import evaluate_classifier, evaluate_label_words
from adapterkit.export import ExportReport, export
from adapterkit.hub import publish
from adapterkit.merge import merge
from adapterkit.serve.pool import AdapterPool
from adapterkit.config import AdapterConfig
from adapterkit.errors import (
    AdapterExistsError,
    AdapterFormatError,
    AdapterKitError,
    AdapterMismatchError,
    AdapterNotFoundError,
    DataError,
    HubError,
    IncompatibleModelError,
    InvalidOptionError,
    ModelNotAvailableError,
    PoolFullError,
    StrategyImportError,
    UnknownStrategyError,
)
from adapterkit.runtime import mixed_batch
from adapterkit.training import TrainSettings, register_task, train
from adapterkit.registry import Registry, get_strategy, list_strategies, register_strategy
from adapterkit.strategies import FullConfig, HeadConfig, LoraConfig, PrefixConfig, Strategy


__all__ = [
    "AdapterPool",
    "AdapterConfig",
    "AdapterExistsError",
    "AdapterFormatError",
    "AdapterKitError",
    "AdapterMismatchError",
    "AdapterNotFoundError",
    "AdapterSummary",
    "DataError",
    "ExportReport",
    "FullConfig",
    "HeadConfig",
    "HubError",
    "IncompatibleModelError",
    "InvalidOptionError",
    "LoraConfig",
    "ModelNotAvailableError",
    "PoolFullError",
    "ModelSummary",
    "PrefixConfig",
    "Registry",
    "Strategy",
    "TrainSettings",
    "StrategyImportError",
    "UnknownStrategyError",
    "attach",
    "compose",
    "detach",
    "evaluate_classifier",
    "evaluate_label_words",
    "export",
    "get_active_adapter",
    "get_adapter_record",
    "get_strategy",
    "list_adapters",
    "list_strategies",
    "load",
    "load_base",
    "merge",
    "mixed_batch",
    "publish",
    "register_strategy",
    "register_task",
    "save",
    "summary",
    "trainable_parameters",
    "train",
    "use",
]
