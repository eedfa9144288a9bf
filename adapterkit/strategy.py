"""The interface every strategy implements, built-in or plugin.

A strategy owns everything specific to one adapter method: which parameters it adds or
unfreezes, how it makes one of its adapters active, and how its tensors are written and
read. The rest of adapterkit (``api.py``, ``artifacts.py``, ``runtime.py``) never branches
on the strategy's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from adapterkit.config import AdapterConfig
from adapterkit.errors import AdapterMismatchError, IncompatibleModelError
from adapterkit.io import write_safetensors


class Strategy:
    """Base class of adapter strategies.

    Subclasses set ``config_cls`` and implement the hooks below; ``name`` is filled in by
    the registry. An instance is stateless: all adapter state lives on the model, in
    :class:`adapterkit.state.AdapterStore`.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: Whether the label head (classifier/score) is trained and saved with each adapter.
    trains_label_head: ClassVar[bool] = True
    #: Whether several adapters of this strategy (and others) can share one base.
    shares_base: ClassVar[bool] = True
    #: Whether the strategy can train on a 4/8-bit quantized base.
    supports_quantized: ClassVar[bool] = True
    #: Whether a freshly attached adapter leaves the model's outputs unchanged.
    identity_at_init: ClassVar[bool] = True
    #: Whether :func:`adapterkit.export` can fold an adapter of this strategy into the base's weights.
    merges_into_weights: ClassVar[bool] = False
    #: Learning rate training uses when the caller sets none.
    default_learning_rate: ClassVar[float] = 1e-3
    #: peft's ``peft_type`` of the plain peft folders this strategy reads (``"LORA"``), or None.
    peft_type: ClassVar[str | None] = None

    def backbone_frozen(self, model: nn.Module, name: str) -> bool:
        """Whether adapter ``name`` leaves the whole backbone untouched (then training may cache
        the backbone's outputs and run it once per example)."""
        return False

    def check_mixed_batch(self, config: AdapterConfig) -> None:
        """Raise :class:`~adapterkit.errors.IncompatibleModelError` unless rows of one batch can go
        through different adapters of this strategy configured as ``config``; the default refuses.

        A strategy that accepts makes its layers follow a per-row :class:`adapterkit.routing.Route`.
        """
        raise IncompatibleModelError(
            f"'{self.name}' adapters cannot share a batch with other adapters; "
            "run them alone with adapterkit.use()."
        )

    def check_model(self, model: nn.Module, config: AdapterConfig) -> None:
        """Raise :class:`~adapterkit.errors.IncompatibleModelError` if the model can't take this strategy."""

    def attach(self, model: nn.Module, config: AdapterConfig, name: str) -> None:
        """Add adapter ``name`` to ``model`` in place, freshly initialised."""
        raise NotImplementedError

    def activate(self, model: nn.Module, name: str | None) -> None:
        """Make ``name`` (one of this strategy's adapters) active, or none of them when ``None``.

        Called on every switch, so it must be cheap: no weight copies.
        """
        raise NotImplementedError

    def detach(self, model: nn.Module, name: str) -> None:
        """Remove adapter ``name`` and free its memory."""
        raise NotImplementedError

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """The parameters adapter ``name`` trains (label head excluded), by model path."""
        raise NotImplementedError

    def state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors in this strategy's file format (label head excluded)."""
        return {k: p.detach() for k, p in self.parameters(model, name).items()}

    def check_state_dict(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Raise :class:`~adapterkit.errors.AdapterMismatchError` unless ``tensors`` fit adapter ``name``
        exactly (same keys as :meth:`state_dict`, same shapes, floating point); copies nothing.

        Loading calls it before :meth:`load_state_dict`, so a failed load changes no weight.
        """
        expected = {k: tuple(v.shape) for k, v in self.state_dict(model, name).items()}
        _check_exact(expected, tensors, self.name)

    def load_state_dict(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors (as returned by :meth:`state_dict`) into adapter ``name``.

        Everything is checked first (:meth:`check_state_dict`), so a refused file copies nothing.
        """
        self.check_state_dict(model, name, tensors)
        with torch.no_grad():
            for key, param in self.parameters(model, name).items():
                param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))

    def write_files(self, model: nn.Module, name: str, folder: Path, head: dict[str, torch.Tensor]) -> None:
        """Write the adapter's weights (and the label head's) into ``folder``.

        The default writes ``adapter.safetensors``; peft-backed strategies override it to
        write peft's own files.
        """
        write_safetensors(folder / "adapter.safetensors", {**self.state_dict(model, name), **head})

    def config_from_files(self, folder: Path) -> AdapterConfig | None:
        """Rebuild a config from files a foreign tool wrote (plain peft), or None."""
        return None


def _check_exact(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], strategy: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"The saved '{strategy}' adapter does not fit this model: "
            f"{len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
    for key, shape in sorted(expected.items()):
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise AdapterMismatchError(
                f"The saved '{strategy}' adapter does not fit this model: tensor '{key}' has shape "
                f"{tuple(value.shape)} in the file but {shape} in the model."
            )
        if not value.is_floating_point():
            raise AdapterMismatchError(
                f"The saved '{strategy}' adapter does not fit this model: tensor '{key}' has dtype {value.dtype}, "
                "but adapter weights are floating point."
            )
