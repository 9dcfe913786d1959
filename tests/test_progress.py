"""ovdet.util.progress: tqdm on a terminal; whole lines (done/total, rate, ETA, no carriage returns) in a log; quiet."""

from __future__ import annotations

import io
import logging

from tqdm import tqdm

from ovdet.util.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_whole_lines_with_rate_and_eta(monkeypatch):
    monkeypatch.setenv("OVDET_PROGRESS_SECONDS", "0")
    log = io.StringIO()
    with progress(total=10, desc="annotate", unit="img", initial=2, file=log) as bar:
        assert isinstance(bar, LineProgress)
        bar.update(3)
        bar.write("ovdet: skipped x.jpg: corrupt")
        bar.update(5)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("annotate: 5/10 (50%) ") and " img/s, ETA " in lines[0]
    assert lines[1] == "ovdet: skipped x.jpg: corrupt"
    assert lines[-1].startswith("annotate: 10/10 (100%) in ") and lines[-1].endswith(" img/s)")


def test_lines_come_at_most_every_interval_and_unknown_totals_work():
    log = io.StringIO()
    bar = LineProgress(None, desc="cam", unit="frame", file=log, interval=3600)
    for _ in range(1000):
        bar.update()
    bar.close()
    bar.close()
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0]]  # only the last line, once
    assert log.getvalue().startswith("cam: 1000 in ")
    sized = io.StringIO()
    with LineProgress(2048, unit="B", unit_scale=True, file=sized, interval=0) as b:
        b.update(1024)
    assert sized.getvalue().startswith("1.00k/2.00k (50%) ")


def test_terminal_gets_tqdm_and_quiet_prints_nothing(monkeypatch):
    monkeypatch.setenv("OVDET_PROGRESS_SECONDS", "0")
    tty = Terminal()
    with progress(total=3, desc="x", file=tty) as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
    assert "\r" in tty.getvalue()
    for stream in (Terminal(), io.StringIO()):
        with progress(total=3, quiet=True, file=stream) as bar:
            bar.update(3)
        assert stream.getvalue() == ""


def test_train_quiet_silences_ultralytics_and_logs_get_no_redraw_frames(monkeypatch, capsys):
    from ultralytics.utils import LOGGER
    from ultralytics.utils.tqdm import TQDM

    from ovdet.jobs.train import _ultralytics_output

    with _ultralytics_output(quiet=True):
        LOGGER.info("an info line")
        for _ in TQDM(range(50), desc="epoch 1/1"):
            pass
    assert capsys.readouterr() == ("", "")
    assert LOGGER.getEffectiveLevel() <= logging.INFO  # restored afterwards
    with _ultralytics_output(quiet=False):  # capsys' stdout is not a terminal
        for _ in TQDM(range(50), desc="epoch 1/1"):
            pass
    out = capsys.readouterr().out
    assert "\r" not in out and out.count("\n") == 1 and "epoch 1/1" in out
