"""Random-effects meta-analysis of model performance across centres (external sites, or the held-out centre of
every leave-one-centre-out fold: internal-external cross-validation).

Per measure, on the scale where it is closer to normal (Debray et al. 2017; Snell et al. 2018):

* **c-statistic**: logit(AUC), variance from DeLong's: var(AUC) / (AUC (1 - AUC))^2 (delta method);
* **calibration slope**: as estimated, variance its squared standard error;
* **O/E**: log(O/E), variance 1/O - 1/N.

The between-centre variance τ² is estimated by Paule-Mandel (statsmodels ``combine_effects``, iterated; Veroniki
et al. 2016 recommend it with REML). The pooled estimate has a 95 % CI from the normal distribution or, with
Hartung-Knapp(-Sidik-Jonkman), from t with k - 1 degrees of freedom and the rescaled variance. I² is τ² over τ²
plus the typical within-centre variance (Higgins & Thompson 2002), as metafor reports it for any estimator. The
95 % prediction interval for the performance in a new centre is pooled ± t(k - 2) sqrt(τ² + SE²) (Higgins,
Thompson & Spiegelhalter 2009; Riley et al. 2011), with at least 1 degree of freedom as metafor's
``predict(..., pi.type = "riley")``: with two centres it is very wide, which is what two centres can say.
Everything is checked against metafor's ``rma(method = "PM")`` (tests/reference/golden_validation.R).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from tace.analysis.data import MODEL_NAMES
from tace.analysis.discrimination import Z95

#: Each measure: its name in words, the scale it is pooled on, and the back-transformation to the reported scale.
MEASURES = {
    "auc": ("c-statistic (AUC)", "logit"),
    "slope": ("calibration slope", "identity"),
    "oe": ("O/E ratio", "log"),
}
METHOD = "Paule-Mandel"


def _back(scale: str, v: float) -> float:
    if scale == "logit":
        return 1 / (1 + math.exp(-v))
    if scale == "log":
        return math.exp(v)
    return v


def centre_estimate(measure: str, block: dict[str, Any]) -> tuple[float, float] | None:
    """One centre's (estimate, variance) of `measure` on its pooling scale from its validation block of a model
    (``auc`` and ``delong_se``; ``calibration``), or None when the centre does not give it (one class, no events)."""
    if measure == "auc":
        auc, se = block.get("auc"), block.get("delong_se")
        if auc is None or se is None or not 0 < auc < 1 or se <= 0:
            return None
        return math.log(auc / (1 - auc)), (se / (auc * (1 - auc))) ** 2
    cal = block.get("calibration") or {}
    if measure == "slope":
        slope = cal.get("slope")
        return (slope["value"], slope["se"] ** 2) if slope else None
    oe = cal.get("oe")
    return (math.log(oe["value"]), oe["se_log"] ** 2) if oe else None


def random_effects(estimates: Sequence[float], variances: Sequence[float], hartung_knapp: bool = False) -> dict[str, Any]:
    """Random-effects meta-analysis (Paule-Mandel τ²) of `estimates` with within-centre `variances` (k >= 2).

    Returns, on the pooling scale: ``pooled``, ``se``, ``ci_low``/``ci_high``, ``pi_low``/``pi_high`` (95 %
    prediction interval for a new centre), ``tau2``, ``i2`` (0-1), ``q`` and its p-value ``q_p``, ``k`` and the
    relative random-effects ``weights``.
    """
    from statsmodels.stats.meta_analysis import combine_effects

    y, v = np.asarray(estimates, dtype=float), np.asarray(variances, dtype=float)
    k = len(y)
    if k < 2:
        raise ValueError("a meta-analysis needs at least two centres")
    # atol: statsmodels resets τ² to 0 when the estimating equation turns negative, which rounding does near machine
    # precision; at 1e-9 the iteration (monotone from below) stops first, with τ² exact to about 1e-11.
    res = combine_effects(y, v, method_re="iterated", atol=1e-9, maxiter=1000)
    tau2 = max(float(res.tau2), 0.0)
    pooled = float(res.mean_effect_re)
    if hartung_knapp:
        se, crit = math.sqrt(float(res.var_hksj_re)), float(stats.t.isf(0.025, k - 1))
    else:
        se, crit = float(res.sd_eff_w_re), Z95
    w = 1 / v
    typical = (k - 1) * w.sum() / (w.sum() ** 2 - (w**2).sum())  # the typical within-centre variance
    pi_crit = float(stats.t.isf(0.025, max(k - 2, 1)))
    half = pi_crit * math.sqrt(tau2 + se**2)
    q = float(res.q)
    return {
        "k": k, "pooled": pooled, "se": se, "ci_low": pooled - crit * se, "ci_high": pooled + crit * se,
        "pi_low": pooled - half, "pi_high": pooled + half, "tau2": tau2, "i2": tau2 / (tau2 + typical),
        "q": q, "q_p": float(stats.chi2.sf(q, k - 1)), "weights": np.asarray(res.weights_rel_re, dtype=float).tolist(),
    }  # fmt: skip


def meta_analysis(blocks: dict[str, dict[str, Any]], models: Sequence[str], hartung_knapp: bool = False) -> dict[str, Any]:
    """Per model and measure, the random-effects summary across the centres of `blocks` ({centre: validation block});
    values on the reported scale (AUC, slope, O/E) with the pooling-scale numbers kept (``*_pooling``)."""
    out: dict[str, Any] = {"method": METHOD, "hartung_knapp": hartung_knapp, "centres": list(blocks), "models": {}, "notes": []}
    for model in models:
        per: dict[str, Any] = {}
        for measure, (words, scale) in MEASURES.items():
            rows = [(c, centre_estimate(measure, b["models"].get(model, {}))) for c, b in blocks.items()]
            used = [(c, e) for c, e in rows if e is not None]
            left = [c for c, e in rows if e is None]
            entry: dict[str, Any] = {"measure": words, "scale": scale, "excluded": left, "centres": []}
            for c, (est, var) in used:
                se = math.sqrt(var)
                entry["centres"].append({"centre": c, "value": _back(scale, est), "low": _back(scale, est - Z95 * se),
                                         "high": _back(scale, est + Z95 * se)})  # fmt: skip
            if len(used) >= 2:
                fit = random_effects([e for _, (e, _) in used], [v for _, (_, v) in used], hartung_knapp)
                for c, w in zip(entry["centres"], fit["weights"], strict=True):
                    c["weight"] = w
                entry.update({key: _back(scale, fit[key]) for key in ("pooled", "ci_low", "ci_high", "pi_low", "pi_high")})
                entry.update({"k": fit["k"], "tau2": fit["tau2"], "i2": fit["i2"], "q": fit["q"], "q_p": fit["q_p"],
                              "pooled_scale": fit["pooled"], "se_scale": fit["se"]})  # fmt: skip
            else:
                entry["k"] = len(used)
                out["notes"].append(f"{MODEL_NAMES.get(model, model)}: no meta-analysis of the {words}: {len(used)} centre(s) give it "
                                    "(at least 2 are needed; a centre with one class or an AUC of 0 or 1 gives none)")  # fmt: skip
            per[measure] = entry
        out["models"][model] = per
    return out
