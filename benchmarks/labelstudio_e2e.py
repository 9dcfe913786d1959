"""`ovdet serve` as the ML backend of a real Label Studio: pre-annotations read back from Label Studio equal ovdet's.

    python -m venv /tmp/ls-venv && /tmp/ls-venv/bin/pip install label-studio     # once, its own environment
    python benchmarks/labelstudio_e2e.py --label-studio /tmp/ls-venv/bin/label-studio [--backend torch] [--keep]

Everything runs on loopback, in a temporary folder, offline:

1. Label Studio starts (`label-studio start`, SQLite and uploads under a fresh LABEL_STUDIO_BASE_DATA_DIR) with a
   user and a legacy API token made on the command line; its update check, analytics and Sentry are off, and its
   SSRF guard is told that ML backends on loopback are allowed (ML_BLOCK_LOCAL_IP / SSRF_PROTECTION_ENABLED=false).
2. `ovdet serve --model demo --token T --data-root <Label Studio's media folder>` starts with a private OVDET_HOME.
3. Through Label Studio's REST API: a project with a RectangleLabels config (the demo model's shapes), the sample
   images uploaded, ovdet connected as its ML backend (POST /api/ml, HTTP Basic auth with the token as password,
   as a user would fill in the Connect Model form), the data manager's "Retrieve predictions" action on all tasks,
   then the predictions read back (GET /api/predictions).
4. The same images (the files Label Studio stored, checked byte-equal to the samples) go through
   `OVDetector.detect` in this process with the same model, backend and vocabulary.

Label Studio stores each result's `value` (x, y, width, height in percent of original_width/height) as the JSON
floats ovdet sent; they are turned back into pixels (x1 = x * W / 100, x2 = (x + width) * W / 100) and must equal
ovdet's boxes within 1e-2 px, labels exactly, scores within 1e-4; each prediction's model_version must be the one
ovdet's /setup reported. Prints a table and timings; exits 1 on any mismatch, 2 when a server does not come up.
Both servers run in their own process groups and are stopped in any case.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests

REPO = Path(__file__).resolve().parents[1]
SAMPLES = [REPO / "samples" / "shapes.jpg", *sorted((REPO / "samples" / "shapes").glob("*.jpg")),
           REPO / "samples" / "bus.jpg", REPO / "samples" / "coffee.png"]
LABELS = ("red circle", "blue square", "green triangle")
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="label" toName="image">
""" + "".join(f'    <Label value="{name}"/>\n' for name in LABELS) + """  </RectangleLabels>
</View>"""
MISSING = "/data/upload/1/missing.jpg"
BOX_TOL, SCORE_TOL = 1e-2, 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server in its own process group, output to a log file; `stop()` ends the whole group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.name, self.log = name, log
        self._out = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_http(self, url: str, timeout: float) -> None:
        """Return once GET `url` answers 200; SystemExit(2) with the log's tail if it dies or times out."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.popen.poll() is not None:
                break
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        print(f"{self.name} did not answer {url} within {timeout:.0f}s (exit code {self.popen.poll()}); the end of "
              f"its log {self.log}:\n{tail}", file=sys.stderr)
        raise SystemExit(2)

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=10)
        self._out.close()


class LabelStudio:
    """Label Studio's REST API with a legacy token."""

    def __init__(self, url: str, token: str):
        self.url, self.http = url, requests.Session()
        self.http.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, **kwargs):
        answer = self.http.request(method, self.url + path, timeout=600, **kwargs)
        if answer.status_code >= 400:
            raise SystemExit(f"Label Studio {method} {path}: {answer.status_code} {answer.text[:1000]}")
        return answer.json() if answer.content else None


def ls_env(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(data), LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false",
               SENTRY_DSN="", FRONTEND_SENTRY_DSN="", ML_BLOCK_LOCAL_IP="false", SSRF_PROTECTION_ENABLED="false",
               ML_TIMEOUT_SETUP="30", ML_TIMEOUT_HEALTH="10", ML_CONNECTION_TIMEOUT="10")
    return env


def pixels(value: dict, width: int, height: int) -> list[float]:
    """Label Studio's percent box back in pixels of the original image."""
    return [value["x"] * width / 100, value["y"] * height / 100, (value["x"] + value["width"]) * width / 100,
            (value["y"] + value["height"]) * height / 100]


def stored_file(task_image: str, media: Path) -> Path:
    """The file Label Studio keeps for an uploaded task (/data/upload/<project>/<prefix>-<name>)."""
    path = unquote(urlsplit(task_image).path)
    if not path.startswith("/data/"):
        raise SystemExit(f"unexpected task image reference {task_image!r}: uploads are served from /data/upload/")
    return media / path[len("/data/"):]


