"""Adapter files on disk: atomic writes of safetensors and the base model's identity."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors through a temporary file renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(plain, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def base_model_id(model: nn.Module) -> str | None:
    """The id the base was loaded from: Hub id, embedded model's canonical id, or a path."""
    explicit = model.__dict__.get("_adapterkit_base_id")
    if explicit:
        return explicit
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None
