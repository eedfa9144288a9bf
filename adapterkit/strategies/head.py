"""Head-only training: the base stays frozen, only the task head (and optionally the top layers) learns.

Trains the modules that map backbone features to outputs (``classifier``, ``score``,
``lm_head``, ...; discovered from the model) and, by default, the backbone's pooler where it
has one: the update is plain gradient descent on those weights alone. This is the classic
"freeze the body, train a new output layer" recipe; ``train_top_layers=k`` is its sibling,
"freeze most of the model and fine-tune only the last k layers" (the top k transformer
blocks of each block stack, discovered from the model). Each head adapter owns a copy of
everything it trains, so several share one base and switching swaps module references. A
tied output embedding becomes an untied copy, and a quantized head or block a dequantized
one, so it can train.
"""

from __future__ import annotations

import dataclasses

from torch import nn

import adapterkit.heads as heads
from adapterkit.config import AdapterConfig
from adapterkit.errors import IncompatibleModelError
from adapterkit.registry import register_strategy
from adapterkit.state import get_store
from adapterkit.strategy import Strategy
from adapterkit.targets import head_paths, layer_stacks, pooler_path


@dataclasses.dataclass(kw_only=True)
class HeadConfig(AdapterConfig):
    """Options of the ``head`` strategy.

    Attributes:
        head_modules: module paths to train (the pooler is then not added; the top layers
            are); ``None`` discovers the task head.
        train_pooler: also train the backbone's pooler (BERT's ``pooler.dense``). Sentence
            embedding checkpoints such as all-MiniLM-L6-v2 never trained their pooler, and a
            classifier on its frozen output stays at chance.
        train_top_layers: also train the top (last) this many transformer blocks of every
            block stack: BERT's ``bert.encoder.layer``, GPT-2's ``transformer.h``, Llama's
            ``model.layers``. An encoder-decoder such as T5 has two stacks, and ``k`` trains
            the last ``k`` blocks of each (the encoder's, which produce what the decoder
            attends to, and the decoder's, which feed the head). Final layer norms after the
            stack stay frozen. ``0`` trains the head alone.
    """

    strategy = "head"

    head_modules: list[str] | None = None
    train_pooler: bool = True
    train_top_layers: int = 0

    def validate(self) -> list[str]:
        problems = []
        hm = self.head_modules
        if hm is not None and not (isinstance(hm, list) and hm and all(isinstance(h, str) and h for h in hm)):
            problems.append(f"head_modules must be None or a non-empty list of module paths, got {hm!r}")
        if not isinstance(self.train_pooler, bool):
            problems.append(f"train_pooler must be True or False, got {self.train_pooler!r}")
        k = self.train_top_layers
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            problems.append(f"train_top_layers must be a whole number of layers (0 or more), got {k!r}")
        return problems


def top_layer_paths(model: nn.Module, count: int) -> list[str]:
    """Paths of the top ``count`` blocks of every block stack of ``model``, bottom to top.

    Raises:
        IncompatibleModelError: the model has no block stack, or fewer than ``count`` layers.
    """
    if count == 0:
        return []
    what = type(model).__name__
    stacks = layer_stacks(model)
    if not stacks:
        raise IncompatibleModelError(
            f"train_top_layers={count}: {what} has no discoverable stack of transformer blocks (an nn.ModuleList "
            "of same-class blocks outside its task head). Pass the modules to train as head_modules instead, "
            "or use the 'lora' strategy."
        )
    sizes = {stack: len(model.get_submodule(stack)) for stack in stacks}
    fewest = min(sizes.values())
    if count > fewest:
        listing = ", ".join(f"{stack} ({size})" for stack, size in sizes.items())
        raise IncompatibleModelError(
            f"train_top_layers={count} but {what} has only {fewest} layers to train in its layer stack: {listing}. "
            f"Pass train_top_layers between 0 and {fewest}, or use the 'full' strategy to train everything."
        )
    return [f"{stack}.{i}" for stack, size in sizes.items() for i in range(size - count, size)]


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
        layers = top_layer_paths(model, config.train_top_layers)
        return [*layers, *(p for p in paths if p not in layers)]
    paths = head_paths(model)
    if not paths:
        raise IncompatibleModelError(
            f"No task head found on {type(model).__name__}: it has no classifier/score/lm_head beside its backbone. "
            "Load the base with a task (adapterkit.load_base(..., task='classification')) or pass head_modules."
        )
    pooler = pooler_path(model) if config.train_pooler else None
    return [*top_layer_paths(model, config.train_top_layers), *([pooler] if pooler else []), *paths]


def _check_nesting(model: nn.Module, paths: list[str]) -> None:
    """Refuse paths that contain one another: a module swapped inside a swapped block would be lost."""
    swapped = set(paths) | set(getattr(get_store(model), "base_heads", {}))
    for inner in paths:
        outer = next((p for p in sorted(swapped) if inner != p and (inner.startswith(p + ".") or p.startswith(inner + "."))), None)
        if outer is not None:
            raise IncompatibleModelError(
                f"The head adapter would train '{inner}', which overlaps '{outer}' (one contains the other) that "
                "this or another head adapter on the model trains. Name whole, separate modules in head_modules, "
                "or drop head_modules inside the top layers."
            )


def _plain_layers(module: nn.Module) -> None:
    """Replace, inside an adapter's copy of a block, peft's wrappers by the layers they wrap.

    A block copied after LoRA adapters were attached carries their wrappers; this adapter's
    block must compute the bare layer, and other adapters' LoRA weights are not its own.
    """
    # peft's tuner layers (BaseTunerLayer) hold what they wrap as ``base_layer``.
    wrapped = [
        name for name, m in module.named_modules()
        if name and isinstance(getattr(m, "base_layer", None), nn.Module) and callable(getattr(m, "get_base_layer", None))
    ]
    for name in wrapped:
        if any(name.startswith(outer + ".") for outer in wrapped):
            continue
        parent_path, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, attr, getattr(parent, attr).get_base_layer())


@register_strategy("head")
class HeadStrategy(Strategy):
    """Train only the task head (and pooler) on a frozen base."""

    config_cls = HeadConfig
    merges_into_weights = True
    default_learning_rate = 5e-3
    # The head *is* this strategy's adapter; the generic label-head copy would duplicate it.
    trains_label_head = False

    def check_model(self, model: nn.Module, config: HeadConfig) -> None:
        _check_nesting(model, chosen_paths(model, config))

    def attach(self, model: nn.Module, config: HeadConfig, name: str) -> None:
        paths = chosen_paths(model, config)
        _check_nesting(model, paths)
        for copy in heads.copy_heads(model, get_store(model), name, paths).values():
            _plain_layers(copy)

    def activate(self, model: nn.Module, name: str | None) -> None:
        # The store installs every adapter's head modules on each switch.
        return None

    def detach(self, model: nn.Module, name: str) -> None:
        return None  # the store drops the head copies

    def backbone_frozen(self, model: nn.Module, name: str) -> bool:
        trained = set(get_store(model).heads.get(name, {}))
        return trained <= set(head_paths(model)) | {pooler_path(model)}

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return heads.parameters(get_store(model), name)
