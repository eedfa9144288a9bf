"""What identifies a base model: the fingerprint an adapter records and loading checks.

A fingerprint has two generations of fields. The first (``architecture``, ``model_type``, the
sizes, ``shapes`` and ``weights``) is what adapters saved by earlier versions hold; it is still
computed exactly as before so those adapters keep loading. The second (``version`` 2:
``layout``, ``tensors``, ``digests``, ``sketch``, ``linear_quantization``) covers every weight family and
is compared only when the saved fingerprint has it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import math
import re
from typing import Any

import torch
from torch import nn

from adapterkit.compat.bnb import int8_scales, values_4bit
from adapterkit.compat.torch import tensor_version
from adapterkit.state import get_store
from adapterkit.targets import STORE_NAME, head_paths

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 2
# Elements read from each tensor for its digest: enough that a dense change (a merged LoRA
# update, another pretraining) flips many bf16 roundings, few enough to cost milliseconds.
DIGEST_SAMPLE = 4096
DIGEST_BYTES = 6
# Values kept per linear weight for comparisons across quantization (fp16 in the sidecar).
SKETCH_SAMPLE = 16
# Relative RMS difference allowed between a sketch and the full-precision one, per storage (two
# quantized sides combine in quadrature). Measured on smollm2-135m, worst of its 210 linear
# weights against fp32: bf16 0.003, 8-bit 0.017, 4-bit nf4 0.154, fp4 0.238; unrelated weights of
# one distribution differ by about 1.4.
SKETCH_TOLERANCE = {None: 0.01, "bnb-8bit": 0.1, "bnb-4bit-nf4": 0.35, "bnb-4bit-fp4": 0.45}
_CACHE_KEY = "_adapterkit_fingerprint"
_LINEAR_TYPES = ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D")
_LAYER_NUMBER = re.compile(r"\.\d+\.")


def _base_entries(model: nn.Module) -> list[tuple[str, torch.Tensor, nn.Module | None]]:
    """``(pre-adapter name, parameter, its linear layer if it is one's weight)``, in ``named_parameters`` order."""
    out = []
    seen: set[int] = set()
    for module_name, module in _base_modules(model):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            if name.startswith(STORE_NAME):
                continue
            linear = pname == "weight" and (isinstance(module, nn.Linear) or type(module).__name__ in _LINEAR_TYPES)
            out.append((name, p, module if linear else None))
    return out


def _base_modules(model: nn.Module):
    """``named_modules`` in order, with the base's own head modules where an adapter installed its copy."""
    store = get_store(model)
    swapped = {}
    if store is not None:
        swapped = {path: m for path, m in store.base_heads.items() if model.get_submodule(path) is not m}

    def walk(prefix: str, module: nn.Module, seen: set[int]):
        module = swapped.get(prefix, module)
        inner = getattr(module, "base_layer", None)
        if isinstance(inner, nn.Module) and inner is not module:
            # A peft tuner layer (any adapter type): only the base layer it wraps is the base's,
            # under the wrapper's name, which is the layer's name before the adapter came.
            yield from walk(prefix, inner, seen)
            return
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for name, child in module.named_children():
            yield from walk(f"{prefix}.{name}" if prefix else name, child, seen)

    yield from walk("", model, set())


def _logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    state = getattr(p, "quant_state", None)
    return tuple(int(d) for d in state.shape) if state is not None else tuple(p.shape)


def weights_version(model: nn.Module, entries: list | None = None) -> tuple:
    """A key that changes when any base weight is replaced or written in place.

    It reads torch's private per-tensor ``_version`` counter (bumped by every in-place op on
    the tensor, e.g. an optimizer step or ``copy_`` under ``no_grad``) and peft's record of
    adapters merged into a layer, since peft merges through ``weight.data``, which the counter
    does not see. Writes through ``.data`` by other code are not seen either: call
    :func:`forget_fingerprint` after them.
    """
    key = []
    for name, p, _ in entries if entries is not None else _base_entries(model):
        key.append((name, id(p), p.data_ptr() if p.device.type != "meta" else 0, tensor_version(p)))
    for module_name, module in model.named_modules():
        merged = getattr(module, "merged_adapters", None)
        if merged:
            key.append((module_name, *merged))
    return tuple(key)


def forget_fingerprint(model: nn.Module) -> None:
    """Drop the fingerprint cached on ``model`` (after writing its weights through ``.data``)."""
    model.__dict__.pop(_CACHE_KEY, None)


@functools.lru_cache(maxsize=1024)
def _strided(numel: int, count: int) -> torch.Tensor:
    """``count`` flat indices spread evenly over ``numel`` elements and across a matrix's columns.

    The stride is coprime with ``numel`` so the samples of a matrix do not all fall in one
    column (a stride of a whole number of rows would).
    """
    if numel <= count:
        return torch.arange(numel)
    step = max(1, numel // count)
    while math.gcd(step, numel) != 1:
        step += 1
    return (torch.arange(count, dtype=torch.int64) * step) % numel


def _take(tensor: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``tensor.reshape(-1)[idx]``; ``index_select`` because on a busy CPU the advanced-indexing
    kernel's threads made it 100x slower (2.5 s for smollm2-135m's 211 weights, measured)."""
    return tensor.reshape(-1).index_select(0, idx.to(tensor.device))


# The name tests/test_fingerprint.py imports; the function lives in adapterkit.compat.bnb.


def _linear_values(p: torch.Tensor, module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Values of a linear weight at flat indices of its (out, in) matrix, as float32 (NaN: unreadable)."""
    if getattr(p, "quant_state", None) is not None:
        return values_4bit(p, idx)
    if p.dtype == torch.int8:
        scb = int8_scales(p, module)
        if scb is None:
            return torch.full((idx.numel(),), float("nan"))
        return _take(p.data, idx).float() * _take(scb, idx // p.shape[1]).float() / 127.0
    flat = p.detach().reshape(-1)
    if type(module).__name__ == "Conv1D":  # GPT-2's Conv1D stores (in, out); bitsandbytes stores it as (out, in)
        rows = p.shape[1]
        idx = (idx % p.shape[0]) * rows + idx // p.shape[0]
    return _take(flat, idx).float()


def _quantization_of(p: torch.Tensor) -> str | None:
    state = getattr(p, "quant_state", None)
    if state is not None:
        return f"bnb-4bit-{getattr(state, 'quant_type', 'fp4')}"
    if p.dtype == torch.int8:
        return "bnb-8bit"
    return None


@functools.lru_cache(maxsize=4096)
def _family(name: str, linear: bool) -> str:
    """One letter naming a tensor's weight family, upper case for a linear layer's weight."""
    lower = name.lower()
    parts = set(lower.replace("_", ".").split("."))
    if "norm" in lower or parts & {"ln", "ln1", "ln2", "lnf"} or lower.startswith("ln"):
        letter = "n"
    elif lower.endswith(".bias"):
        letter = "b"
    elif "embed" in lower or parts & {"wte", "wpe", "shared"}:
        letter = "e"
    elif "attn" in lower or "attention" in lower:
        letter = "a"
    elif parts & {"mlp", "ffn", "fc", "fc1", "fc2", "intermediate", "output", "densereludense", "wi", "wo", "experts"}:
        letter = "m"
    elif parts & {"q", "k", "v", "o", "query", "key", "value"}:
        letter = "a"
    else:
        letter = "o"
    return letter.upper() if linear else letter


_FAMILY_NAMES = {"a": "attention", "m": "MLP", "e": "embedding", "n": "norm", "b": "bias", "o": "other"}


def _describe(letter: str) -> str:
    family = _FAMILY_NAMES.get(letter.lower(), "other")
    return f"{family} weight" if letter.isupper() else (family if letter.lower() in "nbe" else f"{family} tensor")


def _new_fields(backbone: list[tuple[str, torch.Tensor, nn.Module | None]]) -> dict[str, Any]:
    entries = sorted(backbone, key=lambda e: e[0])
    # `shapes` sees GPT-2's Conv1D as (in, out) but its bitsandbytes load as (out, in); this does not.
    layout = [
        (n, _logical_shape(p)[::-1] if type(m).__name__ == "Conv1D" else _logical_shape(p)) for n, p, m in entries
    ]
    families = []
    digests = bytearray()
    sketch: list[torch.Tensor] = []
    quantization: set[str] = set()
    for name, p, module in entries:
        linear = module is not None
        families.append(_family(_LAYER_NUMBER.sub(".0.", name), linear))
        if p.device.type == "meta":  # offloaded: nothing to read, so nothing is compared
            digests += bytes(DIGEST_BYTES)
            if linear:
                sketch.append(torch.full((SKETCH_SAMPLE,), float("nan")))
            continue
        kind = _quantization_of(p)
        numel = math.prod(_logical_shape(p))
        with torch.no_grad():
            if kind is None:
                idx = _strided(numel, DIGEST_SAMPLE)
                values = _linear_values(p, module, idx) if linear else _take(p.detach(), idx).float()
                # bf16 rounding is idempotent, so fp32 and bf16 loads of one checkpoint hash alike.
                raw = values.cpu().to(torch.bfloat16).view(torch.int16).numpy().tobytes()
                digest = hashlib.blake2b(raw, digest_size=DIGEST_BYTES, person=b"adapterkit").digest()
                # All-zero bytes mean "not in full precision here: compare the sketch".
                digests += digest if any(digest) else b"\x01" + digest[1:]
            else:
                quantization.add(kind)
                digests += bytes(DIGEST_BYTES)
            if linear:
                values = _linear_values(p, module, _strided(numel, SKETCH_SAMPLE)).cpu()
                sketch.append(torch.nn.functional.pad(values, (0, SKETCH_SAMPLE - values.numel()), value=float("nan")))
    packed = torch.cat(sketch).to(torch.float16).numpy().tobytes() if sketch else b""
    return {
        "version": FINGERPRINT_VERSION,
        "layout": hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16],
        "tensors": "".join(families),
        "digests": base64.b64encode(bytes(digests)).decode(),
        "sketch": base64.b64encode(packed).decode(),
        "linear_quantization": max(quantization, key=_tolerance) if quantization else None,
    }


def _tolerance(quantization: str | None) -> float:
    return SKETCH_TOLERANCE.get(quantization, max(SKETCH_TOLERANCE.values()))


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a base: architecture, parameter shapes and hashes over every weight.

    Fields from earlier versions keep their meaning: ``weights`` hashes the input embeddings
    and the normalisation weights. ``digests`` holds one short hash per backbone tensor (task
    head excluded) over a strided sample of it (4,096 elements spread over its rows and
    columns) rounded to bf16; ``sketch`` holds 16 strided values of every linear layer's weight.

    Guarantee: fp32 and bf16 loads of one checkpoint give identical digests; bitsandbytes
    4-bit (nf4/fp4) and 8-bit loads give identical digests for the tensors they leave in full
    precision (embeddings, norms, biases), and their linear weights agree with the
    full-precision ones through the sketch within the quantization's error. Any other
    checkpoint whose weights differ densely by more than bf16 rounding, in any tensor (an
    attention or MLP matrix, a norm, a bias), is told apart when both sides are in full
    precision.

    Limit: where either side's linear weights are quantized, a linear weight is compared only
    through its sketch, so a change smaller than the quantization error (a typical merged LoRA
    update) is not seen there; another pretraining is. A change confined to elements outside
    the samples, or below bf16 resolution, is not seen at all. fp16 loads are not promised to
    agree (rounding fp32 to fp16 then bf16 is not rounding to bf16).

    The result is cached on the model and recomputed when :func:`weights_version` changes.
    """
    entries = _base_entries(model)
    key = weights_version(model, entries)
    cached = model.__dict__.get(_CACHE_KEY)
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    config = model.config
    heads = tuple(p + "." for p in head_paths(model))
    backbone = [e for e in entries if not e[0].startswith(heads)]
    shapes = sorted((n, _logical_shape(p)) for n, p, _ in backbone)
    shapes = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    embeddings = model.get_input_embeddings().weight
    for tensor in [embeddings] + [p for n, p, _ in entries if "norm" in n.lower() and p.dim() == 1]:
        flat = tensor.detach().reshape(-1)[:65536].to(torch.bfloat16).to(torch.float32).cpu()
        digest.update(flat.numpy().tobytes())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    result = {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None) or getattr(text, "d_model", None),
        "num_layers": getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "shapes": shapes,
        "weights": digest.hexdigest()[:16],
        **_new_fields(backbone),
    }
    model.__dict__[_CACHE_KEY] = (key, result)
    return dict(result)


def _decoded(fp: dict[str, Any]) -> tuple[str, bytes, torch.Tensor]:
    families, digests, sketch = fp["tensors"], fp["digests"], fp["sketch"]
    if not all(isinstance(v, str) for v in (families, digests, sketch)):
        raise TypeError("fields 'tensors', 'digests' and 'sketch' must be strings")
    digests = base64.b64decode(digests, validate=True)
    sketch = base64.b64decode(sketch, validate=True)
    linear = sum(c.isupper() for c in families)
    if len(digests) != DIGEST_BYTES * len(families) or len(sketch) != 2 * SKETCH_SAMPLE * linear:
        raise ValueError(f"{len(families)} tensors but {len(digests)} digest and {len(sketch)} sketch bytes")
    values = torch.frombuffer(bytearray(sketch), dtype=torch.float16).float() if sketch else torch.zeros(0)
    return families, digests, values.reshape(linear, SKETCH_SAMPLE)


def _listing(letters: list[str], total: int) -> str:
    counts: dict[str, int] = {}
    for letter in letters:
        counts[_describe(letter)] = counts.get(_describe(letter), 0) + 1
    parts = ", ".join(f"{n} {what}{'s' if n > 1 else ''}" for what, n in counts.items())
    return f"{len(letters)} of {total} tensors differ: {parts}"


def _check_new_fields(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The version-2 comparison: exact digests where both sides are full precision, else sketches."""
    saved_families, saved_digests, saved_sketch = _decoded(saved)
    families, digests, sketch = _decoded(current)
    if saved_families != families:
        logger.warning("The adapter's base fingerprint lists its tensors differently; only its shapes were compared.")
        return None
    differing = []
    tolerance = math.hypot(_tolerance(saved.get("linear_quantization")), _tolerance(current.get("linear_quantization")))
    worst = 0.0
    row = -1
    for i, letter in enumerate(families):
        row += letter.isupper()
        a = saved_digests[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES]
        b = digests[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES]
        if any(a) and any(b):
            if a != b:
                differing.append(letter)
            continue
        if not letter.isupper():
            continue
        x, y = saved_sketch[row], sketch[row]
        keep = ~(x.isnan() | y.isnan())
        if not bool(keep.any()):
            continue
        x, y = x[keep], y[keep]
        relative = float((x - y).norm()) / max(float(x.norm()), float(y.norm()), 1e-12)
        if relative > tolerance:
            differing.append(letter)
            worst = max(worst, relative)
    if not differing:
        return None
    text = f"same architecture but other weights ({_listing(differing, len(families))}"
    if worst:
        text += (
            f"; a quantized linear weight is off by {worst:.2f} relative, "
            f"more than quantization explains ({tolerance:.2f})"
        )
    return text + ")"


def check_fit(saved: dict[str, Any], current: dict[str, Any], saved_id: str | None, current_id: str | None) -> str | None:
    """Why an adapter trained on ``saved`` does not fit ``current``, or None if it fits.

    The fields added in fingerprint version 2 are compared only when both sides have them, so
    adapters saved by earlier versions keep loading exactly as they did.
    """
    both = f"the adapter was trained on {saved_id or 'an unnamed base'} but this base is {current_id or 'unnamed'}"
    if not isinstance(saved, dict):
        kind = type(saved).__name__
        return f"its recorded base fingerprint is damaged (a {kind}, not a mapping); save the adapter again"
    if saved.get("model_type") != current.get("model_type"):
        return f"other architecture ({saved.get('model_type')} vs {current.get('model_type')}): {both}"
    for key in ("hidden_size", "num_layers", "vocab_size"):
        if saved.get(key) != current.get(key):
            return f"other {key.replace('_', ' ')} ({saved.get(key)} vs {current.get(key)}): {both}"
    same_layout = bool(saved.get("layout")) and saved.get("layout") == current.get("layout")
    if saved.get("shapes") != current.get("shapes") and not same_layout:
        return f"other parameter shapes: {both}"
    if saved.get("version") == FINGERPRINT_VERSION and current.get("version") == FINGERPRINT_VERSION:
        try:
            problem = _check_new_fields(saved, current)
        except (KeyError, TypeError, ValueError) as err:
            return f"its recorded base fingerprint is damaged ({type(err).__name__}: {err}); save the adapter again"
        if problem:
            return f"{problem}: {both}"
    elif "version" in saved:
        logger.warning(
            "Base fingerprint version %r is unknown here; only its first-version fields were compared.",
            saved["version"],
        )
    if saved.get("weights") != current.get("weights"):
        return f"same architecture but other weights: {both}"
    return None
