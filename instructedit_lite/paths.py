"""Where trained models, editors and measurements are kept: one folder, ``$INSTRUCTEDIT_CACHE``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "INSTRUCTEDIT_CACHE"


def cache_dir() -> Path:
    """``$INSTRUCTEDIT_CACHE`` or ``~/.cache/instructedit-lite`` (created on first use)."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "instructedit-lite")
    path.mkdir(parents=True, exist_ok=True)
    return path
