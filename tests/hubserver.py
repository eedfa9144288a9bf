"""A Hub-API server on 127.0.0.1 for the test suite: the real huggingface_hub client talks to it.

The client under test is the real ``huggingface_hub`` (2.4.0); only the far end is ours. The HTTP
surface follows ../shared/HUB.md and the client's source:

- repos: model and dataset repos (spaces share the code), git-like history with 40-hex commit
  shas, branches (``main`` + ``create_branch``), tags; every revision is addressable by branch,
  tag or commit sha. Repo ids must be ``namespace/name``; ``create_repo("name")`` lands in
  ``HubServer.user``'s namespace, as on the Hub.
- upload: ``/api/repos/create`` (409 + url on conflict), ``/api/validate-yaml``, preupload
  ("regular" below ``lfs_threshold`` bytes, "lfs" above), ndjson commits, and the LFS batch API
  (batch, PUT, verify) the client uses for "lfs" files when ``HF_HUB_DISABLE_XET=1``. There is no
  Xet: "lfs" files with Xet enabled fail at the xet-write-token call.
- download: repo info (``?blobs=True``), tree listing, paths-info, refs, commits, and
  ``HEAD``/``GET .../resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and
  ``Range``. LFS files answer with a 302 to a "CDN" on ``localhost`` (another origin, like the
  real CDN) carrying ``X-Linked-Etag``/``X-Linked-Size``, so the client's redirect handling runs.
- errors: 404 with ``X-Error-Code`` RepoNotFound / RevisionNotFound / EntryNotFound.

``requests`` logs every request as ``(method, raw path with query)`` so tests can count them;
``unreachable()`` takes the server off the network for a ``with`` block; ``faults(...)`` makes
matching requests stall, fail with a status (``Retry-After`` too), lose their answer, or get a
truncated, short or corrupted body, for a ``with`` block (see :class:`Fault`). Not emulated: auth
(any token or none is accepted, private repos are readable), pull requests, Xet, pagination.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
import traceback
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Words that follow the repo id in /api/{type}s/{ns}/{name}/{action}/...
API_ACTIONS = {"revision", "tree", "paths-info", "preupload", "commit", "branch", "tag", "refs", "commits"}


def git_blob_sha1(data: bytes) -> str:
    """The oid git gives a blob: what the Hub reports (and the client compares) for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answer; ``code`` goes to ``X-Error-Code``, which the client maps to exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


@dataclass
class Fault:
    """What ``HubServer.faults`` does to the requests it matches (``hits`` logs them).

    A request matches when its method is in ``methods`` (any if None) and ``paths`` (regexes,
    searched in the raw path without query; any if None) matches; only the first ``times``
    matching requests are hit (all if None). Effects, checked in this order:

    - ``stall``: hold the request (body read) without answering for ``stall`` seconds, or until
      the ``with`` block ends or the server stops; then close the connection unanswered.
    - ``drop``: close the connection without answering; the request is not applied.
    - ``status``: answer that status (JSON error body) instead of handling the request, with a
      ``Retry-After: retry_after`` header and an ``X-Error-Code: error_code`` header when given
      (``error_code="EntryNotFound"`` makes a 404 mean "no such file"); nothing is applied.
    - ``stall_body``: handle the request, send the status line and headers, then hold the body
      like ``stall`` (the client has its answer's headers but never the bytes; the server
      answers nothing else meanwhile, as it holds its state lock).
    - ``truncate`` (bytes): handle the request, announce the full ``Content-Length`` but send
      only the first ``truncate`` bytes of the body, then close the connection.
    - ``content_length`` (bytes): handle it, but cut the body to that many bytes and say so in
      ``Content-Length``, as a server with a wrong size would (the answer looks complete).
    - ``corrupt``: handle it, flip every byte of the body (same length).
    """

    status: int | None = None
    retry_after: float | None = None
    error_code: str | None = None
    stall: float | None = None
    drop: bool = False
    stall_body: float | None = None
    truncate: int | None = None
    content_length: int | None = None
    corrupt: bool = False
    times: int | None = None
    paths: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    hits: list[tuple[str, str]] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and len(self.hits) >= self.times:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.body_effect and method != "GET":  # only a GET has a body to cut
            return False
        return self.paths is None or any(re.search(p, path) for p in self.paths)

    @property
    def body_effect(self) -> bool:
        return self.truncate is not None or self.content_length is not None or self.corrupt or bool(self.stall_body)


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, bytes]
    lfs: set[str]  # paths stored as LFS objects (oid = sha256, served through the CDN redirect)
    title: str
    message: str = ""
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=_now)

    def resolve(self, revision: str) -> Commit:
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        sha = self.branches.get(name) or self.tags.get(name) or revision
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]

    def history(self, sha: str) -> Iterator[Commit]:
        while sha is not None:
            commit = self.commits[sha]
            yield commit
            sha = commit.parent


