"""When a progress bar shows: on the command line and in interactive use, never in the built book."""

from __future__ import annotations

import os


def bar_disabled(progress: bool) -> bool:
    """``disable=`` for a tqdm bar: off when the caller asks, or when ``TQDM_DISABLE`` is set.

    tqdm reads ``TQDM_DISABLE`` only as a default, and an explicit ``disable=False`` overrides it;
    ``make book`` sets it so that no bar is stored in the executed chapters.
    """
    return not progress or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
