"""ovdet: open-vocabulary object detection. Name what to find in words, get boxes.

    from ovdet import OVDetector
    det = OVDetector("yolov8s-worldv2")
    det.set_classes(["person", "red backpack"])
    detections = det.detect("street.jpg")
"""

from __future__ import annotations

from typing import Any

from ovdet.version import __version__

__all__ = ["DetectorConfig", "Exemplar", "OVDetector", "annotate_folder", "__version__"]

_LAZY = {"DetectorConfig": "ovdet.config", "OVDetector": "ovdet.detector", "annotate_folder": "ovdet.jobs.annotate",
         "Exemplar": "ovdet.text.exemplars"}


def __getattr__(name: str) -> Any:
    """Import the heavy modules (torch, ultralytics) only when their names are used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ovdet' has no attribute {name!r}")
