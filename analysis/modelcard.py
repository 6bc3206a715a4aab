"""The model card of a finished run: intended use, data, performance by site and subgroup, calibration, limits and
privacy settings (Mitchell et al. 2019, "Model cards for model reporting"), from the run folder and its analysis.

`write_model_card` writes ``RUN/model_card.json`` and ``RUN/model_card.md`` and packs the card into the run's model
files (``models/tace-model.zip``; in a leave-one-centre-out run each fold's), so that `tace-client predict` shows it
with every prediction. The limits are the ones the software can see (small sites, miscalibration, a wide prediction
interval, suppressed subgroups, synthetic data); the authors add theirs.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tace.analysis.data import MODEL_NAMES
from tace.analysis.samplesize import MIN_EVENTS
from tace.common.config import fusion_head_text

FORMAT = "tace-model-card/1"
INTENDED_USE = (
    "Research use in a study setting: the probability that a patient with hepatocellular carcinoma responds (mRECIST complete "
    "or partial response at first follow-up) to a first transarterial chemoembolization, from pretreatment contrast-enhanced "
    "MRI (arterial, portal-venous and delayed phases, with a mask of the target tumour) and routine clinical factors; with "
    "the predicted group at the cut-off fixed on the training sites and a progression-free-survival risk group. Intended "
    "users: interventional radiologists and hepatologists, as one input to the multidisciplinary decision."
)
NOT_INTENDED = (
    "Not a certified medical device and not for decisions about an individual patient outside a study. Not validated for "
    "other treatments, other tumours, images without a tumour mask, other MRI sequences than those the model was trained "
    "on, or hospitals whose case mix differs from the external sites below."
)
INPUTS = (
    "Missing clinical factors are imputed with the training sites' pooled mean or mode; images are checked "
    "(`tace-client check`) and a patient with unreadable or inconsistent images is refused, never predicted."
)


def _interval(e: dict[str, Any] | None, value: str = "value", low: str = "low", high: str = "high") -> dict[str, Any] | None:
    if not e or e.get(value) is None:
        return None
    return {"value": e[value], "low": e.get(low), "high": e.get(high)}


def _on(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _read(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def build_model_card(run_dir: Path, validation: dict[str, Any], version: str) -> dict[str, Any]:
    """The model card of the run in `run_dir` from its `validation` section (analysis.json)."""
    run_dir = Path(run_dir)
    config_file = _read(run_dir / "run_config.json")
    config = config_file.get("run_config", {})
    summary = _read(run_dir / "summary.json")
    returns = {p.stem: _read(p) for p in sorted((run_dir / "site_returns").glob("*.json"))}
    for fold in sorted((run_dir / "folds").glob("*/site_returns/*.json")):
        returns.setdefault(fold.stem, _read(fold))
    pooled = validation["pooled"]
    meta = validation.get("meta", {})
    training = [{"site": s, "internal_validation_patients": r.get("n")} for s, r in returns.items() if r.get("role") == "train"]
    external = [{"site": s, "patients": b["n"], "responders": b["n_pos"]} for s, b in validation["sites"].items()]
    card: dict[str, Any] = {
        "format": FORMAT,
        "model": {
            "name": "DLTRMLP: a 3D CNN on the tumour-centred MRI (DLTR) fused with the clinical factors and radiomics features by "
            f"{fusion_head_text(config)}; DLTR, a radiomics "
            "and a clinical logistic model alongside",
            "source_run": run_dir.name,
            "tace_fl_version": version,
            "backbone": summary.get("backbone", config.get("backbone")),
            "layout": summary.get("layout", config.get("layout")),
            "training": config_file.get("mode", summary.get("mode")),
        },
        "intended_use": INTENDED_USE,
        "not_intended_use": NOT_INTENDED,
        "inputs": INPUTS,
        "data": {
            "training_sites": training,
            "external_sites": external,
            "outcome": "mRECIST objective response (complete or partial) at first follow-up after TACE",
        },
        "performance": {
            "external_pooled": {m: _interval(e, "auc", "ci_low", "ci_high") for m, e in pooled["models"].items()},
            "by_site": {s: {m: e.get("auc") for m, e in b["models"].items()} for s, b in validation["sites"].items()},
            "meta_analysis": {
                m: {
                    "k": e["auc"].get("k"),
                    **(_interval(e["auc"], "pooled", "ci_low", "ci_high") or {}),
                    "pi_low": e["auc"].get("pi_low"),
                    "pi_high": e["auc"].get("pi_high"),
                    "i2": e["auc"].get("i2"),
                }
                for m, e in meta.get("models", {}).items()
            },
            "subgroups": [
                {
                    "variable": v["label"],
                    "level": level,
                    "n": b["n"],
                    "status": b["status"],
                    **(
                        {
                            "auc": b["models"]["dltrmlp"].get("auc"),
                            "ci_low": b["models"]["dltrmlp"].get("ci_low"),
                            "ci_high": b["models"]["dltrmlp"].get("ci_high"),
                        }
                        if "dltrmlp" in b["models"]
                        else {}
                    ),
                }
                for v in validation.get("subgroups", {}).get("variables", {}).values()
                for level, b in v["levels"].items()
            ],
        },
        "calibration": {
            m: {k: (e.get("calibration") or {}).get(k) for k in ("intercept", "slope", "oe", "ici")} for m, e in pooled["models"].items()
        },
        "cutoff": {m: c.get("youden_threshold") for m, c in (next(iter(validation.get("cutoffs", {}).values()), {}) or {}).items()},
        "privacy": {
            "differential_privacy": (
                f"on ({config.get('dp-mode')}-level, target ε = {config.get('dp-target-epsilon')})" if _on(config.get("dp")) else "off"
            ),
            "secure_aggregation": "on" if _on(config.get("secagg")) else "off",
            "what_left_the_sites": "model weights during training and aggregates for the analysis; patient-level rows only from "
            "sites that opted in (data_sharing.json)",
        },
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    card["limits"] = limits(validation, config)
    return card


def limits(validation: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The limits of the evidence the software can see, in words."""
    out = []
    sites = validation["sites"]
    n = sum(b["n"] for b in sites.values())
    out.append(f"External validation on {len(sites)} site(s), {n} patients ({sum(b['n_pos'] for b in sites.values())} responders).")
    cohort = Path(str(config.get("cohort") or "")) / "cohort.json"
    if config.get("cohort") and cohort.is_file() and _read(cohort).get("generator"):
        out.append("Trained and validated on synthetic patients (tace-sim cohort): the numbers show the method, not clinical performance.")
    for site, per in validation.get("sample_size", {}).get("sites", {}).items():
        a = per.get("dltrmlp")
        if a and not a["rule_of_thumb_met"]:
            out.append(f"Site {site}: {a['events']} responders and {a['non_events']} non-responders, fewer than the {MIN_EVENTS} of each "
                       "usually asked for a validation: its estimates are imprecise.")  # fmt: skip
    c = (validation["pooled"]["models"].get("dltrmlp", {}).get("calibration")) or {}
    slope, oe = c.get("slope"), c.get("oe")
    if slope and slope["high"] < 1:
        out.append(f"DLTRMLP's predictions are too extreme at the external sites (calibration slope {slope['value']:.2f}, 95 % CI "
                   f"{slope['low']:.2f} to {slope['high']:.2f}).")  # fmt: skip
    elif slope and slope["low"] > 1:
        out.append(f"DLTRMLP's predictions are too moderate at the external sites (calibration slope {slope['value']:.2f}).")
    if oe and (oe["high"] < 1 or oe["low"] > 1):
        word = "over" if oe["high"] < 1 else "under"
        out.append(
            f"DLTRMLP {word}estimates the response rate at the external sites (O/E {oe['value']:.2f}, {oe['low']:.2f}-{oe['high']:.2f})."
        )
    auc = validation.get("meta", {}).get("models", {}).get("dltrmlp", {}).get("auc", {})
    if auc.get("pi_low") is not None and math.isfinite(auc["pi_low"]):
        out.append(f"In a new centre DLTRMLP's AUC may lie anywhere from {auc['pi_low']:.2f} to {auc['pi_high']:.2f} (95 % prediction "
                   f"interval over {auc['k']} centres).")  # fmt: skip
    hidden = [f"{v['label']} {level}" for v in validation.get("subgroups", {}).get("variables", {}).values()
              for level, b in v["levels"].items() if b["status"] != "reported"]  # fmt: skip
    if hidden:
        out.append(f"Subgroups suppressed at some or all sites (minimum cell count): {', '.join(hidden)}.")
    return out


