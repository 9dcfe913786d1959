"""Engines that run jobs across machines: `RayEngine`, annotate on a Ray Data actor pool (`engine="ray"`)."""

from ovdet.engines.ray.engine import RayEngine

__all__ = ["RayEngine"]
