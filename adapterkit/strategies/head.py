"""Head-only training: the base stays frozen, only the task head learns.

Trains the modules that map backbone features to outputs (``classifier``, ``score``,
``lm_head``, ...; discovered from the model) and, by default, the backbone's pooler where it
has one: the update is plain gradient descent on those weights alone. This is the classic
"freeze the body, train a new output layer" recipe. Each head adapter owns a copy of the
head, so several share one base and switching swaps a module reference. A tied output
embedding becomes an untied copy, and a quantized head a dequantized one, so it can train.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from adapterkit.config import AdapterConfig
from adapterkit.errors import IncompatibleModelError
from adapterkit.registry import register_strategy
from adapterkit.state import get_store
from adapterkit.strategies.base import Strategy
from adapterkit.targets import head_paths, pooler_path


@dataclasses.dataclass(kw_only=True)
class HeadConfig(AdapterConfig):
    """Options of the ``head`` strategy.

    Attributes:
        head_modules: module paths to train; ``None`` discovers the task head.
        train_pooler: also train the backbone's pooler (BERT's ``pooler.dense``). Sentence
            embedding checkpoints such as all-MiniLM-L6-v2 never trained their pooler, and a
            classifier on its frozen output stays at chance.
    """

    strategy = "head"

    head_modules: list[str] | None = None
    train_pooler: bool = True

    def validate(self) -> list[str]:
        hm = self.head_modules
        if hm is not None and not (isinstance(hm, list) and hm and all(isinstance(h, str) and h for h in hm)):
            return [f"head_modules must be None or a non-empty list of module paths, got {hm!r}"]
        if not isinstance(self.train_pooler, bool):
            return [f"train_pooler must be True or False, got {self.train_pooler!r}"]
        return []


def chosen_paths(model: nn.Module, config: HeadConfig) -> list[str]:
    """The module paths a head adapter trains on ``model``."""
    if config.head_modules is not None:
        paths = list(config.head_modules)
        known = {n for n, _ in model.named_modules() if n}
        missing = [p for p in paths if p not in known]
        if missing:
            raise IncompatibleModelError(
                f"head_modules {missing} are not modules of {type(model).__name__}. "
                f"Its discovered task head is {head_paths(model)}."
            )
        return paths
    paths = head_paths(model)
    if not paths:
        raise IncompatibleModelError(
            f"No task head found on {type(model).__name__}: it has no classifier/score/lm_head beside its backbone. "
            "Load the base with a task (adapterkit.load_base(..., task='classification')) or pass head_modules."
        )
    pooler = pooler_path(model) if config.train_pooler else None
    return [pooler, *paths] if pooler else paths


@register_strategy("head")
class HeadStrategy(Strategy):
    """Train only the task head (and pooler) on a frozen base."""

    config_cls = HeadConfig
    # The head *is* this strategy's adapter; the generic label-head copy would duplicate it.
    trains_label_head = False

    def check_model(self, model: nn.Module, config: HeadConfig) -> None:
        chosen_paths(model, config)

    def attach(self, model: nn.Module, config: HeadConfig, name: str) -> None:
        get_store(model).add_head_copies(model, name, chosen_paths(model, config))

    def activate(self, model: nn.Module, name: str | None) -> None:
        # The store installs every adapter's head modules on each switch.
        return None

    def detach(self, model: nn.Module, name: str) -> None:
        return None  # the store drops the head copies

    def backbone_frozen(self, model: nn.Module, name: str) -> bool:
        trained = set(get_store(model).heads.get(name, {}))
        return trained <= set(head_paths(model)) | {pooler_path(model)}

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return {
            f"{path}.{pname}": p
            for path, module in get_store(model).heads.get(name, {}).items()
            for pname, p in module.named_parameters()
        }
