"""The server's counters and latency histogram, written in Prometheus' text exposition format.

Only the handful of metric kinds the server records (counters and histograms with labels, and
gauges read at scrape time), thread-safe, in the format Prometheus scrapes (version 0.0.4):
https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable

#: Prometheus' text format, as its scrapers ask for it
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: request latency buckets, seconds: millisecond classifications to long generations
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: rows per model batch
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


_INF = 'le="+Inf"'


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


class Counter:
    """A counter per combination of label values."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the counter of ``labels``."""
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        """The count of ``labels`` so far."""
        return self._values.get(labels, 0.0)

    def samples(self) -> Iterable[str]:
        with self._lock:
            items = sorted(self._values.items())
        for labels, value in items:
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


class Histogram:
    """Observations bucketed by upper bound, per combination of label values."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.label_names = name, help, labels
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list] = {}  # labels -> [bucket counts..., sum, count]
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation of ``value`` under ``labels``."""
        with self._lock:
            series = self._series.setdefault(labels, [0] * len(self.buckets) + [0.0, 0])
            index = bisect.bisect_left(self.buckets, value)
            if index < len(self.buckets):
                series[index] += 1
            series[-2] += value
            series[-1] += 1

    def samples(self) -> Iterable[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for labels, series in items:
            cumulative = 0
            for bound, count in zip(self.buckets, series):
                cumulative += count
                le = _labels(self.label_names, labels, f'le="{_number(bound)}"')
                yield f"{self.name}_bucket{le} {cumulative}"
            yield f"{self.name}_bucket{_labels(self.label_names, labels, _INF)} {series[-1]}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_number(series[-2])}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {series[-1]}"


class Gauge:
    """A value read when scraped (``read()`` returns it)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge") -> None:
        self.name, self.help, self.read, self.kind = name, help, read, kind

    def samples(self) -> Iterable[str]:
        yield f"{self.name} {_number(self.read())}"


class Metrics:
    """Everything ``/metrics`` shows; ``render()`` writes the text format."""

    def __init__(self, pool_stats: Callable[[], dict[str, float]], adapters: Callable[[], int]) -> None:
        self.requests = Counter("adapterkit_requests_total", "HTTP requests by route and status.", ("route", "status"))
        self.latency = Histogram(
            "adapterkit_request_duration_seconds", "Time from request to the last byte of the response.", ("route",)
        )
        self.batch_rows = Histogram("adapterkit_batch_rows", "Rows per model batch.", ("kind",), BATCH_BUCKETS)
        self.tokens = Counter("adapterkit_generated_tokens_total", "Tokens generated.")
        self.joined = Counter("adapterkit_joined_rows_total", "Generation requests that joined a running batch.")
        self._metrics: list = [self.requests, self.latency, self.batch_rows, self.tokens, self.joined]
        self._metrics.append(Gauge("adapterkit_adapters", "Adapters the server serves.", lambda: adapters()))
        for key, kind, help in (
            ("hits", "counter", "Routed adapters found in a slot."),
            ("misses", "counter", "Routed adapters that had to be copied into a slot."),
            ("evictions", "counter", "Adapters evicted from their slot (LRU)."),
            ("loads", "counter", "Adapters read from disk into the pool."),
            ("load_seconds", "counter", "Seconds spent reading adapters into the pool."),
        ):
            self._metrics.append(
                Gauge(f"adapterkit_pool_{key}_total", help, lambda key=key: float(pool_stats().get(key, 0)), kind)
            )

    def render(self) -> str:
        """All metrics in Prometheus' text exposition format."""
        lines = []
        for metric in self._metrics:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"
