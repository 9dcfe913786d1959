"""`ovdet serve`: the HTTP detection service and Label Studio ML backend (FastAPI on uvicorn, imported in run())."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ovdet.cli import HelpFormatter
from ovdet.cli._common import add_model_options, detector_config, detector_from_args
from ovdet.service.settings import TOKEN_ENV, ServeConfigError, ServeSettings, check_bind
from ovdet.util.display import shown

_DEFAULTS = ServeSettings()


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("serve", help="serve detection over HTTP (and as a Label Studio ML backend)",
                            description="Serve the detector over HTTP: POST /v1/detect, stored vocabularies, "
                                        "/health, /metrics, OpenAPI at /docs, and Label Studio's ML-backend "
                                        "protocol (/setup, /predict). See README, HTTP service and Label Studio.",
                            formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; any other than loopback needs a token")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--token", default=None,
                        help=f"bearer token clients must send (default: ${TOKEN_ENV}; none: no auth, loopback only)")
    parser.add_argument("--allow-urls", action="store_true", help="fetch images given as http(s) URLs")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="read images given as local paths (Label Studio tasks: uploads, /data/upload/...) from "
                             "under this folder only, e.g. Label Studio's media folder")
    parser.add_argument("--local-files-root", default=None, metavar="DIR",
                        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: tasks of its local files storage "
                             "(/data/local-files/?d=...) are read from under it (default: --data-root)")
    group = parser.add_argument_group("batching and limits")
    group.add_argument("--max-batch", type=int, default=_DEFAULTS.max_batch, help="most images in one forward pass")
    group.add_argument("--max-wait-ms", type=float, default=_DEFAULTS.max_wait_ms,
                       help="how long a batch waits for more requests with the same vocabulary")
    group.add_argument("--max-queue", type=int, default=_DEFAULTS.max_queue,
                       help="requests waiting for the detector; more are answered 503 with Retry-After")
    group.add_argument("--max-body-mb", type=float, default=_DEFAULTS.max_body_bytes / 2**20,
                       help="largest request body in MiB")
    group.add_argument("--max-pixels", type=int, default=_DEFAULTS.max_pixels, help="largest image, in pixels")
    group.add_argument("--max-images", type=int, default=_DEFAULTS.max_images, help="most images per request")
    group.add_argument("--no-persist", dest="persist", action="store_false",
                       help="keep stored vocabularies in memory only, not also as JSON under $OVDET_HOME/vocabularies")
    ray = parser.add_argument_group("Ray Serve (several replicas, one machine or a cluster)")
    ray.add_argument("--ray", action="store_true",
                     help="run the app as a Ray Serve deployment of --replicas copies behind Ray's HTTP proxy "
                          '(pip install "ovdet[serve,ray]")')
    ray.add_argument("--replicas", type=int, default=None, metavar="N",
                     help="detector replicas (default: one per GPU of the cluster, else one per node holding its "
                          "CPUs: a replica's batcher and backend already use every core it gets)")
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="Ray cluster to run on ('auto', 'ray://head:10001'; default: $RAY_ADDRESS, else a Ray "
                          "instance of this machine started for the server and stopped with it)")
    ray.add_argument("--cpus-per-replica", type=float, default=None, metavar="N",
                     help="CPUs per replica, its backend threads (default: from --replicas and the nodes' CPUs)")
    ray.add_argument("--gpus-per-replica", type=float, default=None, metavar="N",
                     help="GPUs per replica (default: 1 when the cluster has GPUs, else 0)")
    add_model_options(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The ServeSettings the options ask for; ServeConfigError for unsafe or impossible ones."""
    token = args.token or ServeSettings.token_from_env()
    check_bind(args.host, token)
    for name in ("max_batch", "max_queue", "max_pixels", "max_images"):
        if getattr(args, name) < 1:
            raise ServeConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_body_mb <= 0 or args.max_wait_ms < 0:
        raise ServeConfigError("--max-body-mb must be positive and --max-wait-ms not negative")
    roots = {}
    for option in ("data_root", "local_files_root"):
        root = roots[option] = Path(getattr(args, option)).expanduser() if getattr(args, option) else None
        if root is not None and not root.is_dir():
            raise ServeConfigError(f"--{option.replace('_', '-')} {shown(root)} is not a folder: give the folder "
                                   "images are read from")
    return ServeSettings(token=token, max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                         max_images=args.max_images, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_queue=args.max_queue, allow_urls=args.allow_urls, **roots,
                         persist_vocabularies=args.persist)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.ray:
        return run_ray(args, settings)
    if any(getattr(args, name) is not None for name in _RAY_ONLY):
        raise ServeConfigError("--replicas, --ray-address, --cpus-per-replica and --gpus-per-replica go with --ray")
    import uvicorn

    from ovdet.service import create_app

    det = detector_from_args(args)
    settings.model_version = f"ovdet-{det.model_id}"
    print(f"ovdet: serving {shown(det.model_id)} on {det.world.describe()} at http://{args.host}:{args.port} "
          f"(docs: /docs{', token required' if settings.token else ''})", file=sys.stderr)
    uvicorn.run(create_app(det, settings), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=30)
    return 0


_RAY_ONLY = ("replicas", "ray_address", "cpus_per_replica", "gpus_per_replica")


def run_ray(args: argparse.Namespace, settings: ServeSettings) -> int:
    """Serve through Ray Serve until SIGINT/SIGTERM, then delete the deployment (and stop the Ray it started)."""
    import signal
    import threading

    from ovdet.service.rayserve import deploy

    service = deploy(detector_config(args), settings, host=args.host, port=args.port, address=args.ray_address,
                     replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                     gpus_per_replica=args.gpus_per_replica)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        each = f"{service.gpus_per_replica:g} GPU" if service.gpus_per_replica else \
            f"{service.cpus_per_replica:g} CPUs"
        print(f"ovdet: serving {shown(args.model)} on Ray Serve, {service.replicas} replicas of {each}, at "
              f"{service.url} (docs: /docs{', token required' if settings.token else ''})", file=sys.stderr)
        if service.replicas > 1 and not settings.persist_vocabularies:
            print("ovdet: --no-persist keeps each replica's stored vocabularies to itself: send classes, or drop "
                  "--no-persist so the replicas share $OVDET_HOME/vocabularies", file=sys.stderr)
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()
    return 0
