"""Where the models work and where they do not: performance by subgroup at the external sites.

From the subgroup score tables the external sites send (`tace.common.summaries.SubgroupTable`), per subgroup
variable and level, pooled over the external sites: patients, responders, and per model the AUC with its 95 % DeLong
CI, the O/E ratio and the calibration intercept and slope (`tace.analysis.calibration.recalibration`). A level a
site suppressed (fewer patients than its minimum cell count) is listed with that site under ``suppressed_at``; a
level every site suppressed has no numbers and ``status = "suppressed"``, never a missing row. Subgroups come from
the tables in both analysis sources: patient-level rows carry no subgroup.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tace.analysis import calibration, discrimination
from tace.analysis.data import SiteReturn, subgroup_rows
from tace.common.subgroups import BY_KEY, SUBGROUPS


def _model_block(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if 0 < y.sum() < len(y):
        dl = discrimination.delong(y, p)
        lo, hi = dl.ci(0)
        out.update(auc=float(dl.aucs[0]), ci_low=lo, ci_high=hi, delong_se=math.sqrt(max(float(dl.cov[0, 0]), 0.0)))
    rec = calibration.recalibration(y, p)
    out.update(oe=rec["oe"], intercept=rec["intercept"], slope=rec["slope"])
    return out


def subgroup_analysis(external: list[SiteReturn], models: tuple[str, ...]) -> dict[str, Any]:
    """Per subgroup variable the external sites sent, per level: counts, the sites that sent or suppressed it, and
    per model AUC (95 % DeLong CI), O/E and calibration intercept and slope, pooled over those sites."""
    sent = {key for s in external for key in s.summary.get("subgroups", {})}
    keys = [spec.key for spec in SUBGROUPS if spec.key in sent] + sorted(sent - set(BY_KEY))
    out: dict[str, Any] = {"variables": {}, "notes": []}
    for key in keys:
        rows, suppressed, levels = subgroup_rows(external, key)
        without = [s.site_id for s in external if key not in s.summary.get("subgroups", {})]
        if without:
            out["notes"].append(f"subgroup {key}: site(s) {', '.join(without)} sent no table (run by an older TACE-FL, or no such column)")
        entry: dict[str, Any] = {"label": BY_KEY[key].label if key in BY_KEY else key, "levels": {}}
        for level in levels:
            sub = rows[rows["level"] == level]
            block: dict[str, Any] = {"n": len(sub), "n_pos": int(sub["label"].sum()), "sites": sorted(set(sub["site"])),
                                     "suppressed_at": sorted(suppressed.get(level, [])), "models": {}}  # fmt: skip
            if not len(sub):
                block["status"] = "suppressed"
            else:
                block["status"] = "partly suppressed" if block["suppressed_at"] else "reported"
                y = sub["label"].to_numpy(dtype=int)
                for model in models:
                    block["models"][model] = _model_block(y, sub[model].to_numpy(dtype=float))
            entry["levels"][level] = block
        out["variables"][key] = entry
    return out
