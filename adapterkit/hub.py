"""Publishing adapters to the Hugging Face Hub and downloading them, through huggingface_hub.

Uploads go in one commit that holds exactly the files ``save`` wrote (and removes the files of
the adapter it replaces); downloads use the Hub cache, so an adapter once fetched loads offline
(``HF_HUB_OFFLINE=1``) and, when the Hub is down or stalls, from the cached copy.

Every network call is bounded: the Hub must make progress at least every ``timeout`` seconds
(default 30, ``ADAPTERKIT_HUB_TIMEOUT``), counted across retries. Transient answers (5xx, 429,
broken connections) are retried a few times with backoff, honouring ``Retry-After`` when it fits
in that budget; other 4xx are never retried. Failures are told apart: no access, no such repo or
revision, the Hub failed, or the Hub cannot be reached.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import set_client_factory, validate_repo_id
from torch import nn

from adapterkit.artifacts import SIDECAR, adapter_files, save
from adapterkit.compat.huggingface_hub import client_factory
from adapterkit.errors import AdapterFormatError, AdapterKitError, AdapterNotFoundError, HubError, InvalidOptionError, exception_chain

logger = logging.getLogger(__name__)

#: Files an adapter folder may hold; anything else (pickles above all) is never fetched.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "README.md"]
#: What a repo's previous adapter consists of when it has no sidecar to say so.
KNOWN_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter.safetensors", "adapterkit.json",
                       "README.md")
DEFAULT_TIMEOUT = 30.0
TIMEOUT_ENV = "ADAPTERKIT_HUB_TIMEOUT"
#: Attempts per step (the first one included) for transient failures.
MAX_ATTEMPTS = 4
#: Backoff before the n-th retry: BACKOFF_BASE * 2**(n-1), at most BACKOFF_CAP, with jitter.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 4.0
# 408 and 429 are the client's "try again", 5xx the Hub's (as huggingface_hub's own backoff).
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")
_sleep = time.sleep  # the backoff's wait; the test suite makes it instant (tests/hub_fixtures.py)


class PublishResult(str):
    """What :func:`publish` did; the string itself is the commit URL (so old callers keep working).

    Attributes:
        commit_url: the URL of the commit.
        repo_id: the repo published to.
        revision: the branch committed on.
        files: the files uploaded, relative to the adapter folder.
        deleted: files of the repo's previous adapter that the commit removed.
        private: the repo's visibility as the Hub reports it (None if the Hub did not say).
    """

    commit_url: str
    repo_id: str
    revision: str
    files: list[str]
    deleted: list[str]
    private: bool | None

    def __new__(cls, commit_url: str, *, repo_id: str, revision: str, files: list[str], deleted: list[str],
                private: bool | None) -> PublishResult:
        self = super().__new__(cls, commit_url)
        self.commit_url, self.repo_id, self.revision = str(commit_url), repo_id, revision
        self.files, self.deleted, self.private = list(files), list(deleted), private
        return self


def resolve_timeout(timeout: float | None = None) -> float:
    """The Hub timeout in seconds: ``timeout``, else ``$ADAPTERKIT_HUB_TIMEOUT``, else 30."""
    source = "timeout="
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT
        source = f"{TIMEOUT_ENV}="
        try:
            timeout = float(raw)
        except ValueError:
            raise InvalidOptionError(f"{source}{raw!r} is not a number of seconds; set it to e.g. 30.") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise InvalidOptionError(f"{source}{timeout!r} is not a positive number of seconds; pass e.g. 30.")
    return float(timeout)


# --- bounded waits: hooks on huggingface_hub's HTTP client, active only inside a scope --------
class _HubTimeout(Exception):
    """The Hub made no progress within the budget (raised from a client hook, so never retried)."""

    def __init__(self, timeout: float, url: str, retry_after: float | None = None) -> None:
        self.timeout, self.url, self.retry_after = timeout, url, retry_after
        detail = f"it asked to retry after {retry_after:g} s" if retry_after is not None else "no progress"
        super().__init__(f"{detail} within {timeout:g} s ({url})")


class _Scope:
    """One publish/download call: its budget, and since when each request has waited for progress."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.waiting: dict[tuple[str, str], float] = {}  # (method, url) -> last progress
        self.lock = threading.Lock()

    def remaining(self, key: tuple[str, str], now: float) -> float:
        with self.lock:
            since = self.waiting.setdefault(key, now)
        return since + self.timeout - now

    def progressed(self, key: tuple[str, str], done: bool = False) -> None:
        with self.lock:
            if done:
                self.waiting.pop(key, None)
            else:
                self.waiting[key] = time.monotonic()


