"""Turning results into JSON-ready values: the one converter the run folder and the analysis both use."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(obj: Any, finite: bool = False) -> Any:
    """Dicts (keys as text), lists and tuples recursively; numpy scalars to Python; paths to text.

    With `finite`, non-finite numbers (undefined statistics) become null, so the result passes
    ``json.dumps(..., allow_nan=False)``.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v, finite) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v, finite) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if finite and isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically: readers (`tace-server status`, a resume) see the previous file or
    the new one, never half of one."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2), encoding="utf-8")
    tmp.replace(path)
    return path
