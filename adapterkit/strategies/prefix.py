"""Prefix tuning: trained key/value vectors prepended to every attention layer.

Trains one (num_virtual_tokens x layers x 2 x kv_dim) table; each attention layer attends to
``[P_k; K]`` and ``[P_v; V]`` (Li & Liang 2021, https://arxiv.org/abs/2101.00190).
peft 0.21 cannot prefix-tune BERT-style encoders or ``*ForSequenceClassification`` models
under transformers 5 (it looks for a ``past_key_values`` argument that was renamed
``cache``), so adapterkit feeds the prefix through the model's own KV-cache argument with a
forward pre-hook. The table has peft's layout and is saved as peft's ``prompt_embeddings``
with a ``PREFIX_TUNING`` ``adapter_config.json``, so plain peft loads it where peft works.

Encoder-decoder models (T5, BART) get prefixes in all three kinds of attention, as in Li &
Liang: the encoder self-attention, the decoder self-attention and the cross-attention. The
table is peft's layout with more layers: ``num_layers = L_enc + 2 * L_dec``, in the order
encoder layers, decoder self-attention layers, cross-attention layers. The decoder's prefixes
are fed through its ``EncoderDecoderCache`` (the cross-attention appends the encoder's keys
and values to its prefix); the encoder takes no cache, so each of its attention modules gets
a one-layer cache holding its prefix from a pre-hook (see :func:`_attention_modules`).
peft 0.21 prefixes only the decoder self-attention of these models (it never reaches the
encoder and resets the cross-attention cache), so plain peft cannot reproduce such an
adapter: it is saved as adapterkit's ``adapter.safetensors`` (no ``adapter_config.json``),
with the layout in the file's safetensors metadata.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

import adapterkit.routing as routing
from adapterkit.compat import transformers as transformers_compat
from adapterkit.config import AdapterConfig
from adapterkit.errors import AdapterMismatchError, IncompatibleModelError
from adapterkit.registry import register_strategy
from adapterkit.state import get_store
from adapterkit.strategy import Strategy
from adapterkit.heads import PEFT_PREFIX, modules_to_save
from adapterkit.io import write_safetensors
from adapterkit.model_info import base_model_id
from adapterkit.targets import backbone_name

_ACTIVE = "prefix_active"
_ENCODERS = "prefix_encoders"
_HOOK = "prefix_hook"
_LAYOUT_KEY = "adapterkit_prefix_layout"

#: per model (store key), the prefix an encoder forward chose once for all its layers
_PINNED: contextvars.ContextVar[dict] = contextvars.ContextVar("adapterkit_prefix_pinned", default={})
#: decoder caches holding a cross-attention prefix, and its length
_CROSS_PREFIXED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    #: encoder-decoder models: (encoder layers, decoder layers); the table holds L_enc + 2 * L_dec layers
    parts: tuple[int, int] | None = None

    @property
    def token_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _geometry(model: nn.Module) -> _Geometry:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return _seq2seq_geometry(model)
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


def _attention_modules(stack: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """The attention modules of an encoder or decoder stack, each with the names of its cache and
    mask keywords.

    This is the one place that relies on transformers' internal module layout (5.x T5 and BART,
    checked by tests/test_prefix_seq2seq.py): an attention module has an integer ``layer_idx``,
    and its forward takes ``key_value_states`` (given for cross-attention), a KV cache
    (``cache``) and a mask (``mask`` in T5, ``attention_mask`` in BART) by keyword, and attends
    to the cache's keys followed by its own.
    """
    found = []
    for module in stack.modules():
        index = getattr(module, "layer_idx", None)
        if not isinstance(index, int) or isinstance(index, bool):
            continue
        params = inspect.signature(module.forward).parameters
        cache = next((a for a in ("cache", "past_key_values") if a in params), None)
        mask = next((a for a in ("attention_mask", "mask") if a in params), None)
        if cache and mask and "key_value_states" in params:
            found.append((module, cache, mask))
    return found


def _seq2seq_geometry(model: nn.Module) -> _Geometry:
    config = model.config
    what = type(model).__name__
    if transformers_compat.attn_implementation(config) == "flex_attention":
        raise IncompatibleModelError(
            f"The 'prefix' strategy cannot widen flex_attention's block masks of {what} to cover the prefix. "
            "Load the model with attn_implementation='sdpa' or 'eager', or use 'lora'."
        )
    stacks = [getattr(model, f"get_{part}", lambda: None)() for part in ("encoder", "decoder")]
    if not all(isinstance(stack, nn.Module) for stack in stacks):
        raise IncompatibleModelError(
            f"{what} is an encoder-decoder model without both get_encoder() and get_decoder(), which prefix tuning "
            "needs to reach both stacks. Use 'lora' instead."
        )
    encoder, decoder = (_attention_modules(stack) for stack in stacks)
    decoder_params = inspect.signature(stacks[1].forward).parameters
    cache_arg = next((a for a in ("cache", "past_key_values") if a in decoder_params), None)
    if not encoder or not decoder or cache_arg is None:
        raise IncompatibleModelError(
            f"The 'prefix' strategy does not recognise the attention layers of {what} (it knows T5's and BART's "
            "layout in transformers 5). Use 'lora' instead."
        )
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (heads and hidden):
        raise IncompatibleModelError(
            f"The 'prefix' strategy needs num_attention_heads and hidden_size in the config of {what}. "
            "Use 'lora' instead."
        )
    decoder_heads = getattr(config, "decoder_attention_heads", None) or heads
    if decoder_heads != heads:
        raise IncompatibleModelError(
            f"{what} has {heads} encoder and {decoder_heads} decoder attention heads; the 'prefix' strategy needs "
            "one head layout for both. Use 'lora' instead."
        )
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    encoder_layers = len({m.layer_idx for m, _, _ in encoder})
    decoder_layers = len({m.layer_idx for m, _, _ in decoder})
    parts = (encoder_layers, decoder_layers)
    return _Geometry(encoder_layers + 2 * decoder_layers, heads, head_dim, cache_arg, parts=parts)


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

    def layer_key_value(self, index: int, batch_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) of table layer ``index``, each of shape (batch, kv_heads, P, head_dim)."""
        g = self.geometry
        table = self.embedding.weight.to(dtype)
        p = table.shape[0]
        kv = table.view(p, g.num_layers * 2, g.kv_heads, g.head_dim)[:, 2 * index : 2 * index + 2]
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return kv[0], kv[1]


