"""annotate on Ray Data: a simulated 2-node cluster gives the local engine's outputs, survives killed workers and drivers,
reads file:// and S3 (moto's server on 127.0.0.1) sources, and reports a missing Ray clearly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import cv2
import moto.server as moto_server
import psutil
import pytest
import ray
import torch

from conftest import CROSS_RUN_TOLERANCE, assert_close_data, assert_close_text, scene
from ovdet import OVDetector, annotate_folder
from ovdet.cli import main
from ovdet.engines.ray import RayEngine
from ovdet.engines.ray.parts import list_parts
from ovdet.errors import EngineError, ModelError


REPO = Path(__file__).resolve().parents[1]
CLASSES = "red circle, blue square, green triangle"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1; its address and credentials are in the environment the cluster inherits."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Two Ray nodes of one CPU each on this machine, started once; the test process is connected as the driver."""
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # workers import ovdet
    # Ray keeps idle worker processes up to num_workers_soft_limit (default: the node's CPUs, here 1); above it,
    # it kills them after a second. Then each run's first task (Ray Data's block metadata) waits seconds for a new
    # process. A few idle workers kept per node spare that wait; the actors are started as before.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "_system_config": {"num_workers_soft_limit": 4}})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """22 small images in subfolders (a.jpg and a.png share a stem), one corrupt file and one empty file.

    All of one size: a batch of mixed sizes is letterboxed to a square, one of equal sizes to the smallest
    multiple of the stride, so with mixed sizes detections depend on an image's batch neighbours (in both
    engines), and Ray's batches are not the local engine's.
    """
    root = tmp_path_factory.mktemp("ray_src") / "imgs"
    for i in range(20):
        path = root / (f"sub/s{i:02d}.jpg" if i % 4 == 0 else f"i{i:02d}.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), scene(96, 128, seed=i))
    cv2.imwrite(str(root / "a.jpg"), scene(96, 128, seed=40))
    cv2.imwrite(str(root / "a.png"), scene(96, 128, seed=41))
    (root / "bad.jpg").write_bytes(b"this is not an image")
    (root / "sub" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def demo():
    det = OVDetector("demo", device="cpu")
    det.set_classes(CLASSES)
    return det


@pytest.fixture(scope="module")
def reference(images, demo, tmp_path_factory):
    """The local engine's outputs for the same folder, at the workers' one torch thread (sums in the same order)."""
    out = tmp_path_factory.mktemp("ray_ref") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        annotate_folder(images, CLASSES, out, detector=demo, quiet=True, batch=4)
    finally:
        torch.set_num_threads(threads)
    return out


def records(out: Path, name: str = "predictions.jsonl") -> dict[str, dict]:
    """One record per image (failing on a duplicate), keyed by the image's relative path."""
    lines = [json.loads(x) for x in (out / name).read_text(encoding="utf-8").splitlines()]
    by_image = {r["image"]: r for r in lines}
    assert len(by_image) == len(lines), "an image is recorded twice"
    return by_image


def coco_by_file(out: Path) -> dict[str, list]:
    coco = json.loads((out / "coco" / "annotations.json").read_text(encoding="utf-8"))
    ids = [im["id"] for im in coco["images"]]
    assert len(set(ids)) == len(ids) and len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    out_: dict[str, list] = {name: [] for name in files.values()}
    for a in coco["annotations"]:
        out_[files[a["image_id"]]].append({k: a[k] for k in ("category_id", "bbox", "score")})
    return out_


def assert_same_outputs(out: Path, ref: Path) -> None:
    """The local engine's records, errors, COCO content and per-image YOLO / VOC files, up to the stated cross-run
    tolerances (other processes, other batch make-up: the same sums, not always the same last bit)."""
    assert_close_data(records(out), records(ref))
    assert records(out, "errors.jsonl") == records(ref, "errors.jsonl")
    assert_close_data(coco_by_file(out), coco_by_file(ref))
    for sub, tol in (("yolo/labels", CROSS_RUN_TOLERANCE["text"]), ("voc/Annotations", CROSS_RUN_TOLERANCE["voc"])):
        ours = {p.name: p.read_text() for p in (out / sub).iterdir()}
        theirs = {p.name: p.read_text() for p in (ref / sub).iterdir()}
        assert set(ours) == set(theirs)
        for name in ours:
            assert_close_text(ours[name], theirs[name], tol)
    for sub in ("yolo/images", "voc/JPEGImages"):
        assert {p.name: os.readlink(p) for p in (out / sub).iterdir()} == \
               {p.name: os.readlink(p) for p in (ref / sub).iterdir()}
    assert not (out / ".ovdet-ray").exists()


