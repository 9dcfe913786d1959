"""Mutation check: plant realistic bugs in ovdet one at a time and report which the test suite catches.

Each mutation replaces one exact snippet of ovdet's code (found in the file named, or, if the code has moved, in
the one file under ovdet/ that holds it) in a temporary copy of the repository, then runs the tests named for it
(files or test ids) there with `pytest -x -q`. Caught: the tests fail. Missed: they pass. A snippet that is no longer in the
code (or no longer unique) is reported as "no longer applies", never guessed at. The repository itself is never
touched: the copy is taken from the committed tree (HEAD, default) or the working tree (--worktree).

    python tools/mutation_check.py                 # all of them (15-30 minutes on 2 cores)
    python tools/mutation_check.py --list          # names and where each one applies
    python tools/mutation_check.py -k relabel      # only mutations whose name contains "relabel"
    python tools/mutation_check.py --markdown out.md   # also write the result table to out.md

A catch counts only if the first failing test passes on the unmutated copy (those tests run once more at the end,
unmutated); otherwise the mutation is reported "baseline fails" and left out of the score.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # where the snippet is today (relative to the repo); searched for under ovdet/ if it has moved
    old: str
    new: str
    tests: tuple[str, ...]
    what: str  # the bug, in words


M = Mutation
MUTATIONS: list[Mutation] = [
    # --- outputs a person looks at
    M("preview-nothing-drawn", "ovdet/datasets/previews.py",
      'cv2.imencode(".jpg", draw(image, rec.detections(self.classes)),',
      'cv2.imencode(".jpg", image,',
      ("tests/test_sinks.py", "tests/test_annotate.py::test_previews_show_the_boxes"),
      "annotated previews are written with nothing drawn on them"),
    M("report-title-unescaped", "ovdet/report/page.py",
      'slots = {"{{TITLE}}": html.escape(title),',
      'slots = {"{{TITLE}}": title,',
      ("tests/test_hostile_report.py",),
      "the report's `<title>` is not HTML-escaped (a run folder named `</title><script>` injects markup)"),
    # --- dataset formats
    M("coco-bbox-xyxy", "ovdet/datasets/coco.py",
      '"bbox": [x1, y1, w, h]',
      '"bbox": [x1, y1, x2, y2]',
      ("tests/test_sinks.py",),
      "COCO bbox written as x1,y1,x2,y2 instead of x,y,w,h"),
    M("coco-category-0-based", "ovdet/datasets/coco.py",
      '"category_id": d["class_id"] + 1,',
      '"category_id": d["class_id"],',
      ("tests/test_sinks.py",),
      "COCO category ids 0-based (shifted against the categories list)"),
    M("yolo-not-normalised", "ovdet/datasets/yolo.py",
      "x1, y1, x2, y2 = (rec.boxes / wh).T",
      "x1, y1, x2, y2 = rec.boxes.T",
      ("tests/test_sinks.py",),
      "YOLO labels in pixels instead of normalised to 0..1"),
    M("yolo-class-ids-shifted", "ovdet/datasets/yolo.py",
      "rows = zip(rec.class_ids.tolist(),",
      "rows = zip((rec.class_ids + 1).tolist(),",
      ("tests/test_sinks.py",),
      "YOLO class ids 1-based (off by one against data.yaml names)"),
    M("voc-not-1-based", "ovdet/datasets/voc.py",
      "xmin, ymin = round(x1 + 1), round(y1 + 1)",
      "xmin, ymin = round(x1), round(y1)",
      ("tests/test_sinks.py",),
      "VOC `<bndbox>` 0-based (VOC counts pixels from 1)"),
    M("val-split-depends-on-other-images", "ovdet/datasets/splits.py",
      '        return int.from_bytes(digest, "big") < self.fraction * 2.0**64',
      '        order = self.__dict__.setdefault("_order", {})\n'
      '        order.setdefault(image, len(order))\n'
      '        return (order[image] + 1) * self.fraction % 1.0 < self.fraction',
      ("tests/test_val_split.py", "tests/test_mutations_caught.py"),
      "the val split takes every k-th image seen, so an image's split depends on which other images exist"),
    # --- the model path
    M("nms-iou-ignored-on-v1", "ovdet/model/world.py",
      "kept = nms.non_max_suppression(preds, conf, iou, max_det=max_det)",
      "kept = nms.non_max_suppression(preds, conf, 0.7 if any(type(m).__name__ == 'ImagePoolingAttn' "
      "for m in self.model.model) else iou, max_det=max_det)",
      ("tests/test_world.py::test_nms_iou_is_used_on_v1_and_v2_models",),
      "the NMS iou threshold is ignored (0.7) on YOLO-World v1 models"),
    M("letterbox-scale-off-by-one", "ovdet/model/world.py",
      "det[:, :4] = ops.scale_boxes(batch.shape[2:], det[:, :4], im.shape)",
      "det[:, :4] = ops.scale_boxes((batch.shape[2] + 1, batch.shape[3] + 1), det[:, :4], im.shape)",
      ("tests/test_world.py",),
      "boxes mapped back from the letterboxed input with a size one pixel off"),
    M("negatives-not-suppressed", "ovdet/model/world.py",
      "                reduced = reduced.masked_fill(beaten[:, None], 0)",
      "                pass",
      ("tests/test_prompts.py",),
      "a box whose best prompt is a negative (!reflection) is kept"),
    M("per-class-conf-ignored", "ovdet/detector.py",
      "max_det=max_det or self.max_det, class_conf=class_conf)",
      "max_det=max_det or self.max_det, class_conf=None)",
      ("tests/test_prompts.py",),
      "per-class thresholds (person@0.4) ignored: every class at the global conf"),
    M("demo-default-imgsz-640", "ovdet/detector.py",
      "imgsz or self.world.train_imgsz  # default",
      "imgsz or 640  # default",
      ("tests/test_detector.py::test_the_demo_detects_at_the_size_it_was_trained_at", "tests/test_demo_model.py"),
      "the default inference size is 640 instead of the size the checkpoint was trained at (the demo's)"),
    M("tile-offset-swapped", "ovdet/tiling/run.py",
      "+ (x0, y0, x0, y0)",
      "+ (y0, x0, y0, x0)",
      ("tests/test_tiling.py",),
      "tile boxes shifted by (y0, x0) instead of (x0, y0)"),
    M("tile-merge-class-agnostic", "ovdet/tiling/merge.py",
      "        members = by_class[int(class_id[i])]\n        members = members[alive[members]]",
      "        members = np.arange(n)\n        members = members[alive[members]]",
      ("tests/test_tiling.py",),
      "merging tile boxes suppresses boxes of other classes"),
    # --- backends and caches
    M("openvino-same-k-vocabulary-ignored", "ovdet/backends/openvino_backend.py",
      "        self._request.infer({IMAGES: images, TEXT: txt})",
      '        if getattr(self, "_txt_shape", None) != txt.shape:\n'
      "            self._txt, self._txt_shape = txt, txt.shape\n"
      "        self._request.infer({IMAGES: images, TEXT: self._txt})",
      ("tests/test_backends.py::test_openvino_follows_a_vocabulary_change_that_keeps_the_class_count",),
      "OpenVINO keeps the first vocabulary's embeddings while the number of classes stays the same"),
    M("compiled-cache-key-without-model", "ovdet/backends/base.py",
      'fields = {"model": self._model_id(), "backend": self.name,',
      'fields = {"model": "detector", "backend": self.name,',
      ("tests/test_mutations_caught.py::test_the_compiled_model_cache_keeps_two_models_of_one_name_apart",),
      "the compiled-model cache key leaves out the weights: another model's compiled file is reused"),
    M("embedding-cache-key-without-weights", "ovdet/text/cache.py",
      'digest = hashlib.sha256(f"{config}\\0{state_digest(state[\'state_dict\'])}".encode()).hexdigest()[:16]',
      'digest = hashlib.sha256(f"{config}".encode()).hexdigest()[:16]',
      ("tests/test_embedding_cache.py",),
      "the prompt-embedding cache key of an embedded text tower leaves out its weights"),
    # --- weights
    M("unpickler-allowlist-widened", "ovdet/weights/safepickle.py",
      "    allowed: frozenset[str] = ALLOWED_GLOBALS\n",
      '    allowed: frozenset[str] = ALLOWED_GLOBALS | {"builtins.getattr", "builtins.eval", "posix.system"}\n',
      ("tests/test_mutations_caught.py::test_the_restricted_unpickler_itself_refuses_globals_outside_the_allowlist",
       "tests/test_checkpoint.py"),
      "the restricted unpickler's own allowlist lets getattr/eval/system through (behind the pre-scan)"),
    # --- runs: lock, journal, resume
    M("relabel-threshold-inclusive", "ovdet/jobs/relabel.py",
      "keep = (rec.scores > limits[rec.class_ids])",
      "keep = (rec.scores >= limits[rec.class_ids])",
      ("tests/test_behaviour.py", "tests/test_relabel.py"),
      "relabel keeps a box whose score equals the threshold (annotate drops it)"),
    M("relabel-without-lock", "ovdet/jobs/relabel.py",
      "    with lock_output(out_path):\n",
      "    if True:\n",
      ("tests/test_behaviour.py", "tests/test_relabel.py"),
      "relabel writes its output folder without taking the folder lock"),
    M("report-without-lock", "ovdet/report/page.py",
      "    with lock_output(run.path):\n",
      "    if True:\n",
      ("tests/test_behaviour.py", "tests/test_report.py"),
      "report writes into a run folder another run holds"),
    M("eval-without-lock", "ovdet/jobs/evaluate.py",
      "            stack.enter_context(lock_output(out))\n",
      "            pass\n",
      ("tests/test_behaviour.py", "tests/test_eval.py"),
      "eval writes its output folder without taking the folder lock"),
    M("lock-shared-across-threads", "ovdet/runs/lock.py",
      "if mine is not None and mine.thread == me:",
      "if mine is not None:",
      ("tests/test_runlock.py",),
      "a second thread of the same process enters a folder another thread holds"),
    M("torn-journal-line-kept", "ovdet/runs/journal.py",
      "        if bad_at is not None:\n            _cut(path, fh.fileno(), good_end)",
      "        if bad_at is not None:\n            pass",
      ("tests/test_sinks.py",),
      "a torn last journal line (kill -9 mid-write) is not cut before resuming"),
    M("journal-not-replayed-on-resume", "ovdet/runs/writer.py",
      '                done.add(rec["image"])\n',
      "                pass\n",
      ("tests/test_annotate.py::test_interrupted_run_resumes_exactly_once_and_matches_a_clean_run",),
      "a resumed run does every image again (the journal's finished images are not skipped)"),
    M("journal-not-fsynced", "ovdet/runs/writer.py",
      "        self.journal.sync()\n        self.errors.sync()\n",
      "        self.errors.sync()\n",
      ("tests/test_mutations_caught.py::test_annotate_fsyncs_the_journal_and_the_error_log",),
      "the journal is never fsynced (a power loss can lose finished images)"),
    M("no-recursive-ignored", "ovdet/media/sources.py",
      "            if recursive:\n                yield from _walk(",
      "            if True:\n                yield from _walk(",
      ("tests/test_sources.py",),
      "--no-recursive still walks subfolders"),
    # --- live window
    M("esc-does-not-quit", "ovdet/video/live.py",
      'KEY_QUIT = (ord("q"), 27)',
      'KEY_QUIT = (ord("q"),)',
      ("tests/test_live.py::test_q_and_esc_quit",),
      "Esc no longer quits the webcam window (only q does)"),
    # --- masks, the service
    M("mask-outline-through-pixel-centres", "ovdet/masks/rle.py",
      "    return np.concatenate(path).astype(np.float64)\n",
      "    return np.concatenate(path).astype(np.float64) + 0.5\n",
      ("tests/test_masks.py", "tests/test_masks_outputs.py"),
      "YOLO segment outlines run through pixel centres: the box ultralytics takes from them is a pixel small"),
    M("predict-runs-on-after-the-client-left", "ovdet/service/app.py",
      "            if done and await request.is_disconnected():",
      "            if False and await request.is_disconnected():",
      ("tests/test_serve_labelstudio.py::test_predict_stops_when_label_studio_gives_up",),
      "/predict keeps detecting every task after Label Studio closed the connection"),
    M("local-files-under-data-root-only", "ovdet/service/inputs.py",
      'rel, folder, option = query["d"][0], settings.local_files_root, "--local-files-root"',
      'rel, folder, option = query["d"][0], None, "--local-files-root"',
      ("tests/test_serve_labelstudio.py::test_local_files_storage_reads_under_its_own_root",),
      "--local-files-root is ignored: Label Studio's local files storage is looked for under --data-root"),
    M("int8-start-imports-nncf", "ovdet/backends/openvino_backend.py",
      '            require_installed("nncf", INSTALL_INT8, "int8 with the openvino backend")',
      '            require_module("nncf", INSTALL_INT8, "int8 with the openvino backend")',
      ("tests/test_backends.py::test_reduced_precision_keeps_the_demo_accuracy",),
      "a cached int8 model still imports nncf (~2 s) at every start"),
    # --- the numpy path of the exported backends (ovdet.model.boxes)
    M("numpy-nms-class-agnostic", "ovdet/model/boxes.py",
      "det[:, :4] + det[:, 5:6] * np.float32(MAX_WH)",
      "det[:, :4] + det[:, 5:6] * np.float32(0)",
      ("tests/test_boxes_numpy.py",),
      "the numpy NMS suppresses boxes of other classes (no per-class offset)"),
    M("numpy-letterbox-padding-uncentred", "ovdet/model/boxes.py",
      "top, bottom = round(dh - 0.1), round(dh + 0.1)",
      "top, bottom = 0, round(2 * dh)",
      ("tests/test_boxes_numpy.py",),
      "the numpy letterbox pads only below the image (boxes shifted against ultralytics')"),
    M("numpy-negatives-not-suppressed", "ovdet/model/boxes.py",
      "            reduced = np.where(beaten[:, None], reduced.dtype.type(0), reduced)",
      "            pass",
      ("tests/test_boxes_numpy.py",),
      "on OpenVINO / ONNX Runtime a box whose best prompt is a negative (!reflection) is kept"),
    M("warm-start-imports-torch", "ovdet/detector.py",
      "from ovdet.model.world import WorldDetector\n",
      "from ovdet.model.world import WorldDetector\nimport torch  # noqa: F401\n",
      ("tests/test_warm_start.py::test_a_warm_cli_detect_on_openvino_imports_no_torch",),
      "a warm `ovdet detect` on OpenVINO imports torch again (2-3 s)"),
]


def _sources(root: Path) -> list[Path]:
    return sorted(p for p in (root / "ovdet").rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def locate(root: Path, m: Mutation) -> tuple[Path | None, str]:
    """The file under `root` that holds `m.old` exactly once (m.path first, then any file under ovdet/), or None
    and why not."""
    first = root / m.path
    if first.is_file() and first.read_text(encoding="utf-8").count(m.old) == 1:
        return first, ""
    hits = [(p, n) for p in _sources(root) if p.suffix in (".py", ".js", ".html", ".css")
            for n in [p.read_text(encoding="utf-8", errors="replace").count(m.old)] if n]
    if len(hits) == 1 and hits[0][1] == 1:
        return hits[0][0], ""
    if not hits:
        return None, "snippet not found"
    return None, "snippet in " + ", ".join(f"{p.relative_to(root)} ({n}x)" for p, n in hits)


def make_copy(dest: Path, worktree: bool) -> None:
    """The repository's files (committed tree, or the working tree's tracked and untracked-not-ignored files)."""
    dest.mkdir(parents=True)
    if worktree:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                check=True, capture_output=True).stdout.decode().split("\0")
        for rel in filter(None, listed):
            src = REPO / rel
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def test_env(copy: Path) -> dict[str, str]:
    """The environment the tests run in: the copy's ovdet first on the path (also for the `ovdet` command and the
    subprocesses the tests start), no bytecode written into it, and a home folder of its own, so that nothing
    else on the machine writing to ~/.cache/ovdet can trip the suite's real-home guard and look like a catch."""
    home = copy.parent / "home"
    home.mkdir(exist_ok=True)
    pythonpath = os.pathsep.join(p for p in (str(copy), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k != "OVDET_HOME"}
    return {**env, "PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(home)}


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'error N' | 'timeout', seconds, last lines of output)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=test_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return "timeout", time.monotonic() - start, out[-2000:]
    seconds = time.monotonic() - start
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    if proc.returncode == 0:
        return "pass", seconds, tail
    if proc.returncode == 1:
        return "fail", seconds, tail
    return f"error {proc.returncode}", seconds, tail


def first_failure(tail: str) -> str:
    for line in tail.splitlines():
        if line.startswith("FAILED ") or line.startswith("ERROR "):
            return line.split(" ", 1)[1].split(" - ")[0]
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", dest="only", help="only mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and where each applies, run nothing")
    ap.add_argument("--worktree", action="store_true", help="copy the working tree instead of the committed HEAD")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("--markdown", type=Path, help="also write the result table (markdown) to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]

    tmp = Path(tempfile.mkdtemp(prefix="ovdet-mutation-"))
    copy = tmp / "repo"
    make_copy(copy, args.worktree)
    try:
        # The tests must import the copy, never the repository the check was started from.
        probe = subprocess.run([sys.executable, "-c", "import ovdet; print(ovdet.__file__)"], cwd=copy,
                               env=test_env(copy), capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(copy)):
            print(f"the copy's ovdet is not the one imported ({probe.stdout.strip() or probe.stderr.strip()})",
                  file=sys.stderr)
            return 2
        located = {m.name: locate(copy, m) for m in chosen}
        if args.list:
            for m in chosen:
                path, why = located[m.name]
                where = path.relative_to(copy) if path else f"NO LONGER APPLIES ({why})"
                print(f"{m.name:40} {where}  -> {' '.join(m.tests)}")
            return 0
        rows = []
        for i, m in enumerate(chosen, 1):
            path, why = located[m.name]
            if path is None:
                rows.append([m, "no longer applies", why, 0.0])
                print(f"[{i}/{len(chosen)}] {m.name}: no longer applies ({why})", flush=True)
                continue
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(m.old, m.new, 1), encoding="utf-8")
            try:
                status, seconds, tail = run_tests(copy, m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            detail = first_failure(tail) if status != "pass" else ""
            result = "MISSED" if status == "pass" else "caught" if status == "fail" else f"caught ({status})"
            if result != "caught":
                print(tail, flush=True)
            rows.append([m, result, detail, seconds])
            print(f"[{i}/{len(chosen)}] {m.name}: {result} in {seconds:.0f} s {detail}", flush=True)
        # A catch counts only if the test that failed passes on the unmutated copy: all of them in one run.
        caught_by = sorted({row[2] for row in rows if row[1].startswith("caught") and row[2]})
        if caught_by:
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *caught_by]
            proc = subprocess.run(cmd, cwd=copy, env=test_env(copy), capture_output=True, text=True,
                                  timeout=args.timeout * 2)
            failing = {first_failure(line) for line in proc.stdout.splitlines()} - {""}
            if proc.returncode not in (0, 1):
                print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
                failing = set(caught_by)
            for row in rows:
                if row[2] in failing:
                    row[1] = "baseline fails"
            print(f"unmutated: {len(caught_by) - len(failing)} of {len(caught_by)} catching tests pass", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    scored = [r for r in rows if r[1] == "MISSED" or r[1].startswith("caught")]
    caught = sum(r[1].startswith("caught") for r in scored)
    lines = ["| mutation | planted bug | tests run | result | caught by |", "| --- | --- | --- | --- | --- |"]
    for m, result, detail, _ in rows:
        tests = ", ".join(Path(t).name for t in m.tests)
        lines.append(f"| `{m.name}` | {m.what} | {tests} | {result} | {f'`{detail}`' if detail else ''} |")
    pct = 100.0 * caught / len(scored) if scored else 0.0
    lines.append("")
    lines.append(f"{caught} of {len(scored)} caught ({pct:.0f} %)"
                 + (f"; {len(rows) - len(scored)} not scored (no longer apply or baseline fails)"
                    if len(rows) != len(scored) else ""))
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    return 0 if caught == len(scored) else 1


if __name__ == "__main__":
    sys.exit(main())
