"""Prefix tuning: trained key/value vectors prepended to every attention layer.

Trains one (num_virtual_tokens x layers x 2 x kv_dim) table; each attention layer attends to
``[P_k; K]`` and ``[P_v; V]`` (Li & Liang 2021, https://arxiv.org/abs/2101.00190).
peft 0.21 cannot prefix-tune BERT-style encoders or ``*ForSequenceClassification`` models
under transformers 5 (it looks for a ``past_key_values`` argument that was renamed
``cache``), so adapterkit feeds the prefix through the model's own KV-cache argument with a
forward pre-hook. The table has peft's layout and is saved as peft's ``prompt_embeddings``
with a ``PREFIX_TUNING`` ``adapter_config.json``, so plain peft loads it where peft works.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit import routing
from adapterkit.config import AdapterConfig
from adapterkit.errors import IncompatibleModelError
from adapterkit.registry import register_strategy
from adapterkit.state import get_store
from adapterkit.strategies.base import Strategy
from adapterkit.targets import backbone_name

_ACTIVE = "prefix_active"
_ENCODERS = "prefix_encoders"
_HOOK = "prefix_hook"


@dataclasses.dataclass(kw_only=True)
class PrefixConfig(AdapterConfig):
    """Options of the ``prefix`` strategy.

    Attributes:
        num_virtual_tokens: prefix length per layer.
    """

    strategy = "prefix"

    num_virtual_tokens: int = 20

    def validate(self) -> list[str]:
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            return [f"num_virtual_tokens must be a positive integer, got {n!r}"]
        return []


@dataclasses.dataclass(frozen=True)
class _Geometry:
    num_layers: int
    kv_heads: int
    head_dim: int
    cache_arg: str

    @property
    def token_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _geometry(model: nn.Module) -> _Geometry:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise IncompatibleModelError(
            f"The 'prefix' strategy does not support encoder-decoder models ({type(model).__name__}) yet: "
            "the prefix would have to reach encoder, decoder and cross-attention caches. Use 'lora' instead."
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if not (layers and heads and hidden):
        raise IncompatibleModelError(
            f"The 'prefix' strategy needs num_hidden_layers, num_attention_heads and hidden_size in the config of "
            f"{type(model).__name__}; it has none. Use 'lora' instead."
        )
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    cache_arg = None
    name = backbone_name(model)
    for module in (model, model.get_submodule(name) if name else model):
        params = inspect.signature(module.forward).parameters
        for arg in ("cache", "past_key_values"):
            if arg in params:
                cache_arg = arg
                break
        if cache_arg:
            break
    if cache_arg is None:
        raise IncompatibleModelError(
            f"{type(model).__name__} takes no KV cache argument, which prefix tuning needs. Use 'lora' instead."
        )
    return _Geometry(layers, kv_heads, head_dim, cache_arg)


class PrefixEncoder(nn.Module):
    """The trained prefix table, in peft's layout: ``(P, layers * 2 * kv_heads * head_dim)``."""

    def __init__(self, num_virtual_tokens: int, geometry: _Geometry) -> None:
        super().__init__()
        self.geometry = geometry
        # nn.Embedding's N(0, 1) init is peft's PrefixEncoder init.
        self.embedding = nn.Embedding(num_virtual_tokens, geometry.num_layers * 2 * geometry.token_dim)

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (key, value) of shape (batch, kv_heads, P, head_dim)."""
        g = self.geometry
        table = self.embedding.weight.to(dtype)
        p = table.shape[0]
        kv = table.view(p, g.num_layers * 2, g.kv_heads, g.head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(g.num_layers)]


def _routed_encoder(store) -> PrefixEncoder | None:
    """The prefix the calling context's forward uses: its own route's, else the default's."""
    route = routing.current(store)
    if route is None:
        return store.extra.get(_ACTIVE)
    if route.rows is not None:  # rows of a mixed batch are LoRA adapters or the base
        return None
    return store.extra[_ENCODERS].get(route.name) if route.name is not None else None


