"""Adapters on disk: the folder format, the base fingerprint, atomic save and verified load.

A saved adapter is a folder:

- peft-backed strategies (``lora``, ``prefix``): peft's ``adapter_config.json`` and
  ``adapter_model.safetensors``, loadable by plain peft, vLLM or LoRAX; the label head rides
  along as peft's ``modules_to_save``;
- other strategies: ``adapter.safetensors`` with exactly the trained tensors;
- always ``adapterkit.json`` (the sidecar: format version, strategy and options, base model
  id and fingerprint, quantization, task, label names, metrics, recipe, and a manifest of
  every other file with its size and sha256) and ``README.md`` (a Hub model card with
  metadata).

Weights are safetensors only: pickle files are never read. ``save`` replaces a folder in one
atomic step and only when it holds an earlier adapter; loading checks everything (sidecar
fields, file hashes, links, every tensor) before it copies any weight.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
from pathlib import Path, PurePosixPath
from collections.abc import Iterable
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

import adapterkit.heads as heads
import adapterkit.io as io
from adapterkit._version import __version__
from adapterkit.config import FORMAT_VERSION, AdapterConfig
from adapterkit.errors import (
    AdapterExistsError,
    AdapterFormatError,
    AdapterKitError,
    AdapterMismatchError,
    AdapterNotFoundError,
    InvalidOptionError,
)
from adapterkit.fingerprint import check_fit, fingerprint
from adapterkit.model_info import base_model_id
from adapterkit.models import EMBEDDED_MODELS, embedded_alias
from adapterkit.quantized import quantization_of
from adapterkit.registry import default_registry
from adapterkit.state import require_store, unwrap
from adapterkit.strategy import Strategy

logger = logging.getLogger(__name__)

SIDECAR = "adapterkit.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


# --- save ----------------------------------------------------------------------------
#: Trainer bookkeeping that lands in metrics dicts but measures nothing about the model.
_NOT_METRICS = frozenset({"epoch", "step", "global_step", "total_flos", "train_loss"})
_NOT_METRIC_SUFFIXES = ("_runtime", "_per_second", "_flos", "_seconds")


def card_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric quality metrics of a metrics dict, without Trainer's epoch/runtime/throughput entries."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
        and k not in _NOT_METRICS and not k.endswith(_NOT_METRIC_SUFFIXES)
    }


def _load_name(model_id: str | None) -> str | None:
    """What to pass to load_base for ``model_id``: the embedded alias where there is one, so it works offline."""
    return (embedded_alias(model_id) if model_id else None) or model_id


def _card_base_model(model_id: str | None) -> str | None:
    """The Hub id for the card's ``base_model`` lineage (an embedded alias stands for its source checkpoint)."""
    entry = EMBEDDED_MODELS.get(model_id) if model_id else None
    model_id = entry.model_id if entry else model_id
    return model_id if model_id and "/" in model_id and not os.path.isabs(model_id) else None


def _card(sidecar: dict[str, Any]) -> str:
    metrics = card_metrics(sidecar.get("metrics") or {})
    data = ModelCardData(
        base_model=_card_base_model(sidecar["base_model"].get("id")),
        library_name="adapterkit",
        tags=["adapterkit", sidecar["strategy"], *(["peft"] if sidecar["files"][0] == "adapter_model.safetensors" else []),
              *(["merged"] if sidecar.get("merge") else [])],
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
    lines += _merge_lines(sidecar.get("merge"))
    lines += _sweep_lines(sidecar.get("recipe"))
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import adapterkit as ak",
        f"model, tokenizer = ak.load_base({_load_name(sidecar['base_model'].get('id'))!r}" + (f", task={sidecar['task']!r}" if sidecar.get("task") else "") + ")",
        "model = ak.load(model, '<this repo or folder>')",
        "```",
    ]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n").content


