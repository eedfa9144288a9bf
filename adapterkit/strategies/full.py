"""Full fine-tuning: every weight of the model trains.

The update is ordinary gradient descent on all parameters; it is the quality ceiling the
parameter-efficient strategies are measured against (and the classic BERT recipe: AdamW,
lr 2e-5, 3 epochs). It changes the base itself, so it cannot share a base with other
adapters, and it is refused on a quantized base, whose 4/8-bit weights cannot take
gradient updates.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from adapterkit.config import AdapterConfig
from adapterkit.errors import IncompatibleModelError
from adapterkit.registry import register_strategy
from adapterkit.strategy import Strategy


@dataclasses.dataclass(kw_only=True)
class FullConfig(AdapterConfig):
    """Options of the ``full`` strategy (it has none)."""

    strategy = "full"


@register_strategy("full")
class FullStrategy(Strategy):
    """All parameters train; the saved adapter is the whole model's weights.

    The adapter is the model itself: it cannot share a base, and an export is its weights.
    """

    config_cls = FullConfig
    merges_into_weights = True
    default_learning_rate = 5e-5
    trains_label_head = False
    shares_base = False
    supports_quantized = False

    def attach(self, model: nn.Module, config: FullConfig, name: str) -> None:
        return None

    def activate(self, model: nn.Module, name: str | None) -> None:
        return None

    def detach(self, model: nn.Module, name: str) -> None:
        raise IncompatibleModelError(
            "A 'full' adapter cannot be detached: full fine-tuning changed the base weights themselves. "
            "Reload the base model (adapterkit.load_base) to get the original back."
        )

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return {k: p for k, p in model.named_parameters() if p.is_floating_point()}
