"""`relabel_run`: re-derive a run's datasets from its predictions.jsonl at new per-class thresholds, without the model.

A box the detector kept at threshold t0 is kept at any t >= t0 exactly when its score is above t: non-maximum
suppression is per class and only ever lets a higher-scoring box remove a lower one, so filtering the saved boxes
gives the boxes a fresh run at t would give (one exception: an image whose boxes hit --max-det at t0). Writing goes
through the same writers as `ovdet annotate` (ovdet.datasets.formats), so the outputs are the ones annotate would write.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ovdet.errors import DatasetError, RelabelError
from ovdet.util.progress import progress
from ovdet.runs.lock import LOCK_NAME, lock_output
from ovdet.runs.folder import (ERRORS, JOURNAL, MANIFEST, RunFolder, check_output_folder, clear_outputs,
                               load_run)
from ovdet.datasets.formats import open_dataset_writers, parse_formats, rebuild_from_journal
from ovdet.runs.journal import ImageRecord, Journal
from ovdet.util.safeio import atomic_write
from ovdet.datasets.splits import ValSplit

__all__ = ["RelabelSummary", "parse_pairs", "relabel_run", "resolve_thresholds"]

@dataclass
class RelabelSummary:
    """What one relabel call did."""

    out: str
    images: int
    kept: int
    dropped: int
    per_class: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        per_class = ", ".join(f"{k} {v}" for k, v in self.per_class.items())
        return (f"relabelled {self.images} images in {self.seconds:.1f} s: kept {self.kept} boxes, dropped "
                f"{self.dropped}{' (' + per_class + ')' if per_class else ''} -> {self.out}")


def parse_pairs(text: str | Mapping[str, Any] | None, option: str) -> dict[str, str]:
    """'a=0.4,b=0.2' (or a mapping) -> {'a': '0.4', 'b': '0.2'}; RelabelError for an item without '='."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in text.items()}
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise RelabelError(f"{option} item {item.strip()!r} needs the form 'class=value', "
                               f"e.g. {option} \"person=0.4,helmet=0.2\"")
        key, value = (s.strip() for s in item.split("=", 1))
        pairs[key] = value
    return pairs


def _known(names: Sequence[str], wanted: Sequence[str], option: str) -> None:
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise RelabelError(f"{option} names {', '.join(map(repr, unknown))}, which the run does not have; "
                           f"its classes are: {', '.join(names)}")


def _score(value: Any, what: str) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise RelabelError(f"{what}: {value!r} is not a number; give a threshold between 0 and 1") from None
    if not 0.0 <= t <= 1.0:
        raise RelabelError(f"{what}: {t:g} is not between 0 and 1")
    return t


def resolve_thresholds(run: RunFolder, conf: str | Mapping[str, Any] | None = None,
                       default_conf: float | None = None) -> list[float]:
    """Per-class thresholds (run class order): `conf` per name, else `default_conf`, else the run's own.

    Raises RelabelError for an unknown name, a bad number, or a threshold below the run's floor for that class
    (boxes under the floor were never saved, so only a new annotate run can go lower).
    """
    given = {k: _score(v, f"--conf {k}") for k, v in parse_pairs(conf, "--conf").items()}
    _known(run.names, list(given), "--conf")
    default = None if default_conf is None else _score(default_conf, "--default-conf")
    thresholds, low = [], []
    for name, floor in zip(run.names, run.floors):
        t = given.get(name, floor if default is None else default)
        if t < floor - 1e-12:
            low.append(f"{name} {t:g} < {floor:g}")
        thresholds.append(max(t, floor))
    if low:
        raise RelabelError(
            f"thresholds below the run's own ({'; '.join(low)}): {run.path} only holds boxes above those, so "
            "a lower threshold cannot bring any back. Choose thresholds at or above them, or annotate again "
            "with a lower --conf (then relabel that run)")
    return thresholds


def _class_plan(names: list[str], drop: Sequence[str], rename: Mapping[str, str]) -> tuple[list[str], np.ndarray]:
    """New class names (renames merged, drops removed, order kept) and old id -> new id (-1: dropped)."""
    _known(names, list(drop), "--drop-class")
    _known(names, list(rename), "--rename")
    empty = [k for k, v in rename.items() if not v]
    if empty:
        raise RelabelError(f"--rename gives {', '.join(map(repr, empty))} an empty name; use --drop-class to "
                           "remove a class")
    new_of = [None if n in drop else rename.get(n, n) for n in names]
    new_names = list(dict.fromkeys(n for n in new_of if n is not None))
    if not new_names:
        raise RelabelError("--drop-class removes every class; keep at least one")
    id_map = np.array([-1 if n is None else new_names.index(n) for n in new_of], dtype=int)
    return new_names, id_map


def _prepare_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise DatasetError(f"--out {out} is the run folder itself; write the relabelled datasets to a new folder")
    check_output_folder(out)
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out}: holds an earlier run; pass --overwrite to replace it, or choose another "
                               "--out folder")
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)