def _sweep_lines(recipe: Any) -> list[str]:
    """The card's "Tuning" section for an adapter whose recipe picked its settings with ``--sweep``."""
    sweep = recipe.get("sweep") if isinstance(recipe, dict) else None
    if not isinstance(sweep, dict):
        return []
    metric = sweep.get("metric", "accuracy")
    lines = ["", "## Tuning", "",
             f"Settings picked by `--sweep` on dev {metric}: {sweep.get('dev_rows')} rows of the training data "
             f"({sweep.get('dev_from')}); the evaluation split was not used to choose. {sweep.get('outcome')}.",
             "", f"| trial | values | dev {metric} | train s | status |", "|---|---|---|---|---|"]
    for t in sweep.get("trials") or []:
        values = ", ".join(f"`{k}={v}`" for k, v in (t.get("values") or {}).items())
        dev = (t.get("dev") or {}).get(metric)
        status = "picked" if t.get("trial") == sweep.get("best_trial") else "ok" if t.get("error") is None else "failed"
        shown = "-" if dev is None else f"{dev:.4f}"
        lines.append(f"| {t.get('trial')} | {values} | {shown} | {t.get('train_seconds') or '-'} | {status} |")
    return lines


def _merge_lines(merge: Any) -> list[str]:
    """The card's "Merged from" section for an adapter made by ``ak.merge`` / ``ak.compose``."""
    if not isinstance(merge, dict):
        return []
    extra = ", ".join(f"{k} {merge[k]}" for k in ("density", "r", "seed") if merge.get(k) is not None)
    lines = ["", "## Merged from", "", f"Method: `{merge.get('method')}`" + (f" ({extra})" if extra else ""), "",
             "| adapter | weight | source | sha256 |", "|---|---|---|---|"]
    for c in merge.get("components") or []:
        digest = (c.get("content_hash") or c.get("weights_sha256") or "")[:12]
        lines.append(f"| {c.get('name')} | {c.get('weight')} | {c.get('source') or '-'} | {digest} |")
    search = merge.get("search")
    if isinstance(search, dict):
        skipped = ", ".join(str(x.get("candidate")) for x in search.get("skipped") or []) or "none"
        lines += ["", f"Composed from {search.get('examples')} labelled examples (sha256 "
                      f"{str(search.get('examples_sha256'))[:12]}) by {search.get('optimizer')}: loss "
                      f"{search.get('loss', float('nan')):.4f} (base model {search.get('base_loss', float('nan')):.4f}) "
                      f"after {search.get('evaluations')} evaluations; skipped: {skipped}."]
    return lines


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    metrics: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Path:
    """Write one adapter (default: the active one) to the folder ``path``, atomically.

    The folder is built under a temporary name beside ``path`` and swapped into place in one
    step, so a failure or a kill at any instant leaves the previous adapter or the new one,
    never a half-written one. Only a new path, an empty folder or an earlier adapterkit
    adapter (with no files of yours added) is written to.

    Args:
        model: a model carrying adapterkit adapters.
        path: destination folder.
        name: which adapter; the active one when omitted.
        metrics: evaluation results to record (merged over those already recorded).
        recipe: the settings that produced the adapter.

    Returns:
        The folder written.

    Raises:
        AdapterExistsError: ``path`` is a file, a link, a folder that is not an adapterkit
            adapter, or an adapter folder holding files it did not write.
    """
    base = unwrap(model)
    store = require_store(base)
    name = name or store.active
    if name is None:
        raise AdapterNotFoundError(
            f"No adapter is active; pass name= (loaded: {', '.join(sorted(store.records))})."
        )
    record = store.record(name)
    impl = default_registry.get(record.strategy)()
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise InvalidOptionError(
            f"Cannot save an adapter to {str(path)!r}: name the folder to write (e.g. 'runs/my-adapter')."
        )
    # The record learns the new metrics and recipe only once they are on disk.
    merged_metrics = {**record.meta.get("metrics", {}), **(metrics or {})}
    recipe = recipe or record.meta.get("recipe")
    head = heads.state_dict(store, name) if impl.trains_label_head else {}

    def prepare(destination: Path) -> None:
        io.recover_locked(destination, _is_complete)
        _check_destination(destination)

    with io.writing_folder(path, prepare=prepare) as tmp:
        io.step("writing")
        impl.write_files(base, name, tmp, head)
        files = sorted(p.name for p in tmp.iterdir())
        weight_file = next((f for f in WEIGHT_FILES if f in files), None)
        sidecar = {
            "format_version": FORMAT_VERSION,
            "adapterkit_version": __version__,
            "name": name,
            "strategy": record.strategy,
            "options": record.config.to_dict(),
            "base_model": {
                "id": base_model_id(base),
                "fingerprint": record.meta.get("base_fingerprint") or fingerprint(base),
            },
            "quantization": record.meta.get("quantization", quantization_of(base)),
            "task": record.meta.get("task"),
            "label_names": record.meta.get("label_names"),
            "head_modules": sorted(store.heads.get(name, {})) if impl.trains_label_head else [],
            "metrics": merged_metrics,
            "recipe": recipe,
            # only when present: adapters that are not merges keep byte-identical sidecars
            **({"merge": record.meta["merge"]} if record.meta.get("merge") else {}),
            "files": [weight_file] if weight_file else files,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            json.dumps(sidecar)
        except TypeError as err:
            raise AdapterFormatError(
                f"Adapter metadata cannot be saved as JSON: {err}. Pass plain values."
            ) from err
        (tmp / "README.md").write_text(_card(sidecar), encoding="utf-8")
        sidecar["manifest"] = _manifest(tmp)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    record.meta["metrics"] = merged_metrics
    if recipe:
        record.meta["recipe"] = recipe
    logger.info("Saved adapter '%s' (%s) to %s", name, record.strategy, path)
    return path


def recover(path: str | os.PathLike) -> bool:
    """Put back an adapter that a killed :func:`save` left renamed aside, and remove dead saves' leftovers.

    :func:`save` and :func:`read_folder` call it; call it yourself before testing whether an
    adapter folder exists. Returns whether an adapter was restored at ``path``.
    """
    return io.recover(path, _is_complete)


def _is_complete(folder: Path) -> bool:
    try:
        sidecar = read_sidecar(folder)
        if sidecar is None:
            return False
        _verified_manifest(folder, sidecar)
        return True
    except (AdapterKitError, OSError):
        return False


def _check_destination(path: Path) -> None:
    """Refuse to save where it would destroy something that is not an earlier adapterkit adapter."""
    if os.path.islink(path):
        raise AdapterExistsError(
            f"Cannot save to {path}: it is a symbolic link (to {os.readlink(path)}). adapterkit.save replaces "
            "folders and never follows or removes links: save to the link's target or another path."
        )
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise AdapterExistsError(
            f"Cannot save to {path}: it is an existing file, not a folder. adapterkit.save writes a folder and never "
            "replaces your files: pick another path, or move the file away."
        )
    top = sorted(p.name for p in path.iterdir())
    if not top:
        return  # an empty folder is fine to fill
    try:
        sidecar = read_sidecar(path)
    except AdapterFormatError:
        sidecar = None
    if sidecar is None:
        raise AdapterExistsError(
            f"Cannot save to {path}: the folder exists and is not an adapter saved by adapterkit.save "
            f"(it holds {', '.join(top[:5])}{', ...' if len(top) > 5 else ''}). adapterkit.save replaces only "
            "its own adapters: pick a new or empty folder."
        )
    present = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir() or not any(p.iterdir()))
    listed = {SIDECAR, *(sidecar.get("manifest") or dict.fromkeys(LEGACY_FILES))}
    extra = [p for p in present if p not in listed]
    if extra:
        raise AdapterExistsError(
            f"Cannot save to {path}: it holds an earlier adapter plus files that adapter did not write "
            f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}). adapterkit.save replaces the whole folder "
            "and never deletes your files: move them out, or save to another folder."
        )


