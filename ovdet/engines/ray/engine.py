"""The Ray Data engine of `annotate`: a streaming actor pool over a cluster, part files merged by the driver.

The driver (the process that called annotate_folder) holds the output folder's lock, encodes the classes
once, puts the detector (`OVDetector.worker_payload()`: weights and class embeddings) into the object store once,
and gives every worker a WorkerSpec whose DetectorConfig says how to run it (device, backend, precision, threads).
It lists the source
lazily into object-store blocks of (image, output key) rows for Ray Data. `map_batches` runs them through a pool of
`Annotator` actors (one detector each, on `cpus_per_worker` CPUs or `gpus_per_worker` GPUs); Ray restarts a
worker that dies and retries its batch. Each batch comes back as a part file, which the driver merges
through the job's RunWriter (predictions.jsonl last), as the local engine writes, so both write the same outputs.

Exactly once: an image is merged only if predictions.jsonl does not hold it yet, and output keys are given
out by the driver in folder order, as the local engine does. A killed driver leaves finished parts behind;
the next run merges them first and then does only the images that are still missing.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovdet import errors
from ovdet.config import DetectorConfig
from ovdet.engines.base import Counts, Detector, Runtime, Work
from ovdet.engines.ray.parts import PARTS, RUN_TOKEN, list_parts, part_dir, part_prefix, read_part
from ovdet.engines.ray.worker import Annotator, WorkerSpec
from ovdet.engines.source import Source, open_source
from ovdet.errors import DatasetError, EngineError, OVDetError
from ovdet.util.progress import progress
from ovdet.runs.journal import ImageRecord
from ovdet.runs.writer import RunWriter
from ovdet.util.safeio import atomic_write, remove_stale_temp_files

if TYPE_CHECKING:
    from ovdet.detector import DetectorPayload

__all__ = ["RayEngine"]

_INSTALL_HINT = 'pip install "ovdet[ray]"'


@dataclass(frozen=True)
class RayEngine:
    """annotate on Ray Data: `annotate_folder(..., engine=RayEngine(workers=4, gpus_per_worker=1))`.

    `address`: a Ray cluster ("auto" for the one `ray start` runs on this machine, "ray://head:10001",
    "10.0.0.5:6379"); None takes RAY_ADDRESS when it is set, else starts a Ray instance of this machine's own for
    the run and stops it after (a cluster already running here is not joined: it may be anyone's). A process
    already connected (ray.init) runs on its cluster.

    Sizing: `workers` detector actors of `cpus_per_worker` CPUs (its torch threads) or `gpus_per_worker` GPUs.
    Defaults: one worker per node holding all of that node's CPUs (nodes of unequal size: workers of the smallest
    node's CPUs, as many as fit on each node); with `gpus_per_worker`, as many 1-CPU workers as the GPUs allow;
    `workers` alone splits a node's CPUs between that many. The workers run the job's DetectorConfig (annotate_folder's device, half,
    backend, precision, calib); `device` / `half` / `backend` / `precision` / `calib` set here override it for the
    workers (the driver only encodes the classes, on its CPU). `part_size`: images per worker call and part file
    (default: from the batch and the number of images).
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0
    device: str | None = None
    half: bool | None = None
    part_size: int | None = None
    backend: str | None = None
    precision: str | None = None
    calib: str | None = None

    def source(self, src: str | os.PathLike[str], recursive: bool = True) -> Source:
        """Where the images are: a folder or a URI (see ovdet.engines.source)."""
        return open_source(src, recursive=recursive)

    def driver_config(self, config: DetectorConfig) -> DetectorConfig:
        """The driver only encodes the classes and ships the weights: torch fp32 on its CPU, whatever the workers
        run on."""
        return config.replace(device="cpu", half=False, backend="torch", precision=None, threads=None)

    def worker_config(self, config: DetectorConfig) -> DetectorConfig:
        """How every worker runs its detector: the job's device, half, backend, precision and calib (this engine's
        where set), on `cpus_per_worker` threads. The weights, image size and classes come with the payload."""

        def pick(own: Any, job: Any) -> Any:
            return own if own is not None else job

        calib = pick(self.calib, config.calib)
        return DetectorConfig(device=pick(self.device, config.device), half=pick(self.half, config.half),
                              backend=pick(self.backend, config.backend),
                              precision=pick(self.precision, config.precision),
                              calib=None if calib is None else str(calib),
                              threads=max(1, int(self.cpus_per_worker or 1)),
                              conf=config.conf, iou=config.iou, max_det=config.max_det)

    def runtime(self, detector: Detector, config: DetectorConfig) -> Runtime:
        """What the workers were asked to run (each one resolves "auto" on its own machine)."""
        workers = self.worker_config(config)
        return Runtime(workers.backend, workers.precision, " on the workers")

    def run(self, work: Work, writer: RunWriter) -> Counts:
        """Annotate what `work.done` lacks through `writer`; returns (images found, images already done)."""
        if (self.cpus_per_worker is not None and self.cpus_per_worker <= 0) or self.gpus_per_worker < 0 \
                or (self.workers is not None and self.workers < 1):
            raise EngineError("--workers must be at least 1, --cpus-per-worker above 0 and --gpus-per-worker 0 or "
                              "more")
        ray = _import_ray()
        started = _connect(ray, self.address, quiet=work.quiet)
        try:
            return _Driver(_sized(self, ray), ray, work, writer).run()
        finally:
            if started:
                ray.shutdown()


def _import_ray() -> Any:
    # Ray's usage telemetry is opt-in for ovdet's users (a user's own setting wins). Left on, Ray Data also starts a
    # driver thread that asks localhost:9090 for Prometheus counters every 10 s for the rest of the process.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise EngineError(f"--engine ray needs Ray Data, which is not installed here ({exc}); {_INSTALL_HINT} "
                          "(or use the default local engine)") from exc
    return ray