def _new_settings(run: RunFolder, new_names: list[str], id_map: np.ndarray, thresholds: list[float],
                  fmts: Sequence[str]) -> dict[str, Any]:
    """The run's settings with the relabelled classes, each carrying its threshold (the new run's floor), and the
    exemplar records moved to their class's new name (those of dropped classes removed)."""
    old = run.settings["classes"]["classes"]
    entries = []
    for new_id, name in enumerate(new_names):
        members = [i for i in range(len(old)) if id_map[i] == new_id]
        prompts = list(dict.fromkeys(p for i in members for p in old[i].get("prompts", [old[i]["name"]])))
        fuse = [old[i]["fuse"] for i in members if "fuse" in old[i]]
        entries.append({"name": name, "prompts": prompts, "conf": min(thresholds[i] for i in members),
                        **({"fuse": fuse[0]} if fuse else {})})
    settings = json.loads(json.dumps(run.settings))
    settings["classes"] = {**settings["classes"], "classes": entries}
    if isinstance(settings.get("exemplars"), list):
        new_name = {n: (new_names[id_map[i]] if id_map[i] >= 0 else None) for i, n in enumerate(run.names)}

        def moved(record: Any) -> Any:  # a negative exemplar (class None) stays; one of a dropped class goes
            cls = record.get("class") if isinstance(record, dict) else None
            if not isinstance(cls, str):
                return record
            return {**record, "class": new_name[cls]} if new_name.get(cls) else None

        settings["exemplars"] = [m for m in map(moved, settings["exemplars"]) if m is not None]
    settings["formats"] = list(fmts)
    settings["save_annotated"] = False
    return settings


def relabel_run(run_dir: str | os.PathLike, out: str | os.PathLike, conf: str | Mapping[str, Any] | None = None,
                default_conf: float | None = None, drop: Sequence[str] | str = (),
                rename: str | Mapping[str, str] | None = None, min_area: float = 0.0,
                formats: str | Sequence[str] | None = None, overwrite: bool = False,
                quiet: bool = False) -> RelabelSummary:
    """Write the datasets of run `run_dir` to `out`, keeping boxes whose score is above their class's threshold.

    `conf` maps class names to thresholds ("a=0.4,b=0.2" or a dict); other classes get `default_conf`, else the
    run's own threshold. `drop` removes classes, `rename` ("old=new"; two olds may share a new name, merging
    them) renames them (class ids are renumbered in order), `min_area` drops boxes smaller than that many px².
    `formats` defaults to the run's own. Thresholds and `conf` names refer to the run's (old) class names.
    Every option is checked before anything is written; `out` is locked while it is written. With YOLO or VOC
    output (which link the images), a record whose image is not a regular image file inside the run's source
    folder (RunFolder.image_problem) is skipped and listed in OUT/errors.jsonl: a run folder from elsewhere may
    name any file.
    """
    started = time.perf_counter()
    run = load_run(run_dir)
    out_path = Path(out)
    thresholds = resolve_thresholds(run, conf, default_conf)
    drop_names = [d.strip() for d in drop.split(",") if d.strip()] if isinstance(drop, str) else list(drop)
    renames = parse_pairs(rename, "--rename")
    new_names, id_map = _class_plan(run.names, drop_names, renames)
    if min_area < 0:
        raise RelabelError(f"--min-area must be 0 or more (px²), got {min_area:g}")
    fmts = parse_formats(run.formats if formats is None else formats)
    if "jsonl" not in fmts:
        fmts = (*fmts, "jsonl")
    settings = _new_settings(run, new_names, id_map, thresholds, fmts)
    manifest = {"version": run.manifest.get("version", 1), "kind": "relabel", "settings": settings,
                "relabel": {"from": str(run.path.resolve()), "thresholds": dict(zip(run.names, thresholds)),
                            "drop": drop_names, "rename": renames, "min_area": float(min_area)}}
    old_errors = run.errors()  # checked (and refused if not a plain file of the run's own) before writing starts
    links = bool({"yolo", "voc"} & set(fmts))  # these formats link the images: only the run's own source images
    with lock_output(out_path):
        _prepare_out(run.path, out_path, overwrite)
        info = {"description": "ovdet relabel", "model": settings.get("model"), "source": settings.get("source")}
        writers, coco = open_dataset_writers(out_path, new_names, fmts, info, ValSplit.from_settings(settings))
        limits = np.array(thresholds, dtype=np.float64)
        has_masks = settings.get("masks") is not None
        counts: Counter[int] = Counter()
        images = kept = seen = 0
        atomic_write(out_path / ERRORS, b"")
        with Journal(out_path / JOURNAL) as journal, Journal(out_path / ERRORS) as errors, \
                progress(desc="relabel", unit="img", quiet=quiet) as bar:
            for record in old_errors:
                errors.append(record)
            for raw in run.records():
                problem = run.image_problem(raw["path"]) if links else ""
                if problem:  # a record naming a file outside the run's source folder: skipped, like an unreadable image
                    errors.append({"image": raw["image"], "path": raw["path"], "reason": problem})
                    bar.update(1)
                    continue
                rec = ImageRecord.from_json(raw, check=False)  # run.records() vetted every field
                keep = (rec.scores > limits[rec.class_ids]) & (id_map[rec.class_ids] >= 0)
                if min_area > 0:
                    wh = rec.boxes[:, 2:] - rec.boxes[:, :2]
                    keep &= wh[:, 0] * wh[:, 1] >= min_area
                # the run's masks of the kept boxes (a journal line without boxes holds none, even in a masks run)
                masks = ([] if has_masks else None) if rec.masks is None else [m for m, k in zip(rec.masks, keep) if k]
                new = ImageRecord(rec.image, rec.path, rec.key, rec.width, rec.height, rec.boxes[keep],
                                  id_map[rec.class_ids[keep]], rec.scores[keep], masks)
                for writer in writers:
                    writer.write(new)
                journal.append(new.to_json(new_names))
                counts.update(new.class_ids.tolist())
                images += 1
                kept += len(new.class_ids)
                seen += len(rec.class_ids)
                bar.update(1)
            journal.sync()
            errors.sync()
        rebuild_from_journal(writers, coco, out_path / JOURNAL)
        atomic_write(out_path / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return RelabelSummary(out=str(out_path), images=images, kept=kept, dropped=seen - kept,
                          per_class={n: counts.get(i, 0) for i, n in enumerate(new_names)},
                          seconds=time.perf_counter() - started)
