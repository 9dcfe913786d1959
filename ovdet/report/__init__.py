"""Review reports: `write_report(RUN_DIR)` writes RUN_DIR/report.html, one self-contained page over a run folder.

The page embeds the run's detections as JSON, its script and style inline, and references thumbnails
(RUN_DIR/thumbs/, made once) and the original images by relative paths: no network, no server, so it opens
on an offline laptop and keeps working when the folder is copied with its images.
"""

from ovdet.report.page import write_report

__all__ = ["write_report"]
