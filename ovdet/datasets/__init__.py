"""Dataset outputs: one writer per format (COCO, YOLO, VOC, JSONL), previews, splits, output keys."""
