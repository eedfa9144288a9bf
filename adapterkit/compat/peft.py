"""peft internals: which adapters a tuner layer runs, and its disable flag.

Checked against peft 0.21.2 (``peft.tuners.tuners_utils.BaseTunerLayer``).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

#: The instance attribute behind ``BaseTunerLayer.active_adapters``: a list of adapter names
#: (or one name) the layer's forward adds up. peft reads it on every forward.
ACTIVE_ADAPTER_ATTR = "_active_adapter"


def set_active_adapters(named_layers: Iterable[tuple[str, nn.Module]], names: list[str]) -> None:
    """Make each peft tuner layer of ``named_layers`` (``(path, layer)`` pairs, as ``named_modules``
    yields them) run exactly the adapters ``names`` (``[]``: none, the base layer only).

    Writes ``layer.__dict__["_active_adapter"]`` directly: peft's ``set_adapter`` also walks
    every adapter to flip ``requires_grad`` (slower with each adapter loaded, and it decides
    what trains), and ``nn.Module.__setattr__``'s type checks cost more than the switch itself.
    Relies on peft 0.21.2 keeping the active names in that instance attribute.
    """
    key = ACTIVE_ADAPTER_ATTR
    for _, layer in named_layers:
        layer.__dict__[key] = names


def enable_adapter_layer(layer: nn.Module) -> None:
    """Clear peft tuner ``layer``'s disable flag (``_disable_adapters``, peft 0.21.2).

    peft's public ``enable_adapters(True)`` also calls ``set_adapter``, which changes which
    parameters require grad; adapterkit decides that itself.
    """
    layer._disable_adapters = False
