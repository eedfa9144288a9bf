"""PNG plots of a benchmark result: one panel per measured section."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _colors(labels: list[str]) -> list[str]:
    return ["tab:orange" if label.startswith(("adapterkit", "fewshot", "ak")) else "tab:gray" for label in labels]


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar charts: training tokens/s and peak RSS, smollm2 memory by bits, runtime costs, few-shot accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[str], list[float], list[float] | None, str]] = []
    if results.get("train_speed"):
        rows = results["train_speed"]["rows"]
        panels.append(("minilm-l6 SST-2 training: real (non-pad) tokens/s", [r["side"] for r in rows],
                       [r["real_tokens_per_s"] for r in rows], None, "linear"))
        panels.append(("minilm-l6 SST-2 training: peak RSS (MB)", [r["side"] for r in rows], [r["peak_rss_mb"] for r in rows],
                       None, "linear"))
    if results.get("smollm2"):
        rows = [r for r in results["smollm2"]["rows"] if "error" not in r]
        labels = [f"{r['side']} {r['bits'] or 32}-bit" for r in rows]
        panels.append(("smollm2-135m LoRA: peak RSS (MB)", labels, [r["peak_rss_mb"] for r in rows], None, "linear"))
        panels.append(("smollm2-135m LoRA: dev accuracy", labels, [r["accuracy"] for r in rows], None, "linear"))
    rt = results.get("runtime")
    if rt:
        labels = ["adapterkit switch (2)", "peft set_adapter (2)", "adapterkit switch (16)", "peft set_adapter (16)",
                  "adapterkit load", "peft load_adapter", "adapterkit mixed 8x8", "adapterkit one at a time",
                  "peft mixed 8x8", "peft one at a time"]
        keys = ["switch_ms_2", "peft_set_adapter_ms_2", "switch_ms_16", "peft_set_adapter_ms_16", "load_ms",
                "peft_load_adapter_ms", "mixed_batch_ms", "one_at_a_time_ms", "peft_mixed_batch_ms", "peft_one_at_a_time_ms"]
        pairs = [(lab, rt[k]) for lab, k in zip(labels, keys) if isinstance(rt.get(k), (int, float))]
        panels.append(("smollm2-135m runtime costs (ms, log scale)", [p[0] for p in pairs], [p[1] for p in pairs], None, "log"))
    q = results.get("quality")
    if q and q.get("summary"):
        s = q["summary"]
        panels.append(("few-shot SST-2 accuracy (mean ± std over seeds)", [f"{r['method']} k={r['k_per_class']}" for r in s],
                       [r["accuracy_mean"] for r in s], [r["accuracy_std"] for r in s], "linear"))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 0.45 * sum(len(p[1]) for p in panels) + 1.2 * len(panels)))
    axes = axes if len(panels) > 1 else [axes]
    for ax, (title, labels, values, errors, scale) in zip(axes, panels):
        ax.barh(labels, values, xerr=errors, color=_colors(labels))
        ax.set_xscale(scale)
        ax.set_title(title)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.3g}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
