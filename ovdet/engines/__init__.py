"""Engines that run a job's detection over many items: local threads and Ray; `open_engine` picks one by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ovdet.errors import DatasetError

if TYPE_CHECKING:
    from ovdet.engines.base import Engine

__all__ = ["open_engine"]


def open_engine(engine: str | Engine) -> Engine:
    """"local" (threads in this process), "ray" (a Ray Data actor pool, default settings), or an Engine as is."""
    from ovdet.engines.base import Engine

    if isinstance(engine, str) and engine.strip().lower() == "local":
        from ovdet.engines.local import LocalEngine

        return LocalEngine()
    if isinstance(engine, str) and engine.strip().lower() == "ray":
        from ovdet.engines.ray import RayEngine

        return RayEngine()
    if isinstance(engine, Engine):
        return engine
    raise DatasetError(f"unknown engine {engine!r}: use 'local' (this process) or 'ray' (a Ray cluster)")
