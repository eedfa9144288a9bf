"""Pytest fixtures that point the real huggingface_hub client at the loopback HubServer.

Use from tests/conftest.py with ``pytest_plugins = ["tests.hub_fixtures"]`` (or import
``hub_server`` and ``hub_env`` from here), then::

    def test_upload(hub_env, tmp_path):
        api = HfApi()                          # built inside the test: picks up the patched endpoint
        api.create_repo("me/thing")
        ...
        assert hub_env.server.request_count > 0

- ``hub_server`` (session): a started :class:`tests.hubserver.HubServer`. Repos live for the
  whole session, so give each test its own repo names (``hub_env.repo_id("name")`` helps).
- ``hub_env`` (function): yields a :class:`HubEnv` after pointing the client at the server:
  env vars ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE`` (fresh, under tmp_path), ``HF_TOKEN``
  (dummy), ``HF_HUB_DISABLE_TELEMETRY=1``, offline and Xet switches cleared, *and* the
  module-level copies huggingface_hub made of them at import time (see ``_patch_client``).
  It clears the server's request log, so ``server.requests`` holds this test's requests.
  Helpers: ``offline()`` (HF_HUB_OFFLINE=1), ``lfs(threshold)`` (Xet off, files above
  ``threshold`` bytes take the LFS batch path), ``unreachable()`` (endpoint = a closed port,
  for the rest of the test; ``with hub_env.server.unreachable():`` is the temporary form),
  ``no_retry_waits()`` (client backoff without sleeping; ``unreachable()`` does it),
  ``use_endpoint(url)``, ``repo_id(name)``.
  Everything is undone by monkeypatch at the end of the test.

Why the constants: ``huggingface_hub.constants`` reads env vars once, at import; the client reads
``constants.X`` at call time, so patching the module attribute switches endpoint / cache /
offline / Xet per test without re-importing. A few places copied a value out of ``constants``
at import (``from ..constants import X`` or an ``HfApi()`` built at import) and are patched too,
as are the copies in ``transformers`` and ``datasets`` when those are already imported.
An ``HfApi`` that a test builds before switching endpoint keeps its old ``endpoint``.
"""

from __future__ import annotations

import itertools
import socket
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hubserver import HubServer

_names = itertools.count()


@pytest.fixture(scope="session")
def hub_server():
    with HubServer() as server:
        yield server


