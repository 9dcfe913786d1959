"""End to end on the shipped demo model: prompts → text tower → region scores → the right boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import supervision as sv

from ovdet.cli import main
from ovdet.jobs.synth import WorldSpec, background, generate, image_rng
from ovdet.weights.registry import DEMO_FILE

pytestmark = pytest.mark.skipif(
    not DEMO_FILE.is_file(),
    reason=f"demo model {DEMO_FILE} is absent: build it with `python scripts/build_demo_model.py`")

IMGSZ = 160  # the demo was trained on 160-pixel images
HELD_OUT_SEED = 4242  # a world the model never saw (training used seed 0)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("held-out") / "world", train=1, val=48, seed=HELD_OUT_SEED,
                    spec=WorldSpec(imgsz=IMGSZ), progress=False)


@pytest.fixture(scope="module")
def demo():
    from ovdet import OVDetector

    return OVDetector("demo", device="cpu", imgsz=IMGSZ)


def _ap50(det, data, prompt):
    from ovdet.jobs.evaluate import evaluate, load_dataset

    result = evaluate(det, load_dataset(data, split="val"), classes=[prompt], progress=False)
    assert [c.name for c in result.classes] == [prompt]
    return result.map50


def _hits(det, data, prompt, conf=0.25):
    """Detections of `prompt` at `conf`, counted by the ground-truth class they overlap (IoU ≥ 0.5) or 'none'."""
    from ovdet.jobs.evaluate import load_dataset

    ds = load_dataset(data, split="val")
    det.set_classes([prompt])
    counts: dict[str, int] = {}
    found = det.detect_batch([str(image.path) for image in ds.images], conf=conf)
    for image, dets in zip(ds.images, found):
        gt = image.targets((IMGSZ, IMGSZ, 3))
        iou = sv.box_iou_batch(dets.xyxy, gt.xyxy) if len(dets) and len(gt) else np.zeros((len(dets), 0))
        for row in iou:
            name = ds.names[gt.class_id[row.argmax()]] if row.size and row.max() >= 0.5 else "none"
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_demo_resolves_by_name_and_carries_its_text_tower(demo):
    assert demo.world.text_encoder_state is not None
    assert demo.text_encoder.name.startswith("random-clip-text")
    emb = demo.text_encoder.encode([f"{c} {s}" for c in ("red", "green", "blue")
                                    for s in ("circle", "square", "triangle")])
    cos = (emb @ emb.T).numpy()
    assert cos[~np.eye(9, dtype=bool)].max() < 0.95  # the nine prompts are told apart by the tower


@pytest.mark.parametrize("prompt, other", [("red circle", "blue square"), ("blue square", "red circle")])
def test_prompt_decides_what_is_found(demo, held_out, prompt, other):
    from ovdet.jobs.evaluate import load_dataset

    assert _ap50(demo, held_out, prompt) >= 0.9
    ds = load_dataset(held_out, split="val")
    present = sum(int((im.class_ids == ds.names.index(prompt)).sum()) for im in ds.images)
    counts = _hits(demo, held_out, prompt)
    assert present >= 10 and counts.get(prompt, 0) >= 0.9 * present  # finds (nearly) all of them at conf 0.25
    assert counts.get(other, 0) == 0  # ... and none of the other class


def test_unseen_phrase_finds_nothing_on_a_world_without_objects(demo):
    demo.set_classes(["forklift"])
    spec = WorldSpec(imgsz=IMGSZ)
    images = [background(image_rng(HELD_OUT_SEED, "val", i), spec) for i in range(12)]
    assert all(len(d) == 0 for d in demo.detect_batch(images, conf=0.25))


def test_ovdet_eval_cli_measures_the_demo(held_out, capsys):
    code = main(["eval", str(held_out), "--model", "demo", "--classes", "red circle", "--device", "cpu",
                 "--imgsz", str(IMGSZ), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["classes"][0]["name"] == "red circle"
    assert result["classes"][0]["ap50"] >= 0.9 and result["map50"] == result["classes"][0]["ap50"]
    assert result["images"] == 48 and result["model"].startswith("demo-world@")
