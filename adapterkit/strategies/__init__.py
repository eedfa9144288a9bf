"""Built-in strategies; importing this package registers them."""

from adapterkit.strategies import full, head, lora, prefix  # noqa: F401  (registration side effect)
from adapterkit.strategy import Strategy
from adapterkit.strategies.full import FullConfig, FullStrategy
from adapterkit.strategies.head import HeadConfig, HeadStrategy
from adapterkit.strategies.lora import LoraConfig, LoraStrategy
from adapterkit.strategies.prefix import PrefixConfig, PrefixStrategy

__all__ = [
    "FullConfig",
    "FullStrategy",
    "HeadConfig",
    "HeadStrategy",
    "LoraConfig",
    "LoraStrategy",
    "PrefixConfig",
    "PrefixStrategy",
    "Strategy",
]
