"""The engine layer: annotate talks to any Engine through the protocol, RunWriter, the shared output-folder check,
the options a job hands engines (DetectorConfig) and what the Ray engine asks its workers to run."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ovdet import annotate_folder
from ovdet.config import DetectorConfig
from ovdet.engines import open_engine
from ovdet.engines.base import Engine, Runtime, Work
from ovdet.engines.local import LocalEngine
from ovdet.engines.ray import RayEngine
from ovdet.errors import DatasetError, OutputWriteError
from ovdet.jobs.evaluate import evaluate, load_dataset
from ovdet.jobs.relabel import relabel_run
from ovdet.runs.folder import check_output_folder
from ovdet.runs.lock import LOCK_NAME
from ovdet.runs.writer import RunWriter
from test_annotate import CLASSES, FakeDetector, assert_exactly_once, journal, make_images, snapshot

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RecordingEngine:
    """An engine that is not ovdet's: keeps what the job handed it, then lets the local engine do the work."""

    seen: list[Work] = field(default_factory=list)
    writers: list[RunWriter] = field(default_factory=list)

    def source(self, src, recursive=True):
        return LocalEngine().source(src, recursive)

    def driver_config(self, config):
        return config

    def runtime(self, detector, config):
        return Runtime("recorded", "bf16", " somewhere else")

    def run(self, work, writer):
        self.seen.append(work)
        self.writers.append(writer)
        return LocalEngine().run(work, writer)


def test_any_engine_that_follows_the_protocol_runs_the_job(tmp_path):
    src = tmp_path / "src"
    images = make_images(src, 7)
    engine = RecordingEngine()
    assert isinstance(engine, Engine)
    summary = annotate_folder(src, CLASSES, tmp_path / "out", detector=FakeDetector(), engine=engine, batch=3,
                              conf=0.4, max_det=9, imgsz=96, quiet=True)
    work = engine.seen[0]
    assert work.config == DetectorConfig(conf=0.4, max_det=9, imgsz=96)
    assert work.detect_kwargs == {"conf": 0.4, "iou": 0.7, "max_det": 9, "imgsz": 96}
    assert (work.batch, work.done, work.quiet) == (3, set(), True)
    assert summary.images_done == 7 and summary.backend == "recorded bf16 somewhere else"
    assert_exactly_once(tmp_path / "out", set(images))
    # what the engine says it runs is the run's: a bf16 run is not resumed by an fp32 one
    settings = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))["settings"]
    assert settings["reduced_precision"] == "bf16" and settings["conf"] == 0.4 and settings["imgsz"] == 96

    local = annotate_folder(src, CLASSES, tmp_path / "local", detector=FakeDetector(), batch=3, conf=0.4, max_det=9,
                            imgsz=96, quiet=True)
    assert local.backend is None  # the fake detector does not say what runs it
    a, b = snapshot(tmp_path / "out"), snapshot(tmp_path / "local")
    assert {k: v for k, v in a.items() if k != "run.json"} == {k: v for k, v in b.items() if k != "run.json"}


def test_engines_by_name_and_unknown_engines():
    assert isinstance(open_engine("local"), LocalEngine) and isinstance(open_engine(" Ray "), RayEngine)
    mine = RecordingEngine()
    assert open_engine(mine) is mine
    with pytest.raises(DatasetError, match="unknown engine 'spark'"):
        open_engine("spark")
    with pytest.raises(DatasetError, match="unknown engine"):
        open_engine(object())  # type: ignore[arg-type]


def test_a_config_and_keyword_options_give_the_same_run(tmp_path):
    """`config=` and keyword arguments named like its fields are one set of options (keywords win)."""
    src = tmp_path / "src"
    make_images(src, 4)
    annotate_folder(src, CLASSES, tmp_path / "kw", detector=FakeDetector(), conf=0.5, iou=0.6, quiet=True)
    annotate_folder(src, CLASSES, tmp_path / "cfg", detector=FakeDetector(), quiet=True,
                    config=DetectorConfig(conf=0.5, iou=0.2), iou=0.6)
    assert snapshot(tmp_path / "kw") == snapshot(tmp_path / "cfg")
    with pytest.raises(TypeError, match="unknown detector option 'confidence'"):
        annotate_folder(src, CLASSES, tmp_path / "bad", detector=FakeDetector(), confidence=0.5)


def test_annotate_builds_its_detector_from_the_config(tmp_path):
    """Without a detector, the demo model named in the config runs, at the config's size and thresholds."""
    out = tmp_path / "out"
    summary = annotate_folder(REPO / "samples" / "shapes", ["red circle", "blue square"], out, quiet=True,
                              config=DetectorConfig(model="demo", imgsz=192, conf=0.3, device="cpu"))
    settings = json.loads((out / "run.json").read_text(encoding="utf-8"))["settings"]
    assert settings["model"].startswith("demo-world@") and settings["imgsz"] == 192 and settings["conf"] == 0.3
    assert summary.images_done == 4 and summary.backend == "torch fp32"
    scores = [d["score"] for rec in journal(out) for d in rec["detections"]]
    assert scores and min(scores) >= 0.3


