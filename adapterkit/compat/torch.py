"""torch internals: the per-tensor version counter, the ``torch.compile`` wrapper.

Checked against torch 2.13.0.
"""

from __future__ import annotations

import torch


def tensor_version(tensor: torch.Tensor) -> int:
    """torch's private ``Tensor._version``: a counter every in-place op on the tensor bumps
    (``add_``, ``copy_`` under ``no_grad``, an optimizer step); writes through ``.data`` and
    replacing ``.data`` do not. Autograd's saved-tensor check is built on it (torch 2.13.0)."""
    return tensor._version


def compiled_inner(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiles, else None.

    ``OptimizedModule._orig_mod`` is private (torch 2.13.0); ``torch.compile`` documents no
    accessor for the original module.
    """
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else None
