"""What a base model is: the id it was loaded from, its task, its label names.

Where its weights are (targets.py) and whether two bases are the same (fingerprint.py) have
files of their own; these are the small facts saved with every adapter.
"""

from __future__ import annotations

from torch import nn

#: The instance attribute ``load_base`` sets to the id a model was loaded under.
BASE_ID_ATTR = "_adapterkit_base_id"


def base_model_id(model: nn.Module) -> str | None:
    """The id the base was loaded from: Hub id, embedded model's canonical id, or a path."""
    explicit = model.__dict__.get(BASE_ID_ATTR)
    if explicit:
        return explicit
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def task_of(model: nn.Module) -> str:
    """``"classification"``, ``"seq2seq"``, ``"causal-lm"`` or ``"feature-extraction"``, by the model's class."""
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "classification"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "seq2seq"
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    return "feature-extraction"


def label_names(model: nn.Module) -> list[str] | None:
    """A classifier's label names in id order (``config.id2label``); None for other tasks."""
    if task_of(model) != "classification":
        return None
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label, key=int)] if id2label else None
