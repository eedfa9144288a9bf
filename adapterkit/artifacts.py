"""Adapters on disk: the folder format, the base fingerprint, atomic save and verified load.

A saved adapter is a folder:

- peft-backed strategies (``lora``, ``prefix``): peft's ``adapter_config.json`` and
  ``adapter_model.safetensors``, loadable by plain peft, vLLM or LoRAX; the label head rides
  along as peft's ``modules_to_save``;
- other strategies: ``adapter.safetensors`` with exactly the trained tensors;
- always ``adapterkit.json`` (the sidecar: format version, strategy and options, base model
  id and fingerprint, quantization, task, label names, metrics, recipe) and ``README.md``
  (a Hub model card with metadata).

Weights are safetensors only: pickle files are never read.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.config import FORMAT_VERSION
from adapterkit.errors import AdapterFormatError, AdapterKitError, AdapterMismatchError, AdapterNotFoundError
from adapterkit.quantized import quantization_of
from adapterkit.targets import STORE_NAME, head_paths

logger = logging.getLogger(__name__)

SIDECAR = "adapterkit.json"
PEFT_PREFIX = "base_model.model."
WEIGHT_FILES = ("adapter_model.safetensors", "adapter.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


# --- small file helpers --------------------------------------------------------------
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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a corrupt or truncated one is an :class:`AdapterFormatError`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError / OSError kinds
        raise AdapterFormatError(
            f"{path} is not a readable safetensors file ({err}). It is corrupt or truncated: "
            "save or download the adapter again."
        ) from err


def base_model_id(model: nn.Module) -> str | None:
    """The id the base was loaded from: Hub id, embedded model's canonical id, or a path."""
    explicit = model.__dict__.get("_adapterkit_base_id")
    if explicit:
        return explicit
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


# --- fingerprint ---------------------------------------------------------------------
def _base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The base's own parameters, under their pre-adapter names."""
    out = []
    for name, p in model.named_parameters():
        if name.startswith(STORE_NAME) or ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        out.append((name.replace(".base_layer", ""), p))
    return out