def test_two_nodes_give_the_local_engines_outputs(cluster, images, demo, reference, tmp_path):
    out = tmp_path / "out"
    # a file:// URI: the local engine's outputs (paths included), as from the folder path it names
    summary = annotate_folder(images.as_uri(), CLASSES, out, detector=demo, quiet=True, batch=4,
                              engine=RayEngine(part_size=4))
    assert summary.images_found == 24 and summary.images_done == 22 and len(summary.skipped) == 2
    assert_same_outputs(out, reference)
    assert {r["image"]: r["key"] for r in records(out).values()}["a.png"] == "a_png"  # keys given out in folder order
    errors = records(out, "errors.jsonl")
    assert set(errors) == {"bad.jpg", "sub/empty.png"} and "empty" in errors["sub/empty.png"]["reason"]
    # a second run, given the folder path, finds everything done: the URI and the path are the same source
    again = annotate_folder(images, CLASSES, out, detector=demo, quiet=True, batch=4, engine="ray")
    assert again.images_done == 0 and again.images_already_done == 22
    assert_same_outputs(out, reference)
    # Ray Data's usage poller (a driver thread that logs a traceback every 10 s for the rest of the process) is off
    assert "data-usage-metrics-poller" not in {t.name for t in threading.enumerate()}


def _map_workers(c) -> list[psutil.Process]:
    """The Ray Data actor processes (MapWorker) under this cluster's raylets."""
    procs = []
    for node in [c.head_node, *c.worker_nodes]:
        for info in node.all_processes.get("raylet", []):
            for child in psutil.Process(info.process.pid).children(recursive=True):
                try:
                    if "MapWorker" in " ".join(child.cmdline()):
                        procs.append(child)
                except psutil.Error:
                    pass
    return procs


def test_a_killed_worker_is_retried_and_every_image_is_written_once(cluster, images, demo, reference, tmp_path):
    out = tmp_path / "out"
    killed: list[int] = []
    finished = threading.Event()

    def kill_one_worker_mid_run():
        while not finished.is_set() and not killed:  # as long as the run lasts: on a busy machine actors start slowly
            journal = out / "predictions.jsonl"
            workers = _map_workers(cluster)
            # mid-run: a part is written (on a busy machine the workers may finish before the driver merges it)
            if workers and (list_parts(out) or journal.exists() and journal.stat().st_size > 0):
                workers[0].send_signal(signal.SIGKILL)
                killed.append(workers[0].pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker_mid_run)
    killer.start()
    try:
        summary = annotate_folder(images, CLASSES, out, detector=demo, quiet=True, batch=2,
                                  engine=RayEngine(part_size=2))
    finally:
        finished.set()
        killer.join()
    assert killed, "no worker was running to kill"
    assert summary.images_done == 22
    assert_same_outputs(out, reference)


def test_a_killed_driver_resumes_with_only_what_is_missing(cluster, images, reference, tmp_path, capsys):
    out = tmp_path / "out"
    script = ("import sys; from ovdet import annotate_folder; from ovdet.engines.ray import RayEngine; "
              f"annotate_folder(sys.argv[1], {CLASSES!r}, sys.argv[2], model='demo', device='cpu', batch=2, quiet=True, "
              "engine=RayEngine(address=sys.argv[3], part_size=2))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(images), str(out), cluster.address], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.stat().st_size > 0:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    output = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the driver was not killed mid-run:\n{output}"
    before = records(out)
    assert 0 < len(before) < 22
    # The resumed run (the CLI this time, in this process, on the connected cluster) merges parts the dead driver
    # left, then does the rest, and says so.
    capsys.readouterr()
    rc = main(["annotate", str(images), "--engine", "ray", "--model", "demo", "--device", "cpu", "--classes", CLASSES,
               "--out", str(out), "--batch", "2"])
    assert rc == 0
    missing = 22 - len(before)
    assert f"annotated {missing} image{'s' if missing != 1 else ''}; " in capsys.readouterr().err
    assert_same_outputs(out, reference)
    assert (out / "yolo" / "data.yaml").exists()
    after = records(out)
    assert all(after[k] == v for k, v in before.items())


def test_parts_left_by_a_dead_driver_are_merged_not_redone(cluster, images, demo, tmp_path):
    # Every image but one is in the journal and that one is in a part a dead driver left: merged, the run has
    # nothing left for the workers (no unreadable files either, which every run retries); not merged or merged
    # after the listing, the workers detect it again and its record is the model's.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("i01.jpg", "i02.jpg", "s00.jpg", "a.png"):
        shutil.copy(images / ("sub" if name == "s00.jpg" else "") / name, src / name)
    out = tmp_path / "out"
    annotate_folder(src, CLASSES, out, detector=demo, quiet=True, batch=4)  # the local engine: Ray resumes it
    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    marked = json.loads(lines[2])
    assert marked["detections"]  # the model finds something here, so an empty list can only come from the part
    (out / "predictions.jsonl").write_text("".join(lines[:2] + lines[3:]), encoding="utf-8")
    marked["detections"] = []  # not what the model finds: only merging the part can put this in the journal
    parts = out / ".ovdet-ray" / "parts"
    parts.mkdir(parents=True)
    (parts / "part-left-behind.jsonl").write_text(json.dumps({"ok": marked}) + "\n", encoding="utf-8")
    summary = annotate_folder(src, CLASSES, out, detector=demo, quiet=True, batch=4, engine="ray")
    # written by this call from the part, not found done before it: counted once, 1 + 3 = the 4 images found
    assert (summary.images_done, summary.images_already_done, summary.images_found) == (1, 3, 4)
    assert records(out)[marked["image"]]["detections"] == []
    assert len(records(out)) == 4 and not parts.exists()


def test_s3_source(cluster, s3_server, images, demo, reference, tmp_path):
    # (a file:// URI: test_two_nodes_give_the_local_engines_outputs)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="photos")
    for path in images.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "photos", f"batch1/{path.relative_to(images).as_posix()}")
    out = tmp_path / "s3"
    summary = annotate_folder("s3://photos/batch1", CLASSES, out, detector=demo, quiet=True, batch=4, engine="ray")
    assert summary.images_done == 22
    ref, got = records(reference), records(out)
    assert set(got) == set(ref)
    for image, rec in got.items():
        assert_close_data(rec["detections"], ref[image]["detections"])
        assert rec["key"] == ref[image]["key"]
        assert rec["path"] == str((out / "originals" / image).resolve())  # the dataset holds its own copies
        assert Path(rec["path"]).read_bytes() == (images / image).read_bytes()
    errors = records(out, "errors.jsonl")
    assert errors["bad.jpg"]["path"] == "s3://photos/batch1/bad.jpg"
    assert set(errors) == {"bad.jpg", "sub/empty.png"}
    assert_close_data(coco_by_file(out), coco_by_file(reference))
    link = out / "yolo" / "images" / f"{got['i01.jpg']['key']}.jpg"
    assert link.resolve() == (out / "originals" / "i01.jpg").resolve() and link.read_bytes()
    assert json.loads((out / "run.json").read_text())["settings"]["source"] == "s3://photos/batch1"


