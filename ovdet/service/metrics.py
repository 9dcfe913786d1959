"""The service's counters and histograms, written in Prometheus' text exposition format (no client library needed)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.total}"]


class Metrics:
    """Requests and errors by route and status, request latency, batch sizes; queue depth read when scraped."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0):
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._latency = _Histogram(LATENCY_BUCKETS)
        self._batches = _Histogram(BATCH_BUCKETS)
        self._images = 0
        self.queue_depth = queue_depth

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(route, status)] += 1
            self._latency.observe(seconds)

    def batch(self, images: int) -> None:
        with self._lock:
            self._batches.observe(images)
            self._images += images

    def text(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        with self._lock:
            lines = ["# HELP ovdet_requests_total HTTP requests answered, by route and status.",
                     "# TYPE ovdet_requests_total counter"]
            lines += [f'ovdet_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self._requests.items())]
            lines += ["# HELP ovdet_errors_total HTTP requests answered with a 4xx or 5xx status.",
                      "# TYPE ovdet_errors_total counter",
                      f"ovdet_errors_total {sum(n for (_, s), n in self._requests.items() if s >= 400)}",
                      "# HELP ovdet_request_seconds Time from request to answer.",
                      "# TYPE ovdet_request_seconds histogram", *self._latency.lines("ovdet_request_seconds"),
                      "# HELP ovdet_batch_images Images in one forward pass (requests batched together).",
                      "# TYPE ovdet_batch_images histogram", *self._batches.lines("ovdet_batch_images"),
                      "# HELP ovdet_images_total Images detected in.", "# TYPE ovdet_images_total counter",
                      f"ovdet_images_total {self._images}"]
        lines += ["# HELP ovdet_queue_depth Requests waiting for the detector.", "# TYPE ovdet_queue_depth gauge",
                  f"ovdet_queue_depth {self.queue_depth()}"]
        return "\n".join(lines) + "\n"