def markdown(card: dict[str, Any]) -> str:
    """The model card as Markdown (``model_card.md``)."""

    def ci(e: dict[str, Any] | None) -> str:
        return "n/a" if not e else f"{e['value']:.3f} ({e['low']:.3f} to {e['high']:.3f})"

    m = card["model"]
    lines = [f"# Model card: {m['source_run']}", "", f"{m['name']}. TACE-FL {m['tace_fl_version']}, backbone {m['backbone']}, "
             f"{m['layout']} layout, {m['training']} training. Written {card['written']}.", "", "## Intended use", "", card["intended_use"],
             "", "## Not intended for", "", card["not_intended_use"], "", "## Inputs", "", card["inputs"], "", "## Data", "",
             "Training sites: " + ", ".join(f"{t['site']}" for t in card["data"]["training_sites"]) + ".",
             "External sites: " + ", ".join(f"{e['site']} ({e['patients']} patients, {e['responders']} responders)" for e in card["data"]["external_sites"]) + ".",
             f"Outcome: {card['data']['outcome']}.", "", "## Performance at the external sites", "",
             "| model | pooled AUC (95 % CI) | meta-analytic AUC (95 % CI) | 95 % prediction interval | calibration slope (95 % CI) | O/E (95 % CI) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for model, name in MODEL_NAMES.items():
        e = card["performance"]["external_pooled"].get(model)
        meta = card["performance"]["meta_analysis"].get(model, {})
        pi = f"{meta['pi_low']:.3f} to {meta['pi_high']:.3f}" if meta.get("pi_low") is not None else "n/a"
        cal = card["calibration"].get(model, {})
        lines.append(
            f"| {name} | {ci(e)} | {ci(meta if 'value' in meta else None)} | {pi} | {ci(cal.get('slope'))} | {ci(cal.get('oe'))} |"
        )
    lines += ["", "## Limits", "", *[f"- {x}" for x in card["limits"]], "", "## Privacy", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in card["privacy"].items()]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: Path, validation: dict[str, Any]) -> Path:
    """Write RUN/model_card.json and .md and pack the card into every model file of the run; returns the JSON's path."""
    from tace.common.artifact import FILENAME, attach_model_card
    from tace.common.cli import version_string
    from tace.common.serialize import jsonable, write_json

    run_dir = Path(run_dir)
    card = jsonable(build_model_card(run_dir, validation, version_string()), finite=True)
    path = run_dir / "model_card.json"
    write_json(path, card)
    (run_dir / "model_card.md").write_text(markdown(card), encoding="utf-8")
    for model_file in [run_dir / "models" / FILENAME, *sorted(run_dir.glob(f"folds/*/models/{FILENAME}"))]:
        if model_file.is_file():
            attach_model_card(model_file, card)
    return path
