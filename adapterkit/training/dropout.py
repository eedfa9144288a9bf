"""Dropout masks drawn in bulk on the CPU while training.

torch draws a CPU dropout mask with ``bernoulli_``, which outside MKL's Intel-only vector path
walks the tensor one element at a time with its Mersenne-Twister generator. A BERT-style model
calls it three times a layer (attention probabilities, attention output, feed-forward output)
plus the embeddings and the classifier: on the 2-core AMD EPYC the benchmarks run on, that was
12% of a minilm-l6 LoRA step's CPU time (``benchmarks/train_speed.py``; one mask of 16x28x384
took 1.2-1.5 ms). numpy's PCG64 fills the same mask in bulk several times faster.

:func:`bulk_dropout` swaps a model's ``nn.Dropout`` modules for :class:`BulkDropout` (the same
``p``, the same inverted scaling, masks from one :class:`MaskSource` seeded by the run's seed),
and, when the model runs transformers' ``"sdpa"`` attention, routes attention through
:func:`dropout_attention`, which draws the attention-probability mask the same way. The result
is statistically the same training (each element is zeroed with probability ``p``, rounded to
1/65536, and the survivors scaled by ``1 / (1 - p)``) from a different random stream; evaluation,
accelerators and ``p = 0`` take the stock paths untouched. Everything is restored on exit.
``ak.train`` uses it by default where torch's masks are serial (:func:`torch_masks_vectorized`
is false: AMD and ARM CPUs, builds without MKL).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers  # a lazy module: TrainerCallback loads on first use
from torch import nn

from adapterkit.compat import transformers as transformers_compat
from adapterkit.errors import InvalidOptionError

logger = logging.getLogger(__name__)

#: The attention implementation :func:`bulk_dropout` switches "sdpa" models to while training.
ATTENTION = "adapterkit_sdpa"
#: Mask resolution: a uint16 per element, so p is rounded to a multiple of 1/65536.
_LEVELS = 1 << 16
#: Attention features the math path below does not implement; calls that use one keep sdpa.
_UNSUPPORTED = ("softcap", "s_aux", "sliding_window", "position_bias")


class MaskSource:
    """Draws dropout masks for one training run: numpy's PCG64, seeded by the run's seed and
    re-seeded at every optimizer step from (seed, step), so a run resumed from a checkpoint draws
    the masks the uninterrupted run drew.

    Not shared between runs (or threads): each :func:`bulk_dropout` context makes its own.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.start_step(0)

    def start_step(self, step: int) -> None:
        """Draw the masks of optimizer step ``step`` from here on."""
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))

    def scaled_mask(self, shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
        """``0`` with probability ``p`` and ``1 / (1 - p)`` otherwise, of ``shape`` and ``dtype``."""
        draws = torch.from_numpy(self.rng.integers(0, _LEVELS, size=int(np.prod(shape)), dtype=np.uint16).view(np.int16))
        # uint16 draws read as int16 are uniform on [-32768, 32767]; keep the top (1 - p) of them.
        keep = draws.view(shape) >= round(p * _LEVELS) - _LEVELS // 2
        return keep.to(dtype).mul_(1.0 / (1.0 - p))


class BulkDropout(nn.Dropout):
    """``nn.Dropout`` whose training-time CPU masks come from a :class:`MaskSource`."""

    def __init__(self, p: float, source: MaskSource, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        if self.p == 1:
            return x * 0
        return x * self.source.scaled_mask(x.shape, self.p, x.dtype)


def dropout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except that a training CPU call with dropout draws the
    attention-probability mask from the module's :class:`BulkDropout` source.

    Anything else (no dropout, an accelerator, a module without a ``BulkDropout``, features the
    math path lacks) is handed to transformers' own sdpa function unchanged.
    """
    source = getattr(getattr(module, "dropout", None), "source", None)
    if (dropout == 0 or source is None or query.device.type != "cpu"
            or any(kwargs.get(name) is not None for name in _UNSUPPORTED)):
        return transformers_compat.sdpa_attention(module, query, key, value, attention_mask, dropout=dropout,
                                                  scaling=scaling, is_causal=is_causal, **kwargs)
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        key, value = key.repeat_interleave(heads // kv_heads, dim=1), value.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if attention_mask is None and causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril(
            key.shape[2] - query.shape[2])
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    probs = probs * source.scaled_mask(probs.shape, dropout, probs.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


transformers_compat.register_attention(ATTENTION, dropout_attention)


@functools.cache
def torch_masks_vectorized() -> bool:
    """Whether torch's own CPU masks take MKL's vector path: an MKL build on an Intel CPU (the
    condition in ATen's CPU ``bernoulli_`` kernel). There bulk masks are not worth a new stream."""
    return torch.backends.mkl.is_available() and "intel" in _cpu_vendor().lower()


def _cpu_vendor() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("vendor_id"):
                return line.partition(":")[2].strip()  # GenuineIntel, AuthenticAMD...
    return platform.processor()


def use_bulk_dropout(setting: bool | None, model: nn.Module, *, checkpointing: bool) -> bool:
    """Whether training ``model`` draws bulk masks: ``setting`` (None: where torch's own masks are
    serial), on a CPU model with dropout, never under gradient checkpointing.

    Raises:
        InvalidOptionError: ``setting`` is True under gradient checkpointing, whose recomputed
            forwards restore torch's generator but would draw new bulk masks (wrong gradients).
    """
    if setting and checkpointing:
        raise InvalidOptionError(
            "fast_dropout=True cannot be combined with gradient checkpointing: the recomputed forward passes "
            "would draw other dropout masks than the first ones. Leave fast_dropout unset (automatic: off under "
            "checkpointing) or turn gradient checkpointing off.")
    if setting is None:
        setting = not torch_masks_vectorized()
    return bool(setting) and not checkpointing and has_cpu_dropout(model)


def has_cpu_dropout(model: nn.Module) -> bool:
    """Whether :func:`bulk_dropout` would change anything: a CPU model with a dropout above 0."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return False
    return any(_swappable(m) for m in model.modules())


def _swappable(module: nn.Module) -> bool:
    """A plain ``nn.Dropout`` that drops something (subclasses may draw their own masks)."""
    return type(module) is nn.Dropout and module.p > 0


def step_seeder(source: MaskSource) -> Any:
    """A ``transformers.TrainerCallback`` that moves ``source`` to each optimizer step's stream."""

    class StepSeeder(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs) -> None:
            source.start_step(state.global_step)

    return StepSeeder()


@contextlib.contextmanager
def bulk_dropout(model: nn.Module, seed: int) -> Iterator[MaskSource]:
    """Within the block, ``model``'s ``nn.Dropout`` modules draw their CPU masks in bulk.

    Yields the :class:`MaskSource` (give :func:`step_seeder` of it to Trainer so resumed runs
    repeat their masks); on exit the original modules (and the attention implementation) are
    back, whatever happened inside.
    """
    source = MaskSource(seed)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    config = getattr(model, "config", None)
    switch = config is not None and transformers_compat.attn_implementation(config) == "sdpa"
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _swappable(child):
                    replacement = BulkDropout(child.p, source, child.inplace)
                    replacement.train(child.training)
                    setattr(parent, name, replacement)
                    swapped.append((parent, name, child))
        if switch:
            transformers_compat.set_attn_implementation(config, ATTENTION)
        logger.debug("Bulk CPU dropout masks on %d modules%s", len(swapped), " and sdpa attention" if switch else "")
        yield source
    finally:
        if switch:
            transformers_compat.set_attn_implementation(config, "sdpa")
        for parent, name, original in swapped:
            original.train(getattr(parent, name).training)
            setattr(parent, name, original)
