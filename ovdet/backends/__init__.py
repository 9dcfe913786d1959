"""Backends: the forward pass behind one protocol (letterboxed batch + text embeddings → raw head output)."""

from ovdet.backends.graph import IMAGES, OUTPUT, TEXT, LiveWorldGraph, export_onnx

__all__ = ["IMAGES", "OUTPUT", "TEXT", "LiveWorldGraph", "export_onnx"]
