"""Build ovdet/assets/demo-world.pt: a small YOLO-World (scale n) trained on the generated world, on CPU.

    python scripts/build_demo_model.py            # ~11-20 min on 2 (shared) CPU cores

Steps, all seeded: generate the synth dataset (ovdet.jobs.synth), make the fixed random text tower
(TextEncoder.random(seed=0, hidden_size=64, num_hidden_layers=4, num_attention_heads=2)), train
yolov8n-worldv2 from its yaml config with ovdet.jobs.train, copy the checkpoint (fp16, text tower embedded)
to the asset path, then score it on the val split and on a held-out world (another seed) with ovdet.jobs.evaluate.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


from ovdet.detector import OVDetector
from ovdet.jobs.evaluate import evaluate, load_dataset
from ovdet.jobs.synth import WorldSpec, generate
from ovdet.text.tower import TextEncoder
from ovdet.jobs.train import train

ASSET = Path(__file__).resolve().parents[1] / "ovdet" / "assets" / "demo-world.pt"
TOWER = {"seed": 0, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2}
# Colour is what tells most classes apart: no hue shift, mild saturation/value changes.
HYPERPARAMETERS = {"hsv_h": 0.0, "hsv_s": 0.3, "hsv_v": 0.3, "optimizer": "AdamW", "lr0": 0.002, "close_mosaic": 3,
                   "seed": 0, "deterministic": True, "workers": 0}
HELD_OUT_SEED = 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/ovdet-demo-build", help="scratch folder (data, training run); replaced")
    p.add_argument("--out", default=str(ASSET), help="where to write the demo checkpoint")
    p.add_argument("--train", type=int, default=1000, help="generated training images")
    p.add_argument("--val", type=int, default=200, help="generated validation images")
    p.add_argument("--imgsz", type=int, default=160, help="image size of the data and of training")
    p.add_argument("--epochs", type=int, default=18, help="training epochs")
    p.add_argument("--batch", type=int, default=16, help="training batch size")
    args = p.parse_args()

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    spec = WorldSpec(imgsz=args.imgsz)
    data = generate(work / "data", train=args.train, val=args.val, seed=0, spec=spec)
    encoder = TextEncoder.random(**TOWER)
    t0 = time.time()
    result = train(data, model="yolov8n-worldv2.yaml", out=work / "run", epochs=args.epochs, imgsz=args.imgsz,
                   batch=args.batch, device="cpu", text_model=encoder, **HYPERPARAMETERS)
    minutes = (time.time() - t0) / 60
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.checkpoint, out)
    print(f"\nwrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {minutes:.1f} min of training")

    det = OVDetector(out, device="cpu", imgsz=args.imgsz)
    held_out = generate(work / "held-out", train=1, val=args.val, seed=HELD_OUT_SEED, spec=spec, progress=False)
    for title, source in (("val split", data), (f"held-out world (seed {HELD_OUT_SEED})", held_out)):
        scores = evaluate(det, load_dataset(source, split="val"), progress=False)
        print(f"\n{title}: {source}\n{scores.table()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
