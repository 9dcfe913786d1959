"""`RunWriter`: what an annotate run writes, image by image, through one object that every engine shares.

A job opens it on its output folder, asks `load_journal()` which images an earlier (interrupted) call finished, and
hands it to an engine. The engine gives every new image an output key (`key_for`, in source order), passes each
finished image to `write` (dataset files and preview first, the predictions.jsonl line last: that line marks the
image done) or a file it could not read to `add_error`, and calls `maybe_checkpoint` between batches. The job ends
with `finish` (journal synced, COCO rebuilt) and `close`. Both engines write through the same writer, so their
outputs are the same and either can resume the other's run.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ovdet.datasets.formats import open_dataset_writers, rebuild_from_journal
from ovdet.datasets.keys import flat_key
from ovdet.datasets.previews import PreviewWriter
from ovdet.datasets.splits import ValSplit
from ovdet.errors import OVDetWarning
from ovdet.runs.folder import ERRORS, JOURNAL
from ovdet.runs.journal import ImageRecord, Journal, read_journal, repair_journal
from ovdet.util.display import shown
from ovdet.util.safeio import atomic_write

__all__ = ["RunWriter", "utf8"]

_NOT_UTF8 = ("its name is not valid UTF-8 (the bytes are shown as \\xNN), and ovdet's outputs are UTF-8 files "
             "that must name it: rename the file, e.g. with `convmv -f latin1 -t utf8`, and run again")


def utf8(text: str) -> bool:
    """True when `text` can be written to a UTF-8 file (file names that were not valid UTF-8 cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class RunWriter:
    """The dataset writers, journal, errors file and previews of one annotate call, and the counts between them.

    `classes` are the run's class names (ids index them); `settings` are run.json's (its model and source go into
    the COCO info); `formats` the datasets to write; `save_annotated` adds preview JPEGs; the journal is synced and
    COCO rebuilt at least every `checkpoint_s` seconds; `split` sorts images into train and val.
    """

    def __init__(self, out: Path, classes: Sequence[str], settings: Mapping[str, Any], formats: Sequence[str],
                 save_annotated: bool, checkpoint_s: float, split: ValSplit):
        self.out, self.classes = out, list(classes)
        self.journal_path = out / JOURNAL
        info = {"description": "ovdet annotate", "model": settings["model"], "source": settings["source"]}
        self.writers, self.coco = open_dataset_writers(out, self.classes, formats, info, split)
        self.split = split
        self.split_counts = [0, 0]  # images in the (train, val) split, finished ones of earlier runs included
        self.preview = PreviewWriter(out / "annotated", self.classes) if save_annotated else None
        if self.preview is not None:
            self.preview.start()
        self.journal: Journal | None = None
        self.errors: Journal | None = None
        self.used_keys: set[str] = set()  # lower-cased output keys given out, this call's and earlier calls'
        self.counts: Counter[int] = Counter()  # detections per class id written by this call
        self.skipped: list[tuple[str, str]] = []  # (path, reason) of the files this call could not read
        self.images_done = 0  # images written by this call
        self.checkpoint_s = checkpoint_s
        self.last_checkpoint = time.monotonic()

    @property
    def previews(self) -> bool:
        """Whether the run writes preview JPEGs (OUT/annotated); an engine whose workers draw them asks this."""
        return self.preview is not None

    def load_journal(self) -> set[str]:
        """Repair the journal, open it for appending and return the images it already holds."""
        repair_journal(self.journal_path)
        done: set[str] = set()
        if self.journal_path.exists():
            for rec in read_journal(self.journal_path):
                done.add(rec["image"])
                self.used_keys.add(rec["key"].lower())
                self.split_counts[self.split.is_val(rec["image"])] += 1
        self.journal = Journal(self.journal_path)
        # the COCO file(s) and split lists exist (and match the journal) from the start
        rebuild_from_journal(self.writers, self.coco, self.journal_path)
        # Unreadable files are retried on every run, so their old records go.
        atomic_write(self.out / ERRORS, b"")
        self.errors = Journal(self.out / ERRORS)
        return done

    def key_for(self, rel: str) -> str:
        """A flat output file stem unique in this run (see ovdet.datasets.keys): sub/dir/a.jpg -> sub__dir__a."""
        return flat_key(rel, self.used_keys)

    def claim_key(self, key: str) -> bool:
        """Take `key`, given out by an earlier call whose results arrive only now (a Ray part file a killed driver
        left); False when this run has given it to another image since."""
        if key.lower() in self.used_keys:
            return False
        self.used_keys.add(key.lower())
        return True

    def add_error(self, record: dict[str, str]) -> None:
        """Append one errors.jsonl record (image, path, reason) of a file that could not be read; a name that is
        not valid UTF-8 is written with its bytes escaped (\\xNN), since JSON in UTF-8 cannot hold it."""
        assert self.errors is not None, "load_journal() first"
        record = {k: v if not isinstance(v, str) or utf8(v) else shown(v) for k, v in record.items()}
        self.errors.append(record)
        self.skipped.append((record["path"], record["reason"]))

    def write(self, rec: ImageRecord, image: np.ndarray | None = None) -> None:
        """Write every output of one image (the preview only given its pixels), journal entry last; an image whose
        name is not valid UTF-8 goes to errors.jsonl instead, since no UTF-8 output file can name it."""
        assert self.journal is not None, "load_journal() first"
        if not (utf8(rec.image) and utf8(rec.path)):
            self.add_error({"image": rec.image, "path": rec.path, "reason": _NOT_UTF8})
            return
        for writer in self.writers:
            writer.write(rec)
        if self.preview is not None and image is not None:
            self.preview.write(rec, image)
        self.journal.append(rec.to_json(self.classes))
        self.counts.update(rec.class_ids.tolist())
        self.split_counts[self.split.is_val(rec.image)] += 1
        self.images_done += 1

    def maybe_checkpoint(self) -> None:
        """Every checkpoint_s seconds: fsync the journal and refresh the COCO file from it."""
        if time.monotonic() - self.last_checkpoint < self.checkpoint_s:
            return
        began = time.monotonic()
        self._checkpoint()
        # Keep checkpoints at most ~5% of the run even when the COCO file gets large.
        self.checkpoint_s = max(self.checkpoint_s, 20 * (time.monotonic() - began))
        self.last_checkpoint = time.monotonic()

    def _checkpoint(self) -> None:
        assert self.journal is not None and self.errors is not None, "load_journal() first"
        self.journal.sync()
        self.errors.sync()
        rebuild_from_journal(self.writers, self.coco, self.journal_path, end=self.journal.size())

    def finish(self) -> None:
        """The last checkpoint; warns when a val split left one side empty."""
        self._checkpoint()
        empty = [name for name, n in zip(("train", "val"), self.split_counts) if n == 0]
        if self.split.active and empty and any(self.split_counts):
            warnings.warn(f"the {empty[0]} split is empty: --val-split {self.split.fraction:g} put "
                          f"{self.split_counts[1]} of {sum(self.split_counts)} images in val. Use a fraction that "
                          "leaves images on both sides (or more images) for a dataset ultralytics can train on.",
                          OVDetWarning, stacklevel=2)

    def close(self) -> None:
        """Close the journal and the errors file (what was appended stays)."""
        for j in (self.journal, self.errors):
            if j is not None:
                j.close()
