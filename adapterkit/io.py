"""Files that survive crashes: safetensors written through a rename, folders installed atomically.

A folder is built under a temporary name beside its destination (``.<name>.tmp-<pid>-<random>``)
and swapped into place in one step, so a reader or a process killed at any instant sees the
old folder or the new one, never half of one. Writers into one parent serialise on
:func:`locked`; :func:`recover` cleans up after writers that died.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save_file

from adapterkit.errors import AdapterFormatError

logger = logging.getLogger(__name__)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors through a temporary file renamed into place."""
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
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError / OSError kinds
        raise AdapterFormatError(
            f"{path} is not a readable safetensors file ({err}). It is corrupt or truncated: "
            "save or download the adapter again."
        ) from err


#: Weight files up to this size are read into memory once, hashed and parsed from the same bytes;
#: larger ones (full fine-tunes) are hashed in blocks and memory-mapped, so a load never holds
#: two copies of a multi-GB file.
IN_MEMORY_BYTES = 256 << 20


class HashedFile:
    """A file's size and sha256, with its bytes when they were small enough to keep.

    The hash is taken on a worker thread (hashlib releases the GIL), so parsing the bytes
    overlaps with it; :attr:`sha256` waits for it.
    """

    def __init__(self, path: Path, data: bytes | None, size: int) -> None:
        self.path = path
        self.data = data
        self.size = size
        self._digest: list[str] = []
        source = (lambda: hashlib.sha256(data).hexdigest()) if data is not None else (lambda: sha256_file(path))
        self._hashing = threading.Thread(target=lambda: self._digest.append(source()), daemon=True,
                                         name="adapterkit-hash")
        self._hashing.start()

    @property
    def sha256(self) -> str:
        """The sha256 hex digest of the bytes read (waits for the hashing thread)."""
        self._hashing.join()
        if not self._digest:  # the file vanished or became unreadable while it was hashed
            raise AdapterFormatError(f"{self.path} could not be read to check its sha256; load it again.")
        return self._digest[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Parse it as safetensors, from the very bytes that are hashed when they were kept."""
        if self.data is None:
            return read_safetensors(self.path)
        try:
            return load(self.data)
        except Exception as err:  # safetensors raises its own SafetensorError kinds
            raise AdapterFormatError(
                f"{self.path} is not a readable safetensors file ({err}). It is corrupt or truncated: "
                "save or download the adapter again."
            ) from err


def hashed_file(path: Path) -> HashedFile:
    """Read ``path`` once for its sha256, keeping the bytes up to :data:`IN_MEMORY_BYTES`.

    Parsing the kept bytes means the tensors loaded are the bytes that were checked (a second
    read could see others) and the file is read once instead of twice.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > IN_MEMORY_BYTES:
        return HashedFile(path, None, size)
    data = path.read_bytes()
    return HashedFile(path, data, len(data))


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def step(name: str) -> None:
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


def exchange(a: Path, b: Path) -> bool:
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
def locked(parent: Path):
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


def fsync(path: Path, *, directory: bool = False) -> None:
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


def install(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` at ``path``, replacing what is there in one step."""
    for file in tmp.rglob("*"):
        if file.is_file():
            fsync(file)
    fsync(tmp, directory=True)
    step("installing")
    if not os.path.lexists(path):
        os.rename(tmp, path)
        step("renamed")
    elif exchange(tmp, path):
        step("exchanged")
        fsync(path.parent, directory=True)
        shutil.rmtree(tmp)  # the old adapter, now under the temporary name
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
        os.rmdir(aside)
        os.rename(path, aside)
        step("moved-aside")
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(aside, path)
            raise
        step("renamed")
        fsync(path.parent, directory=True)
        shutil.rmtree(aside)
    fsync(path.parent, directory=True)
    step("done")


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


def stale_siblings(path: Path) -> list[tuple[str, Path]]:
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


def recover_locked(path: Path, is_complete: Callable[[Path], bool]) -> bool:
    """Like :func:`recover`, for a caller that already holds :func:`locked` on ``path.parent``."""
    restored = False
    stale = stale_siblings(path)
    if not os.path.lexists(path):
        # Newest first: the copy renamed aside by the last killed save.
        olds = sorted((p for kind, p in stale if kind == "old"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in olds:
            if is_complete(old):
                os.rename(old, path)
                logger.warning("Recovered %s from %s, left by an interrupted save.", path, old.name)
                restored = True
                break
    for _, sibling in stale:
        if sibling.exists() and sibling != path:
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
    return restored


def recover(path: str | os.PathLike, is_complete: Callable[[Path], bool]) -> bool:
    """Put back a folder that a killed :func:`writing_folder` left renamed aside (the newest copy
    ``is_complete`` accepts), and remove dead writers' leftovers. Returns whether one was restored."""
    path = Path(path)
    if not path.parent.is_dir() or not path.name or not stale_siblings(path):
        return False
    with locked(path.parent):
        return recover_locked(path, is_complete)


@contextlib.contextmanager
def writing_folder(path: Path, *, prepare: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block ends normally it replaces
    ``path`` atomically (:func:`install`), when it raises it is removed and ``path`` is untouched.

    ``prepare(path)`` runs first, under the same lock (e.g. to refuse a destination).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        if prepare is not None:
            prepare(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        try:
            yield tmp
            install(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
