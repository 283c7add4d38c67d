"""One base for the configuration dataclasses: ``to_dict``, ``from_dict``, ``key`` (chapter 4).

:class:`Config` gives every settings dataclass (MEND, KE, meta-training, the baselines) the same
round trip to plain JSON-able dicts, a check that names unknown keys instead of ignoring them, and
a short stable hash for cache folders.  Nested configs are rebuilt from dicts by the field's
declared type via :meth:`Config.nested`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, fields
from typing import Any, Mapping

import numpy as np

__all__ = ["Config", "jsonable"]


class Config:
    """Mixin for dataclasses; subclasses may list nested config fields in :meth:`nested`."""

    @classmethod
    def nested(cls) -> dict[str, type]:
        """Field name → Config class, for fields holding another config (rebuilt from dicts)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build from a dict; unknown keys raise ValueError naming them (never silently dropped)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}.from_dict: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown keys {sorted(unknown)}")
        kwargs = dict(data)
        for name, sub in cls.nested().items():
            if isinstance(kwargs.get(name), Mapping):
                kwargs[name] = sub.from_dict(kwargs[name])
        return cls(**kwargs)

    def key_data(self) -> dict[str, Any]:
        """What the cache key hashes (default: ``to_dict``)."""
        return self.to_dict()

    def key(self) -> str:
        """A short stable hash of :meth:`key_data` (a cache key)."""
        text = json.dumps(self.key_data(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def jsonable(value):
    """``value`` with NaN/inf as None and numpy scalars as Python numbers, for JSON files."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