def test_the_ray_engine_runs_its_workers_on_the_job_options_unless_it_sets_its_own():
    job = DetectorConfig(model="demo", device="cuda:1", half=True, backend="openvino", precision="int8",
                         calib=Path("/calib"), conf=0.3, text_model="some/tower", threads=12)
    workers = RayEngine(cpus_per_worker=2.5).worker_config(job)
    assert workers == DetectorConfig(device="cuda:1", half=True, backend="openvino", precision="int8", calib="/calib",
                                     threads=2, conf=0.3)  # the model and classes travel in the payload
    own = RayEngine(device="cpu", backend="torch", precision="fp32", half=False).worker_config(job)
    assert (own.device, own.backend, own.precision, own.half, own.threads) == ("cpu", "torch", "fp32", False, 1)
    driver = RayEngine().driver_config(job)
    assert driver == job.replace(device="cpu", half=False, backend="torch", precision=None, threads=None)
    assert RayEngine().runtime(object(), job).words() == "openvino int8 on the workers"  # type: ignore[arg-type]
    assert RayEngine().runtime(object(), DetectorConfig()).words() == "auto default precision on the workers"
    assert RayEngine().runtime(object(), job).reduced_precision == "int8"  # type: ignore[arg-type]


class _Cluster:
    """What the Ray engine's sizing reads of a cluster: its nodes (CPUs each) and its resources."""

    def __init__(self, node_cpus: list[float], gpus: float = 0.0):
        self.node_cpus, self.gpus = node_cpus, gpus

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": c}} for c in self.node_cpus] + \
               [{"Alive": False, "Resources": {"CPU": 64.0}}]  # a dead node holds no worker

    def cluster_resources(self) -> dict:
        return {"CPU": sum(self.node_cpus), "GPU": self.gpus}


@pytest.mark.parametrize("engine, nodes, gpus, sized", [
    (RayEngine(), [16.0], 0, (1, 16.0)),  # one worker per node, holding all of its CPUs
    (RayEngine(), [8.0, 8.0, 8.0], 0, (3, 8.0)),
    (RayEngine(), [4.0, 8.0], 0, (3, 4.0)),  # unequal nodes: workers of the smallest node's CPUs, as many as fit
    (RayEngine(workers=4), [8.0], 0, (4, 2.0)),  # --workers alone splits a node's CPUs
    (RayEngine(workers=1), [2.0, 2.0], 0, (1, 2.0)),  # a worker never spans nodes
    (RayEngine(cpus_per_worker=1), [2.0, 2.0], 0, (4, 1)),  # the old one-per-CPU, when asked for
    (RayEngine(workers=3, cpus_per_worker=2), [2.0], 0, (3, 2)),
    (RayEngine(gpus_per_worker=1), [16.0], 4, (4, 1.0)),  # one per GPU
    (RayEngine(gpus_per_worker=0.5, cpus_per_worker=2), [16.0], 2, (4, 2)),
])
def test_the_ray_engine_sizes_its_workers_per_node(engine, nodes, gpus, sized):
    from ovdet.engines.ray.engine import _sized

    got = _sized(engine, _Cluster(nodes, gpus))
    assert (got.workers, got.cpus_per_worker) == sized
    assert got.worker_config(DetectorConfig()).threads == int(sized[1])  # a worker's torch threads: its CPUs


@pytest.mark.parametrize("engine, nodes, gpus, words", [
    (RayEngine(), [0.5], 0, "no node"), (RayEngine(cpus_per_worker=4), [2.0, 2.0], 0, "lower --cpus-per-worker"),
    (RayEngine(gpus_per_worker=1), [8.0], 0, "lower --gpus-per-worker")])
def test_a_cluster_too_small_for_one_worker_says_so(engine, nodes, gpus, words):
    from ovdet.engines.ray.engine import _sized
    from ovdet.errors import EngineError

    with pytest.raises(EngineError, match=words):
        _sized(engine, _Cluster(nodes, gpus))


def test_the_ray_engine_starts_its_own_instance_unless_told_a_cluster(monkeypatch):
    from ovdet.engines.ray.engine import _connect

    class FakeRay:
        def __init__(self):
            self.calls: list[dict] = []

        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs):
            self.calls.append(kwargs)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray = FakeRay()
    assert _connect(ray, None, quiet=True) and ray.calls[-1]["address"] == "local"  # never a cluster found here
    assert _connect(ray, "10.0.0.5:6379", quiet=True) and ray.calls[-1]["address"] == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert _connect(ray, None, quiet=True) and ray.calls[-1]["address"] == "ray://head:10001"
    assert _connect(ray, "auto", quiet=True) and ray.calls[-1]["address"] == "auto"  # --ray-address wins