# --- manifest: the files save wrote, with their sizes and hashes ---------------------
#: Files a format-1 adapter written before the manifest existed may hold.
LEGACY_FILES = (SIDECAR, "README.md", "adapter_config.json", *WEIGHT_FILES)
#: Hub users edit model cards in place, so the card's bytes are listed but never enforced.
EDITABLE_FILES = frozenset({"README.md"})


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in ``folder`` except the sidecar, by relative name."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != SIDECAR:
            out[rel] = {"size": path.stat().st_size, "sha256": io.sha256_file(path)}
    return out


def _verified_manifest(
    folder: Path, sidecar: dict[str, Any], *, enforce_card: bool = True, known: dict[str, io.HashedFile] | None = None
) -> dict[str, dict[str, Any]]:
    """The sidecar's manifest after checking every listed file against its size and sha256.

    Legacy sidecars (no manifest) get one computed from the known file names present.
    ``known`` holds files already read and hashed (by relative name), which are not read again.
    """
    known = known or {}

    def size_and_hash(rel: str) -> tuple[int, str]:
        if rel in known:
            return known[rel].size, known[rel].sha256
        path = folder / rel
        return path.stat().st_size, io.sha256_file(path)

    manifest = sidecar.get("manifest")
    if manifest is None:
        return {n: dict(zip(("size", "sha256"), size_and_hash(n)))
                for n in LEGACY_FILES if n != SIDECAR and (n in known or (folder / n).is_file())}
    changed = []
    for rel, entry in manifest.items():
        if rel not in known and not (folder / rel).is_file():
            raise AdapterFormatError(
                f"{folder} is missing '{rel}', which adapterkit.save wrote there. The folder is incomplete: "
                "save or download the adapter again."
            )
        if not enforce_card and rel in EDITABLE_FILES:
            continue
        if size_and_hash(rel) != (entry["size"], entry["sha256"]):
            changed.append(rel)
    if changed:
        raise AdapterFormatError(
            f"The bytes of {', '.join(repr(c) for c in changed)} in {folder} changed since adapterkit.save wrote "
            "them (size or sha256 differs from the sidecar's manifest): the file is damaged or was edited. "
            "Save or download the adapter again."
        )
    return manifest