def run(args: argparse.Namespace, work: Path) -> int:
    data, ovdet_home = work / "label-studio", work / "ovdet-home"
    media = data / "media"
    media.mkdir(parents=True)
    ovdet_home.mkdir()
    os.environ.update(OVDET_HOME=str(ovdet_home), OVDET_OFFLINE="1")  # for the detector in this process too
    ls_port, ov_port = free_port(), free_port()
    user, password = "ovdet-e2e@example.com", secrets.token_urlsafe(12)
    ls_token, ov_token = secrets.token_hex(20), secrets.token_hex(16)
    timings: dict[str, float] = {}
    procs: list[Proc] = []
    try:
        t0 = time.perf_counter()
        ls = Proc("Label Studio", [args.label_studio, "start", "--no-browser", "--internal-host", "127.0.0.1",
                                   "--port", str(ls_port), "--data-dir", str(data), "--username", user,
                                   "--password", password, "--user-token", ls_token, "--enable-legacy-api-token",
                                   "--log-level", "WARNING"], ls_env(data), work / "label-studio.log", work)
        procs.append(ls)
        ov_env = {**os.environ, "OVDET_HOME": str(ovdet_home), "OVDET_OFFLINE": "1"}
        ov = Proc("ovdet serve", [sys.executable, "-m", "ovdet.cli", "serve", "--model", args.model, "--host",
                                  "127.0.0.1", "--port", str(ov_port), "--token", ov_token, "--data-root", str(media),
                                  "--backend", args.backend], ov_env, work / "ovdet-serve.log", REPO)
        procs.append(ov)
        ov_url, ls_url = f"http://127.0.0.1:{ov_port}", f"http://127.0.0.1:{ls_port}"
        ov.wait_http(ov_url + "/health", args.timeout)
        timings["ovdet serve up"] = time.perf_counter() - t0
        ls.wait_http(ls_url + "/health", args.timeout)
        timings["Label Studio up (migrations, user)"] = time.perf_counter() - t0
        health = requests.get(ov_url + "/health", timeout=10).json()
        api = LabelStudio(ls_url, ls_token)
        version = api.call("GET", "/api/version")["release"]

        t = time.perf_counter()
        project = api.call("POST", "/api/projects", json={"title": "ovdet e2e", "label_config": LABEL_CONFIG})["id"]
        files = [(f"file{i}", (p.name, p.read_bytes())) for i, p in enumerate(SAMPLES * args.copies)]  # one field each
        imported = api.call("POST", f"/api/projects/{project}/import", files=files)["task_count"]
        # a task whose image ovdet cannot read: it must get no prediction (so a later retrieval asks again)
        imported += api.call("POST", f"/api/projects/{project}/import", json=[{"image": MISSING}])["task_count"]
        timings["project + upload"] = time.perf_counter() - t
        if imported != len(files) + 1:
            raise SystemExit(f"imported {imported} tasks, expected {len(files) + 1}")

        t = time.perf_counter()
        backend = api.call("POST", "/api/ml", json={
            "url": ov_url, "project": project, "title": "ovdet", "auth_method": "BASIC_AUTH",
            "basic_auth_user": "label-studio", "basic_auth_pass": ov_token})
        timings["connect ML backend"] = time.perf_counter() - t
        if backend.get("state") != "CO":
            raise SystemExit(f"Label Studio did not connect ovdet: {json.dumps(backend)[:1000]}")

        t = time.perf_counter()
        action = api.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                          json={"selectedItems": {"all": True, "excluded": []}})
        timings["retrieve predictions"] = time.perf_counter() - t
        # what the action stored, before anything else asks: opening a task without a prediction makes Label Studio
        # ask the backend for that one task, which would hide a failed batch
        after_action = api.call("GET", "/api/predictions", params={"project": project})
        after_action = after_action.get("results", []) if isinstance(after_action, dict) else after_action
        listed = api.call("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]
        # each task as the labelling page loads it: its `predictions` are the pre-annotations an annotator sees
        tasks = {t["id"]: api.call("GET", f"/api/tasks/{t['id']}") for t in listed}
        for task in tasks.values():
            task["stored_by_action"] = sum(p["task"] == task["id"] for p in after_action)
        print(f"Label Studio {version}: the retrieve action on {action.get('processed_items')} tasks stored "
              f"{len(after_action)} predictions; ovdet {health['model_version']} on {health['backend']}", flush=True)

        t = time.perf_counter()
        from ovdet.detector import OVDetector
        from ovdet.media.sources import load_image

        det = OVDetector(args.model, backend=args.backend)
        det.set_classes(list(LABELS))
        timings["in-process detector load"] = time.perf_counter() - t
        return compare(tasks, det, load_image, media, health["model_version"], timings)
    finally:
        for proc in reversed(procs):
            proc.stop()


def compare(tasks, det, load_image, media, model_version, timings) -> int:
    samples = {p.name: p for p in SAMPLES}
    problems, rows, worst_box, worst_score, n_boxes, detected = [], {}, 0.0, 0.0, 0, {}
    t = time.perf_counter()
    for _, task in sorted(tasks.items()):
        got = task["predictions"]
        if task["data"]["image"] == MISSING:
            if got or task["stored_by_action"]:
                problems.append(f"the task with the unreadable image {MISSING} got {len(got)} prediction(s) "
                                f"{json.dumps(got)[:300]}: Label Studio will never ask for it again")
            continue
        path = stored_file(task["data"]["image"], media)
        name = path.name.split("-", 1)[1]
        if path.read_bytes() != samples[name].read_bytes():
            problems.append(f"{name}: the file Label Studio stored differs from the sample")
        if name not in detected:  # the copies are byte-equal to the sample (checked above): detect it once
            image = load_image(path)
            detected[name] = (det.detect(image), *image.shape[:2])
        want, h, w = detected[name]
        if len(got) != 1 or task["stored_by_action"] != 1:
            problems.append(f"{name}: {task['stored_by_action']} predictions stored by the retrieve action, "
                            f"{len(got)} shown on the task; expected 1")
            continue
        pred = got[0]
        if pred.get("model_version") != model_version:
            problems.append(f"{name}: model_version {pred.get('model_version')!r}, ovdet said {model_version!r}")
        results = pred["result"]
        ls_boxes, diffs = [], [0.0]
        if len(results) != len(want):
            problems.append(f"{name}: {len(results)} boxes in Label Studio, ovdet finds {len(want)}")
        for r, box, score, label in zip(results, want.xyxy.tolist(), want.confidence.tolist(),
                                        want.data["class_name"]):
            if ((r["original_width"], r["original_height"]) != (w, h) or r["type"] != "rectanglelabels"
                    or (r["from_name"], r["to_name"]) != ("label", "image")):
                problems.append(f"{name}: {r['type']} result {r['from_name']}->{r['to_name']} of size "
                                f"{r['original_width']}x{r['original_height']}; want rectanglelabels label->image, "
                                f"{w}x{h}")
            px = pixels(r["value"], r["original_width"], r["original_height"])
            ls_boxes.append(px)
            diff = max(abs(a - b) for a, b in zip(px, box))
            diffs.append(diff)
            worst_box = max(worst_box, diff)
            worst_score = max(worst_score, abs(r["score"] - score))
            if r["value"]["rectanglelabels"] != [str(label)]:
                problems.append(f"{name}: label {r['value']['rectanglelabels']} vs ovdet's {label!r}")
            if diff > BOX_TOL or abs(r["score"] - score) > SCORE_TOL:
                problems.append(f"{name}: box {px} score {r['score']} vs ovdet's {box} {score}")
        n_boxes += len(results)
        row = rows.setdefault(name, [f"{w}x{h}", 0, ls_boxes, want.xyxy.tolist(), list(want.data["class_name"]), 0])
        row[1], row[5] = row[1] + 1, max(row[5], *diffs)
    timings["in-process detect"] = time.perf_counter() - t
    print_table(rows)
    print(f"\n{sum(row[1] for row in rows.values())} tasks with images + 1 without, {n_boxes} boxes; "
          f"max |box diff| {worst_box:.2e} px (tolerance {BOX_TOL}), max |score diff| {worst_score:.2e} "
          f"(tolerance {SCORE_TOL})")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    for problem in problems:
        print("MISMATCH:", problem)
    print("OK: Label Studio's predictions equal ovdet's" if not problems else f"FAILED: {len(problems)} mismatches")
    return 1 if problems else 0


def print_table(rows) -> None:
    def boxes(items):
        return "; ".join("[" + ", ".join(f"{v:.1f}" for v in box) + "]" for box in items) or "-"

    print("\n| image | size | tasks | labels | boxes from Label Studio (px) | boxes from ovdet (px) "
          "| max abs diff (px) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (size, count, ls_boxes, ov_boxes, labels, diff) in rows.items():
        print(f"| {name} | {size} | {count} | {', '.join(labels) or '-'} | {boxes(ls_boxes)} | {boxes(ov_boxes)} | "
              f"{diff:.1e} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label-studio", default=shutil.which("label-studio") or "label-studio",
                        help="the label-studio executable (install it in its own venv)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backend", default="torch", help="the backend of both ovdet serve and the in-process check")
    parser.add_argument("--copies", type=int, default=3,
                        help="upload the samples this many times (Label Studio sends all selected tasks in one "
                             "/predict; the default makes more tasks than ovdet's --max-images)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each server may take to come up")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, SQLite, uploads)")
    args = parser.parse_args(argv)
    if not Path(args.label_studio).exists() and not shutil.which(args.label_studio):
        raise SystemExit(f"no Label Studio at {args.label_studio!r}: python -m venv /tmp/ls-venv && "
                         "/tmp/ls-venv/bin/pip install label-studio, then --label-studio /tmp/ls-venv/bin/label-studio")
    work = Path(tempfile.mkdtemp(prefix="ovdet-ls-e2e-"))
    try:
        return run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