def _routed_encoder(store) -> PrefixEncoder | None:
    """The prefix the calling context's forward uses: its own route's, else the default's."""
    route = routing.current(store)
    if route is None:
        return store.extra.get(_ACTIVE)
    if route.rows is not None:  # rows of a mixed batch are LoRA adapters or the base
        return None
    return store.extra[_ENCODERS].get(route.name) if route.name is not None else None


def _call_inputs(store, args: tuple, kwargs: dict[str, Any]):
    """``(prefix, args, kwargs, reference tensor, cache, batch, length)`` of a forward call a prefix
    hook rewrites, or None when no prefix applies or the call has neither ``input_ids`` nor
    ``inputs_embeds``."""
    encoder = _routed_encoder(store)
    if encoder is None:
        return None
    if args:  # Trainer passes keywords; plain calls may pass input_ids positionally
        kwargs = {"input_ids": args[0], **kwargs}
        args = ()
    reference = kwargs.get("input_ids")
    if reference is None:
        reference = kwargs.get("inputs_embeds")
    if reference is None:
        return None
    cache_arg = encoder.geometry.cache_arg
    cache = kwargs.get(cache_arg)
    if cache is None and cache_arg != "past_key_values":
        cache = kwargs.pop("past_key_values", None)
    return (encoder, args, kwargs, reference, cache, *reference.shape[:2])


def _prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    call = _call_inputs(get_store(module), args, kwargs)
    if call is None:
        return None
    encoder, args, kwargs, reference, cache, batch, length = call
    g, p = encoder.geometry, encoder.embedding.num_embeddings
    # generate() counts positions without the prefix; the model, fed the prefix as cached
    # tokens, counts them (a plain forward starts at P), so explicit positions shift by P.
    for key in ("cache_position", "position_ids"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key] + p
    if cache is None or cache.get_seq_length() == 0:
        cache = cache if cache is not None else DynamicCache(config=module.config)
        dtype = _prefix_dtype(module, reference)
        for layer, (key, value) in enumerate(encoder.key_values(batch, dtype)):
            cache.update(key.to(reference.device), value.to(reference.device), layer)
    past = cache.get_seq_length()  # the prefix plus, during generation, earlier tokens
    kwargs[g.cache_arg] = cache
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, past + length, dtype=torch.long, device=reference.device)
    elif mask.shape[1] + p == past + length:  # the caller's mask does not know the prefix
        mask = _attend_prefix(mask, p)
    kwargs["attention_mask"] = mask
    return args, kwargs


