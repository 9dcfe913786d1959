"""Proof that a restructuring changed no output: run the same commands on two checkouts and diff them byte for byte.

    git worktree add /tmp/ovdet-ref 942e431          # the tree before the change
    python benchmarks/layout_identity.py --ref /tmp/ovdet-ref [--new .] [--ray] [--keep DIR]
    git worktree remove /tmp/ovdet-ref

Each checkout runs, in a fresh process with that checkout first on PYTHONPATH (the script checks `ovdet.__file__`),
its own empty OVDET_HOME (offline; the backend is `auto`, as a user gets it) and the demo model:

- `ovdet annotate samples/shapes` into all four formats; again with --save-annotated --val-split 0.5 --batch 3
  --report; and `annotate_folder(...)` from Python with model options as keyword arguments;
- `ovdet synth` (a small seeded dataset), `ovdet eval --json --out` on it;
- `ovdet detect samples/shapes.jpg --json`;
- `ovdet COMMAND --help` of every command that takes model options (their defaults come from DetectorConfig now);
- with --ray, `ovdet annotate --engine ray` too (slow: starts a Ray cluster).

Both sides use the images of the --new checkout and write into the same folder (renamed after each side), so the
absolute paths written into run.json, predictions.jsonl, data.yaml and the VOC files are the same on both sides.
Compared: the set of files, every file's bytes, every link's target, every command's exit code and stdout, and its
stderr without progress lines (how many a run prints depends on its speed) and with durations and speeds ("in 3.1 s",
"0.5 img/s") masked. One value is masked in the files: the time report.html says it was generated at. Exit code 0
when everything is identical; otherwise every difference is listed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CLASSES = "red circle, blue square, green triangle"
API = ("import sys; from ovdet import annotate_folder; "
       "annotate_folder(sys.argv[1], ['red circle', 'blue square', 'green triangle'], sys.argv[2], formats='coco,yolo', "
       "model='demo', conf=0.1, iou=0.5, max_det=5, imgsz=192, batch=3, quiet=True)")
# durations and speeds, which differ between any two runs; progress lines (how many depends on the speed)
_TIMING = re.compile(r"\d+(\.\d+)? ?(s|img/s|it/s|ms)\b|\d\d:\d\d")
_PROGRESS = re.compile(r"^[\w-]+: \d+/\d+ \(\d+%\)", re.MULTILINE)
# the one timestamp in the outputs: when report.html was generated
_GENERATED = re.compile(rb'"generated":"[0-9: -]+"')
HELP_COMMANDS = ("annotate", "detect", "eval", "video", "webcam", "classes encode")


def commands(samples: Path, run: Path, ray: bool) -> list[tuple[str, list[str]]]:
    """(name, argv after `python`) of every step; outputs go under `run`."""
    cli = ["-m", "ovdet.cli"]
    steps = [
        ("annotate", cli + ["annotate", str(samples / "shapes"), "--model", "demo", "--classes", CLASSES,
                            "--format", "coco,yolo,voc,jsonl", "--out", str(run / "annotate")]),
        ("annotate-previews-split-report", cli + [
            "annotate", str(samples / "shapes"), "--model", "demo", "--classes", CLASSES, "--save-annotated",
            "--val-split", "0.5", "--batch", "3", "--report", "--out", str(run / "annotate2")]),
        ("annotate-python-api", ["-c", API, str(samples / "shapes"), str(run / "api")]),
        ("synth", cli + ["synth", str(run / "synth"), "--train", "2", "--val", "6", "--seed", "7", "--quiet"]),
        ("eval", cli + ["eval", str(run / "synth" / "data.yaml"), "--model", "demo", "--json", "--quiet",
                        "--out", str(run / "eval")]),
        ("detect", cli + ["detect", str(samples / "shapes.jpg"), "--model", "demo", "--classes", CLASSES, "--json"]),
    ]
    if ray:
        steps.append(("annotate-ray", cli + ["annotate", str(samples / "shapes"), "--engine", "ray", "--model", "demo",
                                             "--classes", CLASSES, "--out", str(run / "ray")]))
    steps += [(f"help {command}", cli + command.split() + ["--help"]) for command in HELP_COMMANDS]
    return steps


def run_side(tree: Path, samples: Path, base: Path, side: str, ray: bool) -> dict[str, tuple[int, str, str]]:
    """Run every step with `tree` on PYTHONPATH into base/run, then rename that to base/side; returns each step's
    (exit code, stdout, masked stderr)."""
    home, run = base / f"home-{side}", base / "run"
    home.mkdir()
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVDET_")}
    env.update(PYTHONPATH=str(tree), OVDET_HOME=str(home), OVDET_OFFLINE="1", PYTHONHASHSEED="0")
    where = subprocess.run([sys.executable, "-c", "import ovdet; print(ovdet.__file__)"], env=env, cwd=base,
                           capture_output=True, text=True, check=True).stdout.strip()
    if Path(where).resolve() != (tree / "ovdet" / "__init__.py").resolve():
        raise SystemExit(f"{side}: ovdet imports from {where}, not from {tree}")
    results = {}
    for name, argv in commands(samples, run, ray):
        proc = subprocess.run([sys.executable, *argv], env=env, cwd=base, capture_output=True, text=True)
        stderr = "\n".join(line for line in proc.stderr.splitlines() if not _PROGRESS.match(line))
        results[name] = (proc.returncode, proc.stdout, _TIMING.sub("<t>", stderr))
        print(f"  {side}: {name} -> exit {proc.returncode}", file=sys.stderr)
    run.rename(base / side)
    return results


def tree_state(root: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under root: ("link", target), ("file", bytes) or ("dir", b"")."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path).encode())
        elif path.is_dir():
            out[rel] = ("dir", b"")
        else:
            data = path.read_bytes()
            out[rel] = ("file", _GENERATED.sub(b'"generated":"<t>"', data) if path.name == "report.html" else data)
    return out


def differences(ref: dict, new: dict, ref_dir: Path, new_dir: Path) -> list[str]:
    found = []
    for name in sorted(set(ref) | set(new)):
        if name not in new or name not in ref:
            found.append(f"step {name}: only on the {'ref' if name in ref else 'new'} side")
        elif ref[name] != new[name]:
            for label, a, b in zip(("exit code", "stdout", "stderr"), ref[name], new[name]):
                if a != b:
                    found.append(f"step {name}: {label} differs:\n--- ref\n{a}\n--- new\n{b}")
    a, b = tree_state(ref_dir), tree_state(new_dir)
    for rel in sorted(set(a) | set(b)):
        if rel not in a or rel not in b:
            found.append(f"{rel}: only on the {'ref' if rel in a else 'new'} side")
        elif a[rel] != b[rel]:
            found.append(f"{rel}: {a[rel][0]} differs ({len(a[rel][1])} vs {len(b[rel][1])} bytes)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, type=Path, help="checkout before the change (a git worktree)")
    parser.add_argument("--new", default=Path(__file__).resolve().parents[1], type=Path,
                        help="checkout after the change (default: this one)")
    parser.add_argument("--ray", action="store_true", help="also compare `ovdet annotate --engine ray` (slow)")
    parser.add_argument("--keep", type=Path, default=None, help="write the outputs here and keep them")
    args = parser.parse_args()
    ref, new = args.ref.resolve(), args.new.resolve()
    base = Path(tempfile.mkdtemp(prefix="ovdet-identity-")) if args.keep is None else args.keep.resolve()
    base.mkdir(parents=True, exist_ok=True)
    try:
        samples = new / "samples"
        print(f"outputs in {base}", file=sys.stderr)
        ref_results = run_side(ref, samples, base, "ref", args.ray)
        new_results = run_side(new, samples, base, "new", args.ray)
        found = differences(ref_results, new_results, base / "ref", base / "new")
        failed = [name for name, (code, _, _) in new_results.items() if code != 0]
        files = sum(1 for _ in (base / "new").rglob("*"))
        for line in found:
            print(line)
        if failed:
            print(f"steps that failed on both sides alike: {', '.join(failed)}")
        print(f"{len(new_results)} steps, {files} output entries: "
              f"{'IDENTICAL' if not found and not failed else f'{len(found)} difference(s)'}")
        return 0 if not found and not failed else 1
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