class _ProgressStream(httpx2.SyncByteStream):
    """A response body that tells its scope about every chunk, and when it arrived whole."""

    def __init__(self, inner: httpx2.SyncByteStream, scope: _Scope, key: tuple[str, str]) -> None:
        self.inner, self.scope, self.key = inner, scope, key

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.scope.progressed(self.key)
            yield chunk
        self.scope.progressed(self.key, done=True)

    def close(self) -> None:
        self.inner.close()


_CURRENT: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("adapterkit_hub_scope", default=None)
_SCOPES: list[_Scope] = []
_INSTALL_LOCK = threading.Lock()
_installed: dict[str, Any] = {}


def _active_scope() -> _Scope | None:
    # huggingface_hub downloads and uploads in worker threads, which do not inherit context
    # variables: those fall back to the newest scope of the process.
    scope = _CURRENT.get()
    if scope is None and _SCOPES:
        scope = _SCOPES[-1]
    return scope


def _request_key(request: httpx2.Request) -> tuple[str, str]:
    return request.method, str(request.url)


def _on_request(request: httpx2.Request) -> None:
    scope = _active_scope()
    if scope is None:
        return
    remaining = scope.remaining(_request_key(request), time.monotonic())
    if remaining <= 0:
        raise _HubTimeout(scope.timeout, str(request.url))
    # huggingface_hub sends most API calls with no timeout at all; keep its shorter ones (HEAD: 10 s).
    current = request.extensions.get("timeout") or {}
    bounded = {k: remaining if current.get(k) is None else min(current[k], remaining)
               for k in ("connect", "read", "write", "pool")}
    request.extensions = {**request.extensions, "timeout": bounded}


def _on_response(response: httpx2.Response) -> None:
    scope = _active_scope()
    if scope is None:
        return
    key = _request_key(response.request)
    if response.status_code in RETRY_STATUSES:
        retry_after = _retry_after(response.headers)
        # huggingface_hub sleeps Retry-After + 1 s before its own retries, however long it is.
        if retry_after is not None and retry_after + 1 > scope.remaining(key, time.monotonic()):
            raise _HubTimeout(scope.timeout, str(response.request.url), retry_after)
        return
    response.stream = _ProgressStream(response.stream, scope, key)


def _hooked_factory(previous: Callable[[], httpx2.Client]) -> Callable[[], httpx2.Client]:
    def factory() -> httpx2.Client:
        client = previous()
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks.get("request", []), _on_request],
                              "response": [*hooks.get("response", []), _on_response]}
        return client

    return factory


@contextlib.contextmanager
def _bounded(timeout: float) -> Iterator[_Scope]:
    """Bound every request huggingface_hub sends inside the block by ``timeout`` (see module doc).

    The hooks go onto huggingface_hub's client through its public client factory, wrapped around
    whatever factory was set before, and the previous factory is restored when the last block
    ends. While a block runs, requests of other code in the process are bounded too.
    """

    scope = _Scope(timeout)
    with _INSTALL_LOCK:
        if not _SCOPES:
            previous = client_factory()
            _installed["previous"], _installed["ours"] = previous, _hooked_factory(previous)
            set_client_factory(_installed["ours"])
        _SCOPES.append(scope)
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        _CURRENT.reset(token)
        with _INSTALL_LOCK:
            _SCOPES.remove(scope)
            # Someone may have set their own factory meanwhile: leave theirs alone.
            if not _SCOPES and client_factory() is _installed.get("ours"):
                set_client_factory(_installed["previous"])
            if not _SCOPES:
                _installed.clear()


# --- retries ---------------------------------------------------------------------------------
def _retry_after(headers: Any) -> float | None:
    value = (headers.get("Retry-After") or "").strip() if headers is not None else ""
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP-date: treated like no hint (our own backoff applies)
    return seconds if seconds >= 0 else None


def _status(err: BaseException) -> int | None:

    if isinstance(err, hf_errors.HfHubHTTPError) and err.response is not None:
        return err.response.status_code
    return None


def _cut_short(err: BaseException) -> bool:
    # huggingface_hub reports a body shorter than announced as a bare OSError; its message is the only mark.
    return type(err) is OSError and str(err).startswith("Consistency check failed")


