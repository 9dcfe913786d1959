"""ovdet's environment: where its cache lives ($OVDET_HOME) and whether the network is off (OVDET_OFFLINE)."""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def home() -> Path:
    """ovdet's cache root: $OVDET_HOME, else ~/.cache/ovdet."""
    env = os.environ.get("OVDET_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ovdet"


def is_offline() -> bool:
    """True when OVDET_OFFLINE (or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) is set to 1/true/yes: no network at all."""
    names = ("OVDET_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in names)
