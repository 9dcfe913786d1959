"""Class changes made in the live window: a dragged box becomes a class at once, n names it, u undoes a change.

A box drawn on the live picture is cut from the frame shown (without the drawn detections) and added as an exemplar
class (ovdet.text.exemplars) named "object N"; the name prompt runs in a background thread like the class prompt, so
the video keeps running while you type. Every change made here, and every class list typed after `c`, can be undone.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ovdet.errors import ClassSpecError, ImageError

__all__ = ["DRAG_HELP", "MIN_DRAG_PX", "Box", "LiveClasses", "Prompt", "ordered"]

DRAG_HELP = "drag a box: new class from it · n name it · u undo"
MIN_DRAG_PX = 4  # a drag narrower or lower than this is a click, not a box
Box = tuple[int, int, int, int]


class Prompt:
    """Asks a question in a background thread, so the video keeps running while you type."""

    def __init__(self, ask: Callable[[], str]):
        self._ask = ask
        self._thread: threading.Thread | None = None
        self._answer: str | None = None
        self._lock = threading.Lock()

    def start(self) -> bool:
        """Start asking; False if a question is already open."""
        if self._thread is not None and self._thread.is_alive():
            return False
        self._thread = threading.Thread(target=self._run, name="ovdet-live-prompt", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        try:
            answer = self._ask()
        except EOFError:  # no terminal to type in
            return
        with self._lock:
            self._answer = answer

    def poll(self) -> str | None:
        """The typed line once there is one (taken only once), else None."""
        with self._lock:
            answer, self._answer = self._answer, None
        return answer


def _ask_name(current: str) -> str:
    return input(f"name for the class {current!r} (empty keeps it): ")


class LiveClasses:
    """The detector's classes as the live window changes them: add from a box, rename, undo."""

    def __init__(self, detector: Any, echo: Callable[[str], None], changes: list[list[str]],
                 ask_name: Callable[[str], str] = _ask_name):
        self.detector, self.echo, self.changes, self.ask_name = detector, echo, changes, ask_name
        self.added: list[str] = []  # classes added by dragging a box, newest last
        self.history: list[Any] = []  # the classes (a ClassSpec, or names) before each change, for undo
        self._namer: Prompt | None = None
        self._naming: str | None = None  # the class the open name prompt renames

    def current(self) -> Any:
        """What set_classes needs to restore the present classes: the ClassSpec, else the names."""
        return getattr(self.detector, "class_spec", None) or list(self.detector.classes)

    def change(self, classes: Any, exemplars: Any = ()) -> bool:
        """Set new classes, keeping the old ones for undo; False (and a message) if they are refused."""
        before = self.current()
        try:
            if exemplars:
                self.detector.set_classes(classes, exemplars=exemplars)
            else:
                self.detector.set_classes(classes)
        except (ClassSpecError, ImageError) as exc:
            self.echo(f"classes unchanged: {exc}")
            return False
        self.history.append(before)
        self.changes.append(list(self.detector.classes))
        return True

    def add_box(self, frame: np.ndarray, box: Box) -> str | None:
        """Add what `box` (image pixels) shows in `frame` as a new class "object N"; its name, or None when the
        box is too small or refused."""
        x1, y1, x2, y2 = _clipped(box, frame.shape)
        if x2 - x1 < MIN_DRAG_PX or y2 - y1 < MIN_DRAG_PX:
            return None
        from ovdet.text.exemplars import Exemplar  # torch and class parsing: only once a box is drawn

        taken = {" ".join(c.lower().split()) for c in self.detector.classes}
        n = len(self.added) + 1
        while f"object {n}" in taken:
            n += 1
        name = f"object {n}"
        exemplar = Exemplar(np.ascontiguousarray(frame), box=(x1, y1, x2, y2), name=name)
        if not self.change(self.current(), exemplars=[exemplar]):
            return None
        self.added.append(name)
        self.echo(f"new class {name!r} from the box {x1},{y1},{x2},{y2}: n names it, u undoes it")
        return name

    def start_naming(self) -> None:
        """Ask (in the terminal, in the background) for a name for the newest class added from a box."""
        if not self.added or self.added[-1] not in self.detector.classes:
            self.echo("no class to name: drag a box around something first")
            return
        current = self.added[-1]
        namer = Prompt(lambda: self.ask_name(current))
        if namer.start():
            self._namer, self._naming = namer, current

    def apply_name(self) -> None:
        """Rename the class once its name was typed (checked every frame)."""
        answer = self._namer.poll() if self._namer is not None else None
        if answer is None:
            return
        old, new = self._naming, answer.strip()
        self._namer = self._naming = None
        spec = getattr(self.detector, "class_spec", None)
        if not new or spec is None or old not in self.detector.classes:
            return
        if self.change(_renamed(spec, old, new)):
            self.added[self.added.index(old)] = new
            self.echo(f"class {old!r} is now {new!r}")

    def undo(self) -> None:
        """Go back to the classes before the last change."""
        if not self.history:
            self.echo("nothing to undo")
            return
        before = self.history.pop()
        try:
            self.detector.set_classes(before)
        except (ClassSpecError, ImageError) as exc:
            self.echo(f"cannot undo: {exc}")
            return
        self.changes.append(list(self.detector.classes))
        self.echo(f"classes: {', '.join(self.detector.classes)}")


def ordered(x1: int, y1: int, x2: int, y2: int) -> Box:
    """The box between two corners, top-left first."""
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _clipped(box: Box, shape: tuple[int, ...]) -> Box:
    """A box inside an image of `shape` (a drag may end outside the picture)."""
    h, w = shape[:2]
    x1, y1, x2, y2 = box
    return max(0, min(x1, w)), max(0, min(y1, h)), max(0, min(x2, w)), max(0, min(y2, h))


def _renamed(spec: Any, old: str, new: str) -> Any:
    """`spec` (a ClassSpec) with class `old` called `new`, its exemplars too."""
    from ovdet.text.exemplars import Exemplar

    def rename(entry: Any) -> Any:
        if entry.name != old:
            return entry
        exemplars = tuple(Exemplar(e.pixels(), box=e.box, name=new, source=e.source, weight=e.weight)
                          for e in entry.exemplars)
        prompts = tuple(new if p == old else p for p in entry.prompts)
        return dataclasses.replace(entry, name=new, prompts=prompts, exemplars=exemplars)

    return dataclasses.replace(spec, classes=tuple(rename(c) for c in spec.classes))