def _closed_port_url() -> str:
    with socket.socket() as s:  # bind then close: nothing listens there, connections are refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _patch_client(mp: pytest.MonkeyPatch, *, endpoint: str | None = None, home: Path | None = None,
                  offline: bool | None = None, disable_xet: bool | None = None) -> None:
    """Set the env vars *and* every import-time copy huggingface_hub 2.4.0 keeps of them."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_assets, _cache_manager, _git_credential

    if endpoint is not None:
        mp.setenv("HF_ENDPOINT", endpoint)
        mp.setattr(constants, "ENDPOINT", endpoint)
        # hf_hub_url() formats this template, and only rewrites URLs that start with constants.ENDPOINT.
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(_git_credential, "ENDPOINT", endpoint)
        # huggingface_hub.create_repo / upload_folder / model_info ... are bound methods of this
        # HfApi, built at import: its endpoint is frozen unless patched.
        mp.setattr(hf_api.api, "endpoint", endpoint)
        # transformers caches its own HfApi on first use (push_to_hub & co); drop it so the next
        # use builds one against the current endpoint. transformers / datasets are patched only
        # if already imported (importing them here would slow every test down); imported later,
        # they read the env vars set here.
        if "transformers.utils.hub" in sys.modules:
            mp.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)
        if datasets_config := sys.modules.get("datasets.config"):  # `datasets` copies the endpoint too
            mp.setattr(datasets_config, "HF_ENDPOINT", endpoint)
            mp.setattr(datasets_config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    if home is not None:
        cache, assets, xet = home / "hub", home / "assets", home / "xet"
        cache.mkdir(parents=True, exist_ok=True)
        for var, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_ASSETS_CACHE": assets,
                           "HF_XET_CACHE": xet}.items():
            mp.setenv(var, str(value))
            mp.setattr(constants, var, str(value))
        mp.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(cache))  # legacy alias, still exported
        mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        mp.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        mp.setattr(_cache_manager, "HF_HUB_CACHE", str(cache))  # scan_cache_dir() default
        mp.setattr(_cache_assets, "HF_ASSETS_CACHE", str(assets))
        if datasets_config := sys.modules.get("datasets.config"):
            mp.setattr(datasets_config, "HF_DATASETS_CACHE", home / "datasets")
    if offline is not None:
        mp.setenv("HF_HUB_OFFLINE", "1") if offline else mp.delenv("HF_HUB_OFFLINE", raising=False)
        for var in ("TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # also read into *_OFFLINE at import
            mp.delenv(var, raising=False)
        # is_offline_mode() returns constants.HF_HUB_OFFLINE; transformers and peft ask it (or the env).
        mp.setattr(constants, "HF_HUB_OFFLINE", offline)
        if datasets_config := sys.modules.get("datasets.config"):
            mp.setattr(datasets_config, "HF_HUB_OFFLINE", offline)
            mp.setattr(datasets_config, "HF_DATASETS_OFFLINE", offline)
    if disable_xet is not None:
        mp.setenv("HF_HUB_DISABLE_XET", "1") if disable_xet else mp.delenv("HF_HUB_DISABLE_XET", raising=False)
        mp.setattr(constants, "HF_HUB_DISABLE_XET", disable_xet)  # is_xet_available() reads it per call


@dataclass
class HubEnv:
    server: HubServer
    home: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def cache(self) -> Path:
        return self.home / "hub"

    def use_endpoint(self, url: str) -> None:
        _patch_client(self.monkeypatch, endpoint=url)

    def offline(self) -> None:
        """HF_HUB_OFFLINE=1: the client refuses to send any request; only the cache answers."""
        _patch_client(self.monkeypatch, offline=True)

    def unreachable(self) -> None:
        """Point the client at a port nobody listens on (the session server keeps running)."""
        self.use_endpoint(_closed_port_url())
        self.no_retry_waits()

    def no_retry_waits(self) -> None:
        """Make the client's retry backoff instant (the attempts still happen).

        On a cache miss hf_hub_download retries a failed HEAD with backoff (1+2+4+8+8 s), so each
        "Hub down, file not cached" case would cost ~23 s; a download cut short is resumed up to 5
        times, 1 s apart. Only ``time.sleep`` of those two modules is used. adapterkit's own
        backoff between attempts (``adapterkit.hub._sleep``) is made instant too; its decisions
        (how many attempts, within which budget) still run on the real clock.
        """
        from huggingface_hub import file_download
        from huggingface_hub.utils import _http

        from adapterkit import hub

        no_sleep = types.SimpleNamespace(sleep=lambda seconds: None)
        self.monkeypatch.setattr(_http, "time", no_sleep)
        self.monkeypatch.setattr(file_download, "time", no_sleep)
        self.monkeypatch.setattr(hub, "_sleep", lambda seconds: None, raising=False)  # older adapterkit: none

    def lfs(self, threshold: int = 64) -> None:
        """Files above ``threshold`` bytes go through the LFS batch API (Xet off)."""
        self.monkeypatch.setattr(self.server, "lfs_threshold", threshold)
        _patch_client(self.monkeypatch, disable_xet=True)

    def repo_id(self, name: str, namespace: str = "me") -> str:
        """A repo id no other test of this session uses (the session server keeps all repos)."""
        return f"{namespace}/{name}-{next(_names)}"


@pytest.fixture
def hub_env(hub_server, tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):  # would take precedence / trigger OIDC
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    _patch_client(monkeypatch, endpoint=hub_server.url, home=home, offline=False, disable_xet=False)
    hub_server.clear_log()
    yield HubEnv(hub_server, home, monkeypatch)
    assert not hub_server.errors, "the test hub hit a bug:\n" + "\n".join(hub_server.errors)
