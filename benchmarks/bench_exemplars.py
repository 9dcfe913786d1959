"""Prompt by example on the demo model: per class AP50 with 1, 3 and 5 `region` exemplars cut from other images
against the text prompt, text + exemplars fused against text alone, and the "zorblax" test (exemplars of one class
under a name the text tower cannot know are found; the word finds nothing). Also cold and warm set_classes times.

    python benchmarks/bench_exemplars.py [--seed 5150] [--val 200] [--refs 60] [--json results.json]

The world is ovdet.jobs.synth with a seed the demo never trained on (it trained on seed 0): exemplars come from its
train split, scores from its val split (ovdet.jobs.evaluate, COCO-style AP50 over all nine classes at once, each
class competing with the others). Everything runs under a temporary OVDET_HOME, offline, on the torch backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SHOTS = (1, 3, 5)
SHAPE = (160, 160)  # the synth images' size, the demo's inference size


def pick_exemplars(refs, names: list[str], shots: int) -> dict[str, list]:
    """The first `shots` objects of each class in the reference images, each from another image where possible."""
    from ovdet import Exemplar

    chosen: dict[str, list] = {n: [] for n in names}
    used: dict[str, set] = {n: set() for n in names}
    for rule in ("new image", "any"):
        for image in refs.images:
            boxes = image.targets(SHAPE).xyxy
            for box, class_id in zip(boxes, image.class_ids):
                name = names[int(class_id)]
                if len(chosen[name]) < shots and (rule == "any" or image.path not in used[name]) \
                        and not any(e.path == image.path and e.box == tuple(map(float, box)) for e in chosen[name]):
                    chosen[name].append(Exemplar(image.path, box=tuple(map(float, box)), name=name))
                    used[name].add(image.path)
    short = [n for n, e in chosen.items() if len(e) < shots]
    if short:
        raise SystemExit(f"too few reference objects of {short}: raise --refs")
    return chosen


def per_class(result) -> dict[str, float]:
    return {c.dataset_classes[0]: c.ap50 for c in result.classes}


def zorblax(det, val, refs, shots: int) -> dict[str, float]:
    """AP50 of 'blue circle' objects found by `shots` blue-circle exemplars named zorblax, and by the word."""
    import supervision as sv

    from ovdet import Exemplar
    from ovdet.jobs.evaluate import compute_map

    names = val.names
    target = names.index("blue circle")
    exemplars = [Exemplar(e.path, box=e.box, name="zorblax")
                 for e in pick_exemplars(refs, names, shots)["blue circle"]]
    out = {}
    for label, classes in (("exemplars", exemplars), ("word", ["zorblax"])):
        det.set_classes(classes)
        predictions, targets = [], []
        for image in val.images:
            dets = det.detect(str(image.path), conf=0.001)
            gt = image.targets(SHAPE)
            keep = gt.class_id == target
            targets.append(sv.Detections(xyxy=gt.xyxy[keep], class_id=gt.class_id[keep] * 0))
            predictions.append(sv.Detections(xyxy=dets.xyxy, confidence=dets.confidence,
                                             class_id=dets.class_id * 0))
            out[f"{label}_found_at_0.25"] = out.get(f"{label}_found_at_0.25", 0) + int((dets.confidence >= 0.25).sum())
        out[label] = compute_map(predictions, targets, ["zorblax"]).map50
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=5150, help="synth world seed (not 0: the demo trained on it)")
    parser.add_argument("--val", type=int, default=200, help="images scored")
    parser.add_argument("--refs", type=int, default=60, help="reference images the exemplars are cut from")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ["OVDET_HOME"] = tempfile.mkdtemp(prefix="ovdet-bench-exemplars-")
    os.environ["OVDET_OFFLINE"] = "1"

    from ovdet import OVDetector
    from ovdet.jobs.evaluate import evaluate, load_dataset
    from ovdet.jobs.synth import generate

    work = Path(tempfile.mkdtemp(prefix="ovdet-exemplar-world-"))
    data = generate(work / "world", train=args.refs, val=args.val, seed=args.seed, progress=False)
    val, refs = load_dataset(data, "val"), load_dataset(data, "train")
    names = val.names
    det = OVDetector("demo", device="cpu", backend="torch")

    table: dict[str, dict[str, float]] = {}
    table["text"] = per_class(evaluate(det, val, progress=False))
    picks = {k: pick_exemplars(refs, names, k) for k in SHOTS}
    timing = {}
    for k in SHOTS:
        exemplars = [e for n in names for e in picks[k][n]]
        started = time.perf_counter()
        det.set_classes(None, exemplars=exemplars)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        det.set_classes(None, exemplars=exemplars)
        timing[f"{k} per class ({len(exemplars)} exemplars)"] = {"cold_s": cold,
                                                                "warm_ms": (time.perf_counter() - started) * 1e3}
        table[f"{k} exemplar{'s' if k > 1 else ''}"] = per_class(evaluate(det, val, exemplars=exemplars,
                                                                          progress=False))
        if k == 3:
            table["text + 3 fused"] = per_class(evaluate(det, val, classes=names, exemplars=exemplars,
                                                         progress=False))
    z = zorblax(det, val, refs, 3)

    columns = list(table)
    print(f"demo model, synth world seed {args.seed}: {args.val} val images, exemplars from {args.refs} other images")
    print("| class | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name in names + ["mean"]:
        row = [table[c][name] if name != "mean" else sum(table[c].values()) / len(table[c]) for c in columns]
        label = f"**{name}**" if name == "mean" else name
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    text, three = table["text"], table["3 exemplars"]
    print(f"3 exemplars / text per class: min {min(three[n] / text[n] for n in names):.3f}; "
          f"fused >= text on {sum(table['text + 3 fused'][n] >= text[n] - 1e-9 for n in names)} of {len(names)}")
    print(f"zorblax (3 blue-circle exemplars): AP50 {z['exemplars']:.3f}, {z['exemplars_found_at_0.25']} boxes at "
          f"conf >= 0.25; the word 'zorblax': AP50 {z['word']:.3f}, {z['word_found_at_0.25']} boxes at conf >= 0.25")
    for what, t in timing.items():
        print(f"set_classes, {what}: cold {t['cold_s']:.2f} s, warm {t['warm_ms']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "val": args.val, "refs": args.refs,
                                               "ap50": table, "zorblax": z, "timing": timing}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
