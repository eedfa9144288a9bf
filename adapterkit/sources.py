"""What a name the user typed refers to: a local folder or file, a Hub repo id, or an alias.

Adapters, base models and datasets are all named the same way on the command line and in
Python, so one function decides, and every caller gives the same answer for the same string:

1. an alias the caller knows (an embedded model, a bundled dataset), typed as a bare name, is
   that alias: ``"sst2"`` means the bundled set even where a folder ``sst2/`` happens to be in
   the current directory (write ``./sst2`` for the folder);
2. an existing path is local (a folder or a file);
3. a string that reads as a path (``./x``, ``~/x``, ``a/b/c``, ``x.csv``, ``C:\\x``) but does
   not exist is a missing path, never a Hub request;
4. anything else must be a valid Hub repo id (``huggingface_hub.utils.validate_repo_id``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from adapterkit.errors import AdapterKitError, InvalidOptionError

#: Suffixes that mark a string as a file name, so a typo in one is not sent to the Hub.
FILE_SUFFIXES = frozenset(
    {".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".yaml", ".yml", ".safetensors", ".bin", ".pt",
     ".pth", ".ckpt", ".gguf", ".arrow", ".xlsx", ".xls", ".gz", ".zip", ".bz2", ".xz", ".zst"}
)

_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")  # C:\data or C:/data


@dataclass(frozen=True)
class Source:
    """Where a named thing lives.

    ``kind`` is ``"folder"`` or ``"file"`` (``path`` set), ``"hub"`` (``repo_id`` set) or
    ``"alias"`` (``alias`` set); ``text`` is what the caller passed.
    """

    kind: Literal["folder", "file", "hub", "alias"]
    text: str
    path: Path | None = None
    repo_id: str | None = None
    alias: str | None = None

    @property
    def is_local(self) -> bool:
        """Whether the source is a folder or file on this machine."""
        return self.kind in ("folder", "file")


def looks_like_path(text: str) -> bool:
    """Whether ``text`` is written as a path rather than a Hub repo id (``owner/name``)."""
    return (
        text.startswith((".", "/", "~", "\\"))
        or "\\" in text
        or bool(_DRIVE.match(text))
        or text.count("/") > 1
        or Path(text).suffix.lower() in FILE_SUFFIXES
    )


def resolve_source(
    source: str | os.PathLike,
    *,
    what: str,
    aliases: Collection[str] = (),
    error: type[AdapterKitError] = InvalidOptionError,
) -> Source:
    """Decide what ``source`` names, or raise ``error`` saying why it names nothing.

    Args:
        source: a path (``str`` or ``os.PathLike``), a Hub repo id, or one of ``aliases``.
        what: the noun used in messages (``"adapter"``, ``"model"``, ``"dataset"``).
        aliases: names the caller resolves itself. A bare name equal to one is that alias, before
            any path or Hub lookup; an ``os.PathLike`` is always a path.
        error: the exception class to raise, so each caller keeps its own error type.

    Raises:
        ``error``: ``source`` is not a string or path, is empty, is a path that does not exist, or
            is neither a path nor a valid Hub repo id.
    """
    if isinstance(source, os.PathLike):
        text, written_as_path = os.fsdecode(os.fspath(source)), True
    elif isinstance(source, str):
        text, written_as_path = source, False
    else:
        raise error(
            f"The {what} must be named by a path or a Hub repo id (a string), got {type(source).__name__} "
            f"{source!r:.60}."
        )
    if not text.strip():
        raise error(f"The {what} name is empty: pass a local path or a Hub repo id ('owner/name').")
    if not written_as_path and text in aliases:
        return Source("alias", text, alias=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return Source("folder", text, path=path)
    if path.exists():
        return Source("file", text, path=path)
    if written_as_path or looks_like_path(text):
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise error(
            f"No such {what}: the path {text} does not exist{where}, and it is not a Hub repo id either "
            "(those read 'owner/name'). Check the path."
        )
    try:
        validate_repo_id(text)
    except HFValidationError as err:
        known = f" or one of {sorted(aliases)}" if aliases else ""
        raise error(
            f"{text!r} is neither an existing path nor a valid Hub repo id{known}: {str(err).splitlines()[0]}"
        ) from err
    return Source("hub", text, repo_id=text)
