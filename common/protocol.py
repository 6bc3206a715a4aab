"""What travels between coordinator and sites: message kinds, record and config keys, and weight packing.

Weights of several models travel in one flat mapping whose keys are ``<stage>.<state-dict key>`` (stage is
``dltr``, ``head`` or ``clinical``). Nothing here imports Flower; the apps turn these into Flower records.
"""

from __future__ import annotations

from typing import cast

import numpy as np

STAGES = ("dltr", "head", "clinical")
MODELS = ("clinical", "dltr", "dltrmlp")

# Query kinds (ConfigRecord "query").
QUERY_INFO = "info"
QUERY_STATS = "stats"
QUERY_FINETUNE = "finetune"

# Record names inside a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

Arrays = dict[str, np.ndarray]


def pack(arrays: dict[str, Arrays]) -> Arrays:
    """Flatten ``{stage: {key: array}}`` into ``{"stage.key": array}``."""
    return {f"{stage}.{k}": v for stage, values in arrays.items() for k, v in values.items()}


def unpack(flat: Arrays) -> dict[str, Arrays]:
    out: dict[str, Arrays] = {}
    for key, value in flat.items():
        stage, _, name = key.partition(".")
        if stage not in STAGES or not name:
            raise ValueError(f"unexpected weight name {key!r}")
        out.setdefault(stage, {})[name] = value
    return out


def flatten_evaluation(result: dict[str, object]) -> dict[str, int | float | list[int] | list[float]]:
    """A site's evaluation aggregates as a flat metric mapping (``auc.<model>`` is -1 when undefined)."""
    flat: dict[str, int | float | list[int] | list[float]] = {"num-examples": int(result["n"]), "n-pos": int(result["n-pos"])}  # type: ignore[call-overload]
    for model in MODELS:
        if model in result:
            res = result[model]
            assert isinstance(res, dict)
            flat[f"auc.{model}"] = -1.0 if res["auc"] is None else float(res["auc"])
            flat[f"hist-neg.{model}"] = [int(v) for v in res["hist-neg"]]
            flat[f"hist-pos.{model}"] = [int(v) for v in res["hist-pos"]]
    return flat


def unflatten_evaluation(flat: dict[str, object]) -> dict[str, object]:
    result: dict[str, object] = {"n": int(flat["num-examples"]), "n-pos": int(flat["n-pos"])}  # type: ignore[call-overload]
    for model in MODELS:
        if f"auc.{model}" in flat:
            value = float(flat[f"auc.{model}"])  # type: ignore[arg-type]
            result[model] = {
                "auc": None if value < 0 else value,
                "hist-neg": list(cast(list[int], flat[f"hist-neg.{model}"])),
                "hist-pos": list(cast(list[int], flat[f"hist-pos.{model}"])),
            }
    return result
