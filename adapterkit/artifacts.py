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

import contextlib
import ctypes
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from adapterkit.config import FORMAT_VERSION
from adapterkit.errors import (
    AdapterExistsError,
    AdapterFormatError,
    AdapterKitError,
    AdapterMismatchError,
    AdapterNotFoundError,
    InvalidOptionError,
)
from adapterkit.fingerprint import check_fit, fingerprint
from adapterkit.quantized import quantization_of

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
    from adapterkit.models import embedded_alias

    return (embedded_alias(model_id) if model_id else None) or model_id


def _card_base_model(model_id: str | None) -> str | None:
    """The Hub id for the card's ``base_model`` lineage (an embedded alias stands for its source checkpoint)."""
    from adapterkit.models import EMBEDDED_MODELS

    entry = EMBEDDED_MODELS.get(model_id) if model_id else None
    model_id = entry.model_id if entry else model_id
    return model_id if model_id and "/" in model_id and not os.path.isabs(model_id) else None


def _card(sidecar: dict[str, Any]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    metrics = card_metrics(sidecar.get("metrics") or {})
    data = ModelCardData(
        base_model=_card_base_model(sidecar["base_model"].get("id")),
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
        f"model, tokenizer = ak.load_base({_load_name(sidecar['base_model'].get('id'))!r}" + (f", task={sidecar['task']!r}" if sidecar.get("task") else "") + ")",
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
    if path.name in ("", ".", ".."):
        raise InvalidOptionError(
            f"Cannot save an adapter to {str(path)!r}: name the folder to write (e.g. 'runs/my-adapter')."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        _recover_locked(path)
        _check_destination(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        try:
            _step("writing")
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
                "metrics": record.meta.get("metrics", {}),
                "recipe": record.meta.get("recipe"),
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
            _install(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("Saved adapter '%s' (%s) to %s", name, record.strategy, path)
    return path


# --- installing a folder atomically, and recovering from a killed save -----------------
# A save builds `.<name>.tmp-<pid>-<random>` beside the destination and swaps it in with one
# atomic directory exchange (Linux renameat2 RENAME_EXCHANGE), so the path always holds the
# old adapter or the new one. Where the exchange is unavailable the old folder is renamed
# aside to `.<name>.old-<pid>-<random>` first; a save killed between the two renames leaves
# that copy stranded, and the next save, load or :func:`recover` puts it back. Leftovers of
# dead writers (the pid in the name) are removed under the same lock.
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
#: Tests turn this off to exercise the rename-aside path on Linux too.
_USE_EXCHANGE = True
#: Tests set this to a callable to pause or kill a save at each named step.
_STEP_HOOK = None


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b``; False where the OS or filesystem cannot."""
    if _renameat2 is None or not _USE_EXCHANGE:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def _locked(parent: Path):
    """Hold an exclusive lock on the folder ``parent`` so saves into it serialise across processes.

    The lock is flock on the directory itself: no lock file is left behind, and the kernel
    drops it when a holder dies.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; saves still install atomically
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync(path: Path, *, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _install(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` at ``path``, replacing what is there in one step."""
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(tmp, directory=True)
    _step("installing")
    if not os.path.lexists(path):
        os.rename(tmp, path)
        _step("renamed")
    elif _exchange(tmp, path):
        _step("exchanged")
        _fsync(path.parent, directory=True)
        shutil.rmtree(tmp)  # the old adapter, now under the temporary name
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
        os.rmdir(aside)
        os.rename(path, aside)
        _step("moved-aside")
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(aside, path)
            raise
        _step("renamed")
        _fsync(path.parent, directory=True)
        shutil.rmtree(aside)
    _fsync(path.parent, directory=True)
    _step("done")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # under the lock no other save of this process is writing this path
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _stale_siblings(path: Path) -> list[tuple[str, Path]]:
    """(``"tmp"``/``"old"``, sibling) of ``path`` left by saves whose process is gone."""
    out = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return out
    for entry in names:
        for kind in ("tmp", "old"):
            prefix = f".{path.name}.{kind}-"
            match = re.fullmatch(r"(\d+)(?:-.*)?", entry[len(prefix):]) if entry.startswith(prefix) else None
            if match and not _pid_alive(int(match.group(1))):
                out.append((kind, path.parent / entry))
    return out


def _is_complete(folder: Path) -> bool:
    try:
        sidecar = read_sidecar(folder)
        if sidecar is None:
            return False
        _verified_manifest(folder, sidecar)
        return True
    except (AdapterKitError, OSError):
        return False


def _recover_locked(path: Path) -> bool:
    restored = False
    stale = _stale_siblings(path)
    if not os.path.lexists(path):
        # Newest first: the copy renamed aside by the last killed save.
        olds = sorted((p for kind, p in stale if kind == "old"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in olds:
            if _is_complete(old):
                os.rename(old, path)
                logger.warning("Recovered the adapter at %s from %s, left by an interrupted save.", path, old.name)
                restored = True
                break
    for _, sibling in stale:
        if sibling.exists() and sibling != path:
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
    return restored


def recover(path: str | os.PathLike) -> bool:
    """Put back an adapter that a killed :func:`save` left renamed aside, and remove dead saves' leftovers.

    :func:`save` and :func:`load_folder` call it; call it yourself before testing whether an
    adapter folder exists. Returns whether an adapter was restored at ``path``.
    """
    path = Path(path)
    if not path.parent.is_dir() or not path.name or not _stale_siblings(path):
        return False
    with _locked(path.parent):
        return _recover_locked(path)


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in ``folder`` except the sidecar, by relative name."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != SIDECAR:
            out[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return out


def _verified_manifest(
    folder: Path, sidecar: dict[str, Any], *, enforce_card: bool = True
) -> dict[str, dict[str, Any]]:
    """The sidecar's manifest after checking every listed file against its size and sha256.

    Legacy sidecars (no manifest) get one computed from the known file names present.
    """
    manifest = sidecar.get("manifest")
    if manifest is None:
        return {n: {"size": (folder / n).stat().st_size, "sha256": _sha256(folder / n)}
                for n in LEGACY_FILES if n != SIDECAR and (folder / n).is_file()}
    changed = []
    for rel, entry in manifest.items():
        path = folder / rel
        if not path.is_file():
            raise AdapterFormatError(
                f"{folder} is missing '{rel}', which adapterkit.save wrote there. The folder is incomplete: "
                "save or download the adapter again."
            )
        if not enforce_card and rel in EDITABLE_FILES:
            continue
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
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
    manifest = _verified_manifest(folder, sidecar, enforce_card=False)
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
    from adapterkit.registry import default_registry

    if sidecar is not None:
        cls = default_registry.get(sidecar["strategy"])
        try:
            config = cls.config_cls.from_dict(sidecar.get("options", {}), strict=False)
        except InvalidOptionError as err:
            raise AdapterFormatError(f"The field 'options' of {folder / SIDECAR} is invalid: {err}") from err
        return cls(), config
    for strategy_name in default_registry.list():
        try:
            impl = default_registry.get(strategy_name)()
        except Exception:  # a broken plugin cannot claim a folder
            continue
        try:
            config = impl.config_from_files(folder)
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as err:
            raise AdapterFormatError(
                f"{folder} has a broken adapter_config.json ({type(err).__name__}: {err}); the '{strategy_name}' "
                "strategy cannot read it. Save or download the adapter again."
            ) from err
        if config is not None:
            return impl, config
    raise AdapterFormatError(
        f"{folder} is not an adapter: it has no {SIDECAR} and no adapter_config.json that an installed strategy "
        "can read. Save adapters with adapterkit.save() or peft's save_pretrained()."
    )


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
        if not _all_finite(value):
            bad = int((~torch.isfinite(value)).sum())
            message = (
                f"Tensor '{key}' in {path} holds {bad} NaN/inf value(s) of {value.numel()}: the training that wrote it "
                "diverged or the file is damaged."
            )
            if not allow_nonfinite:
                raise AdapterFormatError(message + " Retrain it, or pass allow_nonfinite=True to load it anyway.")
            logger.warning("%s Loading it anyway (allow_nonfinite=True).", message)


def _check_label_rows(base: nn.Module, tensors: dict[str, torch.Tensor], label_names: Any, path: Path) -> None:
    """A classifier's output rows must match the label names the sidecar records."""
    from adapterkit.targets import head_paths, is_vocab_head

    if not isinstance(label_names, list):
        return
    for head in head_paths(base):
        if is_vocab_head(base, head):
            continue
        module = base.get_submodule(head)
        linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            continue
        out = f"{head}.{linears[-1]}" if linears[-1] else head
        for leaf in ("weight", "bias"):
            for key in (f"{out}.{leaf}", f"{PEFT_PREFIX}{out}.{leaf}"):
                value = tensors.get(key)
                if value is not None and value.dim() >= 1 and value.shape[0] != len(label_names):
                    raise AdapterFormatError(
                        f"Head tensor '{key}' in {path} has {value.shape[0]} output rows but the sidecar names "
                        f"{len(label_names)} labels ({', '.join(label_names[:6])}). The adapter is inconsistent: "
                        "save it again."
                    )


class _ModelState:
    """What a failed load must put back besides the adapter record: trainability and label names."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.grad = [(p, p.requires_grad) for p in base.parameters()]
        config = getattr(base, "config", None)
        self.labels = {k: getattr(config, k, None) for k in ("id2label", "label2id")} if config is not None else {}

    def restore(self) -> None:
        for p, flag in self.grad:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for key, value in self.labels.items():
            setattr(self.base.config, key, value)


def load_folder(
    model: nn.Module,
    folder: Path,
    *,
    name: str | None = None,
    ignore_mismatch: bool = False,
    source: str | None = None,
    allow_nonfinite: bool = False,
    manifest_checked: bool = False,
) -> str:
    """Load the adapter in ``folder`` onto ``model``, all or nothing; returns the adapter's name.

    ``manifest_checked``: the caller has just verified the files against the manifest (a Hub
    download does), so their bytes are not hashed a second time.

    Everything is checked before any weight is copied: the sidecar's fields, the files'
    bytes against its manifest, symlinks, each tensor's dtype, values, shape and presence,
    the label head against the label names, and the base's fingerprint. A failure leaves the
    model as it was (no record, same active adapter, base weights untouched) and raises the
    reason.

    Args:
        allow_nonfinite: load tensors holding NaN/inf with a warning instead of refusing.
    """
    from adapterkit.api import _discard, activate, attach_config, get_active_adapter
    from adapterkit.state import freeze_all_but, get_store, unwrap

    base = unwrap(model)
    folder = Path(folder)
    where = source or folder
    try:
        recover(folder)
    except OSError as err:  # e.g. a read-only parent: load what is there, if anything
        logger.warning("Could not recover an interrupted save at %s: %s", folder, err)
    if not folder.is_dir():
        raise AdapterNotFoundError(f"{folder} is not a folder with a saved adapter.")
    _refuse_outside_links(folder)
    _refuse_pickle(folder)
    sidecar = read_sidecar(folder)
    if sidecar is not None and not manifest_checked:
        _verified_manifest(folder, sidecar, enforce_card=False)
    impl, config = _identify(folder, sidecar)
    weight_path = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weight_path is None:
        raise AdapterFormatError(f"{folder} has no adapter weights ({' or '.join(WEIGHT_FILES)}).")
    tensors = read_safetensors(weight_path)
    _check_tensors(tensors, weight_path, allow_nonfinite=allow_nonfinite)
    if sidecar is not None:
        saved_base = sidecar["base_model"]
        problem = check_fit(saved_base["fingerprint"], fingerprint(base), saved_base.get("id"), base_model_id(base))
        if problem and not ignore_mismatch:
            raise AdapterMismatchError(
                f"The adapter in {where} does not fit this base model: {problem}. "
                "Load the base it was trained on, or pass ignore_mismatch=True to load it anyway."
            )
        if problem:
            logger.warning("Loading %s despite a base mismatch: %s", where, problem)
        _check_label_rows(base, tensors, sidecar.get("label_names"), weight_path)
    else:
        logger.warning(
            "%s is a plain peft adapter without an adapterkit sidecar: the base it was trained on could not be "
            "verified. If outputs look wrong, check that it was trained on this base.",
            where,
        )
    name = name or (sidecar or {}).get("name") or "default"
    meta = {
        "source": str(where),
        "task": (sidecar or {}).get("task"),
        "label_names": (sidecar or {}).get("label_names"),
        "metrics": (sidecar or {}).get("metrics", {}),
        "recipe": (sidecar or {}).get("recipe"),
        "quantization": (sidecar or {}).get("quantization"),
        "base_fingerprint": (sidecar or {}).get("base_model", {}).get("fingerprint"),
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    previous = get_active_adapter(base)
    saved_state = _ModelState(base)
    try:
        attach_config(base, impl, config, name, meta=meta)
    except Exception as err:
        if isinstance(err, AdapterKitError) or not isinstance(err, ValueError):
            raise
        raise AdapterMismatchError(f"The adapter in {where} cannot be attached to this model: {err}") from err
    try:
        strict = bool((sidecar or {}).get("head_modules"))
        _restore(base, get_store(base), impl, name, tensors, weight_path, strict_heads=strict)
    except BaseException:
        try:
            _discard(base, name, previous)
            saved_state.restore()
        except Exception:  # the load's own error is the one to report
            logger.exception("Cleaning up after the failed load of %s failed too", where)
        raise
    freeze_all_but(base, [])  # a loaded adapter is for inference until train() says otherwise
    activate(base, name)
    return name


def _restore(
    base: nn.Module, store, impl, name: str, tensors: dict[str, torch.Tensor], path: Path, *, strict_heads: bool = True
) -> None:
    """Check every tensor against adapter ``name``, then copy them all (nothing is copied on a failure)."""
    own_keys = set(impl.state_dict(base, name))
    own = {k: v for k, v in tensors.items() if k in own_keys}
    heads = store.heads.get(name, {}) if impl.trains_label_head else {}
    impl.check_state_dict(base, name, own)
    plan = _plan_heads(heads, tensors, own_keys, path, strict=strict_heads)
    impl.load_state_dict(base, name, own)
    for module, leaf, value in plan:
        _resize_linear(module, leaf, value)
        param = getattr(module, leaf)
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))


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
    sidecar = read_sidecar(folder)
    if sidecar is not None:
        _verified_manifest(folder, sidecar, enforce_card=False)
    tensors = read_safetensors(weight_path)
    _check_tensors(tensors, weight_path, allow_nonfinite=False)
    _restore(base, store, impl, name, tensors, weight_path)


def _resize_linear(module: nn.Module, key: str, value: torch.Tensor) -> None:
    """Give a label head the class count of the saved one (e.g. a 6-way head on a 2-way base)."""
    if not isinstance(module, nn.Linear) or key not in ("weight", "bias"):
        return
    current = getattr(module, key)
    if current is None or current.shape == value.shape or current.shape[1:] != value.shape[1:]:
        return
    setattr(module, key, nn.Parameter(torch.empty_like(value, device=current.device, dtype=current.dtype)))
    module.out_features = value.shape[0]


def _plan_heads(
    heads: dict[str, nn.Module], tensors: dict[str, torch.Tensor], own: set[str], path: Path, *, strict: bool
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, parameter name, value) for every head tensor, after checking them all.

    A head module the file has tensors for must be complete (a missing bias is refused, not
    kept from the base). ``strict`` (adapterkit's own files) also refuses a head with no
    tensors at all; plain peft files without ``modules_to_save`` keep the base's head.
    """
    rest = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items() if k not in own}
    plan: list[tuple[nn.Module, str, torch.Tensor]] = []
    loaded: set[str] = set()
    empty = []
    for hpath, module in sorted(heads.items()):
        mine = {k[len(hpath) + 1 :]: v for k, v in rest.items() if k.startswith(hpath + ".")}
        if not mine:
            empty.append(hpath)
            continue
        params = dict(module.named_parameters())
        missing = sorted(set(params) - set(mine))
        if missing:
            raise AdapterMismatchError(
                f"{path} has an incomplete head '{hpath}': no tensor for {', '.join(f'{hpath}.{m}' for m in missing)}. "
                "adapterkit does not fill head weights from the base: save the adapter again."
            )
        for pname, value in sorted(mine.items()):
            if pname not in params:
                continue  # reported below as a tensor with no place
            owner, _, leaf = pname.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            param = params[pname]
            resizable = (
                isinstance(target, nn.Linear) and leaf in ("weight", "bias") and param.shape[1:] == value.shape[1:]
            )
            if param.shape != value.shape and not resizable:
                raise AdapterMismatchError(
                    f"Head tensor '{hpath}.{pname}' in {path} has shape {tuple(value.shape)}, the model's "
                    f"{tuple(param.shape)}."
                )
            plan.append((target, leaf, value))
            loaded.add(f"{hpath}.{pname}")
    unknown = sorted(set(rest) - loaded)
    if unknown:
        raise AdapterMismatchError(f"{path} has tensors this model has no place for: {unknown[:3]}.")
    resized = {(id(m), leaf): v.shape[0] for m, leaf, v in plan if isinstance(m, nn.Linear)}
    for m, leaf, v in plan:
        other = "bias" if leaf == "weight" else "weight"
        if isinstance(m, nn.Linear) and (id(m), other) in resized and resized[(id(m), other)] != v.shape[0]:
            raise AdapterMismatchError(
                f"{path}: the weight and bias of head layer {leaf!r} disagree on the number of outputs."
            )
    if empty and strict:
        raise AdapterMismatchError(
            f"{path} has no tensors for the task head {', '.join(empty)} that this adapter trains. The file is "
            "incomplete: save the adapter again."
        )
    if empty:
        logger.warning(
            "%s carries no weights for the task head %s; it keeps the base's head. Plain peft adapters need "
            "modules_to_save for a trained classifier.",
            path,
            empty,
        )
    return plan