class _CountingDetector(FakeDetector):
    """FakeDetector that sets an event when its `n`-th batch starts."""

    def __init__(self, n: int):
        super().__init__()
        self.started = threading.Event()
        self.n = n

    def detect_batch(self, images, conf=None, iou=None, max_det=None, imgsz=None):
        if self.calls + 1 == self.n:
            self.started.set()
        return super().detect_batch(images, conf=conf, iou=iou, max_det=max_det, imgsz=imgsz)


def test_the_local_engine_writes_a_batch_while_it_detects_the_next(tmp_path, monkeypatch):
    src = tmp_path / "src"
    rels = make_images(src, 7)
    det = _CountingDetector(2)
    waited: list[bool] = []
    real = RunWriter.write

    def write(self, rec, image=None):
        waited.append(det.started.wait(timeout=30))  # in turn (not behind), batch 2 starts only after this returns
        real(self, rec, image)

    monkeypatch.setattr(RunWriter, "write", write)
    annotate_folder(src, CLASSES, tmp_path / "out", detector=det, batch=3, quiet=True, save_annotated=True)
    assert waited[0], "the first batch was not written while the second was detected"
    assert_exactly_once(tmp_path / "out", set(rels))


def test_written_behind_or_in_turn_the_outputs_are_the_same(tmp_path):
    src = tmp_path / "src"
    make_images(src, 8)
    (src / "bad.jpg").write_text("x")
    for name, engine in (("behind", LocalEngine()), ("in-turn", LocalEngine(write_behind=False))):
        annotate_folder(src, CLASSES, tmp_path / name, detector=FakeDetector(), batch=3, quiet=True,
                        save_annotated=True, engine=engine)
    assert snapshot(tmp_path / "behind") == snapshot(tmp_path / "in-turn")
    assert [r["image"] for r in journal(tmp_path / "behind")] == sorted(r["image"] for r in journal(tmp_path / "behind"))


def test_a_failed_write_behind_stops_the_run_and_a_rerun_finishes_exactly_once(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    rels = make_images(src, 10)
    real = RunWriter.write

    def write(self, rec, image=None):
        if self.images_done == 4:
            raise OSError(28, "No space left on device")
        real(self, rec, image)

    monkeypatch.setattr(RunWriter, "write", write)
    with pytest.raises(OutputWriteError) as raised:  # the writer thread's error, raised in the job's thread
        annotate_folder(src, CLASSES, out, detector=FakeDetector(), batch=3, quiet=True)
    assert raised.value.errno == 28
    assert [r["image"] for r in journal(out)] == sorted(rels)[:4]  # in order, nothing after the failure
    monkeypatch.setattr(RunWriter, "write", real)
    summary = annotate_folder(src, CLASSES, out, detector=FakeDetector(), batch=3, quiet=True)
    assert summary.images_already_done == 4 and summary.images_done == 6
    assert_exactly_once(out, set(rels))


def test_a_run_writer_hands_out_keys_once(tmp_path):
    from ovdet.datasets.splits import ValSplit

    writer = RunWriter(tmp_path, ["a"], {"model": "m", "source": "s"}, ("yolo",), False, 60.0, ValSplit(0.0, 0))
    try:
        assert writer.load_journal() == set() and not writer.previews
        assert writer.key_for("x/a.jpg") == "x__a"
        assert not writer.claim_key("X__A")  # taken (keys are compared without case)
        assert writer.claim_key("old_part_key") and not writer.claim_key("old_part_key")
        assert writer.key_for("old_part_key.jpg") != "old_part_key"
    finally:
        writer.close()


@pytest.mark.parametrize("content", ["foreign", "lock-only", "run", "file"])
def test_one_output_folder_check_for_every_job(tmp_path, content):
    out = tmp_path / "out"
    if content == "file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / {"foreign": "thesis.docx", "lock-only": LOCK_NAME, "run": "run.json"}[content]).write_text("{}")
    if content in ("foreign", "file"):
        with pytest.raises(DatasetError, match="not empty and holds no ovdet run" if content == "foreign" else "file"):
            check_output_folder(out)
    else:
        check_output_folder(out)


def test_evaluate_and_relabel_refuse_a_folder_of_someone_elses_files(tmp_path):
    from ovdet.jobs.synth import generate

    dataset = load_dataset(generate(tmp_path / "data", train=1, val=2, seed=3, progress=False))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(DatasetError, match="not empty and holds no ovdet run"):
        evaluate(FakeDetector(), dataset, out=foreign, progress=False)
    src = tmp_path / "src"
    make_images(src, 2)
    annotate_folder(src, CLASSES, tmp_path / "run", detector=FakeDetector(), quiet=True)
    with pytest.raises(DatasetError, match="not empty and holds no ovdet run"):
        relabel_run(tmp_path / "run", foreign, quiet=True)
    assert (foreign / "thesis.docx").read_text() == "precious" and sorted(p.name for p in foreign.iterdir()) == [
        "thesis.docx"]

