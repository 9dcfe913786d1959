"""Say in a few words how a run folder's recorded settings differ from the ones asked for now.

A resumed run must use the settings it started with; when they differ, the user needs one readable line
("classes differ: red circle, blue square → red circle; conf: 0.25 → 0.5"), not the settings objects. The recorded
side comes from a run.json on disk, so every value may be of any JSON type and any text is shown escaped.
"""

from __future__ import annotations

from typing import Any

from ovdet.util.display import shown

__all__ = ["describe_changes"]

_MAX_NAMES = 8  # names listed before "(+N more)"
_MAX_VALUE = 80  # characters of one shown value


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One short phrase per setting whose value differs between `old` (recorded) and `new` (asked for now)."""
    phrases = []
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if key == "classes":
            phrases.extend(_classes(before, value))
        elif key == "exemplars":
            phrases.append(_exemplars(before, value))
        else:
            phrases.append(f"{key}: {_value(before)} → {_value(value)}")
    return phrases


def _value(value: Any) -> str:
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (list, tuple)):
        text = ",".join(_value(v) for v in value) or "none"
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={_value(v)}" for k, v in value.items()) or "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    text = shown(text)
    return text if len(text) <= _MAX_VALUE else text[:_MAX_VALUE - 1] + "…"


def _names(items: list[str]) -> str:
    shown_items = [shown(n) for n in items[:_MAX_NAMES]]
    more = len(items) - _MAX_NAMES
    return (", ".join(shown_items) or "none") + (f" (+{more} more)" if more > 0 else "")


def _class_rows(record: Any) -> list[dict[str, Any]]:
    rows = record.get("classes") if isinstance(record, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _classes(before: Any, after: Any) -> list[str]:
    old_rows, new_rows = _class_rows(before), _class_rows(after)
    old_names, new_names = [str(r.get("name")) for r in old_rows], [str(r.get("name")) for r in new_rows]
    if old_names != new_names:
        return [f"classes differ: {_names(old_names)} → {_names(new_names)}"]
    phrases = []
    changed = [n for n, a, b in zip(new_names, old_rows, new_rows) if a != b]
    if changed:
        phrases.append(f"phrasings or thresholds differ for: {_names(changed)}")
    old, new = (before if isinstance(before, dict) else {}), (after if isinstance(after, dict) else {})
    for key, label in (("negatives", "negatives"), ("templates", "prompt templates"), ("reduce", "reduce")):
        if old.get(key) != new.get(key):
            phrases.append(f"{label}: {_value(old.get(key))} → {_value(new.get(key))}")
    return phrases or ["class settings differ"]


def _exemplars(before: Any, after: Any) -> str:
    old = [r for r in before if isinstance(r, dict)] if isinstance(before, list) else []
    new = [r for r in after if isinstance(r, dict)] if isinstance(after, list) else []
    if len(old) != len(new):
        return f"exemplars: {len(old)} → {len(new)}"
    changed = sorted({"(negative)" if b.get("negative") else str(b.get("class")) for a, b in zip(old, new) if a != b})
    return f"exemplars differ for: {_names(changed)} (images, boxes or weights)"
