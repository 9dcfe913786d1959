"""Class specifications as data: classes with their phrasings, thresholds and exemplars, negatives, templates;
the embedding rows they make (text and exemplar embeddings fused) and the JSON record a run keeps of them.

ovdet.text.prompts parses user input (inline syntax, class files, Exemplar items) into these; see its docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ovdet.errors import ClassSpecError
from ovdet.text import exemplars as _ex
from ovdet.text.class_files import Where as _Where
from ovdet.text.exemplars import DEFAULT_FUSE, Exemplar, fuse, mean_embedding
from ovdet.text.limits import check_counts
from ovdet.util.device import cpu_float32
from ovdet.util.display import shown

if TYPE_CHECKING:
    import torch

Encode = Callable[[list[str]], "np.ndarray | torch.Tensor"]  # prompts -> [N, D] embeddings, numpy or torch

__all__ = ["ClassEntry", "ClassSpec"]


@dataclass(frozen=True)
class ClassEntry:
    """One class: the name detections carry, the phrasings it is scored by, an optional own threshold, and
    exemplars (images that show it) fused into its phrasings with the exemplars' share `fuse`."""

    name: str
    prompts: tuple[str, ...]
    conf: float | None = None
    exemplars: tuple[Exemplar, ...] = ()
    fuse: float = DEFAULT_FUSE


