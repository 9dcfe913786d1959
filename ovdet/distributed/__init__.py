"""Engines that run jobs across machines: `RayEngine`, annotate on a Ray Data actor pool (`engine="ray"`)."""

from ovdet.distributed.engine import RayEngine

__all__ = ["RayEngine"]
