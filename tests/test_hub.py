"""The Hub path with the real huggingface_hub client against the loopback HubServer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

import adapterkit as ak
from adapterkit.cli import main as cli
from tests.test_artifacts import fresh, logits, trained
from tests.tiny import make_batch


def test_client_round_trip_regular_path(hub_env, tmp_path):
    api = HfApi()
    url = api.create_repo("me/plain")
    assert str(url).endswith("/me/plain")
    api.create_repo("me/plain", exist_ok=True)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.json").write_text('{"x": 1}')
    (folder / "b.txt").write_text("hello")
    info = api.upload_folder(repo_id="me/plain", folder_path=str(folder), commit_message="two files")
    assert len(info.oid) == 40
    assert open(hf_hub_download("me/plain", "b.txt")).read() == "hello"
    (folder / "b.txt").write_text("changed")
    api.upload_folder(repo_id="me/plain", folder_path=str(folder))
    assert open(hf_hub_download("me/plain", "b.txt", revision=info.oid)).read() == "hello"  # older revision by sha
    assert open(hf_hub_download("me/plain", "b.txt")).read() == "changed"
    assert sorted(p.name for p in __import__("pathlib").Path(snapshot_download("me/plain")).iterdir()) == ["a.json", "b.txt"]
    assert ("POST", "/api/validate-yaml") not in hub_env.server.requests[-3:]  # no README here


def test_client_errors_map_to_hub_exceptions(hub_env):
    HfApi().create_repo("me/errs")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/nothing-here", "x.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("me/errs", "x.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("me/errs", "x.json")


def test_lfs_upload_path(hub_env, tmp_path):
    hub_env.lfs(threshold=64)
    model = trained("bert", "lora")
    folder = ak.save(model, tmp_path / "a")
    ak.publish(folder, "me/lfs-adapter")
    assert any("/info/lfs/objects/batch" in p for _, p in hub_env.server.requests)
    other = ak.load(fresh("bert"), "me/lfs-adapter")
    batch = make_batch("bert")
    torch.testing.assert_close(logits(other, batch), logits(model, batch))


def test_publish_is_one_commit_and_returns_its_url(hub_env, tmp_path):
    model = trained("gpt2", "lora")
    before = len([r for r in hub_env.server.requests if "/commit/" in r[1]])
    url = ak.publish(model, "me/one-commit", commit_message="first adapter")
    assert len([r for r in hub_env.server.requests if "/commit/" in r[1]]) == before + 1
    assert url.startswith(hub_env.server.url) and len(url.rsplit("/", 1)[1]) == 40
    files = {s.rfilename for s in HfApi().model_info("me/one-commit").siblings}
    assert files == {"README.md", "adapter_config.json", "adapter_model.safetensors", "adapterkit.json"}


def test_revisions_and_missing_revision(hub_env, tmp_path):
    first = trained("bert", "head", seed=0)
    second = trained("bert", "head", seed=1)
    ak.publish(first, "me/revs")
    ak.publish(second, "me/revs", revision="v2")
    batch = make_batch("bert")
    main = ak.load(fresh("bert"), "me/revs")
    v2 = ak.load(fresh("bert"), "me/revs", revision="v2")
    torch.testing.assert_close(logits(main, batch), logits(first, batch))
    torch.testing.assert_close(logits(v2, batch), logits(second, batch))
    with pytest.raises(ak.AdapterNotFoundError, match="no revision 'v3'"):
        ak.load(fresh("bert"), "me/revs", revision="v3")
    with pytest.raises(ak.AdapterNotFoundError, match="No adapter repo 'me/absent'"):
        ak.load(fresh("bert"), "me/absent")


def test_offline_mode_uses_the_cache_and_makes_no_requests(hub_env):
    model = trained("bert", "lora")
    ak.publish(model, "me/cached")
    ak.load(fresh("bert"), "me/cached")  # fills the cache
    hub_env.offline()
    count = len(hub_env.server.requests)
    other = ak.load(fresh("bert"), "me/cached")
    assert len(hub_env.server.requests) == count
    batch = make_batch("bert")
    torch.testing.assert_close(logits(other, batch), logits(model, batch))


def test_unreachable_hub_falls_back_to_cache_or_explains(hub_env):
    model = trained("bert", "lora")
    ak.publish(model, "me/fallback")
    ak.load(fresh("bert"), "me/fallback")
    hub_env.unreachable()
    other = ak.load(fresh("bert"), "me/fallback")  # served from the cache, with a warning
    assert ak.list_adapters(other) == ["default"]
    with pytest.raises(ak.HubError, match="unreachable"):
        ak.load(fresh("bert"), "me/never-downloaded")
    with pytest.raises(ak.HubError, match="unreachable"):
        ak.publish(model, "me/new")


def test_cli_publish_info_pull_list(hub_env, tmp_path, capsys):
    folder = ak.save(trained("bert", "prefix"), tmp_path / "p")
    assert cli(["publish", str(folder), "me/cli"]) == 0
    assert cli(["pull", "me/cli"]) == 0
    pulled = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(open(f"{pulled}/adapterkit.json").read())["strategy"] == "prefix"
    assert cli(["info", "me/cli"]) == 0
    assert "prefix" in capsys.readouterr().out
    assert cli(["list"]) == 0
    assert "me/cli" in capsys.readouterr().out
    assert cli(["info", "me/does-not-exist"]) == 2
    assert "No adapter repo" in capsys.readouterr().err


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {root!r})
    import adapterkit as ak
    from tests.test_artifacts import fresh, logits
    from tests.tiny import make_batch
    model = fresh("bert")
    for repo in ("me/e2e-lora", "me/e2e-prefix"):
        ak.load(model, repo, name=repo.split("-")[-1])
    batch = make_batch("bert")
    out = {{}}
    for name in ("lora", "prefix", "lora"):
        ak.use(model, name)
        out[name] = logits(model, batch).tolist()
    print(json.dumps(out))
    """
)


def test_two_adapters_published_loaded_in_a_fresh_process_and_switched(hub_env, tmp_path):
    import os
    from pathlib import Path

    model = fresh("bert")
    trained("bert", "lora", name="lora", model=model, seed=0)
    trained("bert", "prefix", name="prefix", model=model, seed=1)
    batch = make_batch("bert")
    expected = {}
    for name in ("lora", "prefix"):
        ak.use(model, name)
        expected[name] = logits(model, batch)
        ak.publish(model, f"me/e2e-{name}", name=name)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "HF_ENDPOINT": hub_env.server.url, "HF_HOME": str(tmp_path / "fresh_home"),
           "HF_HUB_CACHE": str(tmp_path / "fresh_home" / "hub"), "HF_TOKEN": "hf_test_token"}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS.format(root=root)], env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("lora", "prefix"):
        assert torch.equal(torch.tensor(out[name]), expected[name])
