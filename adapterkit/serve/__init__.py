"""Serving many adapters on one base: the adapter pool and an OpenAI-compatible server on it.

- ``pool.py``: :class:`AdapterPool`, preallocated LoRA slots with LRU eviction, pinning, a CPU
  tier and per-call routing; ``slots.py``: the pooled layers' stacked buffers and routed forward;
- ``engine.py``: the embedded engine, batching requests across adapters on one model thread;
- ``app.py``: the FastAPI app (``create_app``) and ``BackgroundServer`` (needs ``adapterkit[serve]``);
- ``schemas.py``: request bodies and OpenAI's error shape; ``metrics.py``: Prometheus text;
- ``command.py``: ``adapterkit serve`` (``add_parser`` for the ``adapterkit`` command, ``main``).

This package imports FastAPI only in ``app.py``, so the command line works without the extra.
"""

from adapterkit.serve.command import add_parser, build_engine, main
from adapterkit.serve.engine import Engine
from adapterkit.serve.pool import AdapterPool

__all__ = ["AdapterPool", "Engine", "add_parser", "build_engine", "main"]