def _require_sidecar(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise AdapterNotFoundError(f"{folder} is not a folder with a saved adapter.")
    try:
        sidecar = read_sidecar(folder)
    except AdapterFormatError as err:
        raise AdapterFormatError(f"{folder} is not an adapter saved by adapterkit.save: {err}") from err
    if sidecar is None:
        raise AdapterFormatError(
            f"{folder} is not an adapter saved by adapterkit.save: it has no {SIDECAR}. Save it with adapterkit.save()."
        )
    _refuse_outside_links(folder)
    return sidecar


def adapter_files(folder: Path) -> list[str]:
    """The relative names of the files :func:`save` wrote in ``folder``, sidecar included, sorted.

    Each is checked against the size and sha256 the sidecar records (the model card, which
    the Hub lets people edit, only for presence).

    Raises:
        AdapterNotFoundError: ``folder`` is not a folder.
        AdapterFormatError: no or an invalid sidecar, or a listed file is missing or changed.
    """
    folder = Path(folder)
    sidecar = _require_sidecar(folder)
    return sorted({SIDECAR, *_verified_manifest(folder, sidecar, enforce_card=False)})


def content_hash(folder: Path) -> str:
    """One sha256 hex digest identifying the adapter's bytes: its weights and configs.

    Taken over the manifest's hashes (checked against the files), leaving out the sidecar
    and the card, whose metadata changes without the adapter changing.
    """
    folder = Path(folder)
    sidecar = _require_sidecar(folder)
    return _manifest_hash(_verified_manifest(folder, sidecar, enforce_card=False))


def _manifest_hash(manifest: dict[str, dict[str, Any]]) -> str:
    ident = {rel: entry["sha256"] for rel, entry in sorted(manifest.items()) if rel not in EDITABLE_FILES}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


# --- load ----------------------------------------------------------------------------
def read_sidecar(folder: Path) -> dict[str, Any] | None:
    """The sidecar of a saved adapter, checked for format version; None for plain peft folders."""
    path = folder / SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{path} is not valid JSON ({err}); the adapter folder is damaged.") from err
    if not isinstance(data, dict):
        raise AdapterFormatError(
            f"{path} holds a JSON {type(data).__name__}, not an object; it was not written by adapterkit."
        )
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterFormatError(f"{path} has no integer format_version; it was not written by adapterkit.")
    if version > FORMAT_VERSION:
        raise AdapterFormatError(
            f"{folder} uses adapter format version {version}, newer than this adapterkit understands "
            f"({FORMAT_VERSION}). Upgrade adapterkit: pip install -U adapterkit."
        )
    problems = _sidecar_problems(data)
    if problems:
        raise AdapterFormatError(
            f"{path} is damaged: " + "; ".join(problems) + ". Save or download the adapter again."
        )
    return data


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _safe_relative(rel: Any) -> bool:
    """A manifest name must stay inside the folder (a forged '../x' would publish or hash outside it)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    parts = PurePosixPath(rel).parts
    return not PurePosixPath(rel).is_absolute() and ".." not in parts and "." not in parts and rel != SIDECAR


def _sidecar_problems(data: dict[str, Any]) -> list[str]:
    """Every field of a sidecar with a missing or wrong-typed value, described."""
    problems = []

    def expect(key: str, ok: bool, what: str, *, required: bool = False) -> None:
        if key not in data:
            if required:
                problems.append(f"field '{key}' is missing (expected {what})")
        elif not ok:
            problems.append(f"field '{key}' should be {what}, got {type(data[key]).__name__} {data[key]!r:.60}")

    get = data.get
    expect("strategy", isinstance(get("strategy"), str) and bool(get("strategy")), "a strategy name", required=True)
    expect("name", isinstance(get("name"), str) or get("name") is None, "a string")
    expect("options", isinstance(get("options"), dict), "an object of options")
    base = get("base_model")
    expect("base_model", isinstance(base, dict), "an object with 'id' and 'fingerprint'", required=True)
    if isinstance(base, dict):
        if not (base.get("id") is None or isinstance(base.get("id"), str)):
            problems.append(f"field 'base_model.id' should be a string, got {type(base['id']).__name__}")
        if not isinstance(base.get("fingerprint"), dict):
            problems.append("field 'base_model.fingerprint' should be an object (the base's fingerprint)")
    for key in ("quantization", "task"):
        expect(key, get(key) is None or isinstance(get(key), str), "a string or null")
    expect("label_names", get("label_names") is None or _is_str_list(get("label_names")), "a list of strings or null")
    expect("head_modules", _is_str_list(get("head_modules")), "a list of module paths")
    expect("metrics", isinstance(get("metrics"), dict), "an object")
    expect("recipe", get("recipe") is None or isinstance(get("recipe"), dict), "an object or null")
    expect("merge", get("merge") is None or isinstance(get("merge"), dict), "an object or null")
    expect("files", _is_str_list(get("files")), "a list of file names")
    manifest = get("manifest")
    expect("manifest", isinstance(manifest, dict), "an object of files")
    if isinstance(manifest, dict):
        for rel, entry in manifest.items():
            if not _safe_relative(rel):
                problems.append(f"manifest entry {rel!r} is not a file name inside the adapter folder")
            elif not (
                isinstance(entry, dict)
                and isinstance(entry.get("size"), int)
                and not isinstance(entry.get("size"), bool)
                and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            ):
                problems.append(f"manifest entry '{rel}' should be {{'size': int, 'sha256': hex}}, got {entry!r:.80}")
    return problems


def _refuse_pickle(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise AdapterFormatError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}). adapterkit never loads pickle files, "
            "which can run arbitrary code: convert them to safetensors with the tool that wrote them."
        )


def _refuse_outside_links(folder: Path) -> None:
    """Refuse a symlink that leads out of the adapter folder (it would read or publish other files).

    A Hub cache snapshot (``<repo cache>/snapshots/<rev>/``) is made of links into the same
    repo cache's ``blobs/``; those stay allowed.
    """
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    for entry in sorted(folder.rglob("*")):
        if not entry.is_symlink():
            continue
        target = entry.resolve()
        if not any(target == root or target.is_relative_to(root) for root in roots):
            raise AdapterFormatError(
                f"{entry.relative_to(folder)} in {folder} is a symbolic link to {target}, outside the adapter folder. "
                "adapterkit reads only the adapter's own files: copy the file into the folder instead of linking it."
            )


def _identify(folder: Path, sidecar: dict[str, Any] | None):
    if sidecar is not None:
        cls = default_registry.get(sidecar["strategy"])
        try:
            config = cls.config_cls.from_dict(sidecar.get("options", {}), strict=False)
        except InvalidOptionError as err:
            raise AdapterFormatError(f"The field 'options' of {folder / SIDECAR} is invalid: {err}") from err
        return cls(), config
    peft_type = _peft_type(folder)
    candidates = []
    for strategy_name in default_registry.list():
        try:
            impl = default_registry.get(strategy_name)()
        except Exception:  # a broken plugin cannot claim a folder
            continue
        # A strategy that names its peft type reads only folders of that type; others may sniff any.
        if impl.peft_type is None or impl.peft_type == peft_type:
            candidates.append((impl.peft_type is None, strategy_name, impl))
    for _, strategy_name, impl in sorted(candidates, key=lambda c: c[:2]):
        try:
            config = impl.config_from_files(folder)
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as err:
            raise AdapterFormatError(
                f"{folder} has a broken adapter_config.json ({type(err).__name__}: {err}); the '{strategy_name}' "
                "strategy cannot read it. Save or download the adapter again."
            ) from err
        if config is not None:
            return impl, config
    if peft_type is not None:
        known = sorted({c[2].peft_type for c in candidates if c[2].peft_type} | {"LORA", "PREFIX_TUNING"})
        raise AdapterFormatError(
            f"{folder} is a peft {peft_type} adapter, which no installed strategy reads (peft types read: "
            f"{', '.join(known)}). Load it with peft.PeftModel.from_pretrained, or install a strategy for it."
        )
    raise AdapterFormatError(
        f"{folder} is not an adapter: it has no {SIDECAR} and no adapter_config.json that an installed strategy "
        "can read. Save adapters with adapterkit.save() or peft's save_pretrained()."
    )


def _peft_type(folder: Path) -> str | None:
    """The ``peft_type`` a plain peft folder's ``adapter_config.json`` declares, if it is readable."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterFormatError(
            f"{folder} has a broken adapter_config.json ({type(err).__name__}: {err}). Save or download the adapter again."
        ) from err
    value = data.get("peft_type") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _all_finite(value: torch.Tensor) -> bool:
    if value.numel() == 0:
        return True
    try:
        # min and max propagate NaN and are inf where any value is: two reductions, no copy
        # (25x faster than isfinite().all() on an embedding matrix).
        low, high = torch.aminmax(value)
    except RuntimeError:  # dtypes without aminmax kernels
        return bool(torch.isfinite(value).all())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _check_tensors(tensors: dict[str, torch.Tensor], path: Path, *, allow_nonfinite: bool) -> None:
    """Refuse integer/bool tensors (adapter weights are floats) and, unless allowed, NaN/inf values."""
    for key, value in sorted(tensors.items()):
        if not value.is_floating_point():
            raise AdapterFormatError(
                f"Tensor '{key}' in {path} has dtype {value.dtype}; adapter weights are floating point. "
                "The file is damaged or was not written by adapterkit or peft."
            )
    if _all_finite_at_once(tensors.values()):
        return
    for key, value in sorted(tensors.items()):
        if not _all_finite(value):
            bad = int((~torch.isfinite(value)).sum())
            message = (
                f"Tensor '{key}' in {path} holds {bad} NaN/inf value(s) of {value.numel()}: the training that wrote it "
                "diverged or the file is damaged."
            )
            if not allow_nonfinite:
                raise AdapterFormatError(message + " Retrain it, or pass allow_nonfinite=True to load it anyway.")
            logger.warning("%s Loading it anyway (allow_nonfinite=True).", message)


