"""The segmenter names `masks=` and `--masks` accept (stdlib only, so that the CLI parser needs no OpenCV or torch)."""

from __future__ import annotations

# grabcut: OpenCV's GrabCut from each box, no weights; the rest: ultralytics' SAM family, weights through the registry
GRABCUT = "grabcut"
SAM_MODELS = ("mobile_sam", "sam2.1_t", "sam2.1_b", "sam_b")
SEGMENTERS = (GRABCUT, *SAM_MODELS)
