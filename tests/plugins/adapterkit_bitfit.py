"""A third-party strategy used by the plugin tests: BitFit, training only the bias terms.

Update rule: gradient descent on every bias of the backbone, all weights frozen
(Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199). It changes base parameters, so
like ``full`` it does not share a base.
"""

from __future__ import annotations

import dataclasses

from torch import nn

import adapterkit as ak
from adapterkit.targets import STORE_NAME, head_paths, label_head_paths


@dataclasses.dataclass(kw_only=True)
class BitFitConfig(ak.AdapterConfig):
    strategy = "bitfit"


class BitFitStrategy(ak.Strategy):
    config_cls = BitFitConfig
    shares_base = False
    supports_quantized = False

    def check_model(self, model: nn.Module, config: BitFitConfig) -> None:
        if not self.parameters(model, ""):
            raise ak.IncompatibleModelError(f"{type(model).__name__} has no bias terms for BitFit to train.")

    def attach(self, model: nn.Module, config: BitFitConfig, name: str) -> None:
        return None

    def activate(self, model: nn.Module, name: str | None) -> None:
        return None

    def detach(self, model: nn.Module, name: str) -> None:
        raise ak.IncompatibleModelError("BitFit changed the base's biases; reload the base instead.")

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        heads = (*head_paths(model), *label_head_paths(model), STORE_NAME)
        return {k: p for k, p in model.named_parameters() if k.endswith("bias") and not k.startswith(heads)}
