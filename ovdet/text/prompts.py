"""Class specifications: class names with synonyms, prompt templates, per-class thresholds and negative prompts.

Inline syntax (Python lists, comma strings, `--classes`): `"person|man|woman"` is one class named `person`,
scored by its best phrasing; `"!reflection"` is a negative prompt. A class file (YAML or JSON) says more:

    reduce: max                  # how a class's phrasings combine: max (best phrasing, default) or mean
    templates: true              # true: DEFAULT_TEMPLATES; or a list such as ["a photo of a {}"]; default off
    negatives: [reflection]      # boxes whose best-matching prompt is one of these are dropped
    classes:
      - person|man|woman         # a string, inline syntax as above ("!x" adds a negative)
      - name: helmet             # a mapping: name, synonyms (added to the name), prompts (replace it), conf
        synonyms: [hard hat]
        conf: 0.1                # per-class confidence threshold, overrides the global conf
      - bicycle: {conf: 0.4}     # a one-key mapping {name: options}
      - name: pallet jack        # exemplars: images (paths relative to this file) and boxes that show the class
        exemplars: [{image: ref.jpg, box: [10, 20, 200, 180]}, crop.jpg]
        fuse: 0.3                # the exemplars' share when the class also has words; prompts: [] for none

`classes:` may also be a mapping `{name: options or null}`, and a whole file may be just a list of classes.
In Python lists, `ovdet.Exemplar(...)` items join the class of their name (or make one); see ovdet.text.exemplars.
The parsed result is a ClassSpec (ovdet.text.classspec, re-exported here).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ovdet.text.class_files import Where as _Where
from ovdet.text.class_files import item_line as _line
from ovdet.text.class_files import load_json as _load_json
from ovdet.text.class_files import load_yaml as _load_yaml
from ovdet.util.display import shown
from ovdet.errors import ClassSpecError
from ovdet.options import REDUCTIONS  # defined there so that the CLI parser needs no torch
from ovdet.text import exemplars as _ex
from ovdet.text.classspec import ClassEntry, ClassSpec
from ovdet.text.exemplars import Exemplar
from ovdet.text.limits import check_counts, check_text

CLASS_FILE_SUFFIXES = (".yaml", ".yml", ".json")
# A small CLIP-style prompt ensemble; "{}" (the bare phrasing) is what YOLO-World was trained on.
DEFAULT_TEMPLATES = ("{}", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
                     "a photo of a large {}.", "a cropped photo of a {}.", "a close-up photo of a {}.")
_DOC_KEYS = ("classes", "negatives", "templates", "reduce")
_CLASS_KEYS = ("name", "prompts", "synonyms", "conf", "exemplars", "fuse")


def parse_classes(classes: str | Path | Sequence[Any] | Mapping[str, Any] | ClassSpec | Exemplar | None,
                  templates: bool | Sequence[str] | None = None, reduce: str | None = None,
                  exemplars: Sequence[Exemplar] = ()) -> ClassSpec:
    """A ClassSpec from a list (inline syntax, ovdet.Exemplar items), a comma-separated string, a .yaml/.yml/.json
    class file, a parsed document (mapping) or a ClassSpec. `templates` (True: DEFAULT_TEMPLATES, False: off, or a
    list) and `reduce` ("max" or "mean") override what the file says; `exemplars` join the classes of their names
    (or add classes; None for `classes`: only those). Raises ClassSpecError with the file and line where possible."""
    where = _Where()
    if exemplars:
        exemplars = list(exemplars)
        spec = parse_classes(classes if classes is not None else [exemplars.pop(0)], templates, reduce)
        items = [(e, where) for e in exemplars]
        bad = next((e for e, _ in items if not isinstance(e, Exemplar)), None)
        if bad is not None:
            raise where.error(f"exemplars must be ovdet.Exemplar objects, got {type(bad).__name__} {bad!r}")
        classes_, negatives = [(c, where) for c in spec.classes], list(spec.negative_exemplars)
        for e, w in items:
            if e.negative:
                negatives.append(e)
            else:
                _merge(classes_, e, w, negatives)
        return _checked(dataclasses.replace(spec, classes=tuple(c for c, _ in classes_),
                                            negative_exemplars=tuple(negatives)))
    if isinstance(classes, Exemplar):
        classes = [classes]
    if isinstance(classes, ClassSpec):
        spec = _checked(classes)
    elif isinstance(classes, Path) or (isinstance(classes, str) and is_class_file(classes)):
        spec = load_class_file(classes)
        where = _Where(str(classes))
    elif isinstance(classes, str):
        spec = _document(classes.split(","), where)
    elif isinstance(classes, (Sequence, Mapping)):
        spec = _document(classes, where)
    else:
        raise ClassSpecError(f"Classes must be a list of strings such as ['person', 'bus'], a comma-separated "
                             f"string or a class file path, got {type(classes).__name__} {classes!r}.")
    changes: dict[str, Any] = {}
    if templates is not None:
        changes["templates"] = _templates(templates, where.at("templates"))
    if reduce is not None:
        changes["reduce"] = _reduce(reduce, where.at("reduce"))
    spec = dataclasses.replace(spec, **changes) if changes else spec
    check_counts(len(spec.classes), len(spec.columns), len(spec.templates), where)
    return spec


def _checked(spec: ClassSpec) -> ClassSpec:
    """A ClassSpec built in code gets the checks a parsed one had: classes present, unique names and phrasings."""
    where = _Where()
    if not spec.classes:
        raise where.error("the class list is empty: name at least one thing to find, e.g. ['person']")
    check_counts(len(spec.classes), sum(len(getattr(c, "prompts", ())) for c in spec.classes) + len(spec.negatives),
                 0, where)
    for entry in spec.classes:
        if not isinstance(entry, ClassEntry) or not (entry.prompts or entry.exemplars):
            raise where.error(f"{entry!r} is not a ClassEntry with at least one phrasing or exemplar")
        if entry.conf is not None:
            _conf(entry.conf, where)
        _fuse(entry.fuse, where)
    for item in [e for c in spec.classes for e in c.exemplars] + list(spec.negative_exemplars):
        if not isinstance(item, Exemplar):
            raise where.error(f"exemplars must be ovdet.Exemplar objects, got {type(item).__name__} {item!r}")
    _ex.check_count(len(spec.exemplars), where)
    for what, text in [("class name or phrasing", t) for c in spec.classes for t in (c.name, *c.prompts)] + \
            [("negative prompt", n) for n in spec.negatives]:
        if not isinstance(text, str):
            raise where.error(f"a {what} must be a string, got {type(text).__name__} {text!r}")
        check_text(text, what, where)
    _check_unique([(c, where) for c in spec.classes], [(n, where) for n in spec.negatives])
    _templates(list(spec.templates), where)
    _reduce(spec.reduce, where)
    return spec


def is_class_file(text: str) -> bool:
    """True when a string names a class file (by its .yaml/.yml/.json suffix) rather than listing classes."""
    return "," not in text and text.strip().lower().endswith(CLASS_FILE_SUFFIXES)


def load_class_file(path: str | Path) -> ClassSpec:
    """Parse a YAML or JSON class file (format in this module's docstring)."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in CLASS_FILE_SUFFIXES:
        raise ClassSpecError(f"{shown(path)}: class files must end in .yaml, .yml or .json.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClassSpecError(f"Class file {shown(path)} does not exist: check the path (or list the classes "
                             "directly, e.g. 'person,bus').") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassSpecError(f"Class file {shown(path)} cannot be read as UTF-8 text: {shown(exc)}.") from exc
    data = _load_json(text, str(path)) if path.suffix.lower() == ".json" else _load_yaml(text, str(path))
    return _document(data, _Where(str(path), getattr(data, "line", None)))


def _unknown_key(key: Any, allowed: Sequence[str], where: _Where) -> ClassSpecError:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return where.error(f"unknown key {key!r}: {hint}allowed keys are {', '.join(allowed)}")


def _document(data: Any, where: _Where) -> ClassSpec:
    """A whole spec from a list of class entries or a mapping with classes/negatives/templates/reduce."""
    options: Mapping[str, Any] = {}
    if isinstance(data, Mapping):
        for key in data:
            if key not in _DOC_KEYS:
                raise _unknown_key(key, _DOC_KEYS, where.at(str(key), _line(data, key)))
        if "classes" not in data:
            raise where.error("no 'classes:' key: list the classes to find under classes: [...]")
        options, entries, where = data, data["classes"], where.at("classes", _line(data, "classes"))
    elif isinstance(data, Sequence) and not isinstance(data, str):
        entries = data
    else:
        raise where.error(f"a class file holds a list of classes or a mapping with 'classes:', "
                          f"got {type(data).__name__}")
    classes: list[tuple[ClassEntry, _Where]] = []
    negatives: list[tuple[str, _Where]] = []
    negative_exemplars: list[Exemplar] = []
    rows = 0  # counted as the entries come, so a huge (or alias-multiplied) file stops at the cap, not at its end
    for entry, entry_where in _entries(entries, where):
        if isinstance(entry, str):
            negatives.append((entry, entry_where))
        elif isinstance(entry, Exemplar) and entry.negative:
            negative_exemplars.append(entry)
        else:
            rows -= _merge(classes, entry, entry_where, negative_exemplars)
        rows += 1 if isinstance(entry, (str, Exemplar)) else max(1, len(entry.prompts))
        check_counts(len(classes), rows, 0, entry_where, at_least=True)
        _ex.check_count(len(negative_exemplars) + sum(len(c.exemplars) for c, _ in classes), entry_where)
    if "negatives" in options:
        neg_where = where.at("negatives", _line(options, "negatives"))
        items = options["negatives"]
        exemplar_items = [i for i, item in enumerate(items) if isinstance(item, Mapping)] \
            if isinstance(items, Sequence) and not isinstance(items, str) else []
        for i in exemplar_items:
            item_where = neg_where.at(f"negatives[{i}]", _line(items, i))
            negative_exemplars.append(_ex.file_exemplar(items[i], item_where, None, negative=True))
        items = _string_list([item for i, item in enumerate(items) if i not in exemplar_items]
                             if exemplar_items else items, neg_where)
        check_counts(len(classes), rows + len(items), 0, neg_where, at_least=True)
        for i, item in enumerate(items):
            item_where = neg_where.at(f"negatives[{i}]", _line(options["negatives"], i))
            negatives.append((_phrasing(item.lstrip("!"), "negative prompt", item_where), item_where))
    if not classes:
        if negatives or negative_exemplars:
            raise where.error("there are only negative prompts: name at least one class to find, e.g. 'person'")
        raise where.error("the class list is empty: name at least one thing to find, e.g. ['person']")
    _check_unique(classes, negatives)
    templates = _templates(options["templates"], where.at("templates", _line(options, "templates"))) \
        if "templates" in options else ()
    reduce = _reduce(options["reduce"], where.at("reduce", _line(options, "reduce"))) if "reduce" in options else "max"
    return ClassSpec(tuple(c for c, _ in classes), tuple(n for n, _ in negatives), templates, reduce,
                     tuple(negative_exemplars))


def _merge(classes: list[tuple[ClassEntry, _Where]], entry: ClassEntry | Exemplar, where: _Where,
           negative_exemplars: list[Exemplar]) -> int:
    """Add a class (or a positive Exemplar) to `classes`: an exemplar joins the class of its name, or makes an
    exemplar-only class; words for a class that so far has only exemplars join it. Negative exemplars listed
    under a class go to `negative_exemplars`. Returns the embedding rows the merge saved (for the count)."""
    if isinstance(entry, Exemplar):
        entry = ClassEntry(entry.name, (), exemplars=(entry,))
    negative_exemplars += [e for e in entry.exemplars if e.negative]
    entry = dataclasses.replace(entry, exemplars=tuple(e for e in entry.exemplars if not e.negative))
    if not entry.prompts and not entry.exemplars:
        raise where.error(f"class {entry.name!r} has no phrasing and no exemplar: give prompts or exemplars")
    key = _key(entry.name)
    for i, (known, known_where) in enumerate(classes):
        if _key(known.name) == key and (not known.prompts or not entry.prompts):
            prompts = known.prompts + entry.prompts
            merged = dataclasses.replace(known, prompts=prompts, exemplars=known.exemplars + entry.exemplars,
                                         conf=known.conf if known.conf is not None else entry.conf,
                                         fuse=entry.fuse if not known.prompts and entry.exemplars else known.fuse)
            classes[i] = (merged, known_where)
            return max(1, len(known.prompts)) + max(1, len(entry.prompts)) - max(1, len(prompts))
    classes.append((entry, where))
    return 0


def _entries(entries: Any, where: _Where):
    """Yield (ClassEntry, negative phrasing or Exemplar, where) for a list of entries or a {name: options} mapping."""
    if isinstance(entries, Mapping):
        for name, options in entries.items():
            yield _class_options(name, options, where.at(f"classes.{name}", _line(entries, name)))
        return
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise where.error("classes must be a list such as [person, bus] or a mapping {person: null, bus: null}")
    path = where.path or ""
    for i, item in enumerate(entries):
        item_where = where.at(f"{path}[{i}]", _line(entries, i))
        if isinstance(item, str):
            yield from _inline(item, item_where)
        elif isinstance(item, Exemplar):
            yield item, item_where
        elif isinstance(item, Mapping) and "name" in item:
            yield _class_options(item["name"], {k: v for k, v in item.items() if k != "name"}, item_where,
                                 lines=item)
        elif isinstance(item, Mapping) and len(item) == 1:
            (name, options), = item.items()
            yield _class_options(name, options, item_where)
        elif isinstance(item, Mapping):
            raise item_where.error(f"a class given as a mapping needs a 'name' key (found keys "
                                   f"{', '.join(map(str, item))}); e.g. {{name: helmet, conf: 0.1}}")
        else:
            raise item_where.error(f"classes must be a list of strings such as ['person', 'bus'] (or class "
                                   f"mappings), got {type(item).__name__} {item!r}")


def _split(text: str, what: str, where: _Where) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split("|"))
    if len(parts) > 1 and not all(parts):
        raise where.error(f"{text!r} has an empty synonym: write phrasings separated by '|', "
                          f"e.g. 'person|man|woman'")
    return tuple(_phrasing(p, what, where) for p in parts)


def _phrasing(text: str, what: str, where: _Where) -> str:
    text = text.strip()
    if not text:
        raise where.error(f"the {what} is blank: remove it or write it out")
    return check_text(text, what, where)


def _inline(item: str, where: _Where):
    """Inline syntax: 'a|b|c' is a class named 'a' with three phrasings; '!x' (or '!x|y') are negatives."""
    text = item.strip()
    if text.startswith("!"):
        for phrasing in _split(text[1:], "negative prompt", where):
            yield phrasing, where
        return
    prompts = _split(text, "class name", where)
    yield ClassEntry(prompts[0], prompts), where


def _class_options(name: Any, options: Any, where: _Where, lines: Any = None) -> tuple[ClassEntry, _Where]:
    """The mapping form: name plus options prompts / synonyms / conf."""
    if not isinstance(name, str):
        raise where.error(f"a class name must be a string, got {type(name).__name__} {name!r}")
    name = _phrasing(name, "class name", where)
    if "|" in name or name.startswith("!"):
        raise where.error(f"class name {name!r} uses inline syntax inside a mapping: give the plain name and list "
                          "other phrasings under synonyms: [...] (negatives go under the top-level negatives:)")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise where.error(f"the options of class {name!r} must be a mapping such as {{conf: 0.1, synonyms: "
                          f"[...]}}, got {type(options).__name__} {options!r}")
    lines = lines if lines is not None else options
    for key in options:
        if key not in _CLASS_KEYS[1:]:
            raise _unknown_key(key, _CLASS_KEYS, where.at(f"{where.path}.{key}", _line(lines, key)))
    prompts: list[str] = [name]
    for key in ("prompts", "synonyms"):
        if key in options:
            key_where = where.at(f"{where.path}.{key}", _line(lines, key))
            items = _string_list(options[key], key_where)
            check_counts(1, len(items), 0, key_where, at_least=True)
            items = [_phrasing(p, "synonym" if key == "synonyms" else "prompt", key_where) for p in items]
            if any("|" in p for p in items):
                raise key_where.error(f"{key} take one phrasing per list item, without '|'")
            prompts = items if key == "prompts" else prompts + items
    exemplars: list[Exemplar] = []
    if "exemplars" in options:
        exemplars = _ex.file_exemplars(options["exemplars"], where.at(f"{where.path}.exemplars",
                                                                       _line(lines, "exemplars")), name)
    if not prompts and not any(not e.negative for e in exemplars):
        raise where.error(f"class {name!r} has an empty prompts list: give at least one phrasing (or exemplars)")
    conf = None
    if "conf" in options:
        conf = _conf(options["conf"], where.at(f"{where.path}.conf", _line(lines, "conf")))
    share = _ex.DEFAULT_FUSE
    if "fuse" in options:
        share = _fuse(options["fuse"], where.at(f"{where.path}.fuse", _line(lines, "fuse")))
    return ClassEntry(name, tuple(prompts), conf, tuple(exemplars), share), where


def _string_list(value: Any, where: _Where) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) for v in items):
        raise where.error(f"expected a list of strings, got {value!r}")
    return list(items)


