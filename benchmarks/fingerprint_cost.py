"""What the base fingerprint costs on smollm2-135m: the first-version one beside the current one.

For each load of the base (fp32, bf16, and bitsandbytes nf4 / int8 where installed) it times
the fingerprint as adapterkit computed it before version 2 (copied below as ``before``), the
current one cold (cache dropped) and cached, and ``adapterkit.load`` of a saved LoRA adapter
with each. Run ``python -m benchmarks.fingerprint_cost [--repeat 5]``; it prints a table and
writes ``benchmarks/results/fingerprint.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import RESULTS, environment, peak_rss_mb


# --- before: the fingerprint and check as they were (adapterkit 0.x, sidecar format 1) ---------
def _before_base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, p in model.named_parameters():
        if name.startswith("adapterkit") or ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        out.append((name.replace(".base_layer", ""), p))
    return out


def _before_logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    state = getattr(p, "quant_state", None)
    return tuple(int(d) for d in state.shape) if state is not None else tuple(p.shape)


def before_fingerprint(model: nn.Module) -> dict[str, Any]:
    from adapterkit.targets import head_paths

    config = model.config
    heads = tuple(p + "." for p in head_paths(model))
    backbone = sorted(
        (n, _before_logical_shape(p)) for n, p in _before_base_parameters(model) if not n.startswith(heads)
    )
    shapes = hashlib.sha256(json.dumps(backbone).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    embeddings = model.get_input_embeddings().weight
    for tensor in [embeddings] + [p for n, p in _before_base_parameters(model) if "norm" in n.lower() and p.dim() == 1]:
        flat = tensor.detach().reshape(-1)[:65536].to(torch.bfloat16).to(torch.float32).cpu()
        digest.update(flat.numpy().tobytes())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None) or getattr(text, "d_model", None),
        "num_layers": getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "shapes": shapes,
        "weights": digest.hexdigest()[:16],
    }


def before_check_fit(saved, current, saved_id, current_id):
    both = f"the adapter was trained on {saved_id or 'an unnamed base'} but this base is {current_id or 'unnamed'}"
    if saved.get("model_type") != current.get("model_type"):
        return f"other architecture: {both}"
    for key in ("hidden_size", "num_layers", "vocab_size"):
        if saved.get(key) != current.get(key):
            return f"other {key}: {both}"
    if saved.get("shapes") != current.get("shapes"):
        return f"other parameter shapes: {both}"
    if saved.get("weights") != current.get("weights"):
        return f"same architecture but other weights: {both}"
    return None


# --- measurement --------------------------------------------------------------------------
def _times_ms(fn, repeat: int, before_each=None) -> list[float]:
    out = []
    for _ in range(repeat):
        if before_each is not None:
            before_each()
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1e3)
    return out


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2), "runs": len(times)}


def _loads(bits_ok: bool) -> dict[str, dict[str, Any]]:
    loads = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}}
    if bits_ok:
        loads.update({"nf4": {"bits": 4}, "int8": {"bits": 8}})
    return loads


def measure(repeat: int) -> dict[str, Any]:
    """Time old vs new fingerprint and adapter loading for every supported load of smollm2-135m."""
    import adapterkit as ak
    import adapterkit.artifacts as artifacts
    from adapterkit import fingerprint as fp

    bits_ok = importlib.util.find_spec("bitsandbytes") is not None
    work = Path(tempfile.mkdtemp(prefix="fingerprint-cost-"))
    model, _ = ak.load_base("smollm2-135m")
    ak.attach(model, "lora", r=8)
    adapter = ak.save(model, work / "adapter")
    sidecar = json.loads((adapter / artifacts.SIDECAR).read_text())
    saved_fp = sidecar["base_model"]["fingerprint"]
    sizes = {"before_bytes": len(json.dumps(before_fingerprint(model))), "after_bytes": len(json.dumps(saved_fp))}
    del model

    rows = {}
    for label, kwargs in _loads(bits_ok).items():
        base, _ = ak.load_base("smollm2-135m", **kwargs)
        forget = lambda: fp.forget_fingerprint(base)  # noqa: E731
        row: dict[str, Any] = {}
        started = time.perf_counter()
        fp.fingerprint(base)
        row["after_first_call_ms"] = round((time.perf_counter() - started) * 1e3, 2)
        row["before_fingerprint"] = _summary(_times_ms(lambda: before_fingerprint(base), repeat))
        row["after_fingerprint_cold"] = _summary(_times_ms(lambda: fp.fingerprint(base), repeat, forget))
        fp.fingerprint(base)
        row["after_fingerprint_cached"] = _summary(_times_ms(lambda: fp.fingerprint(base), repeat))
        row["fits"] = fp.check_fit(saved_fp, fp.fingerprint(base), "fp32", label) is None

        def load_once():
            ak.load(base, str(adapter), name="bench")

        def unload():
            if "bench" in ak.list_adapters(base):
                ak.detach(base, "bench")

        originals = artifacts.fingerprint, artifacts.check_fit
        artifacts.fingerprint, artifacts.check_fit = before_fingerprint, before_check_fit
        try:
            row["before_load"] = _summary(_times_ms(load_once, repeat, unload))
        finally:
            artifacts.fingerprint, artifacts.check_fit = originals
        row["after_load_cold"] = _summary(_times_ms(load_once, repeat, lambda: (unload(), forget())))
        row["after_load_cached"] = _summary(_times_ms(load_once, repeat, unload))
        unload()
        rows[label] = row
        del base
    return {"sidecar_fingerprint": sizes, "loads": rows, "peak_rss_mb": round(peak_rss_mb(), 1)}


def table(result: dict[str, Any]) -> str:
    """The result as a markdown table (medians, ms)."""
    cols = [
        ("fingerprint before", "before_fingerprint"), ("after cold", "after_fingerprint_cold"),
        ("after cached", "after_fingerprint_cached"), ("load before", "before_load"),
        ("load after cold", "after_load_cold"), ("load after cached", "after_load_cached"),
    ]
    lines = ["| base | " + " | ".join(c for c, _ in cols) + " | first call | fits |",
             "|---|" + "---:|" * (len(cols) + 1) + "---|"]
    for label, row in result["loads"].items():
        cells = [f"{row[k]['median_ms']:.1f}" for _, k in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['after_first_call_ms']:.1f} | {row['fits']} |")
    sizes = result["sidecar_fingerprint"]
    lines.append("")
    lines.append(f"Fingerprint in the sidecar: {sizes['before_bytes']} bytes before, {sizes['after_bytes']} after.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per measurement (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fingerprint.json")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    result = {"benchmark": "fingerprint_cost", "model": "smollm2-135m", "repeat": args.repeat,
              "environment": environment(), **measure(args.repeat)}
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
