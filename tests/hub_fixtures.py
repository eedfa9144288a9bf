"""Pytest fixtures that point the real huggingface_hub client at the loopback HubServer.

- ``hub_server`` (session): a started :class:`tests.hubserver.HubServer`.
- ``hub_env`` (function): sets ``HF_ENDPOINT``, a fresh ``HF_HOME``/``HF_HUB_CACHE``, a dummy
  ``HF_TOKEN`` and telemetry off, and patches the constants huggingface_hub read at import
  time (endpoint, URL template, cache, offline and Xet switches). Yields a ``HubEnv`` with
  ``server``, ``cache``, ``offline()``, ``unreachable()`` and ``lfs()`` helpers.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hubserver import HubServer


@pytest.fixture(scope="session")
def hub_server():
    with HubServer() as server:
        yield server


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class HubEnv:
    server: HubServer
    cache: Path
    monkeypatch: pytest.MonkeyPatch

    def _endpoint(self, url: str) -> None:
        from huggingface_hub import constants

        self.monkeypatch.setenv("HF_ENDPOINT", url)
        self.monkeypatch.setattr(constants, "ENDPOINT", url)
        self.monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    def offline(self) -> None:
        """HF_HUB_OFFLINE=1: only the cache answers."""
        from huggingface_hub import constants

        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        self.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def unreachable(self) -> None:
        """Point the client at a port nobody listens on."""
        self._endpoint(_closed_port_url())

    def lfs(self, threshold: int = 64) -> None:
        """Files above ``threshold`` bytes go through the LFS batch API (Xet off)."""
        from huggingface_hub import constants

        self.monkeypatch.setattr(self.server, "lfs_threshold", threshold)
        self.monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        self.monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub_env(hub_server, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_manager

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(cache))
    env = HubEnv(hub_server, cache, monkeypatch)
    env._endpoint(hub_server.url)
    yield env
