"""Read YAML and JSON class files keeping where each item came from, so errors point at a file, line and key.

PyYAML's SafeLoader with two changes: every mapping and sequence remembers the line of each item, and a key given
twice is refused (plain PyYAML keeps the last one). ovdet.text.prompts turns the parsed document into a ClassSpec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from ovdet.util.display import shown
from ovdet.errors import ClassSpecError

__all__ = ["Where", "item_line", "load_json", "load_yaml"]


@dataclass(frozen=True)
class Where:
    """Where a piece of a class spec came from: file, line and a path such as `classes[2].conf`."""

    file: str | None = None
    line: int | None = None
    path: str = ""

    def at(self, path: str, line: int | None = None) -> Where:
        return Where(self.file, line if line is not None else self.line, path)

    def error(self, problem: str) -> ClassSpecError:
        place = self.file or "class list"
        if self.file and self.line:
            place += f":{self.line}"
        if self.path:
            place += f" at {self.path}"
        return ClassSpecError(shown(f"{place}: {problem}"))  # file names and YAML excerpts may hold controls


class _Map(dict):
    """A YAML mapping that remembers the line of each key."""

    line: int | None = None
    lines: dict[Any, int]


class _Seq(list):
    """A YAML sequence that remembers the line of each item."""

    line: int | None = None
    lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records line numbers and refuses duplicate keys (plain PyYAML keeps the last one)."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise Where(loader.name, line).error("mapping keys must be plain words")
        if key in out:
            raise Where(loader.name, line).error(f"key {key!r} appears twice (first on line {out.lines[key]}); "
                                                  "keep one")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def load_yaml(text: str, file: str) -> Any:
    loader = _LineLoader(text)
    loader.name = file
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context
        if isinstance(exc, yaml.constructor.ConstructorError) and "tag '!" in str(problem):
            problem += " (YAML reads a leading '!' as a tag: quote negative prompts, e.g. \"!reflection\")"
        raise Where(file, line).error(f"not valid YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise Where(file).error(f"not valid YAML: {exc}") from exc
    finally:
        loader.dispose()


def load_json(text: str, file: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise Where(file).error(f"key {twice!r} appears twice in one object; keep one")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise Where(file, exc.lineno).error(f"not valid JSON: {exc.msg} (column {exc.colno})") from exc


def item_line(container: Any, key: Any) -> int | None:
    lines = getattr(container, "lines", None)
    if isinstance(lines, dict):
        return lines.get(key)
    if isinstance(lines, list) and isinstance(key, int) and key < len(lines):
        return lines[key]
    return None