def _prefix_dtype(module: nn.Module, reference: torch.Tensor) -> torch.dtype:
    """The dtype the prefix enters the cache in: the embeddings' (float32 for quantized ones)."""
    dtype = reference.dtype if reference.is_floating_point() else module.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def _attend_prefix(mask: torch.Tensor, p: int) -> torch.Tensor:
    """A padding mask (batch x length) with ``p`` attended positions in front, for the prefix."""
    return torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device), mask], dim=1)


# --- encoder-decoder models -----------------------------------------------------------------------
def _widen(mask: torch.Tensor | None, p: int) -> torch.Tensor | None:
    """``mask`` with ``p`` attended key positions in front (the prefix)."""
    if mask is None:  # everything is attended, the prefix too
        return None
    if not isinstance(mask, torch.Tensor):
        raise IncompatibleModelError(
            f"The 'prefix' strategy cannot widen an attention mask of type {type(mask).__name__} to cover the prefix. "
            "Load the model with attn_implementation='sdpa' or 'eager', or use 'lora'."
        )
    if mask.dim() == 2 or mask.dtype == torch.bool:  # padding masks and boolean masks: True/1 attends
        fill = 1
    elif mask.is_floating_point():  # additive masks: 0 attends
        fill = 0
    else:
        raise IncompatibleModelError(f"The 'prefix' strategy does not know attention masks of dtype {mask.dtype}.")
    return torch.cat([mask.new_full((*mask.shape[:-1], p), fill), mask], dim=-1)


def _pin(store, module: nn.Module, args: tuple, kwargs: dict) -> None:
    # One choice for every layer of this encoder forward, even if the default changes meanwhile.
    _PINNED.set({**_PINNED.get(), store.key: _routed_encoder(store)})


