"""`ovdet serve` under load, on loopback only: latency and throughput at 1, 4 and 16 concurrent clients against
offline detect_batch, and an overload run where every request must get a 200 or a 503 while RSS stays flat.

    python benchmarks/bench_serve.py [--model demo] [--backend torch] [--requests 20] [--max-batch 8]
                                     [--max-wait-ms 5] [--clients 1,4,16] [--overload-clients 64]

The server is the real app on uvicorn in this process (a thread), bound to 127.0.0.1 on a free port; each client is
a thread with its own httpx connection that sends --requests multipart requests of one image (samples/shapes.jpg,
the same vocabulary), so concurrent requests batch. "offline" is detect_batch on the same detector, the same image
and batch size min(clients, --max-batch), in a loop of the same total number of images: what the service can at
best reach. overload: --overload-clients clients against --max-queue 4 send --requests each without pause; every
answer must be 200 or 503 (with Retry-After), none may fail or hang, RSS (ru_maxrss and the current RSS) is shown
before and after.
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "samples" / "shapes.jpg"
CLASSES = "red circle,blue square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Server:
    """The app on uvicorn in a thread; `stop()` shuts it down gracefully."""

    def __init__(self, det, settings):
        import uvicorn

        from ovdet.service import create_app

        self.port = free_port()
        config = uvicorn.Config(create_app(det, settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)


def load(url: str, clients: int, requests: int) -> dict:
    """`clients` threads × `requests` sequential requests; latencies of the 200s, status counts, wall time."""
    import httpx

    data = IMAGE.read_bytes()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def client():
        with httpx.Client(timeout=120) as http:
            for _ in range(requests):
                started = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/detect", data={"classes": CLASSES},
                                  files={"image": ("shapes.jpg", data, "image/jpeg")})
                    key = str(r.status_code) + ("" if r.status_code != 503 or "retry-after" in r.headers else "!")
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                took = time.perf_counter() - started
                with lock:
                    statuses[key] = statuses.get(key, 0) + 1
                    if key == "200":
                        latencies.append(took)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    [t.start() for t in threads]
    [t.join(600) for t in threads]
    wall = time.perf_counter() - started
    return {"latencies": sorted(latencies), "statuses": statuses, "wall": wall,
            "hung": sum(t.is_alive() for t in threads)}


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def offline(det, batch: int, images: int) -> float:
    """Images/s of detect_batch over `images` images in batches of `batch`, in a thread of its own as the server's
    worker runs it (on a loaded machine torch's CPU kernels ran 7-10× slower from the main thread than from another
    one, which would flatter the server)."""
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(_offline(det, batch, images)))
    thread.start()
    thread.join()
    return out[0]


def _offline(det, batch: int, images: int) -> float:
    from ovdet.media.sources import load_image

    image = load_image(IMAGE)
    det.detect_batch([image] * batch)  # warm
    started = time.perf_counter()
    done = 0
    while done < images:
        n = min(batch, images - done)
        det.detect_batch([image] * n)
        done += n
    return images / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--overload-clients", type=int, default=64)
    args = parser.parse_args(argv)

    from ovdet.detector import OVDetector
    from ovdet.service import ServeSettings

    det = OVDetector(args.model, device=args.device, backend=args.backend)
    det.set_classes(CLASSES)
    print(f"# {det.model_id} on {det.backend} {det.precision}, {args.device}; max_batch {args.max_batch}, "
          f"max_wait {args.max_wait_ms} ms; {args.requests} requests per client")
    print("| clients | p50 ms | p99 ms | images/s | offline detect_batch images/s | ratio | statuses |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=256,
                             persist_vocabularies=False)
    server = Server(det, settings)
    try:
        load(server.url, 1, 3)  # warm
        results = []
        for clients in (int(c) for c in args.clients.split(",")):
            run = load(server.url, clients, args.requests)
            results.append((clients, run))
    finally:
        server.stop()
    for clients, run in results:  # offline after the server stopped: the detector has one user at a time
        served = sum(run["statuses"].values()) / run["wall"]
        best = offline(det, min(clients, args.max_batch), clients * args.requests)
        print(f"| {clients} | {1000 * pct(run['latencies'], 0.5):.1f} | {1000 * pct(run['latencies'], 0.99):.1f} | "
              f"{served:.1f} | {best:.1f} | {served / best:.2f} | {run['statuses']} |")

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=4,
                             persist_vocabularies=False)
    server = Server(det, settings)
    try:
        before = rss_mib()
        run = load(server.url, args.overload_clients, args.requests)
        after = rss_mib()
    finally:
        server.stop()
    bad = {k: v for k, v in run["statuses"].items() if k not in ("200", "503")}
    print(f"\noverload: {args.overload_clients} clients × {args.requests} requests, queue 4: {run['statuses']}, "
          f"hung {run['hung']}, RSS {before:.0f} → {after:.0f} MiB, p99 of the 200s "
          f"{1000 * pct(run['latencies'], 0.99):.0f} ms")
    return 1 if bad or run["hung"] else 0


if __name__ == "__main__":
    sys.exit(main())
