"""The report's data: one JSON document built from a run folder, which the page's script draws from.

Boxes stay numbers (not pixels on a picture) so the browser redraws them at any threshold. Per image:
k key, n name, f full image URL and t thumbnail URL (both relative to the report), w/h size, d detections
[class, score, x1, y1, x2, y2]; eval runs add g ground truth [class, x1, y1, x2, y2], m a matched flag per
detection and gs the score of the detection matching each ground-truth box (-1: none); see evalstats. A run with
masks adds p: per detection its mask's outline [x1, y1, x2, y2, ...] in image pixels, along pixel edges
(ovdet.masks.rle.mask_polygon: pieces bridged, holes filled; [] for an empty mask), which the page fills under the
box. Per class, x holds the crops of its exemplars (data: URIs, ovdet.report.exemplars).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import supervision as sv

from ovdet.masks.rle import decode, mask_polygon
from ovdet.report.evalstats import confusion, match_image, pr_curves
from ovdet.report.exemplars import exemplar_thumbnails
from ovdet.runs.folder import RunFolder

__all__ = ["EVAL_START_CONF", "build_data"]

# Eval runs keep boxes down to conf 0.001 (mAP needs them); the report opens at this more useful threshold.
EVAL_START_CONF = 0.25
# Settings shown in the report's header, in this order, when the run has them.
_SHOWN = ("source", "data", "model", "text_model", "imgsz", "conf", "iou", "max_det", "formats", "recursive")


def _url(target: str | os.PathLike, start: Path) -> str:
    """`target` relative to folder `start`, as a URL path (so the report works wherever the folder is copied)."""
    return quote(Path(os.path.relpath(os.path.abspath(target), start.resolve())).as_posix())


def _skipped(record: Any) -> dict[str, str]:
    """An errors.jsonl record as the page lists it: two strings, whatever another program wrote on the line."""
    if not isinstance(record, dict):
        return {"image": "?", "reason": str(record)}
    return {"image": str(record.get("image", record.get("path", "?"))), "reason": str(record.get("reason", ""))}


def _outline(rle: dict[str, Any], bbox: list[float]) -> list[float]:
    """A mask's outline as a flat [x, y, ...] list, 0.1 px, traced in the box's crop (the mask stays inside it)."""
    mask = decode(rle)  # vetted by run.records()
    h, w = mask.shape
    x1, y1 = max(int(bbox[0]) - 1, 0), max(int(bbox[1]) - 1, 0)
    x2, y2 = min(int(np.ceil(bbox[2])) + 1, w), min(int(np.ceil(bbox[3])) + 1, h)
    if mask[y1:y2, x1:x2].sum() != mask.sum():  # a mask reaching out of its box: traced whole
        x1 = y1 = 0
        x2, y2 = w, h
    points = mask_polygon(mask[y1:y2, x1:x2]) + (x1, y1)
    return [round(float(v), 1) for v in points.reshape(-1)]


def build_data(run: RunFolder, thumbs: Path | None, thumb_errors: dict[str, str]) -> dict[str, Any]:
    """The report document of `run`; `thumbs` is the thumbnail folder (None: the full images are shown)."""
    is_eval = run.kind == "eval"
    k = len(run.names)
    start = [max(f, EVAL_START_CONF) if is_eval else f for f in run.floors]
    palette = sv.ColorPalette.DEFAULT
    images: list[dict[str, Any]] = []
    eval_scores: list[list[np.ndarray]] = [[] for _ in range(k)]
    eval_matched: list[list[np.ndarray]] = [[] for _ in range(k)]
    gt_counts = np.zeros(k, int)
    preds: list[sv.Detections] = []
    masks = run.settings.get("masks") is not None
    targets: list[sv.Detections] = []
    for rec in run.records():
        dets = rec["detections"]
        item: dict[str, Any] = {
            "k": rec["key"], "n": rec["image"], "f": _url(rec["path"], run.path), "w": rec["width"],
            "h": rec["height"],
            "t": None if thumbs is None or rec["key"] in thumb_errors else _url(thumbs / f"{rec['key']}.jpg",
                                                                              run.path),
            "d": [[d["class_id"], d["score"], *(round(v, 1) for v in d["bbox"])] for d in dets],
        }
        if masks or (dets and "segmentation" in dets[0]):  # a run with masks: every detection has one
            item["p"] = [_outline(d["segmentation"], d["bbox"]) if "segmentation" in d else [] for d in dets]
        if is_eval:
            gts = rec.get("gt", [])
            pb = np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
            pc = np.array([d["class_id"] for d in dets], int)
            ps = np.array([d["score"] for d in dets], np.float64)
            gb = np.array([g["bbox"] for g in gts], np.float64).reshape(-1, 4)
            gc = np.array([g["class_id"] for g in gts], int)
            matched, gt_score = match_image(pb, pc, ps, gb, gc)
            item["g"] = [[g["class_id"], *(round(v, 1) for v in g["bbox"])] for g in gts]
            item["m"] = matched.astype(int).tolist()
            item["gs"] = gt_score.tolist()
            for c in range(k):
                eval_scores[c].append(ps[pc == c])
                eval_matched[c].append(matched[pc == c])
            gt_counts += np.bincount(gc, minlength=k)
            preds.append(sv.Detections(xyxy=pb.astype(np.float32), confidence=ps.astype(np.float32), class_id=pc))
            targets.append(sv.Detections(xyxy=gb.astype(np.float32), class_id=gc))
        images.append(item)
    settings = {key: run.settings[key] for key in _SHOWN if run.settings.get(key) is not None}
    shown_by = exemplar_thumbnails(run.settings.get("exemplars"))  # classes given by example: their crops
    data: dict[str, Any] = {
        "version": 1,
        "kind": run.kind,
        "run": str(run.path.resolve()),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": settings,
        "classes": [{"name": n, "floor": f, "start": s, "color": palette.by_idx(i).as_hex(),
                     "x": shown_by.get(n, [])}
                    for i, (n, f, s) in enumerate(zip(run.names, run.floors, start))],
        "images": images,
        "errors": [_skipped(e) for e in run.errors()],
        "thumb_errors": thumb_errors,
    }
    if run.kind == "relabel":
        data["relabel"] = run.manifest.get("relabel", {})
    if is_eval:
        data["eval"] = {
            "result": run.manifest.get("result", {}),
            "gt_counts": gt_counts.tolist(),
            "pr": pr_curves([np.concatenate(s) if s else np.zeros(0) for s in eval_scores],
                            [np.concatenate(m) if m else np.zeros(0, bool) for m in eval_matched], gt_counts),
            "confusion": confusion(preds, targets, run.names, start) if images else [],
            "iou": 0.5,
        }
    return data
