"""Cross-request batching: one worker thread owns the detector and runs requests that share a vocabulary (and
thresholds) in one detect_batch call, bounded in images per batch and in how long it waits for company.

set_classes and detect_batch are not thread-safe, so nothing but the worker touches the detector. The queue is
bounded: a full one refuses at once (the app answers 503 with Retry-After) instead of growing without end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ovdet.service.settings import ServiceError

__all__ = ["Batcher", "Job"]


@dataclass
class Job:
    """One request's images, to run with `spec` (a ClassSpec) and `options` (detect_batch keywords); `key` groups
    jobs that may share a forward pass (same vocabulary, same options)."""

    key: Hashable
    spec: Any
    images: list
    options: dict
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Outcome:
    """A job's detections with how it ran: the batch's images and requests, seconds queued and in the model."""

    detections: list
    batch_images: int
    batch_requests: int
    queue_s: float
    inference_s: float


class Batcher:
    """Runs Jobs on `detector` in a worker thread; `submit` returns a Future of an Outcome."""

    def __init__(self, detector: Any, max_batch: int = 8, max_wait_ms: float = 5.0, max_queue: int = 64,
                 on_batch: Callable[[int], None] = lambda n: None):
        self.detector = detector
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1000.0
        self.max_queue = max(1, max_queue)
        self.on_batch = on_batch
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._key: Hashable = None  # the vocabulary the detector holds now
        self._thread = threading.Thread(target=self._loop, name="ovdet-serve-worker", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        """Jobs waiting (not yet in a batch)."""
        with self._cond:
            return len(self._jobs)

    def submit(self, job: Job) -> Future:
        """Queue `job`; ServiceError 503 (with Retry-After) when the queue is full or the server is stopping."""
        with self._cond:
            if self._closing:
                raise ServiceError(503, "shutting_down", "the server is shutting down; retry on another replica",
                                   {"Retry-After": "1"})
            if len(self._jobs) >= self.max_queue:
                raise ServiceError(503, "queue_full", f"{len(self._jobs)} requests are waiting, the most this server "
                                   "queues; retry after the Retry-After seconds", {"Retry-After": "1"})
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking jobs, finish the queued ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take(self, key: Hashable, room: int) -> list[Job]:
        """Remove and return queued jobs with `key` that fit in `room` images (caller holds the lock)."""
        taken = []
        for job in list(self._jobs):
            if job.key == key and len(job.images) <= room:
                self._jobs.remove(job)
                taken.append(job)
                room -= len(job.images)
        return taken

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._jobs.popleft()
            batch = [first]
            room = self.max_batch - len(first.images)
            deadline = time.monotonic() + self.max_wait
            while room > 0:
                more = self._take(first.key, room)
                batch += more
                room -= sum(len(j.images) for j in more)
                left = deadline - time.monotonic()
                if room <= 0 or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        started = time.perf_counter()
        try:
            if self._key != first.key:
                self._key = None
                self.detector.set_classes(first.spec)
                self._key = first.key
            images = [im for job in batch for im in job.images]
            results = self.detector.detect_batch(images, **first.options)
        except BaseException as exc:  # every waiting request learns why (the app maps it to a status)
            for job in batch:
                job.future.set_exception(exc)
            return
        took = time.perf_counter() - started
        self.on_batch(len(images))
        at = 0
        for job in batch:
            n = len(job.images)
            job.future.set_result(Outcome(results[at:at + n], len(images), len(batch), started - job.queued_at, took))
            at += n