def _prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    encoder = _routed_encoder(get_store(module))
    if encoder is None:
        return None
    from transformers import DynamicCache

    if args:  # Trainer passes keywords; plain calls may pass input_ids positionally
        kwargs = {"input_ids": args[0], **kwargs}
        args = ()
    reference = kwargs.get("input_ids")
    if reference is None:
        reference = kwargs.get("inputs_embeds")
    if reference is None:
        return None
    batch, length = reference.shape[:2]
    g = encoder.geometry
    p = encoder.embedding.num_embeddings
    cache = kwargs.get(g.cache_arg)
    if cache is None and g.cache_arg != "past_key_values":
        cache = kwargs.pop("past_key_values", None)
    # generate() counts positions without the prefix; the model, fed the prefix as cached
    # tokens, counts them (a plain forward starts at P), so explicit positions shift by P.
    for key in ("cache_position", "position_ids"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key] + p
    if cache is None or cache.get_seq_length() == 0:
        cache = cache if cache is not None else DynamicCache(config=module.config)
        dtype = module.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        for layer, (key, value) in enumerate(encoder.key_values(batch, dtype)):
            cache.update(key.to(reference.device), value.to(reference.device), layer)
    past = cache.get_seq_length()  # the prefix plus, during generation, earlier tokens
    kwargs[g.cache_arg] = cache
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, past + length, dtype=torch.long, device=reference.device)
    elif mask.shape[1] + p == past + length:  # the caller's mask does not know the prefix
        mask = torch.cat([torch.ones(batch, p, dtype=mask.dtype, device=mask.device), mask], dim=1)
    kwargs["attention_mask"] = mask
    return args, kwargs


@register_strategy("prefix")
class PrefixStrategy(Strategy):
    """Prefix tuning fed through the model's KV cache."""

    config_cls = PrefixConfig
    identity_at_init = False

    def check_model(self, model: nn.Module, config: PrefixConfig) -> None:
        _geometry(model)

    def attach(self, model: nn.Module, config: PrefixConfig, name: str) -> None:
        store = get_store(model)
        reference = model.get_input_embeddings().weight
        encoder = PrefixEncoder(config.num_virtual_tokens, _geometry(model)).to(reference.device)
        store.extra.setdefault(_ENCODERS, {})[name] = encoder
        if _HOOK not in store.extra:
            store.extra[_HOOK] = model.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)

    def activate(self, model: nn.Module, name: str | None) -> None:
        store = get_store(model)
        current = getattr(model, "adapterkit_prefix", None)
        encoder = store.extra[_ENCODERS][name] if name is not None else None
        if encoder is current:
            return
        if encoder is None:
            del model.adapterkit_prefix
        else:
            reference = model.get_input_embeddings().weight
            if encoder.embedding.weight.device != reference.device:
                encoder.to(reference.device)
            encoder.train(model.training)
            # Registered while active, so the optimizer, .to() and state_dict see it.
            model.adapterkit_prefix = encoder
        store.extra[_ACTIVE] = encoder

    def detach(self, model: nn.Module, name: str) -> None:
        store = get_store(model)
        encoders = store.extra[_ENCODERS]
        encoder = encoders.pop(name)
        if getattr(model, "adapterkit_prefix", None) is encoder:
            self.activate(model, None)
        if not encoders:
            store.extra.pop(_HOOK).remove()

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": get_store(model).extra[_ENCODERS][name].embedding.weight}

    def write_files(self, model: nn.Module, name: str, folder: Path, head: dict[str, torch.Tensor]) -> None:
        from adapterkit.artifacts import base_model_id, write_safetensors

        encoder = get_store(model).extra[_ENCODERS][name]
        g = encoder.geometry
        task = "SEQ_CLS" if head else "CAUSAL_LM"
        peft_config = {
            "peft_type": "PREFIX_TUNING",
            "task_type": task,
            "num_virtual_tokens": encoder.embedding.num_embeddings,
            "num_layers": g.num_layers,
            "num_attention_heads": g.kv_heads,
            "token_dim": g.token_dim,
            "encoder_hidden_size": g.token_dim,
            "num_transformer_submodules": 1,
            "prefix_projection": False,
            "inference_mode": True,
            "base_model_name_or_path": base_model_id(model),
            "modules_to_save": sorted({path.rsplit(".", 1)[-1] for path in get_store(model).heads.get(name, {})}) or None,
        }
        tmp = folder / "adapter_config.json"
        tmp.write_text(json.dumps(peft_config, indent=2, sort_keys=True))
        tensors = {"prompt_embeddings": encoder.embedding.weight.detach()}
        tensors.update({"base_model.model." + k: v for k, v in head.items()})
        write_safetensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})

    def config_from_files(self, folder: Path) -> PrefixConfig | None:
        path = folder / "adapter_config.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("peft_type") != "PREFIX_TUNING" or data.get("prefix_projection"):
            return None
        return PrefixConfig(num_virtual_tokens=int(data["num_virtual_tokens"]))