def _fuse(value: Any, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise where.error(f"fuse (the exemplars' share of a class with words) must be a number between 0 and 1, "
                          f"got {value!r}")
    return float(value)


def _conf(value: Any, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise where.error(f"conf must be a number between 0 and 1, got {value!r}")
    return float(value)


def _templates(value: Any, where: _Where) -> tuple[str, ...]:
    if isinstance(value, bool):
        return DEFAULT_TEMPLATES if value else ()
    templates = tuple(_string_list(value, where))
    check_counts(0, 1, len(templates), where, at_least=True)  # one phrasing in that many templates is too many
    for t in templates:
        check_text(t, "template", where)
        if t.count("{}") != 1:
            raise where.error(f"template {t!r} must contain '{{}}' exactly once, where the phrasing goes, "
                              "e.g. 'a photo of a {}'")
    if len(set(templates)) != len(templates):
        raise where.error("a template is listed twice; keep one")
    return templates


def _reduce(value: Any, where: _Where) -> str:
    if value not in REDUCTIONS:
        raise where.error(f"reduce must be one of {', '.join(REDUCTIONS)}, got {value!r}")
    return value


def _key(text: str) -> str:
    """Names and phrasings compare like CLIP reads them: case- and whitespace-insensitive."""
    return " ".join(text.lower().split())


def _check_unique(classes: list[tuple[ClassEntry, _Where]], negatives: list[tuple[str, _Where]]) -> None:
    """Refuse duplicate class names, and a phrasing used twice (by two classes, or by a class and a negative)."""
    seen: dict[str, tuple[str, _Where]] = {}
    for entry, where in classes:
        key = _key(entry.name)
        if key in seen:
            first, first_where = seen[key]
            at = f" (line {first_where.line})" if first_where.line else ""
            raise where.error(f"class {entry.name!r} is listed twice (as {first!r}{at} too): each class once, "
                              "please; merge their phrasings with 'a|b' or synonyms: [...]")
        seen[key] = (entry.name, where)
    owner: dict[str, tuple[str, _Where]] = {}
    phrasings = [(p, f"class {e.name!r}", w) for e, w in classes for p in e.prompts]
    phrasings += [(n, "the negatives", w) for n, w in negatives]
    for phrasing, who, where in phrasings:
        key = _key(phrasing)
        if key in owner:
            first_who, first_where = owner[key]
            at = f" (line {first_where.line})" if first_where.line else ""
            raise where.error(f"phrasing {phrasing!r} of {who} is also used by {first_who}{at}: a phrasing can "
                              "belong to one class or negative only")
        owner[key] = (who, where)
