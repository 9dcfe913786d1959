"""Pixels in and out: image and video sources, camera capture, frame streams, drawing boxes."""