def _connect(ray: Any, address: str | None, quiet: bool) -> bool:
    """Join `address` (else RAY_ADDRESS's cluster, else start a Ray instance of this run's own); True if this call
    connected. A cluster someone started on this machine is joined only when named ("auto" or its address)."""
    if ray.is_initialized():
        return False
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": not quiet}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise EngineError(f"cannot connect to the Ray cluster at {address!r} ({exc}); start one with "
                              "`ray start --head` (see the README), or leave --ray-address out and unset RAY_ADDRESS "
                              "to run on a Ray instance of this machine started for the run")
        return True
    _private_token()
    ray.init(address="local", include_dashboard=False, **kwargs)  # never ray_current_cluster's (anyone's) cluster
    return True


def _private_token() -> None:
    """A token for the Ray instance ovdet starts, in this process's environment (its Ray processes inherit it) when
    the user has none: Ray 2.60 turns token auth on for new local instances and would otherwise write one to
    ~/.ray/auth_token, which fails on a read-only home. A user's RAY_AUTH_MODE or token is left as it is."""
    if os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") \
            or (Path.home() / ".ray" / "auth_token").is_file():
        return
    import secrets

    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _sized(engine: RayEngine, ray: Any) -> RayEngine:
    """The engine with `workers` and `cpus_per_worker` set: as given, else from the cluster (see RayEngine)."""
    cpus, workers = engine.cpus_per_worker, engine.workers
    if engine.gpus_per_worker > 0:
        cpus = cpus or 1.0
        if workers is None:
            workers = int(ray.cluster_resources().get("GPU", 0) // engine.gpus_per_worker)
            if workers < 1:
                raise EngineError(f"the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs, not enough "
                                  f"for one worker of {engine.gpus_per_worker:g}; lower --gpus-per-worker or add nodes")
        return replace(engine, workers=workers, cpus_per_worker=cpus)
    nodes = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if cpus is None:  # one worker per node holding its CPUs; --workers N: a node's CPUs split between N
        smallest = min((c for c in nodes if c >= 1), default=0.0)
        if smallest < 1:
            raise EngineError("the Ray cluster has no node with a whole CPU for a worker; add CPUs or nodes")
        cpus = float(max(1, int(smallest if workers is None else min(smallest, sum(nodes) // workers))))
    if workers is None:
        workers = sum(int(c // cpus) for c in nodes)
        if workers < 1:
            raise EngineError(f"no node of the Ray cluster has {cpus:g} CPUs for one worker (nodes: "
                              f"{', '.join(f'{c:g}' for c in nodes) or 'none'}); lower --cpus-per-worker or add nodes")
    return replace(engine, workers=workers, cpus_per_worker=cpus)


def _payload(detector: Detector) -> DetectorPayload:
    """The detector's weights and class embeddings, to ship to every worker once (OVDetector.worker_payload)."""
    from ovdet.detector import OVDetector

    if not isinstance(detector, OVDetector):
        raise EngineError(f"engine='ray' ships an OVDetector's weights and classes to its workers; a "
                          f"{type(detector).__name__} has none. Pass an OVDetector (or model=...) instead.")
    return detector.worker_payload()


def _ovdet_cause(exc: BaseException) -> OVDetError | None:
    """The ovdet error a worker raised, from inside Ray's wrappers (None if there is none).

    A failed task carries the error itself; an actor whose constructor failed (ActorDiedError) only its
    traceback text, whose last "ovdet.errors.Name: message" line is rebuilt into that error.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    texts = []
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OVDetError) and type(e).__module__.startswith("ovdet"):
            return e
        texts.append(str(e))
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    for text in texts:
        found = _ERROR_LINE.findall(text)
        if found:
            kind = getattr(errors, found[-1][0], None)
            if isinstance(kind, type) and issubclass(kind, OVDetError):
                return kind(found[-1][1])
    return None


_ERROR_LINE = re.compile(r"^ovdet\.errors\.(\w+): (.+)$", re.MULTILINE)


class _Driver:
    """One Ray run: merge leftovers, list into object-store blocks, run the actor pool, merge parts as they come."""

    def __init__(self, engine: RayEngine, ray: Any, work: Work, writer: RunWriter):
        self.engine, self.ray, self.work, self.writer = engine, ray, work, writer
        self.source, self.done, self.batch, self.quiet = work.source, work.done, work.batch, work.quiet
        self.out: Path = writer.out
        self.token = uuid.uuid4().hex
        self.merged = 0  # images of this run's parts written to the outputs (or to errors.jsonl)
        self.errored: set[str] = set()  # images with an errors.jsonl record in this run
        self.recovered: set[str] = set()  # images written now from the parts of a killed driver

    def run(self) -> Counts:
        folder = part_dir(self.out)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(folder)
        atomic_write(self.out / PARTS / RUN_TOKEN, self.token)
        # Parts that a killed driver did not merge: their images are done. Their errors are dropped, as
        # every run retries unreadable files.
        for path in list_parts(self.out):
            self._merge(path)

        found = already = recovered = 0
        for rel in self.source.list_images():  # a first walk to count (a folder is not held in memory)
            found += 1
            already += rel in self.done
            recovered += rel in self.recovered
        if not found:
            raise DatasetError(f"{self.source.uri}: no image files found; point to a folder or prefix of images")
        todo = found - already
        workers = int(self.engine.workers or 1)  # set by _sized
        part = self.engine.part_size or max(self.batch, min(256, math.ceil(todo / (4 * workers))))
        part = math.ceil(part / self.batch) * self.batch
        with progress(total=found, initial=already, unit="img", desc="annotate", quiet=self.quiet) as bar:
            if todo:
                payload = [self.ray.put(_payload(self.work.detector))]  # shipped once; kept referenced for restarts
                spec = WorkerSpec(payload, str(self.out), self.token, self.source, self.work.detect_kwargs,
                                  self.batch, self.engine.worker_config(self.work.config), self.writer.previews)
                blocks = self._blocks(part)
                for row in self._execute(blocks, spec, min(workers, len(blocks)), part):
                    self._merge(folder / str(row["part"]))
                    bar.update(int(row["images"]))
                    self.writer.maybe_checkpoint()
            for path in list_parts(self.out):  # a retried call that wrote its part twice: nothing new in it
                self._merge(path)
        if self.merged < todo:
            raise EngineError(f"{todo - self.merged} of {todo} images came back from no Ray worker; run the same "
                              "command again to do them")
        shutil.rmtree(self.out / PARTS)  # finished: the folder holds what the local engine writes, nothing more
        # a recovered image is written by this call (the writer counts it done now), not found done before it
        return Counts(found, already - recovered)

    def _blocks(self, part: int) -> list[Any]:
        """The images to do, with their output keys (given out in folder order), as object-store blocks of `part`
        rows: the driver holds references, not the list."""
        import pyarrow as pa

        blocks, images, keys = [], [], []
        for rel in self.source.list_images():
            if rel in self.done:
                continue
            images.append(rel)
            keys.append(self.writer.key_for(rel))
            if len(images) == part:
                blocks.append(self.ray.put(pa.table({"image": images, "key": keys})))
                images, keys = [], []
        if images:
            blocks.append(self.ray.put(pa.table({"image": images, "key": keys})))
        return blocks

    def _execute(self, blocks: list[Any], spec: WorkerSpec, workers: int, part: int) -> Iterator[dict[str, Any]]:
        """Run the blocks through the actor pool; yields {"part", "images"} rows as parts finish."""
        ray = self.ray
        context = ray.data.DataContext.get_current()
        bars, context.enable_progress_bars = context.enable_progress_bars, False  # ovdet's own bar counts images
        logger = logging.getLogger("ray.data")
        level = logger.level
        logger.setLevel(logging.ERROR)  # Ray Data's per-run info lines and warnings about idle actors
        ds = ray.data.from_arrow_refs(blocks)
        ds = ds.map_batches(Annotator, batch_size=part, batch_format="numpy", fn_constructor_args=(spec,),
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=self.engine.cpus_per_worker,
                            num_gpus=self.engine.gpus_per_worker or None)
        try:
            yield from ds.iter_rows()
        except Exception as exc:
            cause = _ovdet_cause(exc)
            if cause is not None:
                raise cause from None
            raise
        finally:
            context.enable_progress_bars = bars
            logger.setLevel(level)

    def _merge(self, path: Path) -> None:
        """Write the images of one part that are not done yet through the run's writers, then delete the part.

        A part of this run carries keys given out by this run. One an earlier (killed) driver left is used only
        where its key is still free; its errors are dropped, since every run tries unreadable files again.
        """
        ours = path.name.startswith(part_prefix(self.token))
        for line in read_part(path):
            if "ok" in line:
                rec = ImageRecord.from_json(line["ok"])
                if rec.image in self.done:
                    continue
                if not ours and not self.writer.claim_key(rec.key):
                    continue
                self.writer.write(rec)
                self.done.add(rec.image)
                self.merged += ours
                if not ours:
                    self.recovered.add(rec.image)
            elif ours and line["error"]["image"] not in self.errored:
                self.writer.add_error(line["error"])
                self.errored.add(line["error"]["image"])
                self.merged += 1
        os.unlink(path)
