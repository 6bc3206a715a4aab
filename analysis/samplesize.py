"""Whether each external site's sample was large enough to validate the models, and what precision it gave.

Riley et al. (2021, Stat Med 40:4230-51, "Minimum sample size for external validation of a clinical prediction
model with a binary outcome") size a validation by the precision of its estimates: a 95 % CI of width about 0.2
for O/E and for the calibration slope, and 0.1 for the c-statistic; they contrast it with the rule of thumb of at
least 100 events and 100 non-events (Vergouwe et al. 2005; Collins, Ogundimu & Altman 2016), which they show can be
too few or too many depending on the outcome's prevalence and the model's discrimination. This module reports
both for what the site actually gave: the events against the rule of thumb, and the CI widths the site's data
achieved (DeLong for the AUC; Wald for the slope; Debray's for O/E) against Riley's targets.
"""

from __future__ import annotations

from typing import Any

#: The rule of thumb: at least this many events and this many non-events.
MIN_EVENTS = 100
#: Riley et al. (2021)'s target widths of the 95 % CIs.
TARGET_WIDTH = {"auc": 0.1, "slope": 0.2, "oe": 0.2}
MEASURE_NAMES = {"auc": "AUC", "slope": "calibration slope", "oe": "O/E"}


def _width(interval: dict[str, Any] | None, low: str = "low", high: str = "high") -> float | None:
    if not interval or interval.get(low) is None or interval.get(high) is None:
        return None
    return float(interval[high]) - float(interval[low])


def adequacy(block: dict[str, Any], model: str) -> dict[str, Any]:
    """One site's validation block (n, n_pos and the model's estimates): events against the rule of thumb, and the
    achieved 95 % CI widths of the AUC, calibration slope and O/E against Riley et al.'s targets."""
    n, events = int(block["n"]), int(block["n_pos"])
    e = block["models"].get(model, {})
    cal = e.get("calibration") or {}
    widths = {
        "auc": _width(e, "ci_low", "ci_high") if e.get("ci_method") == "DeLong" else None,
        "slope": _width(cal.get("slope")),
        "oe": _width(cal.get("oe")),
    }
    return {
        "n": n, "events": events, "non_events": n - events,
        "rule_of_thumb_met": events >= MIN_EVENTS and n - events >= MIN_EVENTS,
        "precision": {m: {"width": w, "target": TARGET_WIDTH[m], "met": None if w is None else w <= TARGET_WIDTH[m]}
                      for m, w in widths.items()},
    }  # fmt: skip


def sample_size(sites: dict[str, dict[str, Any]], models: tuple[str, ...]) -> dict[str, Any]:
    """Per external site and model, `adequacy`; with the rule and the targets it was judged by."""
    return {
        "rule_of_thumb": f"at least {MIN_EVENTS} events and {MIN_EVENTS} non-events",
        "targets": dict(TARGET_WIDTH),
        "reference": "Riley et al. 2021, Stat Med 40:4230-51",
        "sites": {site: {m: adequacy(block, m) for m in models} for site, block in sites.items()},
    }