def _transient(err: BaseException) -> tuple[bool, float | None]:
    """Whether ``err`` is worth retrying, and the wait the Hub asked for (Retry-After)."""

    for e in exception_chain(err):
        if isinstance(e, (_HubTimeout, hf_errors.OfflineModeIsEnabled, AdapterKitError)):
            return False, None
        if isinstance(e, hf_errors.HfHubHTTPError) and e.response is not None:
            status = e.response.status_code
            return status in RETRY_STATUSES, _retry_after(e.response.headers)
        if isinstance(e, httpx2.TimeoutException):
            # Each request may wait the whole budget (see _on_request): a timeout means it is spent.
            return False, None
        if isinstance(e, httpx2.TransportError) and not isinstance(e, (httpx2.ProxyError, httpx2.UnsupportedProtocol)):
            return True, None
        if _cut_short(e):
            return True, None
    return False, None


def _retrying(call: Callable[[], T], scope: _Scope, what: str) -> T:
    """``call()``, retried on transient failures: at most MAX_ATTEMPTS, within the scope's budget."""
    attempt, failing_since = 0, None
    while True:
        attempt += 1
        try:
            return call()
        except Exception as err:
            retry, asked = _transient(err)
            if not retry or attempt >= MAX_ATTEMPTS:
                raise
            # The budget counts from the first failure: a long upload that then fails still gets retries.
            failing_since = failing_since or time.monotonic()
            wait = asked if asked is not None else min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
            if asked is None:
                wait *= random.uniform(0.8, 1.2)  # jitter: many clients failing together retry apart
            if time.monotonic() + wait - failing_since > scope.timeout:
                raise
            logger.info("%s: %s; retrying in %.1f s (attempt %d of %d).", what, _reason(err), wait, attempt + 1,
                        MAX_ATTEMPTS)
            _sleep(wait)


# --- telling failures apart ------------------------------------------------------------------
def _tokens(token: str | None) -> list[str]:

    found = [t for t in (token, os.environ.get("HF_TOKEN"), get_token()) if isinstance(t, str) and len(t) >= 4]
    return sorted(set(found), key=len, reverse=True)


def _redact(text: str, tokens: list[str]) -> str:
    for secret in tokens:
        text = text.replace(secret, "***")
    return text


def _reason(err: BaseException) -> str:
    """A one-line reason: the HTTP status and the Hub's message, or the transport error."""
    for e in exception_chain(err):
        status = _status(e)
        if status is not None:
            message = (getattr(e, "server_message", None) or "").strip().splitlines()
            phrase = e.response.reason_phrase or ""
            return f"HTTP {status} {phrase}".strip() + (f": {message[0]}" if message else "")
        if isinstance(e, (httpx2.TransportError, _HubTimeout)) or _cut_short(e):
            text = str(e).strip().splitlines()
            return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _outage(err: BaseException) -> bool:
    """The Hub is down, stalls or keeps failing (not: it answered no)."""

    for e in exception_chain(err):
        if isinstance(e, _HubTimeout):
            return True
        if isinstance(e, hf_errors.HfHubHTTPError) and e.response is not None:
            return e.response.status_code in RETRY_STATUSES
        if isinstance(e, httpx2.TransportError) or _cut_short(e):
            return True
    return False


