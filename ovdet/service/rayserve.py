"""`ovdet serve --ray`: the same app as a Ray Serve deployment of N replicas, each its own detector and batcher,
behind Ray Serve's HTTP proxy.

Ray is joined as the annotate engine joins it (ovdet.engines.ray.engine): `address`, else $RAY_ADDRESS, else a Ray
instance of this process's own, started for the service and stopped with it; usage telemetry stays off unless the
user turned it on. Replicas are sized by the engine's rules too: with GPUs in the cluster, one replica per GPU
(1 GPU and 1 CPU each); without, one replica per node holding all of that node's CPUs. A replica's batcher already
fills each forward pass from concurrent requests and its backend already uses every core it is given, so splitting
one node's cores between more replicas would add model copies, not throughput; replicas pay off across GPUs and
nodes. `replicas=N` alone splits the CPUs between N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from ovdet.config import DetectorConfig
from ovdet.errors import EngineError
from ovdet.service.settings import TOKEN_ENV, ServeSettings

__all__ = ["APP_NAME", "RayService", "deploy"]

APP_NAME = "ovdet"
_INSTALL_HINT = 'pip install "ovdet[serve,ray]"'


def import_serve() -> tuple[Any, Any]:
    """(ray, ray.serve), with Ray's usage telemetry off unless the user's environment turned it on."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise EngineError(f"ovdet serve --ray needs Ray Serve, which is not installed here ({exc}); "
                          f"{_INSTALL_HINT} (or leave --ray out to serve from this process)") from exc
    return ray, serve


def replica_env() -> dict[str, str]:
    """The OVDET_* settings of this process (home, backend, offline, caps) that every replica runs with; the token
    travels in the ServeSettings instead, not as an environment variable."""
    return {k: v for k, v in os.environ.items() if k.startswith("OVDET_") and k != TOKEN_ENV}


@dataclass
class RayService:
    """A running deployment: `url` answers HTTP; `stop()` deletes it, stops Serve and, if this process started
    Ray, Ray."""

    url: str
    replicas: int
    cpus_per_replica: float
    gpus_per_replica: float
    started_ray: bool

    def stop(self) -> None:
        ray, serve = import_serve()
        try:
            serve.shutdown()
        finally:
            if self.started_ray:
                ray.shutdown()


def _replica_class(serve: Any) -> Any:
    class OVDetReplica:
        """One replica: the detector of `config` (loaded once, on the replica's own device) behind create_app."""

        def __init__(self, config: DetectorConfig, settings: ServeSettings):
            from ovdet.detector import OVDetector

            self.detector = OVDetector.from_config(config)
            self.settings = replace(settings, model_version=f"ovdet-{self.detector.model_id}")

        def __serve_build_asgi_app__(self) -> Any:
            from ovdet.service.app import create_app

            return create_app(self.detector, self.settings)

    return serve.ingress()(OVDetReplica)


def deploy(config: DetectorConfig, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
           address: str | None = None, replicas: int | None = None, cpus_per_replica: float | None = None,
           gpus_per_replica: float | None = None, quiet: bool = False) -> RayService:
    """Start Ray Serve's HTTP proxy on host:port and deploy `replicas` copies of the app (sized as the module says);
    returns once every replica answers. EngineError for a cluster that cannot hold them."""
    from ovdet.engines.ray.engine import RayEngine, _connect, _sized

    if (replicas is not None and replicas < 1) or (cpus_per_replica is not None and cpus_per_replica <= 0) \
            or (gpus_per_replica is not None and gpus_per_replica < 0):
        raise EngineError("--replicas must be at least 1, --cpus-per-replica above 0 and --gpus-per-replica 0 or "
                          "more")
    ray, serve = import_serve()
    started = _connect(ray, address, quiet=quiet)
    try:
        if gpus_per_replica is None:
            gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        sized = _sized(RayEngine(workers=replicas, cpus_per_worker=cpus_per_replica,
                                 gpus_per_worker=gpus_per_replica), ray)
        if config.threads is None and not gpus_per_replica:
            config = config.replace(threads=max(1, int(sized.cpus_per_worker)))
        options = {"num_cpus": sized.cpus_per_worker, "num_gpus": gpus_per_replica,
                   "runtime_env": {"env_vars": replica_env()}}
        deployment = serve.deployment(
            _replica_class(serve), name=APP_NAME, num_replicas=sized.workers, ray_actor_options=options,
            # the app's own batcher queues and answers 503 when full: Serve passes it every request it may queue
            max_ongoing_requests=settings.max_queue + settings.max_batch, graceful_shutdown_timeout_s=30)
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment.bind(config, settings), name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
        raise
    return RayService(f"http://{host}:{port}", sized.workers, sized.cpus_per_worker, gpus_per_replica, started)
