"""README.md's runnable code blocks run, against the demo model, so the README cannot rot.

Convention: a line `<!-- runnable -->` right before a ```bash or ```python fence marks that block runnable.
The blocks run in README order, one after the other, in one fresh clone (the tracked files in a new git repository),
offline, with a private OVDET_HOME, as a reader following the README runs them:

- python blocks are exec'd in a fresh namespace;
- bash blocks run line by line (comments and blank lines skipped, `\\` continuations joined): a line that
  starts with `ovdet ` runs in-process as `ovdet.cli.main(shlex.split(line)[1:])` and must return 0; any
  other line (or an `ovdet` line using pipes or redirection) runs with `bash -c` and must exit 0, with
  `ovdet` defined as `python -m ovdet.cli`. Lines do not share shell state (cd, variables).

Do not mark blocks runnable that need the network, real weights, a camera or a long time.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CROSS_RUN_TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO = ROOT / "ovdet" / "assets" / "demo-world.pt"
MARKER = "<!-- runnable -->"
SHELL_OPERATORS = re.compile(r"[|<>;&`$]")


@dataclass(frozen=True)
class Block:
    lang: str  # "bash" or "python"
    code: str
    line: int  # 1-based line of the opening fence in the README

    @property
    def id(self) -> str:
        return f"{self.lang}-line{self.line}"


def runnable_blocks(text: str) -> list[Block]:
    """The fenced blocks marked runnable; a marker not followed by a bash/python fence is an error."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        match = re.fullmatch(r"```(bash|sh|shell|console|python|py)\s*", fence)
        if not match:
            raise ValueError(f"README line {i + 1}: {MARKER} must be followed by a ```bash or ```python fence, "
                             f"got {fence!r}")
        lang = "python" if match.group(1) in ("python", "py") else "bash"
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README line {i + 2}: the runnable block is never closed")
        blocks.append(Block(lang, "\n".join(lines[i + 2:end]) + "\n", i + 2))
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: continuations joined, comments, blanks and `$ ` prompts dropped."""
    commands, pending = [], ""
    for raw in code.splitlines():
        line = raw.strip()
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line.startswith("$ "):
            line = line[2:]
        if line and not line.startswith("#"):
            commands.append(line)
    if pending.strip():
        commands.append(pending.strip())
    return commands


def run_bash_block(block: Block, cwd: Path) -> None:
    from ovdet.cli import main

    for command in shell_commands(block.code):
        if command.startswith("ovdet ") and not SHELL_OPERATORS.search(command):
            try:
                code = main(shlex.split(command, comments=True)[1:])
            except SystemExit as exc:  # argparse exits for --help and for usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            assert code == 0, f"README line {block.line}: `{command}` returned {code}"
        else:
            script = f'ovdet() {{ "{sys.executable}" -m ovdet.cli "$@"; }}\nset -eo pipefail\n{command}\n'
            proc = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, (f"README line {block.line}: `{command}` exited {proc.returncode}\n"
                                          f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


def run_python_block(block: Block) -> None:
    # Line numbers in tracebacks point into the README.
    exec(compile("\n" * block.line + block.code, str(README), "exec"), {"__name__": "__readme__"})


def run_block(block: Block, cwd: Path) -> None:
    if block.lang == "python":
        run_python_block(block)
    else:
        run_bash_block(block, cwd)


@pytest.fixture
def readme_cwd(tmp_path, monkeypatch) -> Path:
    """A fresh working folder with a copy of samples/, made the current directory."""
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _real_blocks() -> list[Block]:
    return runnable_blocks(README.read_text(encoding="utf-8")) if README.exists() else []


# --- the parser and runner, on a made-up README -------------------------------------------------

FIXTURE = f"""# Demo

Not runnable:

```bash
ovdet webcam --classes person
```

{MARKER}
```bash
# detect shapes
ovdet --help
ovdet detect samples/shapes.jpg --model demo --imgsz 160 \\
    --classes "red circle,blue square" --json > shapes.jsonl
