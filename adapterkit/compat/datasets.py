"""datasets internals: a dataset's fingerprint.

Checked against datasets 5.2.0 (``datasets.arrow_dataset.Dataset``).
"""

from __future__ import annotations

from typing import Any


def fingerprint(ds: Any) -> str | None:
    """The fingerprint datasets keeps for ``ds`` (the private ``Dataset._fingerprint``: the id its
    ``map`` caches are named by, updated by every transform), or None when it has none."""
    value = getattr(ds, "_fingerprint", None)
    return value if isinstance(value, str) else None
