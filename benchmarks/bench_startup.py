"""How long `ovdet --help` and every `ovdet COMMAND --help` take, and how much memory they use, in fresh processes;
with --detect, how long a second `ovdet detect` of one image takes on each backend (caches warm).

    python benchmarks/bench_startup.py [--runs 5]
    python benchmarks/bench_startup.py --detect [--runs 11]

Each help runs `--runs` times as a new `python -m ovdet.cli ... --help` process. The table gives the median wall time
the median CPU time (user + system) and the median peak RSS (the child's ru_maxrss, read through wait4). `python -c pass` is measured the same way as
the floor, since every command pays for the interpreter. The goal in issue #20 is under 0.5 s and under 100 MB for
each help.

--detect runs `ovdet detect samples/shapes.jpg --model demo --classes "red circle"` once per backend to fill a
temporary $OVDET_HOME (compiled model, facts, embeddings), then `--runs` more times each: at the defaults (openvino on
a CPU), with --backend onnxruntime and with --backend torch, beside `python -c "import torch"`. Issue #23's goal is
2.5 s for the defaults, imports included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds (user + system), peak RSS in MiB) of one fresh process. On a loaded machine the
    CPU time is the steadier number: wall time then includes waiting for a core."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux reports KiB


def detect_cases() -> list[tuple[str, list[str]]]:
    """A second `ovdet detect` per backend, in a fresh $OVDET_HOME whose caches the first run of each fills."""
    os.environ["OVDET_HOME"] = tempfile.mkdtemp(prefix="ovdet-bench-startup-")
    os.environ.pop("OVDET_BACKEND", None)
    detect = ["-m", "ovdet.cli", "detect", "samples/shapes.jpg", "--model", "demo", "--classes", "red circle"]
    cases = [("python -c 'import torch'", ["-c", "import torch"]), ("ovdet detect (defaults)", detect),
             ("ovdet detect onnxruntime", [*detect, "--backend", "onnxruntime"]),
             ("ovdet detect torch", [*detect, "--backend", "torch"])]
    for _, argv in cases[1:]:
        measure(argv)  # the first run: exports, compiles, encodes the prompt
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command (default: 5)")
    parser.add_argument("--detect", action="store_true", help="time a second `ovdet detect` per backend instead")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from ovdet.cli import COMMANDS

    cases = [("python -c pass", ["-c", "pass"])]
    if args.detect:
        cases += detect_cases()
    else:
        cases += [("ovdet --help", ["-m", "ovdet.cli", "--help"])]
        cases += [(f"ovdet {name} --help", ["-m", "ovdet.cli", name, "--help"]) for name in COMMANDS]
    print(f"{'command':<28} {'median s':>9} {'max s':>7} {'CPU s':>7} {'median MiB':>11}")
    worst = 0.0
    for label, argv in cases:
        runs = [measure(argv) for _ in range(args.runs)]
        wall = statistics.median(w for w, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        rss = statistics.median(r for _, _, r in runs)
        if not label.startswith("python"):
            worst = max(worst, wall)
        print(f"{label:<28} {wall:>9.3f} {max(w for w, _, _ in runs):>7.3f} {cpu:>7.3f} {rss:>11.1f}")
    print(f"\nslowest {'command' if args.detect else 'help'}: {worst:.3f} s (median of {args.runs})")


if __name__ == "__main__":
    main()
