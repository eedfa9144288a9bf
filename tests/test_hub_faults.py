"""A catalog of Hub cases: what publish uploads, and publish/download under injected faults.

The real huggingface_hub client runs against the loopback HubServer (tests/hubserver.py), whose
``faults(...)`` stalls, fails, drops or cuts requests. Categories:

- security: publish uploads exactly the adapter save wrote, replaces the previous adapter in
  the same commit, reports visibility, and never shows a token;
- faults: every network call bounded (stalls), transient failures retried (bounded), others
  not, failures told apart, the cache serving when the Hub is down, cut-short or corrupted
  downloads never loading, failed commits leaving the previous adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi

import adapterkit as ak
from adapterkit import hub
from adapterkit.artifacts import SIDECAR
from tests.test_artifacts import fresh, logits, trained
from tests.tiny import make_batch

# The requirement: a Hub that never answers fails within 30 s by default. Tests use a 1 s
# timeout, so this bound (not a speed goal) only catches a wait that is not bounded at all.
BOUND_S = 30
SECRET = "hf_SECRETtokenDoNotLeak0123456789"

# Paths of the requests each step sends (regexes on the raw path).
CREATE = r"^/api/repos/create$"
INFO = r"^/api/models/[^/]+/[^/]+(/revision/[^/]+)?$"
PREUPLOAD = r"/preupload/"
COMMIT = r"/commit/"
TREE = r"/tree/"
RESOLVE = r"/resolve/"
WEIGHTS = r"/resolve/[^/]+/adapter_model\.safetensors$"


@pytest.fixture(autouse=True)
def instant_backoff(hub_env):
    """Waits between attempts take no time here; how many attempts, and within what budget, is real."""
    hub_env.no_retry_waits()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two saved adapters for one tiny bert base (never modified: copy before editing)."""
    root = tmp_path_factory.mktemp("adapters")
    batch = make_batch("bert")
    lora, head = trained("bert", "lora", seed=0), trained("bert", "head", seed=1)
    return SimpleNamespace(lora=ak.save(lora, root / "lora"), head=ak.save(head, root / "head"), batch=batch,
                           expected={"lora": logits(lora, batch), "head": logits(head, batch)})


