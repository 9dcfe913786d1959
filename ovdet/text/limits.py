"""Caps on what a class spec may ask: classes, texts to encode, characters, control characters, exemplar images.

A class file is small but multiplies: 300 classes × 300 templates is 90,000 prompts to encode, and every
phrasing is a row the detector scores for every anchor of every image. The caps sit far above real vocabularies
(LVIS, the largest common one, has 1203 classes) and are checked while the spec is parsed, before anything is
encoded or allocated. Raise one for a spec you trust with its environment variable, e.g. OVDET_MAX_PROMPTS=20000.
"""

from __future__ import annotations

import os
from typing import Protocol

from ovdet.util.display import first_unsafe
from ovdet.errors import ClassSpecError

__all__ = ["LIMITS", "check_counts", "check_text", "limit"]

# name -> (environment variable, default)
LIMITS = {
    "classes": ("OVDET_MAX_CLASSES", 2000),
    "prompts": ("OVDET_MAX_PROMPTS", 8192),  # texts the text tower encodes: phrasings × templates
    "prompt_chars": ("OVDET_MAX_PROMPT_CHARS", 1000),  # CLIP reads 77 tokens, ~300 characters of English
    "exemplars": ("OVDET_MAX_EXEMPLARS", 1000),  # exemplar images a spec may name (each is decoded and embedded)
    "exemplar_bytes": ("OVDET_MAX_EXEMPLAR_BYTES", 64 << 20),  # size of one exemplar image file
}


class _Where(Protocol):
    def error(self, problem: str) -> ClassSpecError: ...


def limit(name: str) -> int:
    """The cap `name` (a key of LIMITS): its environment variable if set, else the default."""
    env, default = LIMITS[name]
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ClassSpecError(f"{env}={raw!r} is not a positive whole number: set it to the largest number "
                             f"allowed (default {default}), or unset it.")
    return value


def check_text(text: str, what: str, where: _Where) -> str:
    """`text` (a class name, phrasing, negative prompt or template) if it is short and free of control characters."""
    cap = limit("prompt_chars")
    if len(text) > cap:
        raise where.error(
            f"the {what} {text[:40]!r}... is {len(text)} characters long, more than the cap of {cap}: CLIP reads "
            f"only its first 77 tokens (about 300 characters). Shorten it, or raise the cap with the environment "
            f"variable {LIMITS['prompt_chars'][0]}={len(text)}")
    bad = first_unsafe(text)
    if bad is not None:
        raise where.error(
            f"the {what} {text!r} holds a control character ({bad[1]}) at position {bad[0]}: class names and "
            "prompts are plain text, and a control, bidi or line-separator character would reach terminals and "
            "output files (data.yaml, COCO, VOC XML) as it is. Remove it")
    return text


def check_counts(classes: int, rows: int, templates: int, where: _Where, at_least: bool = False) -> None:
    """Refuse a spec over the caps: `classes` classes, `rows` phrasings (negatives included) and `templates`
    templates (0: off) make rows × max(1, templates) texts to encode. `at_least`: counted while parsing."""
    more = "at least " if at_least else ""
    env, _ = LIMITS["classes"]
    cap = limit("classes")
    if classes > cap:
        raise where.error(
            f"the spec lists {more}{classes} classes, more than the cap of {cap} (LVIS, the largest common detection "
            f"vocabulary, has 1203). If you mean it, raise the cap with the environment variable {env}=N "
            f"(N ≥ {classes})")
    env, _ = LIMITS["prompts"]
    cap = limit("prompts")
    texts = rows * max(1, templates)
    if texts > cap:
        how = f"{rows} phrasings × {templates} templates" if templates else f"{rows} phrasings"
        raise where.error(
            f"the spec asks the text tower to encode {more}{texts} prompts ({how}), more than the cap of {cap}; "
            "nothing was encoded. Use fewer synonyms or templates, or, if you mean it, raise the cap with the "
            f"environment variable {env}=N (N ≥ {texts})")