def _explain(err: BaseException, *, action: str, repo_id: str, revision: str | None, endpoint: str,
             timeout: float, tokens: list[str], publishing: bool = False) -> AdapterKitError:
    """The adapterkit error for a failure of huggingface_hub, classified by exception type."""

    def hub_error(message: str) -> HubError:
        return HubError(_redact(message, tokens))

    reason = _redact(_reason(err), tokens)
    for e in exception_chain(err):
        if isinstance(e, _HubTimeout):
            if e.retry_after is not None:
                return hub_error(f"{action}: the Hub is overloaded and asked to retry after {e.retry_after:g} s, "
                                 f"longer than the {timeout:g} s allowed. Try again later, or allow longer with "
                                 f"timeout= or {TIMEOUT_ENV}.")
            return hub_error(f"{action}: timed out: no answer from {endpoint} within {timeout:g} s, so the Hub is "
                             f"unreachable for now (cannot reach {endpoint}). Check the connection, or allow longer "
                             f"with timeout= or {TIMEOUT_ENV}.")
        if isinstance(e, hf_errors.OfflineModeIsEnabled):
            return hub_error(f"{action}: HF_HUB_OFFLINE=1 forbids network access and the cache has no copy. "
                             "Unset HF_HUB_OFFLINE, or pass a local folder.")
        if isinstance(e, hf_errors.RevisionNotFoundError):
            return AdapterNotFoundError(f"{repo_id} has no revision {revision!r}. Check the branch, tag or commit.")
        if isinstance(e, hf_errors.GatedRepoError):
            return hub_error(f"{repo_id} is gated: accept its terms on the Hub and log in (`hf auth login`).")
        if isinstance(e, hf_errors.RemoteEntryNotFoundError):
            return hub_error(f"{action}: a file the repo lists is missing on the Hub ({reason}). The repo is "
                             "incomplete: publish the adapter again.")
        if isinstance(e, hf_errors.RepositoryNotFoundError):
            if publishing:
                return hub_error(f"{action}: the Hub has no repo {repo_id!r} you may write to ({reason}). Check the "
                                 "id and log in with `hf auth login` as a user with write access.")
            return AdapterNotFoundError(
                f"No adapter repo {repo_id!r} on the Hub (or it is private and no token was given). "
                "Check the id, log in with `hf auth login`, or pass a local folder."
            )
        if isinstance(e, hf_errors.HfHubHTTPError) and e.response is not None:
            status = e.response.status_code
            if status == 401:
                return hub_error(f"{action}: the Hub refused the credentials ({reason}). Log in with `hf auth login` "
                                 "or pass a valid token=.")
            if status == 403:
                return hub_error(f"{action}: you have no access to {repo_id} ({reason}). Log in with `hf auth login` "
                                 "as a user with access, use a token with write permission, or ask the owner.")
            if status == 412:
                return hub_error(f"{action}: {repo_id} changed while publishing (another commit landed first); this "
                                 "call committed nothing. Check the repo and publish again.")
            if status == 429:
                return hub_error(f"{action}: the Hub is rate-limiting requests ({reason}), still after "
                                 f"{MAX_ATTEMPTS} attempts. Wait a few minutes and try again.")
            if status >= 500:
                return hub_error(f"{action}: the Hub failed ({reason}), still after {MAX_ATTEMPTS} attempts. "
                                 "This is on the Hub's side: try again later.")
            return hub_error(f"{action}: the Hub refused the request ({reason}).")
        if isinstance(e, httpx2.TimeoutException):
            return hub_error(f"{action}: timed out: the Hub is unreachable, cannot reach {endpoint} within "
                             f"{timeout:g} s ({reason}). Check the connection, or allow longer with timeout= or "
                             f"{TIMEOUT_ENV}.")
        if isinstance(e, httpx2.RemoteProtocolError) or _cut_short(e):
            return hub_error(f"{action}: the connection to {endpoint} broke off mid-transfer ({reason}), still after "
                             f"{MAX_ATTEMPTS} attempts; nothing incomplete is used. Try again.")
        if isinstance(e, httpx2.TransportError):
            return hub_error(f"{action}: the Hub is unreachable: cannot reach {endpoint} ({reason}). Check the "
                             "connection and HF_ENDPOINT, then try again.")
    return hub_error(f"{action} failed: {reason}")


def _handled(err: BaseException) -> bool:
    """Failures of the Hub or the network, as opposed to bugs, which propagate untouched."""

    return any(isinstance(e, (_HubTimeout, hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled, httpx2.TransportError))
               or _cut_short(e) for e in exception_chain(err))


def _check_repo_id(repo_id: object, doing: str, hint: str = "") -> None:

    try:
        if not isinstance(repo_id, str):
            raise hf_errors.HFValidationError(f"a repo id is a string, not {type(repo_id).__name__}")
        validate_repo_id(repo_id)
    except hf_errors.HFValidationError as err:
        raise InvalidOptionError(f"{doing}: {repo_id!r} is not a Hub repo id ({err}). "
                                 f"Pass an id like 'me/my-adapter'{hint}.") from None


# --- publish ---------------------------------------------------------------------------------
def _checked_files(folder: Path) -> list[str]:
    """The files ``save`` wrote in ``folder``, each a regular file inside it (no link out)."""

    files = adapter_files(folder)
    root = folder.resolve()
    for rel in files:
        path = folder / rel
        if path.is_symlink() or not path.resolve().is_relative_to(root) or not path.is_file():
            raise AdapterFormatError(
                f"{folder} lists {rel!r} as an adapter file, but it is a link or lies outside the folder; "
                "refusing to publish it. Save the adapter again with adapterkit.save()."
            )
    return files


