"""Finding what to adapt, from the model itself rather than a table per architecture.

- The *task head* is what maps the backbone's features to the task's outputs: the top-level
  children beside the backbone (``classifier``, ``score``, ``lm_head``, ...), or the output
  embeddings when the model has no separate backbone child (T5).
- A head is a *label head* when it is not the vocabulary projection: it is new for every
  task, so every strategy trains it and saves it with the adapter.
- *Linear layers* are ``nn.Linear``, GPT-2's ``Conv1D`` and bitsandbytes' 4/8-bit linears.
"""

from __future__ import annotations

import torch
from torch import nn

STORE_NAME = "adapterkit"


def backbone_name(model: nn.Module) -> str | None:
    """Name of the model's backbone child (``"bert"``, ``"model"``, ...), if it has one."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else None


def head_paths(model: nn.Module) -> list[str]:
    """Module paths of the task head, discovered from the model's structure."""
    backbone = backbone_name(model)
    if backbone is not None:
        paths = [
            name
            for name, child in model.named_children()
            if name != backbone and not name.startswith(STORE_NAME) and any(True for _ in child.parameters())
        ]
        if paths:
            return paths
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        for name, module in model.named_modules():
            if module is output:
                return [name]
    return []


def is_vocab_head(model: nn.Module, path: str) -> bool:
    """Whether the head at ``path`` is the language-model vocabulary projection."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return output is not None and model.get_submodule(path) is output


def label_head_paths(model: nn.Module) -> list[str]:
    """Modules that belong to the task: label heads and, in front of them, the pooler.

    The pooler (BERT's ``pooler.dense``) only feeds the classifier, and sentence-embedding
    checkpoints never trained it, so it is trained per task with the classifier.
    """
    heads = [p for p in head_paths(model) if not is_vocab_head(model, p)]
    pooler = pooler_path(model)
    return [pooler, *heads] if heads and pooler else heads


def head_zone(model: nn.Module) -> list[str]:
    """Every path a head adapter may swap (heads and pooler); other strategies leave them alone."""
    pooler = pooler_path(model)
    return [*head_paths(model), *([pooler] if pooler else [])]


def pooler_path(model: nn.Module) -> str | None:
    """Path of the backbone's pooler (BERT-style ``bert.pooler``), if it has parameters."""
    backbone = backbone_name(model)
    if backbone is None:
        return None
    pooler = getattr(model.get_submodule(backbone), "pooler", None)
    if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        return f"{backbone}.pooler"
    return None


def layer_stacks(model: nn.Module) -> list[str]:
    """Paths of the model's stacks of transformer blocks, in model order.

    A stack is an ``nn.ModuleList`` outside the task head whose entries are all of one class
    and hold parameters (``bert.encoder.layer``, ``transformer.h``, ``model.layers``; T5's
    ``encoder.block`` and ``decoder.block``). Lists inside a stack (T5's per-block sublayers,
    mixture-of-experts lists) are parts of a block, not stacks.
    """
    excluded = head_zone(model)
    stacks: list[str] = []
    for name, module in model.named_modules():
        if not name or name.startswith(STORE_NAME) or any(name == e or name.startswith(e + ".") for e in excluded):
            continue
        if any(name.startswith(s + ".") for s in stacks) or not isinstance(module, nn.ModuleList) or not len(module):
            continue
        # By name: a block adapterkit routes is a subclass that keeps its class's name and module.
        kinds = {(type(m).__module__, type(m).__qualname__) for m in module}
        if len(kinds) == 1 and all(any(True for _ in m.parameters()) for m in module):
            stacks.append(name)
    return stacks


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, or a bitsandbytes quantized linear."""
    if isinstance(module, nn.Linear):  # bnb Linear4bit / Linear8bitLt subclass nn.Linear
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_layer_names(model: nn.Module, *, scope: str = "all") -> list[str]:
    """Full paths of the linear layers of the backbone (heads and adapterkit's store excluded).

    Args:
        scope: ``"all"`` for every linear layer, ``"attention"`` for those inside modules
            whose class name says attention.
    """
    excluded = head_zone(model)
    names: list[str] = []
    attention_prefixes: list[str] = []
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if not name or name.startswith(STORE_NAME) or any(name == e or name.startswith(e + ".") for e in excluded):
            continue
        if "attention" in type(module).__name__.lower():
            attention_prefixes.append(name + ".")
        # A peft tuner layer (any adapter type) stands for the layer it wraps: adapt it once,
        # never its base layer or the adapter's own modules inside it.
        if any(name.startswith(w) for w in wrappers):
            continue
        wrapped = isinstance(getattr(module, "base_layer", None), nn.Module)
        if wrapped:
            wrappers.append(name + ".")
        if is_linear(module) or wrapped:
            if scope == "attention" and not any(name.startswith(p) for p in attention_prefixes):
                continue
            names.append(name)
    return names


def parameter_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors take (as stored)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
