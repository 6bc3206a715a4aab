"""Predictions for new patients at a hospital, from a finished study's exported model (`tace-client predict`).

Per patient: the DLTRMLP, DLTR and clinical-model probabilities of objective response, the predicted group at the
cut-off fixed on the training sites, the PFS risk group, and a saliency map of the DLTRMLP decision over the tumour box
for every phase (`tace.common.saliency`). Written to the folder the user names: ``predictions.csv`` for all
patients, ``cards/<patient>.html`` (one self-contained page each: numbers, the saliency overlaid on axial, coronal
and sagittal slices through the tumour for every phase) and ``index.html``. Everything stays at the site.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tace.client.features import TrainedModels, manifest_records, write_features
from tace.common.manifest import PatientRecord
from tace.common.summaries import RESPONSE_GROUPS, groupings

DISCLAIMER = ("Research software: not a medical device. The prediction supports and does not replace the "
              "multidisciplinary team's judgement.")  # fmt: skip


@dataclass
class PredictionRun:
    """What `predict` wrote and how long it took."""

    table: pd.DataFrame
    csv: Path
    cards: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def patients_per_second(self) -> float:
        total = self.seconds.get("total", 0.0)
        return len(self.table) / total if total > 0 else 0.0


def predict(
    trained: TrainedModels,
    manifest: Path | str,
    out: Path | str,
    cache_dir: Path | str,
    device: str = "auto",
    saliency: bool = True,
    cards: bool = True,
    validate: bool = True,
    progress: Any = None,
    method: str = "gradient",
    patients: list[str] | None = None,
) -> PredictionRun:
    """Predict every patient of `manifest` (those with a known response too: it is listed, not used).

    Parameters
    ----------
    trained : the exported model (`TrainedModels.load`)
    manifest : the site's manifest of new patients (docs/manifest.md; the response column empty or absent)
    out : output folder (created); `cache_dir` : preprocessing cache
    saliency, cards : compute saliency maps; write the per-patient HTML cards (they need the maps)
    method : the saliency method, "gradient" or "gradcam" (`tace.common.saliency`)
    patients : only these patient ids of the manifest (default: every patient)
    validate : check the manifest and every image first, as `tace-client check` (raises `ManifestError`)
    progress : optional ``progress(iterable, desc=..., unit=...)`` wrapper (a progress bar)
    """
    from tace.common.training import select_device

    start = time.perf_counter()
    out = Path(out)
    parsed, records = manifest_records(manifest, validate, patients)
    dev = select_device(device)
    table = trained.score(records, parsed.root, cache_dir, device=dev)
    timings = {"scores": time.perf_counter() - start}
    result = table[["patient_id", "dltrmlp", "dltr", "clinical"]].copy()
    scores = {m: result[m].to_numpy() for m in ("dltrmlp", "dltr", "clinical")}
    groups = groupings(scores, trained.cutoffs, trained.bins)
    response = groups.get("dltrmlp:response")
    risk = groups.get("dltrmlp:risk")
    cut = trained.cutoffs.get("dltrmlp", {})
    result["predicted_group"] = [response[1][g] for g in response[0]] if response else "n/a (no cut-off in the model)"
    result["cutoff"] = cut.get("youden_threshold", np.nan)
    result["pfs_risk_group"] = [risk[1][g] for g in risk[0]] if risk else "n/a (no risk groups in the model)"
    if parsed.labelled:
        result["known_response"] = [r.response if r.response is not None else "" for r in records]  # listed for audit, never used
    written: list[Path] = []
    if saliency or cards:
        t = time.perf_counter()
        fractions, chances, written = _explain(trained, records, parsed.root, Path(cache_dir), out, result, dev, cards, progress, method)
        result["saliency_in_tumour"] = fractions
        result["saliency_chance"] = chances
        timings["saliency"] = time.perf_counter() - t
    csv = write_features(result, out / "predictions.csv")
    if cards:
        _write_index(out, result, trained)
    timings["total"] = time.perf_counter() - start
    return PredictionRun(result, csv, written, timings)


def _explain(
    trained: TrainedModels, records: list[PatientRecord], root: Path, cache_dir: Path, out: Path, result: pd.DataFrame, device: str,
    cards: bool, progress: Any, method: str,
) -> tuple[list[float], list[float], list[Path]]:  # fmt: skip
    """Saliency per patient, the share of its mass in and around the tumour, and (with `cards`) the patient cards."""
    from tace.client.cache import PreprocessCache
    from tace.common.preprocess import box_mask
    from tace.common.saliency import Explainer, mass_fraction, total, tumour_region

    explainer = Explainer(trained.models, trained.backbone, device, method)
    cache = PreprocessCache(cache_dir, trained.preprocess)
    margin_mm = trained.preprocess.margin_mm
    fractions, chances, written = [], [], []
    items: list[tuple[PatientRecord, dict[str, Any]]] = list(zip(records, result.to_dict("records"), strict=True))  # type: ignore[arg-type]
    for record, row in progress(items, desc="saliency", unit="patient") if progress else items:
        image = cache.load(record, root).array
        mask, spacing = box_mask(record, root, trained.preprocess)
        group = str(row["predicted_group"])
        responder = True if group == RESPONSE_GROUPS[1] else False if group == RESPONSE_GROUPS[0] else None
        saliency = explainer(image, trained.encoder.encode([record])[0], responder)
        margin = tuple(int(np.ceil(margin_mm / s)) for s in (spacing[2], spacing[1], spacing[0]))
        try:
            inside, chance = mass_fraction(total(saliency), tumour_region(mask, margin))  # type: ignore[arg-type]
        except ValueError:  # the tumour lies outside the box (cannot happen with a valid mask): no fraction
            inside, chance = float("nan"), float("nan")
        fractions.append(inside)
        chances.append(chance)
        if cards:
            path = out / "cards" / f"{record.patient_id}.html"
            _write_card(path, record, row, image, saliency, mask, spacing, trained, method)
            written.append(path)
    return fractions, chances, written


def saliency_figure(
    image: np.ndarray, saliency: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], sequences: tuple[str, ...]
) -> bytes:
    """PNG: one row per phase, axial / coronal / sagittal slices through the tumour's centre, with that phase's
    saliency ``(C, D, H, W)`` overlaid and the tumour outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.argwhere(mask > 0)
    zc, yc, xc = (idx.min(axis=0) + idx.max(axis=0)) // 2 if len(idx) else np.array(mask.shape) // 2
    sx, sy, sz = spacing
    # (name, slice of a (D, H, W) volume, height/width of a pixel in mm): arrays shown in voxel units, true aspect.
    views = [("axial", lambda a: a[zc], sy / sx), ("coronal", lambda a: a[:, yc, :], sz / sx), ("sagittal", lambda a: a[:, :, xc], sz / sy)]
    fig, axes = plt.subplots(len(sequences), 3, figsize=(8.4, 2.8 * len(sequences)), squeeze=False)
    for i, seq in enumerate(sequences):
        for j, (name, cut, aspect) in enumerate(views):
            ax = axes[i][j]
            ax.imshow(cut(image[i]), cmap="gray", aspect=aspect, interpolation="bilinear")
            # Only the salient part is coloured, so the anatomy stays readable around it.
            ax.imshow(
                np.ma.masked_less(cut(saliency[i]), 0.15), cmap="jet", alpha=0.5, vmin=0, vmax=1, aspect=aspect, interpolation="nearest"
            )
            m = cut(mask)
            if m.any() and m.shape[0] > 1 and m.shape[1] > 1:
                ax.contour(m, levels=[0.5], colors="white", linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=10)
            if j == 0:
                ax.set_ylabel(seq.replace("_", " "), fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


CARD_CSS = """body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:900px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.4em;margin-bottom:.1em} .sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left} th{background:#f3f3f3} .big{font-size:1.6em;font-weight:bold}
.resp{color:#1e8449} .nonresp{color:#c0392b} .note{background:#fff8e1;border-left:4px solid #f39c12;padding:.4em .8em;font-size:.88em}
.grid{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start} img{max-width:100%;border:1px solid #eee}"""


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def _write_card(
    path: Path, record: PatientRecord, row: dict[str, Any], image: np.ndarray, saliency: np.ndarray, mask: np.ndarray,
    spacing: tuple[float, float, float], trained: TrainedModels, method: str = "gradient",
) -> None:  # fmt: skip
    from tace.common.clinical import NUMERIC

    png = base64.b64encode(saliency_figure(image, saliency, mask, spacing, trained.preprocess.sequences)).decode("ascii")
    responder = row["predicted_group"] == RESPONSE_GROUPS[1]
    clinical = "".join(
        f"<tr><th>{html.escape(k.replace('_', ' '))}</th><td>{'missing (imputed)' if record.clinical.get(k) is None else _fmt(record.clinical[k], 1)}</td></tr>"
        for k in (*NUMERIC, "sex", "tumour_number", "child_pugh", "bclc_stage", "albi_grade", "portal_vein_invasion", "tace_type")
    )  # fmt: skip
    text = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>TACE response prediction: {html.escape(record.patient_id)}"
        f"</title><style>{CARD_CSS}</style></head><body>"
        f"<h1>TACE response prediction</h1><p class='sub'>Patient <b>{html.escape(record.patient_id)}</b></p>"
        "<div class='grid'><div><table>"
        f"<tr><th>DLTRMLP: probability of objective response (mRECIST CR/PR)</th><td class='big'>{_fmt(row['dltrmlp'])}</td></tr>"
        f"<tr><th>predicted group (cut-off {_fmt(row['cutoff'])}, {html.escape(trained.cutoffs_note or 'fixed on the training sites')})</th>"
        f"<td class='{'resp' if responder else 'nonresp'}'><b>{html.escape(str(row['predicted_group']))}</b></td></tr>"
        f"<tr><th>progression-free survival risk group</th><td>{html.escape(str(row['pfs_risk_group']))}</td></tr>"
        f"<tr><th>DLTR (image only)</th><td>{_fmt(row['dltr'])}</td></tr>"
        f"<tr><th>clinical model</th><td>{_fmt(row['clinical'])}</td></tr>"
        f"<tr><th>saliency in and around the tumour</th><td>{_fmt(row.get('saliency_in_tumour', float('nan')), 2)} of the map "
        f"(the region is {_fmt(row.get('saliency_chance', float('nan')), 2)} of the box)</td></tr>"
        f"</table></div><div><table><tr><th colspan='2'>clinical factors used</th></tr>{clinical}</table></div></div>"
        f"<h2 style='font-size:1.1em'>What the model looked at</h2><p class='sub'>{'Gradient' if method == 'gradient' else 'Grad-CAM'} "
        "saliency of the DLTRMLP decision (red: most influence) over the network's input, per phase, slices through the tumour "
        "centre; tumour outlined in white.</p>"
        f"<img src='data:image/png;base64,{png}' alt='saliency'>"
        f"<p class='note'>{DISCLAIMER}</p><p class='sub'>Model: {html.escape(trained.path.name)} (run {html.escape(trained.source or 'n/a')}, "
        f"TACE-FL {html.escape(trained.version)}, backbone {html.escape(trained.backbone)}; {html.escape(_privacy_text(trained.privacy))}).</p></body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _privacy_text(privacy: dict[str, Any]) -> str:
    """How the model's training was protected, in words, from its model file."""
    if "note" in privacy:
        return str(privacy["note"])
    if str(privacy.get("dp", "false")).lower() in ("true", "1"):
        unit = "per patient at each site" if privacy.get("dp-mode") == "sample" else "per hospital"
        return f"trained with differential privacy ({unit}, budget ε = {privacy.get('dp-target-epsilon')})"
    return "trained without differential privacy"


def _write_index(out: Path, table: pd.DataFrame, trained: TrainedModels) -> None:
    rows = "".join(
        f"<tr><td><a href='cards/{html.escape(r['patient_id'])}.html'>{html.escape(r['patient_id'])}</a></td><td>{_fmt(r['dltrmlp'])}</td>"
        f"<td>{html.escape(str(r['predicted_group']))}</td><td>{html.escape(str(r['pfs_risk_group']))}</td><td>{_fmt(r['dltr'])}</td>"
        f"<td>{_fmt(r['clinical'])}</td></tr>"
        for r in table.to_dict("records")
    )  # fmt: skip
    (out / "index.html").write_text(
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>TACE response predictions</title><style>{CARD_CSS}</style>"
        f"</head><body><h1>TACE response predictions</h1><p class='sub'>{len(table)} patients; model {html.escape(trained.path.name)} "
        f"(TACE-FL {html.escape(trained.version)})</p><table><tr><th>patient</th><th>DLTRMLP</th><th>predicted group</th>"
        f"<th>PFS risk group</th><th>DLTR</th><th>clinical</th></tr>{rows}</table><p class='note'>{DISCLAIMER}</p></body></html>",
        encoding="utf-8",
    )