def _previous_adapter(api: Any, repo_id: str, info: Any, scope: _Scope) -> set[str]:
    """The files of the adapter the repo holds now (from its sidecar, else the known names)."""

    present = {s.rfilename for s in (info.siblings or [])}
    previous = set(KNOWN_ADAPTER_FILES)
    if SIDECAR in present:
        path = _retrying(lambda: api.hf_hub_download(repo_id, SIDECAR, revision=info.sha), scope,
                         f"Reading the sidecar of {repo_id}")
        try:
            sidecar = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            sidecar = None
        if isinstance(sidecar, dict):
            manifest = sidecar.get("manifest")
            listed = sidecar.get("files")
            previous |= {f for f in (manifest if isinstance(manifest, dict) else {}) if isinstance(f, str)}
            previous |= {f for f in (listed if isinstance(listed, list) else []) if isinstance(f, str)}
        else:
            logger.warning("The sidecar of %s is not valid JSON; replacing only the known adapter files.", repo_id)
    return previous & present


def publish(
    path_or_model: str | os.PathLike | nn.Module,
    repo_id: str,
    *,
    name: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> PublishResult:
    """Upload an adapter folder (or a model's adapter, saved first) to ``repo_id`` in one commit.

    Only the files ``save`` wrote are uploaded (as listed and hashed in the sidecar); anything
    else in the folder stays local. If the repo holds another adapter, the same commit deletes
    its files that the new one lacks, so the repo then holds exactly the new adapter. Creates the
    repo (``private`` applies only then) and the branch ``revision`` if needed.

    Args:
        timeout: seconds the Hub may go without progress (default ``$ADAPTERKIT_HUB_TIMEOUT`` or 30).

    Returns:
        A :class:`PublishResult`: the commit URL as a string, with the files uploaded and
        deleted and the repo's visibility.

    Raises:
        AdapterNotFoundError: ``path_or_model`` is not a folder.
        InvalidOptionError: ``repo_id`` is not a Hub repo id, or ``timeout`` is not positive.
        AdapterFormatError: the folder is not an adapter saved by ``adapterkit.save`` (checked
            before any network call), or its files changed since.
        HubError: no access, the Hub failed, timed out or cannot be reached; or ``private=True``
            was asked for an existing public repo (nothing is uploaded then).
    """


    limit = resolve_timeout(timeout)
    branch = revision or "main"
    with tempfile.TemporaryDirectory(prefix="adapterkit-publish-") as tmp:
        if isinstance(path_or_model, nn.Module):
            folder = save(path_or_model, Path(tmp) / "adapter", name=name)
        else:
            folder = Path(path_or_model)
            if not folder.is_dir():
                raise AdapterNotFoundError(f"Cannot publish {folder}: it is not a folder. Save the adapter first.")
        files = _checked_files(folder)
        _check_repo_id(repo_id, f"Cannot publish {folder}")
        api = HfApi(token=token)
        tokens = _tokens(token)
        with _bounded(limit) as scope:
            try:
                _retrying(lambda: api.create_repo(repo_id, private=private, exist_ok=True), scope,
                          f"Creating {repo_id}")
                if branch != "main":
                    _retrying(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), scope,
                              f"Creating branch {branch!r} of {repo_id}")
                info = _retrying(lambda: api.model_info(repo_id, revision=branch), scope, f"Reading {repo_id}")
                if private and info.private is False:
                    # create_repo keeps an existing repo's visibility: uploading would make it public.
                    raise HubError(f"Not publishing to {repo_id}: private=True was asked, but the repo exists and "
                                   "is public. Make it private on the Hub first, or pass private=False.")
                deleted = sorted(_previous_adapter(api, repo_id, info, scope) - set(files))

                def commit() -> Any:
                    # Fresh operations per attempt: huggingface_hub marks them uploaded/committed.
                    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
                    ops += [CommitOperationDelete(path_in_repo=f) for f in deleted]
                    # parent_commit: the deletions were computed from that state; a commit landing in
                    # between is refused (412) rather than silently clobbered.
                    message = commit_message or f"Upload adapter {folder.name} with adapterkit"
                    return api.create_commit(repo_id, ops, revision=branch, parent_commit=info.sha,
                                             commit_message=message)

                result = _retrying(commit, scope, f"Committing to {repo_id}")
            except Exception as err:
                if not _handled(err):
                    raise
                raise _explain(err, action=f"Publishing to {repo_id}", repo_id=repo_id, revision=branch,
                               endpoint=api.endpoint, timeout=limit, tokens=tokens, publishing=True) from err
    visibility = {True: "private", False: "public", None: "of unknown visibility"}[info.private]
    logger.info("Published %s to %s (%s, branch %s): uploaded %s%s; %s", folder, repo_id, visibility, branch,
                ", ".join(files), f"; deleted {', '.join(deleted)}" if deleted else "", result.commit_url)
    return PublishResult(result.commit_url, repo_id=repo_id, revision=branch, files=files, deleted=deleted,
                         private=info.private)