@dataclass(frozen=True)
class ClassSpec:
    """A parsed class specification: classes in the user's order, negative prompts, templates, reduction."""

    classes: tuple[ClassEntry, ...]
    negatives: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    reduce: str = "max"
    negative_exemplars: tuple[Exemplar, ...] = ()

    @classmethod
    def from_names(cls, names: Sequence[str]) -> ClassSpec:
        """One class per name, each scored by its name alone (the plain-list case)."""
        return cls(tuple(ClassEntry(n, (n,)) for n in names))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def thresholds(self) -> list[float | None]:
        """Per-class confidence thresholds in class order (None: use the global conf)."""
        return [c.conf for c in self.classes]

    @property
    def columns(self) -> list[tuple[str, int]]:
        """(label, class index) per embedding row: each phrasing (a class of exemplars only: one row labelled
        by them), then negative prompts and negative exemplars with index -1."""
        rows = [(p, i) for i, c in enumerate(self.classes) for p in c.prompts or (_ex.label(c.exemplars),)]
        return rows + [(n, -1) for n in self.negatives] + [(_ex.label((e,)), -1) for e in self.negative_exemplars]

    @property
    def is_plain(self) -> bool:
        """True when embedding row i is class i (no synonyms, no negatives): plain YOLO-World scoring applies."""
        return not self.negatives and not self.negative_exemplars and all(len(c.prompts) <= 1 for c in self.classes)

    @property
    def exemplars(self) -> list[Exemplar]:
        """Every exemplar of the spec, class by class, negative ones last."""
        return [e for c in self.classes for e in c.exemplars] + list(self.negative_exemplars)

    def _phrasings(self) -> list[str]:
        return [p for c in self.classes for p in c.prompts] + list(self.negatives)

    def texts(self) -> list[str]:
        """Every distinct string the text tower must encode: each phrasing in each template."""
        phrasings = self._phrasings()
        if not self.templates:
            return phrasings
        return list(dict.fromkeys(t for p in phrasings for t in self._templated(p)))

    def embed(self, encode: Encode,
              encode_exemplars: Callable[[list[Exemplar]], np.ndarray | torch.Tensor] | None = None) -> np.ndarray:
        """[rows, D] float32 embeddings of `columns` (numpy): with templates, each phrasing's ensemble averaged and
        renormalized; a class's exemplars (embedded by `encode_exemplars`, [N, D] for N exemplars) averaged and fused
        into its phrasings (`ClassEntry.fuse`), or its one row when it has no words; each negative exemplar a row.
        Plain phrasings are `encode`'s rows as they are (no torch needed); the ensembles and fusions run in torch."""
        check_counts(len(self.classes), len(self.columns), len(self.templates), _Where())  # before any encoding
        phrasings = self._phrasings()
        if not self.exemplars:
            return cpu_float32(self._embed_texts(encode, phrasings))
        import torch
        import torch.nn.functional as F

        text = torch.from_numpy(cpu_float32(self._embed_texts(encode, phrasings))) if phrasings else None
        if encode_exemplars is None:
            raise ClassSpecError("These classes have exemplars, which need a detector to embed them: use "
                                 "OVDetector.set_classes (or `ovdet classes encode --model ...`).")
        vectors = torch.from_numpy(cpu_float32(encode_exemplars(self.exemplars)))
        rows, at, seen = [], 0, 0
        for entry in self.classes:
            words = text[at:at + len(entry.prompts)] if entry.prompts else None
            at += len(entry.prompts)
            if entry.exemplars:
                mean = mean_embedding(vectors[seen:seen + len(entry.exemplars)], [e.weight for e in entry.exemplars])
                seen += len(entry.exemplars)
                rows.append(fuse(words, mean, entry.fuse) if words is not None else mean[None])
            else:
                rows.append(words)
        if self.negatives:
            rows.append(text[at:])
        rows.append(F.normalize(vectors[seen:].float(), dim=-1))
        return torch.cat([r.float().cpu() for r in rows]).numpy()

    def _embed_texts(self, encode: Encode, phrasings: list[str]) -> np.ndarray | torch.Tensor:
        if not self.templates:
            return encode(phrasings)
        import torch
        import torch.nn.functional as F

        texts = self.texts()
        emb = encode(texts)
        emb = emb if isinstance(emb, torch.Tensor) else torch.from_numpy(cpu_float32(emb))
        row = {t: i for i, t in enumerate(texts)}
        index = torch.tensor([row[t] for p in phrasings for t in self._templated(p)], device=emb.device)
        return F.normalize(emb[index].view(len(phrasings), len(self.templates), -1).mean(1), dim=-1)

    def record(self) -> dict[str, Any]:
        """JSON-ready form for run.json: per class name, prompts and conf (and fuse where it has exemplars),
        negatives, templates, reduce; the exemplars themselves are in `exemplar_records()`."""
        classes = [{"name": c.name, "prompts": list(c.prompts), "conf": c.conf,
                    **({"fuse": c.fuse} if c.exemplars else {})} for c in self.classes]
        return {"classes": classes, "negatives": list(self.negatives), "templates": list(self.templates),
                "reduce": self.reduce}

    def exemplar_records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per exemplar (class, image, sha256, box, source, weight, negative)."""
        return [e.record() for e in self.exemplars]

    def _templated(self, phrasing: str) -> list[str]:
        return [t.replace("{}", phrasing) for t in self.templates]

    def describe(self) -> str:
        """A human-readable table of the classes (name, threshold, phrasings), negatives and options; control
        characters (refused by parse_classes, possible in a ClassSpec built by hand) shown escaped."""
        rows = [("#", "NAME", "CONF", "PHRASINGS")] + [
            (str(i), shown(c.name), "-" if c.conf is None else f"{c.conf:g}",
             shown(" | ".join((*c.prompts, *([_ex.label(c.exemplars, c.fuse if c.prompts else None)]
                                             if c.exemplars else [])))))
            for i, c in enumerate(self.classes)]
        widths = [max(len(r[k]) for r in rows) for k in range(3)]
        lines = [f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
        negatives = [*self.negatives, *(_ex.label((e,)) for e in self.negative_exemplars)]
        lines.append(f"negatives: {shown(' | '.join(negatives)) if negatives else '-'}")
        lines.append(f"templates: {shown(' ; '.join(self.templates)) if self.templates else 'off'}")
        lines.append(f"phrasings scored by: {self.reduce}")
        return "\n".join(lines)