class HubServer:
    """The server; give ``url`` to the client as its endpoint.

    Args:
        lfs_threshold: files larger than this many bytes are marked "lfs" in preupload.
        lfs_redirect: answer resolve on LFS files with a 302 to the CDN origin, as the Hub does.
        user: the namespace of repos created without one (and ``whoami``'s name).
    """

    def __init__(self, lfs_threshold: int = 10 * 1024 * 1024, lfs_redirect: bool = True, user: str = "user") -> None:
        self.lfs_threshold = lfs_threshold
        self.lfs_redirect = lfs_redirect
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes, shared by all repos like the real LFS store
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []  # tracebacks of bugs in this server; tests can assert it stays empty
        self.lock = threading.RLock()  # one request mutates state at a time: the client uploads in threads
        self.active_faults: list[Fault] = []
        self._counter = 0
        self._port = 0
        self._httpd: _Server | None = None

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> HubServer:
        # Rebind the previous port after stop(), so a client configured with ``url`` finds us again.
        self._httpd = _Server(("127.0.0.1", self._port), type("Handler", (_Handler,), {"hub": self}))
        self._port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="hubserver").start()
        return self

    def stop(self) -> None:
        for fault in list(self.active_faults):  # let stalled handler threads finish (no lock: they may hold it)
            fault.released.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.drop_connections()
            self._httpd = None

    @contextlib.contextmanager
    def unreachable(self) -> Iterator[None]:
        """Inside the block nothing listens on ``url`` (connection refused); state survives."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @contextlib.contextmanager
    def faults(self, *, status: int | None = None, retry_after: float | None = None, error_code: str | None = None,
               stall: float | bool | None = None, stall_body: float | bool | None = None,
               drop: bool = False, truncate: int | None = None, content_length: int | None = None,
               corrupt: bool = False, times: int | None = None, paths: str | list[str] | tuple[str, ...] | None = None,
               methods: str | list[str] | tuple[str, ...] | None = None) -> Iterator[Fault]:
        """Inject a :class:`Fault` into the matching requests for a ``with`` block; yields it (``hits``).

        ``stall=True`` stalls until the block ends. Faults nest; the newest matching one applies.
        """
        fault = Fault(status=status, retry_after=retry_after, error_code=error_code,
                      stall=(3600.0 if stall is True else stall or None),
                      stall_body=(3600.0 if stall_body is True else stall_body or None), drop=drop,
                      truncate=truncate, content_length=content_length, corrupt=corrupt, times=times,
                      paths=(paths,) if isinstance(paths, str) else (tuple(paths) if paths is not None else None),
                      methods=(methods,) if isinstance(methods, str) else (tuple(methods) if methods else None))
        with self.lock:
            self.active_faults.append(fault)
        try:
            yield fault
        finally:
            fault.released.set()  # first: a stall_body handler holds self.lock while it waits
            with self.lock:
                self.active_faults.remove(fault)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in reversed(self.active_faults):
                if fault.matches(method, path):
                    fault.hits.append((method, path))
                    return fault
        return None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._port, "server not started"
        return f"http://127.0.0.1:{self._port}"

    @property
    def cdn_url(self) -> str:
        # Same socket, other origin: the client treats it like the real CDN (no auth header, no HEAD follow).
        return f"http://localhost:{self._port}"

    @property
    def request_count(self) -> int:
        return len(self.requests)

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()
            self.errors.clear()

    # state (also usable directly by tests to seed repos without the client) -----------------
    def repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_type, repo_id, private)
            self.repos[(repo_type, repo_id)] = repo
            self.commit(repo, "main", {}, message="initial commit")
            return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def commit(self, repo: Repo, branch: str, files: dict[str, bytes], deletes: tuple[str, ...] = (),
               message: str = "", lfs: set[str] = frozenset(), description: str = "") -> Commit:
        """Commit ``files`` (path -> bytes; paths in ``lfs`` become LFS files) on top of ``branch``."""
        with self.lock:
            parent = repo.commits.get(repo.branches.get(branch, ""))
            tree = dict(parent.files) if parent else {}
            lfs_paths = set(parent.lfs) if parent else set()
            for path in deletes:  # "dir/" deletes a folder
                gone = [p for p in tree if p == path or (path.endswith("/") and p.startswith(path))]
                if not gone:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del tree[p]
                    lfs_paths.discard(p)
            for path, data in files.items():
                tree[path] = data
                (lfs_paths.add if path in lfs else lfs_paths.discard)(path)
                if path in lfs:  # seeded directly (not via the batch API): the CDN serves from the store
                    self.lfs_objects.setdefault(sha256(data), data)
            self._counter += 1
            seed = f"{repo.repo_id}:{branch}:{self._counter}:{sorted((p, git_blob_sha1(d)) for p, d in tree.items())}"
            commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent.sha if parent else None, tree,
                            lfs_paths, message, description)
            repo.commits[commit.sha] = commit
            repo.branches[branch] = commit.sha
            return commit


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: object) -> None:
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()  # handler threads remove their sockets concurrently
        super().__init__(*args)

    def process_request(self, request, client_address):  # noqa: ANN001
        with self.live_lock:
            self.live.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # noqa: ANN001
        with self.live_lock:
            self.live.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        # shutdown() only stops accepting: keep-alive connections the client pools would go on
        # being served by their handler threads, and a "stopped" Hub would still answer.
        with self.live_lock:
            live = list(self.live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


_LFS = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+?)\.git/info/lfs/objects/(batch|verify|upload/[0-9a-f]{64})$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"^/cdn-lfs/([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; hence the care with bodies below

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # plumbing ---------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        # Always drain the body: an unread one would be parsed as the next request on this connection.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, then the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    fault: Fault | None = None  # a body fault for the request being answered (see HubServer.faults)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        fault, length, cut = self.fault, len(body), None
        if fault is not None and fault.body_effect and self.command != "HEAD" and status < 300 and body:
            if fault.corrupt:
                body = bytes(b ^ 0xFF for b in body)
            if fault.content_length is not None:
                body = body[:fault.content_length]
                length = len(body)
            if fault.truncate is not None:
                cut = fault.truncate
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(length))  # HEAD too: the size, minus the bytes
        self.end_headers()
        if fault is not None and fault.stall_body and self.command != "HEAD" and status < 300 and body:
            self.wfile.flush()
            fault.released.wait(fault.stall_body)
            self.close_connection = True
            return
        if self.command != "HEAD":
            self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client sees the stream end before Content-Length
                self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, data: object, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _handle(self, method: str) -> None:
        with self.hub.lock:
            self.hub.requests.append((method, self.path))
        body = self._read_body()
        path, _, query = self.path.partition("?")
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        self.fault = fault = self.hub._take_fault(method, path)
        if fault is not None and (fault.stall or fault.drop):
            if fault.stall:
                fault.released.wait(fault.stall)
            self.close_connection = True  # no answer at all: the client sees the connection close
            return
        if fault is not None and fault.status is not None:
            headers = {"X-Error-Message": f"injected fault: {fault.status}"}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            if fault.error_code is not None:
                headers["X-Error-Code"] = fault.error_code
            return self._json({"error": f"injected fault: {fault.status}"}, fault.status, headers)
        try:
            with self.hub.lock:
                self._dispatch(method, path, params, body)
        except HubError as err:
            # Header values must be latin-1; paths in messages may not be.
            headers = {"X-Error-Message": str(err).encode("ascii", "backslashreplace").decode(), **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": str(err)}, err.status, headers)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up mid-answer: not our bug
            self.close_connection = True
        except Exception as err:  # a bug here: record it, answer 400 (the client retries 5xx for ~20 s)
            self.hub.errors.append(traceback.format_exc())
            self._json({"error": f"test hub bug: {type(err).__name__}: {err}"}, 400)

    # routing: match the raw path, unquote segments afterwards (revisions arrive with %2F) ----
    def _dispatch(self, method: str, path: str, params: dict, body: bytes) -> None:
        if (method, path) == ("POST", "/api/repos/create"):
            return self._create_repo(json.loads(body or b"{}"))
        if (method, path) == ("POST", "/api/validate-yaml"):
            return self._json({"errors": [], "warnings": []})
        if (method, path) == ("GET", "/api/whoami-v2"):
            token = {"displayName": "test", "role": "write"}
            return self._json({"type": "user", "name": self.hub.user, "fullname": self.hub.user, "orgs": [],
                               "auth": {"type": "access_token", "accessToken": token}})
        segments = path.split("/")
        if len(segments) >= 4 and segments[1] == "api" and segments[2] in REPO_TYPES:
            repo_type, rest = REPO_TYPES[segments[2]], segments[3:]
            if len(rest) >= 2 and rest[1] not in API_ACTIONS:
                repo_id, rest = f"{rest[0]}/{rest[1]}", rest[2:]
            else:  # a namespace-less id: never created here, so it answers RepoNotFound
                repo_id, rest = rest[0], rest[1:]
            repo = self.hub.repo(urllib.parse.unquote(repo_id), repo_type)
            action = rest[0] if rest else ""
            arg = urllib.parse.unquote("/".join(rest[1:2]))  # the revision / branch / tag segment
            return self._api(method, repo, action, arg, rest[2:], params, body)
        if m := _LFS.match(path):
            repo = self.hub.repo(m[2], REPO_TYPES.get(m[1] or "models"))
            return self._lfs(method, repo, m[3], body)
        if (m := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            repo = self.hub.repo(m[2], REPO_TYPES.get(m[1] or "models"))
            return self._resolve(repo, urllib.parse.unquote(m[3]), urllib.parse.unquote(m[4]))
        if (m := _CDN.match(path)) and method in ("GET", "HEAD") and m[1] in self.hub.lfs_objects:
            data = self.hub.lfs_objects[m[1]]
            return self._serve_bytes(data, {"ETag": f'"{m[1]}"'})
        raise HubError(404, f"test hub has no route for {method} {path}")

    def _create_repo(self, data: dict) -> None:
        repo_type = data.get("type") or "model"
        repo_id = f"{data.get('organization') or self.hub.user}/{data['name']}"
        private = bool(data.get("private")) or data.get("visibility") == "private"  # 2.4.0 sends "visibility"
        existing = self.hub.repos.get((repo_type, repo_id))
        if existing is not None:  # the Hub's 409 carries the url; create_repo(exist_ok=True) swallows it
            message = f"You already created this {repo_type} repo"
            return self._json({"error": message, "url": self.hub.repo_url(existing)}, 409,
                              {"X-Error-Message": message})
        repo = self.hub.create_repo(repo_id, repo_type, private)
        self._json({"url": self.hub.repo_url(repo), "name": repo_id})

    def _api(self, method: str, repo: Repo, action: str, arg: str, more: list[str], params: dict, body: bytes) -> None:
        hub = self.hub
        if method == "GET" and action in ("", "revision"):
            return self._info(repo, repo.resolve(arg or "main"), params.get("blobs", "").lower() == "true")
        if method == "GET" and action == "tree":
            sub = urllib.parse.unquote("/".join(more)).strip("/")
            return self._json(self._tree(repo, repo.resolve(arg), sub, params.get("recursive", "").lower() == "true",
                                         params.get("expand", "").lower() == "true"))
        if method == "POST" and action == "paths-info":
            form = urllib.parse.parse_qs(body.decode())
            commit, expand = repo.resolve(arg), form.get("expand", ["False"])[-1].lower() == "true"
            wanted = {p.strip("/") for p in form.get("paths", [])}
            entries = self._tree(repo, commit, "", recursive=True, expand=expand)
            return self._json([e for e in entries if e["path"] in wanted])
        if method == "POST" and action == "preupload":
            commit, files = repo.resolve(arg), []
            for f in json.loads(body)["files"]:
                lfs = f["size"] > hub.lfs_threshold
                old = commit.files.get(f["path"])
                # oid = what the client will compare with its local oid to drop unchanged files.
                oid = None if old is None else (sha256(old) if lfs else git_blob_sha1(old))
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            return self._json({"files": files, "commitOid": commit.sha})
        if method == "POST" and action == "commit":
            return self._commit(repo, arg, body, params)
        if action == "branch" and method == "POST":
            if arg in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{arg}")
            start = repo.resolve((json.loads(body or b"{}") or {}).get("startingPoint") or "main")
            repo.branches[arg] = start.sha
            return self._json({})
        if action == "branch" and method == "DELETE":
            if arg == "main":
                raise HubError(403, "Cannot delete the default branch")
            if repo.branches.pop(arg, None) is None:
                raise HubError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
            return self._json({})
        if action == "tag" and method == "POST":
            tag = json.loads(body)["tag"]
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = repo.resolve(arg).sha
            return self._json({})
        if action == "tag" and method == "DELETE":
            if repo.tags.pop(arg, None) is None:
                raise HubError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
            return self._json({})
        if method == "GET" and action == "refs":
            def ref(kind: str, name: str, sha: str) -> dict:
                return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
            return self._json({"branches": [ref("heads", n, s) for n, s in repo.branches.items()],
                               "tags": [ref("tags", n, s) for n, s in repo.tags.items()],
                               "converts": [], "pullRequests": []})
        if method == "GET" and action == "commits":
            return self._json([{"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                                "authors": [{"user": hub.user}]} for c in repo.history(repo.resolve(arg).sha)])
        raise HubError(404, f"test hub has no route for {method} {action!r} on {repo.repo_id}")

    def _info(self, repo: Repo, commit: Commit, blobs: bool) -> None:
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=len(data), blobId=git_blob_sha1(data))
                if path in commit.lfs:  # note: "sha256" here, "oid" in tree listings
                    sibling["lfs"] = {"sha256": sha256(data), "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        info = {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
                "createdAt": repo.created, "private": repo.private, "gated": False, "disabled": False,
                "tags": [], "downloads": 0, "likes": 0, "siblings": siblings}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        self._json(info)

    def _tree(self, repo: Repo, commit: Commit, sub: str, recursive: bool, expand: bool) -> list[dict]:
        prefix = f"{sub}/" if sub else ""
        files, dirs = [], set()
        for path, data in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(prefix + "/".join(parts[:depth]))
            if len(parts) > 1 and not recursive:
                continue
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path in commit.lfs:
                entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
            if expand:
                last = self._last_commit(repo, commit, path)
                entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
            files.append(entry)
        if sub and not files and not dirs:
            raise HubError(404, f"{sub} does not exist on {commit.sha}", "EntryNotFound")
        folders = [{"type": "directory", "path": d, "oid": git_blob_sha1(d.encode())} for d in sorted(dirs)]
        return folders + files

    @staticmethod
    def _last_commit(repo: Repo, commit: Commit, path: str) -> Commit:
        last = commit  # walk back while the file is unchanged
        for older in repo.history(commit.sha):
            if older.files.get(path) != commit.files[path]:
                break
            last = older
        return last

    def _commit(self, repo: Repo, branch: str, body: bytes, params: dict) -> None:
        if params.get("create_pr"):
            raise HubError(400, "pull requests are not emulated by the test hub")
        head = repo.resolve(branch)
        if branch not in repo.branches:  # a commit sha or tag is not something one commits onto
            raise HubError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
        files, lfs, deletes, header = {}, set(), [], {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.hub.lfs_objects[value["oid"]]
                lfs.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(value["path"].rstrip("/") + ("/" if key == "deletedFolder" else ""))
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        if header.get("parentCommit") not in (None, head.sha):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self.hub.commit(repo, branch, files, tuple(deletes), header.get("summary", ""), lfs,
                                 header.get("description", ""))
        self._json({"commitOid": commit.sha, "commitUrl": f"{self.hub.repo_url(repo)}/commit/{commit.sha}",
                    "pullRequestUrl": None})

    def _resolve(self, repo: Repo, revision: str, path: str) -> None:
        commit = repo.resolve(revision)
        data = commit.files.get(path)
        if data is None:
            # X-Repo-Commit lets the client cache the absence (.no_exist/<sha>/<path>), as with the Hub.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha}
        if path in commit.lfs:
            oid = sha256(data)
            headers.update({"X-Linked-Etag": f'"{oid}"', "X-Linked-Size": len(data)})
            if self.hub.lfs_redirect:
                location = f"{self.hub.cdn_url}/cdn-lfs/{oid}"
                return self._send(302, b"", {**headers, "ETag": f'"{git_blob_sha1(data)}"', "Location": location})
            return self._serve_bytes(data, {**headers, "ETag": f'"{oid}"'})
        self._serve_bytes(data, {**headers, "ETag": f'"{git_blob_sha1(data)}"'})

    def _serve_bytes(self, data: bytes, headers: dict) -> None:
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        m = _RANGE.match(self.headers.get("Range", "").strip())
        if not m or self.command == "HEAD" or (not m[1] and not m[2]):
            return self._send(200, data, headers)
        if m[1]:
            start, end = int(m[1]), min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
        else:  # "bytes=-N": the last N bytes
            start, end = max(len(data) - int(m[2]), 0), len(data) - 1
        if start >= len(data) or start > end:
            return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
        self._send(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})

    def _lfs(self, method: str, repo: Repo, op: str, body: bytes) -> None:
        hub, base = self.hub, f"{self.hub.repo_url(repo)}.git/info/lfs/objects"
        if op == "batch" and method == "POST":
            objects = []
            for obj in json.loads(body).get("objects", []):
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_objects:  # no "actions" = already stored, the client skips it
                    entry["actions"] = {"upload": {"href": f"{base}/upload/{obj['oid']}"},
                                        "verify": {"href": f"{base}/verify"}}
                objects.append(entry)
            return self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                              {"Content-Type": "application/vnd.git-lfs+json"})
        if op.startswith("upload/") and method == "PUT":
            oid = op.split("/", 1)[1]
            if sha256(body) != oid:
                raise HubError(400, f"sha256 mismatch for LFS object {oid}")
            hub.lfs_objects[oid] = body
            return self._send(200)
        if op == "verify" and method == "POST":
            if json.loads(body)["oid"] not in hub.lfs_objects:
                raise HubError(404, "LFS object not found")
            return self._json({})
        raise HubError(404, f"bad LFS request {method} {op}")