def saved(folder: Path) -> list[str]:
    """What save wrote: every file of a pristine adapter folder (the fixtures' are never edited)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / f"copy-{folder.name}"))


def remote_files(hub_env, repo_id: str, revision: str = "main") -> set[str]:
    return set(hub_env.server.repo(repo_id).resolve(revision).files)


def head_sha(hub_env, repo_id: str) -> str:
    return hub_env.server.repo(repo_id).branches["main"]


def published(hub_env, adapters, kind: str = "lora", name: str = "faults") -> str:
    repo_id = hub_env.repo_id(name)
    ak.publish(getattr(adapters, kind), repo_id)
    hub_env.server.clear_log()
    return repo_id


def loads_as(adapters, source, kind: str) -> None:
    model = ak.load(fresh("bert"), str(source))
    torch.testing.assert_close(logits(model, adapters.batch), adapters.expected[kind])


def timed(call):
    start = time.monotonic()
    try:
        call()
    except Exception as err:  # noqa: BLE001 - returned for the test to check
        return err, time.monotonic() - start
    raise AssertionError("expected the call to fail")


def hub_records(caplog, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "adapterkit.hub" and r.levelno == level]


# === security: publish uploads exactly the adapter =============================================
JUNK = [".private/token.json", "credentials.json", "checkpoint-10/adapter_model.safetensors", "optimizer.pt",
        "notes.txt", "extra.json", "nested/deep/weights.safetensors", ".env", "training_args.bin"]


@pytest.mark.parametrize("junk", JUNK)
def test_publish_uploads_only_the_files_save_wrote(hub_env, adapters, tmp_path, junk):
    folder = copy_of(adapters.lora, tmp_path)
    (folder / junk).parent.mkdir(parents=True, exist_ok=True)
    (folder / junk).write_text('{"token": "%s"}' % SECRET)
    repo_id = hub_env.repo_id("exact")
    result = ak.publish(folder, repo_id)
    wrote = saved(adapters.lora)
    assert junk not in remote_files(hub_env, repo_id)
    assert remote_files(hub_env, repo_id) == set(wrote)
    assert sorted(result.files) == wrote


def _empty(folder: Path, outside: Path) -> Path:
    folder.mkdir()
    return folder


def _only_peft_like_files(folder: Path, outside: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def _bad_sidecar(folder: Path, outside: Path) -> Path:
    (folder / SIDECAR).write_text("{not json")
    return folder


def _sidecar_not_an_object_version(folder: Path, outside: Path) -> Path:
    (folder / SIDECAR).write_text(json.dumps({"format_version": "1"}))
    return folder


def _changed_weights(folder: Path, outside: Path) -> Path:
    with open(folder / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0")
    return folder


def _missing_weights(folder: Path, outside: Path) -> Path:
    (folder / "adapter_model.safetensors").unlink()
    return folder


def _card_links_out(folder: Path, outside: Path) -> Path:
    # Same bytes, so the manifest's size and hash match: only the link gives it away.
    secret = outside / "secret.md"
    shutil.copy(folder / "README.md", secret)
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(secret)
    return folder


def _manifest_escapes(folder: Path, outside: Path) -> Path:
    secret = outside / "secret.json"
    secret.write_text('{"token": "%s"}' % SECRET)
    sidecar = json.loads((folder / SIDECAR).read_text())
    sidecar["manifest"]["../outside/secret.json"] = {"size": secret.stat().st_size,
                                                      "sha256": hashlib.sha256(secret.read_bytes()).hexdigest()}
    (folder / SIDECAR).write_text(json.dumps(sidecar))
    return folder


def _a_file(folder: Path, outside: Path) -> Path:
    path = folder.parent / "adapter.safetensors"
    path.write_bytes(b"\0" * 8)
    return path


def _missing(folder: Path, outside: Path) -> Path:
    return folder.parent / "no-such-folder"


REFUSED = {
    "empty folder": (_empty, ak.AdapterFormatError, "not an adapter saved by adapterkit.save"),
    "peft-like files, no sidecar": (_only_peft_like_files, ak.AdapterFormatError, "not an adapter saved"),
    "sidecar not JSON": (_bad_sidecar, ak.AdapterFormatError, "not an adapter saved"),
    "sidecar without integer version": (_sidecar_not_an_object_version, ak.AdapterFormatError, "format_version"),
    "weights changed since save": (_changed_weights, ak.AdapterFormatError, "changed"),
    "weights missing": (_missing_weights, ak.AdapterFormatError, "missing"),
    "card is a link out of the folder": (_card_links_out, ak.AdapterFormatError, "link"),
    "manifest names a file outside": (_manifest_escapes, ak.AdapterFormatError, "outside"),
    "a plain file": (_a_file, ak.AdapterNotFoundError, "not a folder"),
    "a missing path": (_missing, ak.AdapterNotFoundError, "not a folder"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_non_adapter_folders_are_refused_before_any_request(hub_env, adapters, tmp_path, case):
    make, error, message = REFUSED[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "adapter"
    if make not in (_empty, _only_peft_like_files, _a_file, _missing):
        folder = Path(shutil.copytree(adapters.lora, folder))
    target = make(folder, outside)
    repo_id = hub_env.repo_id("refused")
    with pytest.raises(error, match=message):
        ak.publish(target, repo_id)
    assert hub_env.server.requests == []
    assert ("model", repo_id) not in hub_env.server.repos


def _user_files(hub_env, repo_id: str) -> dict[str, bytes]:
    files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", "docs/usage.md": b"# usage\n"}
    hub_env.server.commit(hub_env.server.repo(repo_id), "main", files, message="user files")
    return files


@pytest.mark.parametrize("old,new", [("head", "lora"), ("lora", "head")])
def test_publish_over_another_adapter_leaves_only_the_new_one(hub_env, adapters, old, new):
    repo_id = hub_env.repo_id("replace")
    ak.publish(getattr(adapters, old), repo_id)
    user = _user_files(hub_env, repo_id)
    before = remote_files(hub_env, repo_id)
    commits = len(hub_env.server.repo(repo_id).commits)
    result = ak.publish(getattr(adapters, new), repo_id)
    new_files = set(saved(getattr(adapters, new)))
    assert remote_files(hub_env, repo_id) == new_files | set(user)  # the user's files stay
    assert len(hub_env.server.repo(repo_id).commits) == commits + 1  # one commit: adds and deletes together
    loads_as(adapters, repo_id, new)
    assert set(result.deleted) == (before - set(user)) - new_files and result.deleted


def test_publish_over_a_repo_without_sidecar_replaces_the_known_adapter_files(hub_env, adapters):
    repo_id = hub_env.repo_id("no-sidecar")
    repo = hub_env.server.create_repo(repo_id)
    hub_env.server.commit(repo, "main", {"adapter.safetensors": b"\0" * 32, "adapter_config.json": b"{}",
                                         "README.md": b"# old\n", "notes.md": b"mine", ".gitattributes": b""})
    result = ak.publish(adapters.lora, repo_id)
    assert remote_files(hub_env, repo_id) == set(saved(adapters.lora)) | {"notes.md", ".gitattributes"}
    loads_as(adapters, repo_id, "lora")
    assert result.deleted == ["adapter.safetensors"]


@pytest.mark.parametrize("existing,asked,expected", [(None, True, True), (None, False, False), (True, False, True)])
def test_publish_result_reports_files_and_visibility_read_back(hub_env, adapters, caplog, existing, asked, expected):
    repo_id = hub_env.repo_id("result")
    if existing is not None:  # visibility is the repo's: asking for another one does not change it
        hub_env.server.create_repo(repo_id, private=existing)
    caplog.set_level(logging.INFO, logger="adapterkit.hub")
    result = ak.publish(adapters.lora, repo_id)  if asked is False else ak.publish(adapters.lora, repo_id, private=True)
    sha = head_sha(hub_env, repo_id)
    assert isinstance(result, str) and result == result.commit_url and result.endswith(sha)
    assert (result.repo_id, result.revision, result.private) == (repo_id, "main", expected)
    assert result.files == saved(adapters.lora) and result.deleted == []
    lines = [r.getMessage() for r in hub_records(caplog, logging.INFO) if r.getMessage().startswith("Published")]
    assert len(lines) == 1
    assert ("private" if expected else "public") in lines[0]
    assert all(f in lines[0] for f in result.files)


def test_private_asked_for_an_existing_public_repo_uploads_nothing(hub_env, adapters):
    repo_id = hub_env.repo_id("public")
    hub_env.server.create_repo(repo_id, private=False)
    before = head_sha(hub_env, repo_id)
    with pytest.raises(ak.HubError, match="is public"):
        ak.publish(adapters.lora, repo_id, private=True)
    assert head_sha(hub_env, repo_id) == before
    assert not any(COMMIT.strip("/") in path or "preupload" in path for _, path in hub_env.server.requests)


def test_publishing_the_same_adapter_again_changes_nothing(hub_env, adapters):
    repo_id = hub_env.repo_id("again")
    first = ak.publish(adapters.lora, repo_id)
    commits = len(hub_env.server.repo(repo_id).commits)
    second = ak.publish(adapters.lora, repo_id)
    assert len(hub_env.server.repo(repo_id).commits) == commits and second.deleted == []
    assert second.files == first.files and second.private is False


@pytest.mark.parametrize("repo_id", ["runs/x/adapter", "", "a" * 200 + "/b", "me/bad name", None])
def test_a_malformed_repo_id_is_refused_before_any_request(hub_env, adapters, repo_id):
    with pytest.raises(ak.InvalidOptionError, match="not a Hub repo id"):
        ak.publish(adapters.lora, repo_id)
    with pytest.raises(ak.InvalidOptionError, match="not a Hub repo id"):
        hub.download(repo_id)
    assert hub_env.server.requests == []


def test_publish_on_a_branch_reports_the_branch(hub_env, adapters):
    repo_id = hub_env.repo_id("branch")
    result = ak.publish(adapters.lora, repo_id, revision="dev")
    assert result.revision == "dev" and result.endswith(hub_env.server.repo(repo_id).branches["dev"])
    assert remote_files(hub_env, repo_id, "dev") >= {SIDECAR, "adapter_model.safetensors"}
    assert remote_files(hub_env, repo_id) == set()  # main untouched


LEAKS = {
    "publish ok": ("publish", {}, None),
    "publish 403 on commit": ("publish", {"status": 403, "paths": COMMIT}, ak.HubError),
    "publish 401 on create": ("publish", {"status": 401, "paths": CREATE}, ak.HubError),
    "publish 500 on commit": ("publish", {"status": 500, "paths": COMMIT}, ak.HubError),
    "download ok": ("download", {}, None),
    "download 401 on info": ("download", {"status": 401, "paths": INFO}, ak.AdapterKitError),
    "download 403 on weights": ("download", {"status": 403, "paths": WEIGHTS}, ak.HubError),
    "download 500 on tree": ("download", {"status": 500, "paths": TREE}, ak.HubError),
    "download stall": ("download", {"stall": True, "paths": RESOLVE}, ak.HubError),
}


@pytest.mark.parametrize("case", list(LEAKS))
def test_a_token_is_never_logged_nor_in_an_error(hub_env, adapters, caplog, monkeypatch, case):
    direction, fault, error = LEAKS[case]
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    repo_id = published(hub_env, adapters) if direction == "download" else hub_env.repo_id("leak")
    call = (lambda: ak.publish(adapters.lora, repo_id, token=SECRET, timeout=1)) if direction == "publish" else (
        lambda: hub.download(repo_id, token=SECRET, timeout=1))
    with hub_env.server.faults(**fault):
        if error is None:
            call()
            text = ""
        else:
            with pytest.raises(error) as err:
                call()
            text = "".join(traceback.format_exception(err.value))
    assert SECRET not in text
    assert SECRET not in caplog.text


# === the Hub: bounded, retried, told apart =====================================================
PUBLISH_STEPS = {"create": CREATE, "info": INFO, "preupload": PREUPLOAD, "commit": COMMIT}
DOWNLOAD_STEPS = {"info": INFO, "tree": TREE, "resolve": RESOLVE}


@pytest.mark.parametrize("step", list(PUBLISH_STEPS))
def test_a_stalled_publish_fails_within_the_timeout(hub_env, adapters, step):
    repo_id = published(hub_env, adapters, "head")
    before = head_sha(hub_env, repo_id)
    with hub_env.server.faults(stall=True, paths=PUBLISH_STEPS[step]) as fault:
        err, elapsed = timed(lambda: ak.publish(adapters.lora, repo_id, timeout=1))
    assert isinstance(err, ak.HubError) and "timed out" in str(err) and hub_env.server.url in str(err)
    assert elapsed < BOUND_S and fault.hits
    assert head_sha(hub_env, repo_id) == before  # nothing half-published
    loads_as(adapters, repo_id, "head")


@pytest.mark.parametrize("step", list(DOWNLOAD_STEPS))
def test_a_stalled_download_fails_within_the_timeout(hub_env, adapters, step):
    repo_id = published(hub_env, adapters)
    with hub_env.server.faults(stall=True, paths=DOWNLOAD_STEPS[step]) as fault:
        err, elapsed = timed(lambda: hub.download(repo_id, timeout=1))
    assert isinstance(err, ak.HubError) and "timed out" in str(err), err
    assert elapsed < BOUND_S and fault.hits
    loads_as(adapters, repo_id, "lora")  # and nothing stale was left to get in the way


def test_a_body_that_stalls_after_its_headers_fails_within_the_timeout(hub_env, adapters):
    repo_id = published(hub_env, adapters)
    with hub_env.server.faults(stall_body=True, paths=WEIGHTS) as fault:
        err, elapsed = timed(lambda: hub.download(repo_id, timeout=1))
    assert isinstance(err, ak.HubError) and "timed out" in str(err), err
    assert elapsed < BOUND_S and fault.hits
    loads_as(adapters, repo_id, "lora")


def test_the_timeout_comes_from_the_environment(hub_env, adapters, monkeypatch):
    monkeypatch.setenv(hub.TIMEOUT_ENV, "1.5")
    assert hub.resolve_timeout() == 1.5 and hub.resolve_timeout(4) == 4.0
    with hub_env.server.faults(stall=True, paths=CREATE):
        err, elapsed = timed(lambda: ak.publish(adapters.lora, hub_env.repo_id("env")))
    assert isinstance(err, ak.HubError) and "within 1.5 s" in str(err) and elapsed < BOUND_S
    monkeypatch.delenv(hub.TIMEOUT_ENV)
    assert hub.resolve_timeout() == hub.DEFAULT_TIMEOUT == 30


@pytest.mark.parametrize("timeout,env", [(0, None), (-1, None), (float("nan"), None), (float("inf"), None),
                                         ("10", None), (True, None), (None, "soon"), (None, "0"), (None, "-3")])
def test_a_bad_timeout_is_refused_before_any_request(hub_env, adapters, monkeypatch, timeout, env):
    if env is not None:
        monkeypatch.setenv(hub.TIMEOUT_ENV, env)
    with pytest.raises(ak.InvalidOptionError, match="seconds"):
        ak.publish(adapters.lora, hub_env.repo_id("bad-timeout"), timeout=timeout)
    with pytest.raises(ak.InvalidOptionError, match="seconds"):
        hub.download("me/anything", timeout=timeout)
    assert hub_env.server.requests == []


TRANSIENT = [
    ("publish", 503, CREATE), ("publish", 502, INFO), ("publish", 500, PREUPLOAD), ("publish", 503, COMMIT),
    ("publish", 429, COMMIT), ("publish", 504, CREATE),
    ("download", 503, INFO), ("download", 500, TREE), ("download", 502, RESOLVE), ("download", 503, WEIGHTS),
    ("download", 429, INFO),
]


@pytest.mark.parametrize("direction,status,path", TRANSIENT)
def test_transient_failures_are_retried(hub_env, adapters, direction, status, path):
    repo_id = published(hub_env, adapters) if direction == "download" else hub_env.repo_id("transient")
    with hub_env.server.faults(status=status, times=2, paths=path) as fault:
        if direction == "publish":
            ak.publish(adapters.lora, repo_id, timeout=10)
        else:
            hub.download(repo_id, timeout=10)
    assert len(fault.hits) == 2
    loads_as(adapters, repo_id, "lora")


def test_retry_after_is_honoured(hub_env, adapters):
    repo_id = hub_env.repo_id("retry-after")
    with hub_env.server.faults(status=429, retry_after=1, times=1, paths=CREATE) as fault:
        ak.publish(adapters.lora, repo_id, timeout=10)
    assert len(fault.hits) == 1 and head_sha(hub_env, repo_id)


@pytest.mark.parametrize("direction", ["publish", "download"])
def test_a_retry_after_beyond_the_budget_fails_at_once(hub_env, adapters, direction):
    repo_id = published(hub_env, adapters) if direction == "download" else hub_env.repo_id("retry-after-long")
    path = CREATE if direction == "publish" else INFO
    call = (lambda: ak.publish(adapters.lora, repo_id, timeout=5)) if direction == "publish" else (
        lambda: hub.download(repo_id, timeout=5))
    with hub_env.server.faults(status=503, retry_after=3600, paths=path) as fault:
        err, elapsed = timed(call)
    assert isinstance(err, ak.HubError) and "3600" in str(err) and elapsed < BOUND_S
    assert len(fault.hits) == 1


@pytest.mark.parametrize("direction,status", [("publish", 500), ("publish", 503), ("download", 500),
                                              ("download", 502)])
def test_persistent_server_errors_are_retried_a_bounded_number_of_times(hub_env, adapters, direction, status):
    repo_id = published(hub_env, adapters) if direction == "download" else hub_env.repo_id("hub-failed")
    call = (lambda: ak.publish(adapters.lora, repo_id, timeout=10)) if direction == "publish" else (
        lambda: hub.download(repo_id, timeout=10))
    with hub_env.server.faults(status=status, paths=CREATE if direction == "publish" else INFO) as fault:
        err, _ = timed(call)
    assert isinstance(err, ak.HubError) and "the Hub failed" in str(err) and f"HTTP {status}" in str(err)
    assert len(fault.hits) == hub.MAX_ATTEMPTS


CLIENT_ERRORS = [
    ("publish", 401, CREATE, ak.HubError, "hf auth login"),
    ("publish", 403, COMMIT, ak.HubError, "no access"),
    ("publish", 400, PREUPLOAD, ak.HubError, "refused the request"),
    ("publish", 422, COMMIT, ak.HubError, "refused the request"),
    ("publish", 412, COMMIT, ak.HubError, "changed while publishing"),
    ("download", 401, INFO, ak.AdapterKitError, "hf auth login"),
    ("download", 403, INFO, ak.HubError, "no access"),
    ("download", 400, TREE, ak.HubError, "refused the request"),
    ("download", 403, WEIGHTS, ak.HubError, "no access"),
]


@pytest.mark.parametrize("direction,status,path,error,message", CLIENT_ERRORS)
def test_client_errors_are_never_retried_and_say_what_to_do(hub_env, adapters, direction, status, path, error,
                                                              message):
    repo_id = published(hub_env, adapters) if direction == "download" else hub_env.repo_id("client-error")
    call = (lambda: ak.publish(adapters.lora, repo_id, timeout=10)) if direction == "publish" else (
        lambda: hub.download(repo_id, timeout=10))
    with hub_env.server.faults(status=status, paths=path) as fault:
        err, _ = timed(call)
    assert isinstance(err, error) and message in str(err), err
    assert len(fault.hits) == 1


def test_missing_repo_revision_and_file_are_told_apart(hub_env, adapters):
    repo_id = published(hub_env, adapters)
    with pytest.raises(ak.AdapterNotFoundError, match="No adapter repo"):
        hub.download(hub_env.repo_id("absent"))
    with pytest.raises(ak.AdapterNotFoundError, match="no revision 'v9'"):
        hub.download(repo_id, revision="v9")
    with hub_env.server.faults(status=404, error_code="EntryNotFound", paths=WEIGHTS) as fault:
        with pytest.raises(ak.HubError, match="missing on the Hub") as err:
            hub.download(repo_id)
    assert not isinstance(err.value, ak.AdapterNotFoundError) and len(fault.hits) == 1


@pytest.mark.parametrize("direction", ["publish", "download"])
def test_an_unreachable_hub_names_the_endpoint(hub_env, adapters, direction):
    hub_env.unreachable()
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    call = (lambda: ak.publish(adapters.lora, "me/unreachable")) if direction == "publish" else (
        lambda: hub.download("me/unreachable"))
    err, elapsed = timed(call)
    assert isinstance(err, ak.HubError) and f"cannot reach {endpoint}" in str(err) and "unreachable" in str(err)
    assert elapsed < BOUND_S


OUTAGES = {
    "unreachable": None,
    "stalls": {"stall": True},
    "503 on everything": {"status": 503},
    "500 on repo info": {"status": 500, "paths": INFO},
    "dropped answers": {"drop": True},
}


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_the_cache_serves_when_the_hub_is_down(hub_env, adapters, caplog, monkeypatch, outage):
    repo_id = published(hub_env, adapters)
    hub.download(repo_id)  # fills the cache
    monkeypatch.setenv(hub.TIMEOUT_ENV, "1")  # ak.load has no timeout= of its own
    caplog.set_level(logging.INFO, logger="adapterkit.hub")
    if OUTAGES[outage] is None:
        hub_env.unreachable()
        loads_as(adapters, repo_id, "lora")
    else:
        with hub_env.server.faults(**OUTAGES[outage]) as fault:
            loads_as(adapters, repo_id, "lora")
        assert fault.hits
    warnings = hub_records(caplog, logging.WARNING)
    assert len(warnings) == 1 and "cached copy" in warnings[0].getMessage()


def test_no_cache_and_hub_down_is_a_clear_error(hub_env, adapters, monkeypatch):
    repo_id = published(hub_env, adapters)
    with hub_env.server.faults(status=503):
        with pytest.raises(ak.HubError, match="cache has no copy"):
            hub.download(repo_id, timeout=5)


def test_a_download_cut_short_once_resumes(hub_env, adapters):
    repo_id = published(hub_env, adapters)
    with hub_env.server.faults(truncate=100, times=1, paths=WEIGHTS) as fault:
        folder = hub.download(repo_id)
    assert len(fault.hits) == 1
    loads_as(adapters, folder, "lora")


CUT = {
    "connection closed before the body": ({"truncate": 0}, ak.HubError, "broke off"),
    "body shorter than announced": ({"content_length": 10}, ak.HubError, "broke off"),
    "corrupted bytes": ({"corrupt": True}, ak.AdapterFormatError, "do not match"),
}


@pytest.mark.parametrize("case", list(CUT))
def test_a_broken_download_is_an_error_now_and_a_clean_download_later(hub_env, adapters, case):
    fault_args, error, message = CUT[case]
    repo_id = published(hub_env, adapters)
    with hub_env.server.faults(paths=WEIGHTS, **fault_args) as fault:
        with pytest.raises(error, match=message):
            ak.load(fresh("bert"), repo_id)
    assert fault.hits
    folder = hub.download(repo_id)  # the Hub is fine again: nothing broken was kept
    expected = hub_env.server.repo(repo_id).resolve("main").files["adapter_model.safetensors"]
    assert (folder / "adapter_model.safetensors").read_bytes() == expected
    loads_as(adapters, repo_id, "lora")


def test_a_corrupted_cache_is_fetched_again(hub_env, adapters):
    repo_id = published(hub_env, adapters)
    folder = hub.download(repo_id)
    blob = (folder / "adapter_model.safetensors").resolve()
    blob.write_bytes(bytes(b ^ 0xFF for b in blob.read_bytes()))  # damaged on disk after the download
    loads_as(adapters, hub.download(repo_id), "lora")


FAILED_COMMITS = {
    "commit answers 500": {"status": 500, "paths": COMMIT},
    "commit connection dropped": {"drop": True, "paths": COMMIT},
    "commit stalls": {"stall": True, "paths": COMMIT},
    "preupload answers 503": {"status": 503, "paths": PREUPLOAD},
}


@pytest.mark.parametrize("case", list(FAILED_COMMITS))
def test_a_failed_commit_leaves_the_previous_adapter(hub_env, adapters, case):
    repo_id = published(hub_env, adapters, "head")
    before, files = head_sha(hub_env, repo_id), remote_files(hub_env, repo_id)
    with hub_env.server.faults(**FAILED_COMMITS[case]) as fault:
        with pytest.raises(ak.HubError):
            ak.publish(adapters.lora, repo_id, timeout=1)
    assert fault.hits
    assert head_sha(hub_env, repo_id) == before and remote_files(hub_env, repo_id) == files
    loads_as(adapters, repo_id, "head")


@pytest.mark.parametrize("fault_args", [{"drop": True}, {"status": 502}], ids=["dropped", "502"])
def test_a_commit_that_failed_once_is_retried_and_lands_once(hub_env, adapters, fault_args):
    repo_id = published(hub_env, adapters, "head")
    commits = len(hub_env.server.repo(repo_id).commits)
    with hub_env.server.faults(times=1, paths=COMMIT, **fault_args) as fault:
        result = ak.publish(adapters.lora, repo_id, timeout=10)
    assert len(fault.hits) == 1 and len(hub_env.server.repo(repo_id).commits) == commits + 1
    assert result.deleted == ["adapter.safetensors"]
    loads_as(adapters, repo_id, "lora")


def test_lfs_uploads_are_retried_too(hub_env, adapters):
    hub_env.lfs(threshold=64)
    repo_id = hub_env.repo_id("lfs-faults")
    with hub_env.server.faults(status=503, times=2, paths=r"/info/lfs/objects/") as fault:
        ak.publish(adapters.lora, repo_id, timeout=10)
    assert len(fault.hits) == 2
    loads_as(adapters, repo_id, "lora")


def test_the_client_is_left_as_it_was(hub_env, adapters):
    from huggingface_hub.utils import _http

    factory = _http._GLOBAL_CLIENT_FACTORY
    repo_id = hub_env.repo_id("restored")
    ak.publish(adapters.lora, repo_id, timeout=5)
    hub.download(repo_id, timeout=5)
    with hub_env.server.faults(stall=True, paths=CREATE):
        with pytest.raises(ak.HubError):
            ak.publish(adapters.lora, hub_env.repo_id("restored"), timeout=1)
    assert _http._GLOBAL_CLIENT_FACTORY is factory and not hub._SCOPES
    # Outside adapterkit the client is huggingface_hub's own again: no hooks of ours on it.
    assert hub._on_request not in _http.get_session().event_hooks["request"]
    assert HfApi().model_info(repo_id).sha == head_sha(hub_env, repo_id)
    assert os.environ.get(hub.TIMEOUT_ENV) is None
