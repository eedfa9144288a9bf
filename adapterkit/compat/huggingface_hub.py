"""huggingface_hub internals: the HTTP client factory currently installed.

Checked against huggingface_hub 2.4.0 (``huggingface_hub.utils._http``).
"""

from __future__ import annotations

from collections.abc import Callable


def client_factory() -> Callable:
    """The factory huggingface_hub builds its HTTP client with now (what ``set_client_factory``
    last set, else its default): ``huggingface_hub.utils._http._GLOBAL_CLIENT_FACTORY``, which has
    no public getter."""
    from huggingface_hub.utils import _http

    return getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