# --- download --------------------------------------------------------------------------------
def _verified(folder: Path) -> Path:
    """``folder`` after checking the files against the sidecar's manifest (plain peft folders pass)."""

    if (folder / SIDECAR).exists():
        adapter_files(folder)
    return folder


def download(repo_id: str, *, revision: str | None = None, token: str | None = None,
             timeout: float | None = None) -> Path:
    """The local folder of adapter ``repo_id`` at ``revision``, from the Hub cache or the Hub.

    Downloaded files are checked against the sidecar's manifest; a damaged or cut-short copy is
    fetched again once, and never returned. When the Hub is down, stalls or keeps failing, a
    cached copy is used, with a warning.

    Args:
        timeout: seconds the Hub may go without progress (default ``$ADAPTERKIT_HUB_TIMEOUT`` or 30).

    Raises:
        AdapterNotFoundError: the repo, or the revision, does not exist.
        AdapterFormatError: the downloaded files do not match the sidecar's manifest.
        InvalidOptionError: ``repo_id`` is not a Hub repo id, or ``timeout`` is not positive.
        HubError: no access, or the Hub failed / cannot be reached and the cache has no copy.
    """

    limit = resolve_timeout(timeout)
    _check_repo_id(repo_id, "Cannot download an adapter", " or the path of an existing adapter folder")
    api = HfApi(token=token)
    tokens = _tokens(token)
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    action = f"Downloading {where}"

    def explain(err: BaseException) -> AdapterKitError:
        return _explain(err, action=action, repo_id=repo_id, revision=revision, endpoint=api.endpoint,
                        timeout=limit, tokens=tokens)

    def cached() -> Path | None:
        try:
            return Path(api.snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                              local_files_only=True))
        except (hf_errors.LocalEntryNotFoundError, OSError):  # no copy, or an incomplete one
            return None

    if constants.HF_HUB_OFFLINE:
        folder = cached()
        if folder is None:
            raise HubError(f"Cannot download {where}: HF_HUB_OFFLINE=1 and the cache has no copy. "
                           "Unset HF_HUB_OFFLINE to fetch it once, or pass a local folder.")
        return _verified(folder)

    with _bounded(limit) as scope:
        try:
            _retrying(lambda: api.repo_info(repo_id, revision=revision), scope, action)
        except Exception as err:
            if not _handled(err):
                raise
            problem = explain(err)
            if not _outage(err):
                raise problem from err
            folder = cached()
            if folder is None:
                raise HubError(f"{problem} The cache has no copy of {where} either; once it is reachable, a "
                               "download fills the cache.") from err
            try:
                _verified(folder)
            except AdapterFormatError as damaged:
                raise HubError(f"{problem} The cached copy of {where} is damaged ({damaged}).") from err
            logger.warning("%s Using the cached copy of %s.", problem, where)
            return folder

        def fetch(force: bool) -> Path:
            # By name, not info.sha: only then does the cache record the branch, for offline use later.
            return Path(api.snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                              force_download=force))

        try:
            folder = _retrying(lambda: fetch(False), scope, action)
            try:
                return _verified(folder)
            except AdapterFormatError as damaged:
                logger.info("The copy of %s does not match its manifest (%s); downloading it again.", where, damaged)
            folder = _retrying(lambda: fetch(True), scope, action)
        except Exception as err:
            if not _handled(err):
                raise
            raise explain(err) from err
    try:
        return _verified(folder)
    except AdapterFormatError as err:
        raise AdapterFormatError(
            f"Downloaded {where} twice, and its files still do not match the sidecar's manifest ({err}). "
            "The copy on the Hub is damaged or the connection corrupts it: publish the adapter again, or retry later."
        ) from err
