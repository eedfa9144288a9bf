"""The loopback HubServer against the real huggingface_hub client: uploads, downloads, errors, offline."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def _folder(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def _posts(server, word: str) -> list[str]:
    return [p for m, p in server.requests if m == "POST" and f"/{word}/" in p]


def test_create_repo_conflict_and_exist_ok(hub_env):
    api, repo_id = HfApi(), hub_env.repo_id("create")
    url = api.create_repo(repo_id)
    assert url == f"{hub_env.server.url}/{repo_id}" and url.repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    # No namespace: the server puts it under its user, as the Hub does with the token's owner.
    assert api.create_repo("solo-" + repo_id.rsplit("-", 1)[1]).repo_id.startswith("user/solo-")
    data_id = hub_env.repo_id("data")
    assert api.create_repo(data_id, repo_type="dataset", private=True).repo_type == "dataset"
    info = api.repo_info(data_id, repo_type="dataset")
    assert info.private and len(info.sha) == 40


def test_upload_folder_is_one_commit_on_the_regular_path(hub_env, tmp_path):
    api, repo_id, server = HfApi(), hub_env.repo_id("regular"), hub_env.server
    api.create_repo(repo_id)
    files = {"README.md": "---\nlicense: mit\n---\n# hi\n", "config.json": '{"a": 1}', "sub/deep/w.bin": b"\0\1\2"}
    info = api.upload_folder(repo_id=repo_id, folder_path=str(_folder(tmp_path / "f", files)), commit_message="three")
    assert len(info.oid) == 40 and info.commit_url.endswith(info.oid)
    assert len(_posts(server, "commit")) == 1 and len(_posts(server, "preupload")) == 1
    assert ("POST", "/api/validate-yaml") in server.requests  # README.md triggers the YAML check
    assert not any("/info/lfs/" in p for _, p in server.requests)  # small files are inlined, base64
    meta = api.model_info(repo_id, files_metadata=True)
    assert meta.sha == info.oid
    assert {s.rfilename: s.size for s in meta.siblings} == {"README.md": 26, "config.json": 8, "sub/deep/w.bin": 3}
    assert all(s.lfs is None for s in meta.siblings)
    tree = {e.path: type(e).__name__ for e in api.list_repo_tree(repo_id, recursive=True)}
    assert tree == {"README.md": "RepoFile", "config.json": "RepoFile", "sub": "RepoFolder",
                    "sub/deep": "RepoFolder", "sub/deep/w.bin": "RepoFile"}
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="sub")] == ["sub/deep"]

    second = api.upload_file(path_or_fileobj=b"new", path_in_repo="extra.txt", repo_id=repo_id)
    assert second.oid != info.oid
    # Same bytes again: preupload's oid equals the local one, so the client sends no commit at all.
    commits = len(_posts(server, "commit"))
    again = api.upload_file(path_or_fileobj=b"new", path_in_repo="extra.txt", repo_id=repo_id)
    assert again.oid == second.oid and len(_posts(server, "commit")) == commits
    titles = [c.title for c in api.list_repo_commits(repo_id)]
    assert titles == ["Upload extra.txt with huggingface_hub", "three", "initial commit"]
    api.delete_folder("sub", repo_id=repo_id)
    assert "sub/deep/w.bin" not in api.list_repo_files(repo_id)


def test_lfs_path_with_xet_disabled(hub_env, tmp_path):
    hub_env.lfs(threshold=64)
    api, repo_id, server = HfApi(), hub_env.repo_id("lfs"), hub_env.server
    api.create_repo(repo_id)
    big = bytes(range(256)) * 8
    api.upload_folder(repo_id=repo_id, folder_path=str(_folder(tmp_path / "f", {"big.bin": big, "small.txt": "hi"})))
    methods = [(m, p.split("/info/lfs/objects/")[1][:6]) for m, p in server.requests if "/info/lfs/" in p]
    assert methods == [("POST", "batch"), ("PUT", "upload"), ("POST", "verify")]
    assert len(_posts(server, "commit")) == 1
    entries = {e.path: e for e in api.list_repo_tree(repo_id)}
    assert entries["big.bin"].lfs.sha256 == hashlib.sha256(big).hexdigest()
    assert entries["small.txt"].lfs is None

    # The LFS file downloads through the 302 to the "CDN" origin, with the linked etag and size.
    server.clear_log()
    assert Path(hf_hub_download(repo_id, "big.bin")).read_bytes() == big
    assert ("GET", f"/cdn-lfs/{entries['big.bin'].lfs.sha256}") in server.requests
    # The same bytes under another name: the batch answer has no upload action, so nothing is PUT.
    server.clear_log()
    api.upload_file(path_or_fileobj=big, path_in_repo="copy.bin", repo_id=repo_id)
    assert [m for m, p in server.requests if "/info/lfs/" in p] == ["POST"]
    assert Path(hf_hub_download(repo_id, "copy.bin")).read_bytes() == big


def test_downloads_by_branch_tag_and_older_sha(hub_env, tmp_path):
    api, repo_id = HfApi(), hub_env.repo_id("revs")
    api.create_repo(repo_id)
    folder = _folder(tmp_path / "a", {"w.txt": "one", "c.json": "{}"})
    first = api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    api.create_tag(repo_id, tag="v1")
    api.create_branch(repo_id, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="w.txt", repo_id=repo_id, revision="dev")
    api.upload_file(path_or_fileobj=b"two", path_in_repo="w.txt", repo_id=repo_id)

    def read(revision=None):
        return Path(hf_hub_download(repo_id, "w.txt", revision=revision)).read_text()

    assert read() == "two"
    assert read(first.oid) == "one"  # an older revision by commit sha
    assert read("v1") == "one"
    assert read("dev") == "dev"
    snap = Path(snapshot_download(repo_id, revision=first.oid))
    assert snap.name == first.oid and sorted(p.name for p in snap.iterdir()) == ["c.json", "w.txt"]
    assert (Path(snapshot_download(repo_id)) / "w.txt").read_text() == "two"
    refs = api.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.target_commit for t in refs.tags] == [first.oid]


def test_dataset_repo_and_quoted_revisions_and_paths(hub_env):
    api, repo_id = HfApi(), hub_env.repo_id("data")
    api.create_repo(repo_id, repo_type="dataset")
    api.create_branch(repo_id, branch="feat/x", repo_type="dataset")  # arrives as feat%2Fx
    name = "dir with space/é.txt"
    api.upload_file(path_or_fileobj=b"q", path_in_repo=name, repo_id=repo_id, repo_type="dataset", revision="feat/x")
    assert Path(hf_hub_download(repo_id, name, repo_type="dataset", revision="feat/x")).read_bytes() == b"q"
    assert api.file_exists(repo_id, name, repo_type="dataset", revision="feat/x")
    assert not api.file_exists(repo_id, name, repo_type="dataset")  # not on main
    assert [e.path for e in api.get_paths_info(repo_id, [name], repo_type="dataset", revision="feat/x")] == [name]
    assert api.revision_exists(repo_id, "feat/x", repo_type="dataset")
    assert not api.repo_exists(repo_id)  # no *model* repo of that name


def test_resolve_headers_and_ranges(hub_env):
    api, repo_id, url = HfApi(), hub_env.repo_id("headers"), hub_env.server.url
    api.create_repo(repo_id)
    sha = api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="d/n.txt", repo_id=repo_id).oid
    head = urllib.request.urlopen(urllib.request.Request(f"{url}/{repo_id}/resolve/main/d/n.txt", method="HEAD"))
    assert head.headers["X-Repo-Commit"] == sha and head.headers["Content-Length"] == "10"
    assert head.headers["ETag"].strip('"') == huggingface_hub.utils.sha.git_hash(b"0123456789")
    ranged = urllib.request.urlopen(urllib.request.Request(f"{url}/{repo_id}/resolve/{sha}/d/n.txt",
                                                           headers={"Range": "bytes=3-"}))
    assert ranged.status == 206 and ranged.read() == b"3456789"
    meta = huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id, "d/n.txt"))
    assert (meta.commit_hash, meta.size) == (sha, 10)


def test_errors_map_to_hub_exceptions(hub_env, tmp_path):
    api, repo_id = HfApi(), hub_env.repo_id("errs")
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_env.repo_id("absent"), "x.txt")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(hub_env.repo_id("absent"))
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "x.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id=repo_id, revision="no-such-branch")
    # RemoteEntryNotFoundError, not just EntryNotFoundError: LocalEntryNotFoundError (cache miss
    # when the Hub is unreachable) is an EntryNotFoundError too.
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt")
    assert list(hub_env.cache.glob("models--*/.no_exist/*/missing.txt"))  # absence cached by commit
    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.txt", repo_id=repo_id)
    parent = api.model_info(repo_id).sha
    api.upload_file(path_or_fileobj=b"z", path_in_repo="z.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as err:  # a stale parent_commit is refused
        api.create_commit(repo_id, [CommitOperationAdd("w.txt", b"w")], commit_message="m", parent_commit=parent)
    assert err.value.response.status_code == 412


def test_offline_mode_makes_zero_requests(hub_env, tmp_path):
    api, repo_id, server = HfApi(), hub_env.repo_id("offline"), hub_env.server
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(_folder(tmp_path / "f", {"a.txt": "a", "b.txt": "b"})))
    online_file = hf_hub_download(repo_id, "a.txt")  # fill the cache with real downloads
    online_snap = snapshot_download(repo_id)
    hub_env.offline()
    before = server.request_count
    assert hf_hub_download(repo_id, "a.txt") == online_file
    assert snapshot_download(repo_id) == online_snap
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(repo_id, "never-downloaded.txt")
    with pytest.raises(huggingface_hub.errors.OfflineModeIsEnabled):
        api.model_info(repo_id)  # the client refuses before any socket is opened
    assert server.request_count == before


def test_unreachable_hub_falls_back_to_the_cache(hub_env, tmp_path):
    api, repo_id, server = HfApi(), hub_env.repo_id("down"), hub_env.server
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id=repo_id)
    cached = hf_hub_download(repo_id, "a.txt")
    hub_env.no_retry_waits()  # a cache miss retries the HEAD 5 times with backoff: don't wait ~23 s
    with server.unreachable():  # even the client's pooled keep-alive connections are cut
        assert hf_hub_download(repo_id, "a.txt") == cached
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(repo_id, "other.txt")
    assert hf_hub_download(repo_id, "a.txt", force_download=True) == cached  # same url again afterwards
    hub_env.unreachable()
    assert hf_hub_download(repo_id, "a.txt") == cached


def test_module_level_functions_follow_the_patched_endpoint(hub_env):
    # huggingface_hub.create_repo / model_info are methods of an HfApi built at import time.
    repo_id = hub_env.repo_id("module-level")
    huggingface_hub.create_repo(repo_id)
    assert huggingface_hub.model_info(repo_id).id == repo_id
    assert ("GET", f"/api/models/{repo_id}") in hub_env.server.requests
