"""A Hub-API server on 127.0.0.1 for the test suite: the real huggingface_hub client talks to it.

In-memory model repos with git-like history (40-hex commit shas, branches), the upload path
(preupload, ndjson commit with inline "regular" files, the LFS batch API used when Xet is
off), and the download path (repo info, tree, resolve with the headers the client relies
on, Range requests, RepoNotFound / RevisionNotFound / EntryNotFound error codes). The HTTP
surface follows ../shared/HUB.md. Every request is logged so tests can count them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    lfs: set[str]
    message: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class HubServer:
    """The server; ``url`` is the endpoint to give the client.

    Args:
        lfs_threshold: files larger than this many bytes are marked "lfs" in preupload.
    """

    def __init__(self, lfs_threshold: int = 10 * 1024 * 1024) -> None:
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None

    # lifecycle ------------------------------------------------------------------------
    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # state ----------------------------------------------------------------------------
    def new_sha(self, seed: str) -> str:
        with self.lock:
            self._counter += 1
            return hashlib.sha1(f"{seed}:{self._counter}:{time.time_ns()}".encode()).hexdigest()

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        first = Commit(self.new_sha(repo_id), {}, set(), "initial commit")
        repo.commits[first.sha] = first
        repo.branches["main"] = first.sha
        self.repos[repo_id] = repo
        return repo


_MODEL_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+|[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_LFS = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/(?P<op>batch|upload/[0-9a-f]{64}|verify)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    # plumbing ---------------------------------------------------------------------------
    def _body(self) -> bytes:
        # Always drain the body: an unread body desynchronises keep-alive connections.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, code: str, message: str, head: bool = False) -> None:
        self._send(404, json.dumps({"error": message}).encode(), {"X-Error-Code": code, "X-Error-Message": message,
                                                                 "Content-Type": "application/json"}, head=head)

    def _route(self, method: str) -> None:
        self.hub.requests.append((method, self.path))
        body = self._body() if method in ("POST", "PUT") else b""
        path, _, query = self.path.partition("?")
        params = urllib.parse.parse_qs(query)
        try:
            self._dispatch(method, path, params, body)
        except Exception as err:  # a bug in the fake must surface as a 500, not a hang
            self._json(500, {"error": f"{type(err).__name__}: {err}"})

    do_GET = lambda self: self._route("GET")  # noqa: E731
    do_HEAD = lambda self: self._route("HEAD")  # noqa: E731
    do_POST = lambda self: self._route("POST")  # noqa: E731
    do_PUT = lambda self: self._route("PUT")  # noqa: E731

    # routes -----------------------------------------------------------------------------
    def _dispatch(self, method: str, path: str, params: dict, body: bytes) -> None:
        hub = self.hub
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body or b"{}")
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if "/" not in repo_id:
                repo_id = f"user/{repo_id}"
            url = f"{hub.url}/{repo_id}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            hub.create_repo(repo_id, bool(data.get("private")))
            return self._json(200, {"url": url, "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        m = _LFS.match(path)
        if m:
            return self._lfs(method, m.group("repo"), m.group("op"), body)
        m = _MODEL_API.match(path)
        if m:
            return self._model_api(method, m.group("repo"), m.group("rest") or "", params, body)
        m = _RESOLVE.match(path)
        if m and method in ("GET", "HEAD"):
            rev = urllib.parse.unquote(m.group("rev"))
            return self._resolve(method, m.group("repo"), rev, urllib.parse.unquote(m.group("path")))
        self._json(404, {"error": f"no route for {method} {path}"})

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error("RepoNotFound", f"Repository {repo_id} not found", head=head)
        return repo

    def _model_api(self, method: str, repo_id: str, rest: str, params: dict, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if method == "GET" and (rest == "" or rest.startswith("/revision/")):
            revision = urllib.parse.unquote(rest[len("/revision/"):]) if rest else "main"
            commit = repo.resolve(revision)
            if commit is None:
                return self._error("RevisionNotFound", f"Invalid rev id: {revision}")
            siblings = [{"rfilename": p, "size": len(d)} if params.get("blobs") else {"rfilename": p}
                        for p, d in sorted(commit.files.items())]
            return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "siblings": siblings,
                                    "private": repo.private, "lastModified": "2026-11-28T00:00:00.000Z",
                                    "tags": [], "downloads": 0, "likes": 0})
        if method == "GET" and rest.startswith("/tree/"):
            revision, _, sub = urllib.parse.unquote(rest[len("/tree/"):]).partition("/")
            commit = repo.resolve(revision)
            if commit is None:
                return self._error("RevisionNotFound", f"Invalid rev id: {revision}")
            recursive = params.get("recursive", ["false"])[0].lower() == "true"
            prefix = sub.strip("/") + "/" if sub.strip("/") else ""
            entries, dirs = [], set()
            for p, data in sorted(commit.files.items()):
                if not p.startswith(prefix):
                    continue
                rel = p[len(prefix):]
                if "/" in rel and not recursive:
                    dirs.add(prefix + rel.split("/")[0])
                    continue
                entry = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
                if p in commit.lfs:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            entries += [{"type": "directory", "path": d, "oid": git_blob_sha1(d.encode())} for d in sorted(dirs)]
            if prefix and not entries:
                return self._error("EntryNotFound", f"{sub} does not exist on {revision}")
            return self._json(200, entries)
        if method == "POST" and rest.startswith("/preupload/"):
            commit = repo.resolve(urllib.parse.unquote(rest[len("/preupload/"):]))
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["size"] > self.hub.lfs_threshold
                old = commit.files.get(f["path"]) if commit else None
                oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old))
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
            return self._json(200, {"files": files, "commitOid": commit.sha if commit else None})
        if method == "POST" and rest.startswith("/commit/"):
            return self._commit(repo, urllib.parse.unquote(rest[len("/commit/"):]), body)
        if method == "POST" and rest.startswith("/branch/"):
            branch = urllib.parse.unquote(rest[len("/branch/"):])
            if branch in repo.branches:
                return self._json(409, {"error": f"Branch {branch} already exists"})
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            commit = repo.resolve(start)
            if commit is None:
                return self._error("RevisionNotFound", f"Invalid rev id: {start}")
            repo.branches[branch] = commit.sha
            return self._json(200, {})
        self._json(404, {"error": f"no route for {method} /api/models/{repo_id}{rest}"})

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        parent_sha = repo.branches.get(revision)
        if parent_sha is None:
            return self._error("RevisionNotFound", f"Invalid rev id: {revision}")
        parent = repo.commits[parent_sha]
        files, lfs, message = dict(parent.files), set(parent.lfs), ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    return self._json(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                files[value["path"]] = data
                lfs.add(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
        commit = Commit(self.hub.new_sha(repo.repo_id), files, lfs, message)
        repo.commits[commit.sha] = commit
        repo.branches[revision] = commit.sha
        self._json(200, {"commitOid": commit.sha, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit.sha}",
                         "pullRequestUrl": None})

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        head = method == "HEAD"
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error("RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        data = commit.files.get(path)
        if data is None:
            return self._error("EntryNotFound", f"{path} does not exist on {revision}", head=head)
        etag = hashlib.sha256(data).hexdigest() if path in commit.lfs else git_blob_sha1(data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if path in commit.lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        status, payload = 200, data
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and not head:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            payload = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(payload) - 1}/{len(data)}"
        if head:
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        self._send(status, payload, headers)

    def _lfs(self, method: str, repo_id: str, op: str, body: bytes) -> None:
        if op == "batch":
            request = json.loads(body)
            objects = []
            for obj in request.get("objects", []):
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.hub.lfs_objects:
                    entry["actions"] = {
                        "upload": {"href": f"{self.hub.url}/{repo_id}.git/info/lfs/objects/upload/{obj['oid']}"},
                        "verify": {"href": f"{self.hub.url}/{repo_id}.git/info/lfs/objects/verify"},
                    }
                objects.append(entry)
            return self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                              {"Content-Type": "application/vnd.git-lfs+json"})
        if op.startswith("upload/") and method == "PUT":
            oid = op.split("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return self._json(400, {"error": "sha256 mismatch"})
            self.hub.lfs_objects[oid] = body
            return self._send(200)
        if op == "verify":
            oid = json.loads(body)["oid"]
            return self._json(200 if oid in self.hub.lfs_objects else 404, {})
        self._json(404, {"error": "bad LFS request"})