def test_a_worker_that_cannot_start_stops_the_run_with_its_reason(cluster, demo, tmp_path):
    # the workers are asked for CUDA, which this machine lacks: the worker's ModelError reaches the caller
    with pytest.raises(ModelError, match="CUDA is not available"):
        annotate_folder(REPO / "samples" / "shapes", CLASSES, tmp_path / "out", detector=demo, quiet=True,
                        engine=RayEngine(device="cuda"))
    assert not records(tmp_path / "out")  # nothing written, and the run can be started again


def test_ray_missing_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    rc = main(["annotate", str(REPO / "samples" / "shapes"), "--engine", "ray", "--model", "demo",
               "--classes", "red circle", "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert 'pip install "ovdet[ray]"' in err and "Traceback" not in err


def test_engine_options_need_the_ray_engine(tmp_path, capsys):
    rc = main(["annotate", str(REPO / "samples" / "shapes"), "--workers", "2", "--model", "demo",
               "--classes", "red circle", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--engine ray" in capsys.readouterr().err
    with pytest.raises(EngineError, match="workers"):
        annotate_folder(REPO / "samples" / "shapes", "red circle", tmp_path / "y", model="demo",
                        engine=RayEngine(workers=0))


def test_a_worker_that_cannot_see_the_output_folder_refuses(tmp_path):
    from ovdet.engines.ray.worker import _check_token

    (tmp_path / ".ovdet-ray").mkdir()
    (tmp_path / ".ovdet-ray" / "run").write_text("abc")
    _check_token(tmp_path, "abc")
    with pytest.raises(EngineError, match="every node mounts"):
        _check_token(tmp_path, "another driver's token")


def test_engine_ray_starts_its_own_instance_beside_an_unrelated_one(tmp_path):
    """`--engine ray` without --ray-address / RAY_ADDRESS neither joins a Ray instance already running on the machine
    (here one with no CPUs: a run on it could not place a worker) nor disturbs it."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ovr", dir="/tmp")  # short: Ray's socket paths must fit AF_UNIX's limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    # the unrelated instance: a head node (it records itself as this machine's current cluster), stopped by us alone
    other = subprocess.Popen([sys.executable, "-c", "import sys\nfrom ray.cluster_utils import Cluster\n"
                              "c = Cluster(initialize_head=True, head_node_args={'num_cpus': 0, "
                              "'include_dashboard': False})\nprint(c.address, flush=True)\nsys.stdin.readline()\n"
                              "c.shutdown()\n"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = other.stdout.readline().strip()
        assert address, "the unrelated Ray instance did not start"
        out = tmp_path / "x"
        proc = subprocess.run([sys.executable, "-m", "ovdet.cli", "annotate", str(REPO / "samples" / "shapes"),
                               "--engine", "ray", "--model", "demo", "--classes", "red circle", "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "annotated 4 images" in proc.stderr
        assert len(records(out)) == 4 and (out / "yolo" / "data.yaml").exists()
        check = subprocess.run([sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], "
                                "logging_level='ERROR'); print(ray.cluster_resources().get('CPU', 0))", address],
                               env=env, capture_output=True, text=True, timeout=240)
        assert check.returncode == 0 and float(check.stdout.split()[-1]) == 0, check.stderr[-2000:]  # still up
    finally:
        other.communicate("stop\n", timeout=240)
        shutil.rmtree(ray_tmp, ignore_errors=True)