test -s shapes.jsonl
ovdet detect samples/shapes.jpg --model demo --imgsz 160 --classes "green triangle"
```

{MARKER}
```python
from pathlib import Path
Path("from_python.txt").write_text("ok")
```
"""


def test_parser_finds_marked_blocks_only():
    blocks = runnable_blocks(FIXTURE)
    assert [(b.lang, b.line) for b in blocks] == [("bash", 10), ("python", 20)]
    assert shell_commands(blocks[0].code) == [
        "ovdet --help",
        'ovdet detect samples/shapes.jpg --model demo --imgsz 160 --classes "red circle,blue square" --json > '
        "shapes.jsonl",
        "test -s shapes.jsonl",
        'ovdet detect samples/shapes.jpg --model demo --imgsz 160 --classes "green triangle"',
    ]


def test_parser_rejects_a_marker_without_a_code_fence():
    with pytest.raises(ValueError, match="line 3"):
        runnable_blocks(f"text\n\n{MARKER}\nsome prose\n")
    with pytest.raises(ValueError, match="never closed"):
        runnable_blocks(f"{MARKER}\n```python\nprint(1)\n")


def test_runner_reports_a_failing_command(readme_cwd):
    bad = Block("bash", "ovdet detect samples/shapes.jpg --model no-such-model --classes x\n", 1)
    with pytest.raises(AssertionError, match="returned 2"):
        run_bash_block(bad, readme_cwd)
    with pytest.raises(AssertionError, match="returned 2"):  # argparse usage error
        run_bash_block(Block("bash", "ovdet detect --no-such-option\n", 1), readme_cwd)
    with pytest.raises(AssertionError, match="exited 1"):
        run_bash_block(Block("bash", "false\n", 1), readme_cwd)
    with pytest.raises(ZeroDivisionError):
        run_python_block(Block("python", "1 / 0\n", 1))


@pytest.mark.skipif(not DEMO.exists(), reason=f"demo model {DEMO} is missing (built by the train issue)")
def test_runner_runs_the_fixture_blocks(readme_cwd):
    for block in runnable_blocks(FIXTURE):
        run_block(block, readme_cwd)
    assert '"detections"' in (readme_cwd / "shapes.jsonl").read_text()
    assert (readme_cwd / "from_python.txt").read_text() == "ok"


# --- the real README ----------------------------------------------------------------------------

def test_readme_has_runnable_blocks():
    assert README.exists(), "README.md is missing"
    assert _real_blocks(), f"README.md marks no code block runnable (put `{MARKER}` right before a fence)"