def _unpin(store, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    _PINNED.set({k: v for k, v in _PINNED.get().items() if k != store.key})


def _encoder_attention_hook(store, cache_kw: str, mask_kw: str, module: nn.Module, args: tuple, kwargs: dict):
    pinned = _PINNED.get()
    encoder = pinned[store.key] if store.key in pinned else _routed_encoder(store)
    if encoder is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    key, value = encoder.layer_key_value(module.layer_idx, hidden.shape[0], hidden.dtype)
    # The encoder passes no cache; a one-layer cache holding the prefix makes the layer attend to
    # [prefix; tokens] with the model's own masks and position bias (T5 offsets it by the prefix).
    cache = DynamicCache()
    cache.update(key.to(hidden.device), value.to(hidden.device), module.layer_idx)
    kwargs[cache_kw] = cache
    kwargs[mask_kw] = _widen(kwargs.get(mask_kw), encoder.embedding.num_embeddings)
    return args, kwargs


def _cross_attention_hook(cache_kw: str, mask_kw: str, module: nn.Module, args: tuple, kwargs: dict):
    states, mask = kwargs.get("key_value_states"), kwargs.get(mask_kw)
    if states is None or mask is None:  # self-attention, or nothing masked
        return None
    p = _CROSS_PREFIXED.get(kwargs.get(cache_kw), 0) if kwargs.get(cache_kw) is not None else 0
    if not p or mask.shape[-1] != states.shape[-2]:
        return None
    kwargs[mask_kw] = _widen(mask, p)
    return args, kwargs


def _decoder_hook(store, module: nn.Module, args: tuple, kwargs: dict):
    call = _call_inputs(store, args, kwargs)
    if call is None:
        return None
    encoder, args, kwargs, reference, cache, batch, length = call
    g, p = encoder.geometry, encoder.embedding.num_embeddings
    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    elif not isinstance(cache, EncoderDecoderCache):
        raise IncompatibleModelError(
            "The 'prefix' strategy feeds an encoder-decoder model's decoder through an EncoderDecoderCache, but it "
            f"was given a {type(cache).__name__}. Pass an EncoderDecoderCache, or none."
        )
    if cache.get_seq_length() == 0:
        dtype = _prefix_dtype(module, reference)
        encoder_layers, decoder_layers = g.parts
        for i in range(decoder_layers):
            key, value = encoder.layer_key_value(encoder_layers + i, batch, dtype)
            cache.self_attention_cache.update(key.to(reference.device), value.to(reference.device), i)
            if cache.cross_attention_cache.get_seq_length(i) == 0:
                # The cross-attention appends the encoder's keys and values to its prefix on its first call.
                key, value = encoder.layer_key_value(encoder_layers + decoder_layers + i, batch, dtype)
                cache.cross_attention_cache.update(key.to(reference.device), value.to(reference.device), i)
                cache.is_updated[i] = False
        _CROSS_PREFIXED[cache] = p
    kwargs[g.cache_arg] = cache
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[1] + p == cache.get_seq_length() + length:
        kwargs["attention_mask"] = _attend_prefix(mask, p)
    return args, kwargs


def _seq2seq_hooks(model: nn.Module, store) -> list:
    encoder, decoder = model.get_encoder(), model.get_decoder()
    handles = [
        encoder.register_forward_pre_hook(functools.partial(_pin, store), with_kwargs=True),
        encoder.register_forward_hook(functools.partial(_unpin, store), with_kwargs=True, always_call=True),
        decoder.register_forward_pre_hook(functools.partial(_decoder_hook, store), with_kwargs=True),
    ]
    for module, cache_kw, mask_kw in _attention_modules(encoder):
        hook = functools.partial(_encoder_attention_hook, store, cache_kw, mask_kw)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    for module, cache_kw, mask_kw in _attention_modules(decoder):
        hook = functools.partial(_cross_attention_hook, cache_kw, mask_kw)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@register_strategy("prefix")
class PrefixStrategy(Strategy):
    """Prefix tuning fed through the model's KV cache."""

    config_cls = PrefixConfig
    default_learning_rate = 1e-2
    peft_type = "PREFIX_TUNING"
    identity_at_init = False

    def check_model(self, model: nn.Module, config: PrefixConfig) -> None:
        _geometry(model)

    def attach(self, model: nn.Module, config: PrefixConfig, name: str) -> None:
        store = get_store(model)
        reference = model.get_input_embeddings().weight
        encoder = PrefixEncoder(config.num_virtual_tokens, _geometry(model)).to(reference.device)
        store.extra.setdefault(_ENCODERS, {})[name] = encoder
        if _HOOK not in store.extra:
            if encoder.geometry.parts:
                store.extra[_HOOK] = _seq2seq_hooks(model, store)
            else:
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
            hooks = store.extra.pop(_HOOK)
            for handle in hooks if isinstance(hooks, list) else [hooks]:
                handle.remove()

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": get_store(model).extra[_ENCODERS][name].embedding.weight}

    def write_files(self, model: nn.Module, name: str, folder: Path, head: dict[str, torch.Tensor]) -> None:
        encoder = get_store(model).extra[_ENCODERS][name]
        g = encoder.geometry
        if g.parts:
            # Not peft's files: peft would load the table and prefix only the decoder self-attention.
            layout = {
                "order": ["encoder_self_attention", "decoder_self_attention", "cross_attention"],
                "layers": [g.parts[0], g.parts[1], g.parts[1]],
                "num_virtual_tokens": encoder.embedding.num_embeddings,
                "num_attention_heads": g.kv_heads,
                "head_dim": g.head_dim,
            }
            tensors = {"prompt_embeddings": encoder.embedding.weight.detach(), **head}
            metadata = {"format": "pt", _LAYOUT_KEY: json.dumps(layout, sort_keys=True)}
            write_safetensors(folder / "adapter.safetensors", tensors, metadata=metadata)
            return
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
            "modules_to_save": modules_to_save(get_store(model), name),
        }
        tmp = folder / "adapter_config.json"
        tmp.write_text(json.dumps(peft_config, indent=2, sort_keys=True))
        tensors = {"prompt_embeddings": encoder.embedding.weight.detach()}
        tensors.update({PEFT_PREFIX + k: v for k, v in head.items()})
        write_safetensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})

    def check_state_dict(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        g = get_store(model).extra[_ENCODERS][name].geometry
        table = tensors.get("prompt_embeddings")
        if g.parts and table is not None and table.dim() == 2 and table.shape[1] == g.parts[0] * 2 * g.token_dim:
            raise AdapterMismatchError(
                f"The prefix table has shape {tuple(table.shape)}: that is plain peft's prefix for an encoder-decoder "
                f"model, which reaches only the decoder self-attention. adapterkit's prefix for {type(model).__name__} "
                f"also reaches the encoder and the cross-attention ({g.num_layers} layers, width "
                f"{g.num_layers * 2 * g.token_dim}), so it cannot load it: train the prefix with adapterkit, or load "
                "the folder with peft.PeftModel.from_pretrained."
            )
        super().check_state_dict(model, name, tensors)

    def config_from_files(self, folder: Path) -> PrefixConfig | None:
        path = folder / "adapter_config.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("peft_type") != "PREFIX_TUNING" or data.get("prefix_projection"):
            return None
        return PrefixConfig(num_virtual_tokens=int(data["num_virtual_tokens"]))
