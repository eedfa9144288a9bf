"""What every benchmark result records, and running one measurement in its own process.

Each side of a comparison runs in a fresh Python process, so its peak RSS is its own; the
sides of one comparison run back to back in the same invocation, and results are reported
as ratios because this machine is shared and its absolute speed drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def environment() -> dict[str, Any]:
    """Versions, commit and hardware of this run."""
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "adapterkit"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "commit": commit, "adapterkit_changed_since_commit": dirty,
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "versions": {n: version(n) for n in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
                                              "safetensors", "huggingface-hub", "setfit", "adapterkit")},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "memory_total_mb": _mem_total_mb(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _mem_total_mb() -> float | None:
    try:
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        return round(kb / 1024, 1)
    except (OSError, StopIteration):
        return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_arguments() -> tuple[str, dict[str, Any]]:
    """The ``--side`` and ``--settings`` a side's process was started with (see :func:`run_side`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", required=True)
    parser.add_argument("--settings", required=True)
    args = parser.parse_args()
    return args.side, json.loads(args.settings)


def run_side(module: str, side: str, settings: dict[str, Any], timeout: int = 3600) -> dict[str, Any]:
    """Run ``python -m <module> --side <side> --settings <json>`` and return the JSON it prints last."""
    cmd = [sys.executable, "-m", module, "--side", side, "--settings", json.dumps(settings)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} --side {side} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - started, 2)
    return result


def write_result(out: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``<out>/<name>.json`` atomically."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def save_json(out: str | None, name: str, result: dict[str, Any], *, quick: bool) -> Path | None:
    """Write ``result`` to ``out`` (default: ``benchmarks/results/<name>.json``; a quick run: nowhere)."""
    if out is None and quick:
        return None
    path = Path(out) if out else RESULTS / f"{name}.json"
    return write_result(path.parent, path.stem, result)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def median_ms(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls, in milliseconds."""
    import statistics
    import time

    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)
