"""Drawn labels stay inside the image and do not cover each other: every label's text is fully visible."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from ovdet.media.draw import draw

H, W = 200, 320


def _dets(boxes: list[list[float]], names: list[str], first_class: int = 0) -> sv.Detections:
    n = len(boxes)
    return sv.Detections(xyxy=np.array(boxes, np.float32).reshape(-1, 4), confidence=np.full(n, 0.96, np.float32),
                         class_id=np.arange(first_class, first_class + n), data={"class_name": np.array(names)})


def _text_pixels(image: np.ndarray) -> int:
    """White text pixels: labels are white on a class colour; boxes and the background are never white."""
    return int((image.min(axis=2) > 200).sum())


def _alone_in_the_middle(name: str, class_id: int = 0) -> int:
    """Text pixels of one label drawn where nothing clips or covers it (same class, so the same colours)."""
    return _text_pixels(draw(np.zeros((H, W, 3), np.uint8), _dets([[100, 80, 180, 150]], [name], class_id)))


@pytest.mark.parametrize("box", [
    [40, 0, 120, 60],  # top edge: the label would sit above the box, outside the image
    [260, 0, 320, 40],  # top-right corner: it would also run off the right edge
    [0, 150, 30, 200],  # left edge, bottom
], ids=["top", "top-right", "left-bottom"])
def test_label_at_an_image_edge_is_drawn_whole(box):
    name = "blue square"
    drawn = draw(np.zeros((H, W, 3), np.uint8), _dets([box], [name]))
    assert _text_pixels(drawn) == _alone_in_the_middle(name) > 50


def test_neighbouring_labels_do_not_cover_each_other():
    names = ["red circle", "blue square", "green triangle"]
    boxes = [[60, 60, 200, 160], [64, 63, 190, 150], [70, 66, 180, 140]]  # same corner: labels would stack up
    drawn = draw(np.zeros((H, W, 3), np.uint8), _dets(boxes, names))
    assert _text_pixels(drawn) == sum(_alone_in_the_middle(n, i) for i, n in enumerate(names))


def test_draw_leaves_the_input_alone_and_handles_no_detections():
    image = np.zeros((H, W, 3), np.uint8)
    assert np.array_equal(draw(image, sv.Detections.empty()), image)
    draw(image, _dets([[0, 0, 50, 50]], ["x"]))
    assert not image.any()