def _all_finite_at_once(values: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite, with one finiteness test for all of them.

    Hundreds of per-tensor ``bool(isfinite(...))`` round trips cost more than the reductions
    (6 of 8 ms for a 420-tensor LoRA file); the per-tensor pass runs only to name a bad one.
    """
    extremes: dict[torch.dtype, list[torch.Tensor]] = {}
    for value in values:
        if value.numel() == 0:
            continue
        try:
            extremes.setdefault(value.dtype, []).extend(torch.aminmax(value))
        except RuntimeError:  # dtypes without aminmax kernels
            return False
    return all(bool(torch.isfinite(torch.stack(parts)).all()) for parts in extremes.values())


@dataclasses.dataclass
class SavedAdapter:
    """An adapter folder read and checked by :func:`read_folder`, ready to attach and copy in."""

    folder: Path
    #: the sidecar, or None for a plain peft folder
    sidecar: dict[str, Any] | None
    strategy: Strategy
    config: AdapterConfig
    weight_path: Path
    tensors: dict[str, torch.Tensor]
    #: the adapter's identity: the content hash of an adapterkit folder, a hash of a plain peft
    #: folder's config and weights; equal digests mean equal weights and configs
    digest: str

    @property
    def name(self) -> str | None:
        """The name it was saved under (None for plain peft folders)."""
        return (self.sidecar or {}).get("name")

    def meta(self, source: str) -> dict[str, Any]:
        """The record metadata an adapter loaded from here carries."""
        sidecar = self.sidecar or {}
        meta = {
            "source": source,
            "task": sidecar.get("task"),
            "label_names": sidecar.get("label_names"),
            "metrics": sidecar.get("metrics", {}),
            "recipe": sidecar.get("recipe"),
            "quantization": sidecar.get("quantization"),
            "base_fingerprint": sidecar.get("base_model", {}).get("fingerprint"),
            "merge": sidecar.get("merge"),
            "content_hash": _manifest_hash(sidecar["manifest"]) if isinstance(sidecar.get("manifest"), dict) else None,
        }
        return {k: v for k, v in meta.items() if v is not None}


def read_folder(folder: Path, *, allow_nonfinite: bool = False, manifest_checked: bool = False) -> SavedAdapter:
    """Read the adapter in ``folder`` and check everything that does not need a model.

    The sidecar's fields, the files' bytes against its manifest (unless ``manifest_checked``:
    the caller just verified them, as a Hub download does), links, pickles, and each tensor's
    dtype and values (NaN/inf refused unless ``allow_nonfinite``). Nothing is attached.
    """
    folder = Path(folder)
    try:
        recover(folder)
    except OSError as err:  # e.g. a read-only parent: load what is there, if anything
        logger.warning("Could not recover an interrupted save at %s: %s", folder, err)
    if not folder.is_dir():
        raise AdapterNotFoundError(f"{folder} is not a folder with a saved adapter.")
    _refuse_outside_links(folder)
    _refuse_pickle(folder)
    sidecar = read_sidecar(folder)
    weights = _hashed_weights(folder)
    # Parsed while the bytes are hashed; a parse error waits until the manifest had its say,
    # since "the bytes changed" explains a broken file better than the parser does.
    tensors, parse_error = None, None
    if weights is not None:
        try:
            tensors = weights.tensors()
        except AdapterFormatError as err:
            parse_error = err
    known = {weights.path.name: weights} if weights is not None else {}
    if sidecar is not None and not manifest_checked:
        manifest = _verified_manifest(folder, sidecar, enforce_card=False, known=known)
    elif sidecar is not None and isinstance(sidecar.get("manifest"), dict):
        manifest = sidecar["manifest"]
    else:
        manifest = None
    impl, config = _identify(folder, sidecar)
    weight_path = _weight_path(folder) if weights is None else weights.path
    if parse_error is not None:
        raise parse_error
    _check_tensors(tensors, weight_path, allow_nonfinite=allow_nonfinite)
    return SavedAdapter(folder, sidecar, impl, config, weight_path, tensors, _identity(folder, manifest, weights))


def _hashed_weights(folder: Path) -> io.HashedFile | None:
    """The weight file read once and hashed (None when there is none: the caller says so)."""
    for file in WEIGHT_FILES:
        try:
            return io.hashed_file(folder / file)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
    return None


def _identity(folder: Path, manifest: dict[str, dict[str, Any]] | None, weights: io.HashedFile) -> str:
    if manifest is not None:
        return _manifest_hash(manifest)
    # A plain peft folder (or a legacy sidecar) has no manifest: its config and weights are its identity.
    digest = hashlib.sha256()
    config = folder / "adapter_config.json"
    if config.is_file():
        digest.update(f"adapter_config.json:{io.sha256_file(config)};".encode())
    digest.update(f"{weights.path.name}:{weights.sha256};".encode())
    return digest.hexdigest()


def check_fits(base: nn.Module, saved: SavedAdapter, *, ignore_mismatch: bool, where: Any,
               base_fingerprint: str | None = None) -> None:
    """Refuse ``saved`` unless it was trained on ``base`` (fingerprint) and its label head
    matches its label names; a plain peft folder cannot be verified and only warns.

    ``base_fingerprint``: ``fingerprint(base)`` when the caller keeps it (a base that does not change).
    """
    sidecar = saved.sidecar
    if sidecar is None:
        logger.warning(
            "%s is a plain peft adapter without an adapterkit sidecar: the base it was trained on could not be "
            "verified. If outputs look wrong, check that it was trained on this base.",
            where,
        )
        return
    saved_base = sidecar["base_model"]
    ours = base_fingerprint if base_fingerprint is not None else fingerprint(base)
    problem = check_fit(saved_base["fingerprint"], ours, saved_base.get("id"), base_model_id(base))
    if problem and not ignore_mismatch:
        raise AdapterMismatchError(
            f"The adapter in {where} does not fit this base model: {problem}. "
            "Load the base it was trained on, or pass ignore_mismatch=True to load it anyway."
        )
    if problem:
        logger.warning("Loading %s despite a base mismatch: %s", where, problem)
    heads.check_label_rows(base, saved.tensors, sidecar.get("label_names"), saved.weight_path)


def copy_weights(base: nn.Module, name: str, saved: SavedAdapter, *, strict_heads: bool | None = None) -> None:
    """Copy ``saved``'s tensors into the attached adapter ``name``; every tensor is checked
    against the adapter first, so a refused file copies nothing.

    ``strict_heads`` refuses a file without tensors for a head the adapter trains; by default
    adapterkit's own folders that record heads are strict, plain peft folders keep the base's.
    """
    store = require_store(base)
    impl = saved.strategy
    own_keys = set(impl.state_dict(base, name))
    own = {k: v for k, v in saved.tensors.items() if k in own_keys}
    trained_heads = store.heads.get(name, {}) if impl.trains_label_head else {}
    if strict_heads is None:
        strict_heads = bool((saved.sidecar or {}).get("head_modules"))
    impl.check_state_dict(base, name, own)
    plan = heads.plan_load(trained_heads, saved.tensors, own_keys, saved.weight_path, strict=strict_heads)
    impl.load_state_dict(base, name, own)
    heads.load_plan(plan)


def restore_weights(model: nn.Module, name: str, folder: Path) -> None:
    """Copy the weights saved in ``folder`` into the already loaded adapter ``name`` (resume)."""
    base = unwrap(model)
    record = require_store(base).record(name)
    saved = read_folder(Path(folder))  # every check a load makes; the record says what the tensors belong to
    saved = dataclasses.replace(saved, strategy=default_registry.get(record.strategy)(), config=record.config)
    copy_weights(base, name, saved, strict_heads=True)


def _weight_path(folder: Path) -> Path:
    path = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if path is None:
        raise AdapterFormatError(f"{folder} has no adapter weights ({' or '.join(WEIGHT_FILES)}).")
    return path
