"""PNG plots of a benchmark result: real tokens/s and peak memory per side."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar charts of real tokens/s and peak RSS for the training sides (and smollm2 bits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if results.get("train_speed"):
        rows = results["train_speed"]["rows"]
        panels.append(("minilm-l6 SST-2: real tokens/s", [r["side"] for r in rows], [r["real_tokens_per_s"] for r in rows]))
        panels.append(("minilm-l6 SST-2: peak RSS (MB)", [r["side"] for r in rows], [r["peak_rss_mb"] for r in rows]))
    if results.get("smollm2"):
        rows = results["smollm2"]["rows"]
        panels.append(("smollm2-135m LoRA: peak RSS (MB)", [f"bits={r['bits']}" for r in rows], [r["peak_rss_mb"] for r in rows]))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)))
    axes = axes if len(panels) > 1 else [axes]
    for ax, (title, labels, values) in zip(axes, panels):
        colors = ["tab:orange" if label.startswith("adapterkit") or label.startswith("bits") else "tab:gray" for label in labels]
        ax.barh(labels, values, color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
