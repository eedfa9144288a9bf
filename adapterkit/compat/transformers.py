"""transformers internals: Trainer's checkpoint hooks, its quantized-model flag, attention kind and registry.

Checked against transformers 5.24.0 (``transformers.Trainer``, ``trainer_utils``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

#: Set by transformers' ``PeftAdapterMixin`` when adapters are loaded; Trainer's
#: ``validate_quantization_for_training`` refuses a quantized model without it.
PEFT_LOADED_ATTR = "_hf_peft_config_loaded"


def checkpoint_trainer_class(
    save: Callable[[Any, str], None],
    load: Callable[[Any, str, nn.Module], None],
) -> type:
    """A ``transformers.Trainer`` subclass whose checkpoints are written and read by the caller.

    ``save(trainer, output_dir)`` runs wherever Trainer saves the model (``save_model``, each
    checkpoint) and must create ``output_dir``; ``load(trainer, checkpoint_dir, model)`` wherever it loads one
    (``resume_from_checkpoint``, ``load_best_model_at_end``). Relies on the private hooks
    ``Trainer._save(output_dir, state_dict)``, ``Trainer._load_from_checkpoint(resume_from_checkpoint,
    model)`` and ``Trainer._load_best_model()`` (transformers 5.24.0), which have no public
    replacement.
    """
    from transformers import Trainer

    class CheckpointTrainer(Trainer):
        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            save(self, output_dir or self.args.output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            load(self, resume_from_checkpoint, model or self.model)

        def _load_best_model(self) -> None:
            load(self, self.state.best_model_checkpoint, self.model)

    return CheckpointTrainer


def is_marked_peft_loaded(model: nn.Module) -> bool:
    """Whether ``model`` itself carries transformers' ``_hf_peft_config_loaded`` flag."""
    return bool(model.__dict__.get(PEFT_LOADED_ATTR))


def mark_peft_loaded(model: nn.Module) -> None:
    """Tell Trainer that adapters are attached to quantized ``model``.

    They are, injected in place rather than through a ``PeftModel`` wrapper, which Trainer's
    ``validate_quantization_for_training`` does not see; it accepts a quantized model whose
    ``_hf_peft_config_loaded`` is true (transformers 5.24.0). Undo with :func:`unmark_peft_loaded`.
    """
    model.__dict__[PEFT_LOADED_ATTR] = True


def unmark_peft_loaded(model: nn.Module) -> None:
    """Remove the flag :func:`mark_peft_loaded` set."""
    model.__dict__.pop(PEFT_LOADED_ATTR, None)


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a model was loaded with (``"eager"``, ``"sdpa"``,
    ``"flex_attention"``...): transformers' private ``PretrainedConfig._attn_implementation``
    (transformers 5.24.0 has no public reader)."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config: Any, name: str) -> None:
    """Make the model of ``config`` run attention ``name`` from its next forward on (its sub-configs
    follow): the private setter behind :func:`attn_implementation`. Modules look the function up by
    this name at every call (transformers 5.24.0), so no weight or module changes."""
    config._attn_implementation = name


def register_attention(name: str, function: Callable[..., Any]) -> None:
    """Register ``function`` as attention implementation ``name``, with sdpa's mask format.

    ``AttentionInterface.register`` and ``AttentionMaskInterface.register`` are transformers'
    documented way to add an attention function; without the mask registration a custom name
    would get no attention mask at all (transformers 5.24.0 skips masks for unknown names).
    """
    # Imported on use: transformers' modeling code takes seconds to load and ``import adapterkit`` must not.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def sdpa_attention(*args: Any, **kwargs: Any) -> Any:
    """transformers' own sdpa attention function (``transformers.integrations.sdpa_attention``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def cache_argument(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes a KV cache under: ``"cache"`` (transformers 5.24.0;
    ``past_key_values`` still works there but is deprecated) or ``"past_key_values"`` before the
    rename. Outputs still name it ``past_key_values``: read it with :func:`output_cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache in a model output, under either name."""
    return out.get("cache", out.get("past_key_values"))