def fresh_clone(dest: Path) -> Path:
    """What a reader has after `git clone`: this checkout's files that git tracks or would track (not ignored ones),
    committed in a new repository, so that `git status` afterwards shows what following the README left behind."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git = ["git", "-c", "user.name=reader", "-c", "user.email=reader@example.com", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clone"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)
    return dest


@pytest.mark.skipif(not DEMO.exists(), reason=f"demo model {DEMO} is missing (built by the train issue)")
def test_readme_runs_top_to_bottom_in_one_folder(tmp_path, monkeypatch, capsys):
    """Every runnable block, in README order, in one fresh clone, as a reader runs them: later blocks see what earlier
    ones wrote (an output folder two blocks share fails here). What a block prints is checked where the README says
    what it prints, and afterwards `git status` is clean: .gitignore covers every output the README writes."""
    assert os.environ.get("OVDET_OFFLINE") == "1"  # conftest: offline, private OVDET_HOME
    clone = fresh_clone(tmp_path / "ovdet")
    monkeypatch.chdir(clone)
    checked = set()
    for block in _real_blocks():
        run_block(block, clone)
        out, err = capsys.readouterr()
        for marker, check in OUTPUT_CHECKS.items():
            if marker in block.code:
                check(out, err, clone)
                checked.add(marker)
    assert checked == set(OUTPUT_CHECKS)
    left = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True,
                          text=True, check=True).stdout
    assert left == "", f"following the README leaves files git does not ignore (add them to .gitignore):\n{left}"


# --- what the blocks print ----------------------------------------------------------------------
# Measured with the shipped demo model (torch fp32, CPU). Another machine computes the same to within the tolerances
# of tests/conftest.py (boxes 0.02 px, scores 1e-4); printed numbers carry their own rounding on top of that.

BOX_TOL, SCORE_TOL = CROSS_RUN_TOLERANCE["bbox"], CROSS_RUN_TOLERANCE["score"]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
# samples/shapes.jpg, classes "red circle, blue square, green triangle": (class, score, x1, y1, x2, y2), by score
SHAPES = [("blue square", 0.95914, 175.42, 218.77, 241.79, 285.52),
          ("blue square", 0.95638, 164.19, 4.3346, 216.43, 56.728),
          ("red circle", 0.88448, 75.814, 103.39, 113.84, 141.26),
          ("green triangle", 0.87236, 248.21, 219.21, 285.95, 262.85)]
RED_TRIANGLE = ("red triangle", 0.8216, 165.2, 147.8, 212.8, 195.9)  # samples/classes/shapes.yaml adds it


def assert_detections(got: list[tuple], want: list[tuple], box_step: float, score_step: float) -> None:
    """(class, score, x1, y1, x2, y2) rows equal in order and class, numbers within the cross-run tolerance plus
    half the step they were printed at."""
    assert [g[0] for g in got] == [w[0] for w in want], got
    for g, w in zip(got, want):
        assert abs(g[1] - w[1]) <= SCORE_TOL + score_step / 2, (g, w)
        assert max(abs(a - b) for a, b in zip(g[2:], w[2:])) <= BOX_TOL + box_step / 2, (g, w)


def check_python_tour(out: str, err: str, cwd: Path) -> None:
    """print(detections.xyxy, detections.confidence, detections.data["class_name"]), then the classes found after
    set_classes(["green triangle"]), then the classes found in a batch of two (numpy prints 5 significant digits)."""
    names_at = out.index("['")
    names = re.findall(r"'([^']*)'", out[names_at:out.index("\n", names_at)])
    numbers = [float(x) for x in NUMBER.findall(out[:names_at])]
    assert len(numbers) == 5 * len(names), out
    n = len(names)
    rows = [(names[i], numbers[4 * n + i], *numbers[4 * i:4 * i + 4]) for i in range(n)]
    assert_detections(rows, SHAPES, box_step=0.01, score_step=1e-5)
    after = out[out.index("\n", names_at) + 1:].splitlines()
    assert after[0] == "['green triangle']", out
    batch = [sorted(names) for names in ast.literal_eval(after[1])]  # order by score: compared as sets of names
    assert batch == [["red circle"], ["blue square", "blue square", "red circle"]], out


def check_shell_tour(out: str, err: str, cwd: Path) -> None:
    """ovdet detect (text, then --json with the class file), annotate's summary, video's tracks."""
    lines = out.splitlines()
    assert "samples/shapes.jpg: 4 detections" in lines
    text = [re.fullmatch(r"  (.+?) +(\d\.\d\d)  (.+)", line) for line in lines]
    rows = [(m.group(1), float(m.group(2)), *map(float, m.group(3).split())) for m in text if m]
    assert_detections(rows, SHAPES, box_step=0.1, score_step=0.01)
    [record] = [json.loads(line) for line in lines if line.startswith("{")]
    assert record["image"] == "samples/shapes.jpg"
    rows = [(d["class"], d["score"], *d["xyxy"]) for d in record["detections"]]
    assert_detections(rows, [*SHAPES, RED_TRIANGLE], box_step=0.1, score_step=1e-4)
    assert "annotated 4 images in " in err
    assert "; 6 detections: red circle 2, blue square 3, green triangle 1 -> labels" in err
    frames = [json.loads(line) for line in (cwd / "tracked.jsonl").read_text().splitlines()]
    assert [f["frame"] for f in frames] == list(range(64))
    pairs = [f for f in frames if sorted(d["class"] for d in f["detections"]) == ["blue square", "red circle"]]
    assert len(pairs) >= 60  # one red circle and one blue square move through the clip ...
    for name in ("red circle", "blue square"):  # ... each followed as one track
        ids = [d["track_id"] for f in pairs for d in f["detections"] if d["class"] == name]
        assert max(ids.count(i) for i in set(ids)) >= 55, (name, ids)


OUTPUT_CHECKS: dict[str, Callable[[str, str, Path], None]] = {
    'print(detections.xyxy, detections.confidence, detections.data["class_name"])': check_python_tour,
    "ovdet detect samples/shapes.jpg --model demo --classes samples/classes/shapes.yaml --json": check_shell_tour,
}


def test_every_output_check_finds_its_block():
    """A README edit that drops or rewrites a checked block fails here instead of silently going unchecked."""
    for marker in OUTPUT_CHECKS:
        assert sum(marker in b.code for b in _real_blocks()) == 1, f"no single runnable README block holds {marker!r}"


def test_the_backend_line_example_names_the_shipped_demo():
    """README's example backend line quotes the demo model's identity, which is the first 16 hex of its sha256."""
    from ovdet.util.hashing import file_sha256

    quoted = re.search(r"`ovdet: demo-world@([0-9a-f]+) on ", README.read_text(encoding="utf-8"))
    assert quoted is not None and quoted.group(1) == file_sha256(DEMO)[:16]
