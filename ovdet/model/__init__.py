"""The region-text detector model: letterbox, forward pass through a backend, scores, NMS."""