def _logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    state = getattr(p, "quant_state", None)
    return tuple(int(d) for d in state.shape) if state is not None else tuple(p.shape)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a base: architecture, parameter shapes and a hash over some weights.

    The weight hash reads the input embeddings (never quantized) and every normalisation
    weight, rounded to bf16 so a bf16/fp32 or 4-bit/fp32 load of the same checkpoint
    agrees; it costs milliseconds, so loading can always check it.
    """
    config = model.config
    heads = tuple(p + "." for p in head_paths(model))
    backbone = sorted((n, _logical_shape(p)) for n, p in _base_parameters(model) if not n.startswith(heads))
    shapes = hashlib.sha256(json.dumps(backbone).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    embeddings = model.get_input_embeddings().weight
    for tensor in [embeddings] + [p for n, p in _base_parameters(model) if "norm" in n.lower() and p.dim() == 1]:
        flat = tensor.detach().reshape(-1)[:65536].to(torch.bfloat16).to(torch.float32).cpu()
        digest.update(flat.numpy().tobytes())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None) or getattr(text, "d_model", None),
        "num_layers": getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "shapes": shapes,
        "weights": digest.hexdigest()[:16],
    }


def check_fit(saved: dict[str, Any], current: dict[str, Any], saved_id: str | None, current_id: str | None) -> str | None:
    """Why an adapter trained on ``saved`` does not fit ``current``, or None if it fits."""
    both = f"the adapter was trained on {saved_id or 'an unnamed base'} but this base is {current_id or 'unnamed'}"
    if saved.get("model_type") != current.get("model_type"):
        return f"other architecture ({saved.get('model_type')} vs {current.get('model_type')}): {both}"
    for key in ("hidden_size", "num_layers", "vocab_size"):
        if saved.get(key) != current.get(key):
            return f"other {key.replace('_', ' ')} ({saved.get(key)} vs {current.get(key)}): {both}"
    if saved.get("shapes") != current.get("shapes"):
        return f"other parameter shapes: {both}"
    if saved.get("weights") != current.get("weights"):
        return f"same architecture but other weights: {both}"
    return None


# --- save ----------------------------------------------------------------------------
def _card(sidecar: dict[str, Any]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    metrics = sidecar.get("metrics") or {}
    data = ModelCardData(
        base_model=sidecar["base_model"]["id"] if sidecar["base_model"].get("id") and "/" in sidecar["base_model"]["id"] and not os.path.isabs(sidecar["base_model"]["id"]) else None,
        library_name="adapterkit",
        tags=["adapterkit", sidecar["strategy"], *(["peft"] if sidecar["files"][0] == "adapter_model.safetensors" else [])],
        metrics=sorted(k for k, v in metrics.items() if isinstance(v, (int, float))) or None,
    )
    lines = [
        f"# {sidecar['name']}: a `{sidecar['strategy']}` adapter",
        "",
        f"Base model: `{sidecar['base_model'].get('id')}`"
        + (f" (trained on a {sidecar['quantization']} quantized base)" if sidecar.get("quantization") else ""),
        f"Task: {sidecar.get('task')}" + (f", labels: {', '.join(sidecar['label_names'])}" if sidecar.get("label_names") else ""),
        "",
        "Options: " + ", ".join(f"`{k}={v}`" for k, v in sidecar["options"].items()) if sidecar["options"] else "Options: defaults",
    ]
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import adapterkit as ak",
        f"model, tokenizer = ak.load_base({sidecar['base_model'].get('id')!r}" + (f", task={sidecar['task']!r}" if sidecar.get("task") else "") + ")",
        "model = ak.load(model, '<this repo or folder>')",
        "```",
    ]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n").content


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    metrics: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Path:
    """Write one adapter (default: the active one) to the folder ``path``, atomically.

    The folder is built under a temporary name beside ``path`` and renamed into place, so a
    failure leaves the previous artifact or none, never a half-written one.

    Args:
        model: a model carrying adapterkit adapters.
        path: destination folder.
        name: which adapter; the active one when omitted.
        metrics: evaluation results to record (merged over those already recorded).
        recipe: the settings that produced the adapter.

    Returns:
        The folder written.
    """
    from adapterkit import __version__
    from adapterkit.api import _strategy
    from adapterkit.state import require_store, unwrap

    base = unwrap(model)
    store = require_store(base)
    name = name or store.active
    if name is None:
        raise AdapterNotFoundError(
            f"No adapter is active; pass name= (loaded: {', '.join(sorted(store.records))})."
        )
    record = store.record(name)
    impl = _strategy(record.strategy)
    if metrics:
        record.meta.setdefault("metrics", {}).update(metrics)
    if recipe:
        record.meta["recipe"] = recipe
    head = {}
    if impl.trains_label_head:
        for hpath, module in store.heads.get(name, {}).items():
            head.update({f"{hpath}.{k}": v.detach() for k, v in module.state_dict().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        impl.write_files(base, name, tmp, head)
        files = sorted(p.name for p in tmp.iterdir())
        weight_file = next((f for f in WEIGHT_FILES if f in files), None)
        sidecar = {
            "format_version": FORMAT_VERSION,
            "adapterkit_version": __version__,
            "name": name,
            "strategy": record.strategy,
            "options": record.config.to_dict(),
            "base_model": {"id": base_model_id(base), "fingerprint": record.meta.get("base_fingerprint") or fingerprint(base)},
            "quantization": record.meta.get("quantization", quantization_of(base)),
            "task": record.meta.get("task"),
            "label_names": record.meta.get("label_names"),
            "head_modules": sorted(store.heads.get(name, {})) if impl.trains_label_head else [],
            "metrics": record.meta.get("metrics", {}),
            "recipe": record.meta.get("recipe"),
            "files": [weight_file] if weight_file else files,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            text = json.dumps(sidecar, indent=2)
        except TypeError as err:
            raise AdapterFormatError(f"Adapter metadata cannot be saved as JSON: {err}. Pass plain values.") from err
        (tmp / SIDECAR).write_text(text + "\n")
        (tmp / "README.md").write_text(_card(sidecar))
        backup = None
        if path.exists():
            backup = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, backup)
        os.replace(tmp, path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Saved adapter '%s' (%s) to %s", name, record.strategy, path)
    return path


# --- load ----------------------------------------------------------------------------
def read_sidecar(folder: Path) -> dict[str, Any] | None:
    """The sidecar of a saved adapter, checked for format version; None for plain peft folders."""
    path = folder / SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{path} is not valid JSON ({err}); the adapter folder is damaged.") from err
    version = data.get("format_version")
    if not isinstance(version, int):
        raise AdapterFormatError(f"{path} has no integer format_version; it was not written by adapterkit.")
    if version > FORMAT_VERSION:
        raise AdapterFormatError(
            f"{folder} uses adapter format version {version}, newer than this adapterkit understands "
            f"({FORMAT_VERSION}). Upgrade adapterkit: pip install -U adapterkit."
        )
    return data


def _refuse_pickle(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise AdapterFormatError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}). adapterkit never loads pickle files, "
            "which can run arbitrary code: convert them to safetensors with the tool that wrote them."
        )


def _identify(folder: Path, sidecar: dict[str, Any] | None):
    from adapterkit.registry import default_registry

    if sidecar is not None:
        cls = default_registry.get(sidecar["strategy"])
        config = cls.config_cls.from_dict(sidecar.get("options", {}), strict=False)
        return cls(), config
    for strategy_name in default_registry.list():
        try:
            impl = default_registry.get(strategy_name)()
        except Exception:  # a broken plugin cannot claim a folder
            continue
        config = impl.config_from_files(folder)
        if config is not None:
            return impl, config
    raise AdapterFormatError(
        f"{folder} is not an adapter: it has no {SIDECAR} and no adapter_config.json that an installed strategy "
        "can read. Save adapters with adapterkit.save() or peft's save_pretrained()."
    )


def _resize_linear(module: nn.Module, key: str, value: torch.Tensor) -> None:
    """Give a label head the class count of the saved one (e.g. a 6-way head on a 2-way base)."""
    if not isinstance(module, nn.Linear) or key not in ("weight", "bias"):
        return
    current = getattr(module, key)
    if current is None or current.shape == value.shape or current.shape[1:] != value.shape[1:]:
        return
    setattr(module, key, nn.Parameter(torch.empty_like(value, device=current.device, dtype=current.dtype)))
    module.out_features = value.shape[0]


def load_folder(
    model: nn.Module, folder: Path, *, name: str | None = None, ignore_mismatch: bool = False, source: str | None = None
) -> str:
    """Load the adapter in ``folder`` onto ``model``; returns the adapter's name."""
    from adapterkit.api import activate, attach_config
    from adapterkit.state import freeze_all_but, get_store, unwrap

    base = unwrap(model)
    if not folder.is_dir():
        raise AdapterNotFoundError(f"{folder} is not a folder with a saved adapter.")
    _refuse_pickle(folder)
    sidecar = read_sidecar(folder)
    impl, config = _identify(folder, sidecar)
    weight_path = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weight_path is None:
        raise AdapterFormatError(f"{folder} has no adapter weights ({' or '.join(WEIGHT_FILES)}).")
    tensors = read_safetensors(weight_path)
    if sidecar is not None:
        saved_base = sidecar.get("base_model", {})
        problem = check_fit(saved_base.get("fingerprint", {}), fingerprint(base), saved_base.get("id"), base_model_id(base))
        if problem and not ignore_mismatch:
            raise AdapterMismatchError(
                f"The adapter in {source or folder} does not fit this base model: {problem}. "
                "Load the base it was trained on, or pass ignore_mismatch=True to load it anyway."
            )
        if problem:
            logger.warning("Loading %s despite a base mismatch: %s", source or folder, problem)
    name = name or (sidecar or {}).get("name") or "default"
    meta = {
        "source": source or str(folder),
        "task": (sidecar or {}).get("task"),
        "label_names": (sidecar or {}).get("label_names"),
        "metrics": (sidecar or {}).get("metrics", {}),
        "recipe": (sidecar or {}).get("recipe"),
        "quantization": (sidecar or {}).get("quantization"),
        "base_fingerprint": (sidecar or {}).get("base_model", {}).get("fingerprint"),
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    try:
        attach_config(base, impl, config, name, meta=meta)
    except Exception as err:
        if isinstance(err, AdapterKitError) or not isinstance(err, ValueError):
            raise
        raise AdapterMismatchError(f"The adapter in {source or folder} cannot be attached to this model: {err}") from err
    try:
        _restore(base, get_store(base), impl, name, tensors, folder)
    except BaseException:
        from adapterkit.api import detach

        detach(base, name)
        raise
    freeze_all_but(base, [])  # a loaded adapter is for inference until train() says otherwise
    activate(base, name)
    return name


def _restore(base: nn.Module, store, impl, name: str, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    own_keys = set(impl.parameters(base, name))
    impl.load_state_dict(base, name, {k: v for k, v in tensors.items() if k in own_keys})
    _load_heads(store.heads.get(name, {}) if impl.trains_label_head else {}, tensors, own_keys, folder)


def restore_weights(model: nn.Module, name: str, folder: Path) -> None:
    """Copy the weights saved in ``folder`` into the already loaded adapter ``name`` (resume)."""
    from adapterkit.api import _strategy
    from adapterkit.state import require_store, unwrap

    base = unwrap(model)
    store = require_store(base)
    impl = _strategy(store.record(name).strategy)
    weight_path = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weight_path is None:
        raise AdapterFormatError(f"{folder} has no adapter weights ({' or '.join(WEIGHT_FILES)}).")
    _restore(base, store, impl, name, read_safetensors(weight_path), folder)


def _load_heads(heads: dict[str, nn.Module], tensors: dict[str, torch.Tensor], own: set[str], folder: Path) -> None:
    rest = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items() if k not in own}
    if not heads:
        if rest:
            raise AdapterMismatchError(f"{folder} has tensors this model has no place for: {sorted(rest)[:3]}.")
        return
    loaded = set()
    for path, module in heads.items():
        for key, value in rest.items():
            if not key.startswith(path + "."):
                continue
            pname = key[len(path) + 1 :]
            owner, _, leaf = pname.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            _resize_linear(target, leaf, value)
            param = dict(module.named_parameters()).get(pname)
            if param is None:
                continue
            if param.shape != value.shape:
                raise AdapterMismatchError(
                    f"Head tensor '{key}' in {folder} has shape {tuple(value.shape)}, the model's {tuple(param.shape)}."
                )
            with torch.no_grad():
                param.copy_(value.to(device=param.device, dtype=param.dtype))
            loaded.add(key)
    unknown = sorted(set(rest) - loaded)
    if unknown:
        raise AdapterMismatchError(f"{folder} has tensors this model has no place for: {unknown[:3]}.")
    if not loaded:
        logger.warning(
            "%s carries no weights for the task head %s; it keeps the base's head. Plain peft adapters need "
            "modules_to_save for a trained classifier.",
            folder,
            sorted(heads),
        )
