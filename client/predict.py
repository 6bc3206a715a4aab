"""Predictions for new patients at a hospital, from a finished study's exported model (`tace-client predict`).

Per patient: the DLTRMLP, DLTR and clinical-model probabilities of objective response, the predicted group at the
cut-off fixed on the training sites, the PFS risk group, and a saliency map of the DLTRMLP decision over the tumour box
for every phase (`tace.common.saliency`). Written to the folder the user names: ``predictions.csv`` for all
patients, ``cards/<patient>.html`` (one self-contained page each: numbers, the saliency overlaid on axial, coronal
and sagittal slices through the tumour for every phase) and ``index.html``, both rendered from the Jinja2 templates
in ``templates/`` with autoescaping (a patient id or a file name is always text, never markup). Everything stays at
the site.
"""

from __future__ import annotations

import base64
import functools
import io
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tace.client.features import manifest_records, score_patients, write_features
from tace.common.artifact import TrainedModels
from tace.common.manifest import PatientRecord
from tace.common.protocol import DISPLAY_ORDER
from tace.common.summaries import RESPONSE_GROUPS, groupings

if TYPE_CHECKING:
    import jinja2

    from tace.common.saliency import Explainer

DISCLAIMER = ("Research software: not a medical device. The prediction supports and does not replace the "
              "multidisciplinary team's judgement.")  # fmt: skip


@dataclass(frozen=True)
class PredictOptions:
    """How `predict` runs (the options of `tace-client predict`).

    Parameters
    ----------
    device : "auto" (the GPU when there is one), "cpu", "cuda" or "cuda:N"
    saliency : compute each patient's saliency map and the share of it in and around the tumour
    cards : also write one HTML card per patient and ``index.html`` (they need the maps)
    method : the saliency method, "gradient" or "gradcam" (`tace.common.saliency`)
    validate : check the manifest and every image first, as `tace-client check` (raises `ManifestError`)
    patients : only these patient ids of the manifest (default: every patient)
    """

    device: str = "auto"
    saliency: bool = True
    cards: bool = True
    method: str = "gradient"
    validate: bool = True
    patients: Sequence[str] | None = None


@dataclass(frozen=True)
class Explanation:
    """One patient's saliency map of the DLTRMLP decision, and the share of it in and around the tumour."""

    record: PatientRecord
    image: np.ndarray  # the network's input, (C, D, H, W)
    saliency: np.ndarray  # per phase, (C, D, H, W), in [0, 1]
    mask: np.ndarray  # the tumour in the input box, (D, H, W)
    spacing: tuple[float, float, float]  # of the box, mm (x, y, z)
    in_tumour: float  # share of the map's mass in and around the tumour (NaN: no tumour in the box)
    chance: float  # share of the box that region occupies: what a map blind to the tumour would give


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
    options: PredictOptions | None = None,
    progress: Any = None,
) -> PredictionRun:
    """Predict every patient of `manifest` (those with a known response too: it is listed, not used).

    Parameters
    ----------
    trained : the exported model (`TrainedModels.load`)
    manifest : the site's manifest of new patients (docs/manifest.md; the response column empty or absent)
    out : output folder (created); `cache_dir` : preprocessing cache
    options : device, saliency maps, cards, saliency method, validation, patients (`PredictOptions`; default: all on)
    progress : optional ``progress(iterable, desc=..., unit=...)`` wrapper (a progress bar)
    """
    from tace.common.training import select_device

    start = time.perf_counter()
    options = options or PredictOptions()
    out = Path(out)
    parsed, records = manifest_records(manifest, options.validate, options.patients)
    dev = select_device(options.device)
    table = score_patients(trained, records, parsed.root, cache_dir, device=dev)
    timings = {"scores": time.perf_counter() - start}
    result = table[["patient_id", *DISPLAY_ORDER]].copy()
    scores = {m: result[m].to_numpy() for m in DISPLAY_ORDER}
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
    if options.saliency or options.cards:
        from tace.common.saliency import Explainer

        t = time.perf_counter()
        explainer = Explainer(trained.models, trained.backbone, dev, options.method)
        rows: list[dict[str, Any]] = result.to_dict("records")  # type: ignore[assignment]  # the columns are named by str
        items = _explain(trained, records, parsed.root, Path(cache_dir), result["predicted_group"].tolist(), explainer, progress)
        for item, row in zip(items, rows, strict=True):
            row.update(saliency_in_tumour=item.in_tumour, saliency_chance=item.chance)  # before the card shows the row
            if options.cards:
                written.append(_write_card(out / "cards", item, row, trained, options.method))
        result["saliency_in_tumour"] = [row["saliency_in_tumour"] for row in rows]
        result["saliency_chance"] = [row["saliency_chance"] for row in rows]
        timings["saliency"] = time.perf_counter() - t
    csv = write_features(result, out / "predictions.csv")
    if options.cards:
        (out / "index.html").write_text(render_index(result, trained), encoding="utf-8")
    timings["total"] = time.perf_counter() - start
    return PredictionRun(result, csv, written, timings)


def _explain(
    trained: TrainedModels,
    records: list[PatientRecord],
    root: Path,
    cache_dir: Path,
    groups: list[str],
    explainer: Explainer,
    progress: Any,
) -> Iterator[Explanation]:
    """Per patient, in order: the saliency map of the decision behind its predicted group, and its share in and
    around the tumour (the tumour's bounding box widened by the preprocessing margin)."""
    from tace.client.cache import PreprocessCache
    from tace.common.preprocess import box_mask
    from tace.common.radiomics import model_inputs
    from tace.common.saliency import mass_fraction, total, tumour_region

    cache = PreprocessCache(cache_dir, trained.preprocess)
    margin_mm = trained.preprocess.margin_mm
    items = list(zip(records, groups, strict=True))
    for record, group in progress(items, desc="saliency", unit="patient") if progress else items:
        image = cache.load(record, root).array
        mask, spacing = box_mask(record, root, trained.preprocess)
        responder = True if group == RESPONSE_GROUPS[1] else False if group == RESPONSE_GROUPS[0] else None
        radiomics = trained.encoder.radiomics.encode(model_inputs(cache.radiomics(record, root)[None], len(trained.preprocess.sequences)))
        saliency = explainer(image, trained.encoder.clinical.encode([record])[0], responder, radiomics[0])
        margin = tuple(int(np.ceil(margin_mm / s)) for s in (spacing[2], spacing[1], spacing[0]))
        try:
            inside, chance = mass_fraction(total(saliency), tumour_region(mask, margin))  # type: ignore[arg-type]
        except ValueError:  # the tumour lies outside the box (cannot happen with a valid mask): no fraction
            inside, chance = float("nan"), float("nan")
        yield Explanation(record, image, saliency, mask, spacing, inside, chance)


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


def _number(value: Any, digits: int = 3) -> str:
    """A probability, share or clinical value with `digits` decimals ("n/a" when not finite); anything else as text."""
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}" if np.isfinite(value) else "n/a"
    return str(value)


@functools.cache
def _templates() -> jinja2.Environment:
    """The card and index templates (``templates/*.j2``, package data), autoescaped whatever their file names."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("tace.client", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    env.filters["number"] = _number
    return env


def _model_facts(trained: TrainedModels) -> dict[str, Any]:
    """What the pages say about the model they come from, with its model card in words (None before the run's
    analysis packed one into the model file)."""
    return {"file": trained.path.name, "source": trained.source or "n/a", "version": trained.version, "backbone": trained.backbone,
            "privacy": _privacy_text(trained.privacy), "card": model_card_text(trained.model_card)}  # fmt: skip


def model_card_text(card: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model card (`tace.analysis.modelcard`) as the sentences the patient cards and index.html show."""
    if not card:
        return None

    def ci(e: Mapping[str, Any] | None) -> str:
        if not e or e.get("value") is None:
            return "n/a"
        return f"{e['value']:.2f} (95 % CI {e['low']:.2f} to {e['high']:.2f})"

    external = card.get("data", {}).get("external_sites", [])
    auc = card.get("performance", {}).get("external_pooled", {}).get("dltrmlp")
    meta = card.get("performance", {}).get("meta_analysis", {}).get("dltrmlp", {})
    performance = f"DLTRMLP AUC at {len(external)} external site(s), {sum(e.get('patients', 0) for e in external)} patients: {ci(auc)}"
    if meta.get("pi_low") is not None:
        performance += f"; in a new centre between {meta['pi_low']:.2f} and {meta['pi_high']:.2f} (95 % prediction interval)"
    cal = card.get("calibration", {}).get("dltrmlp", {})
    calibration = f"calibration slope {ci(cal.get('slope'))}; observed/expected {ci(cal.get('oe'))}"
    subgroups = [
        f"{g['variable']} {g['level']}: {g['auc']:.2f}" if g.get("auc") is not None else f"{g['variable']} {g['level']}: {g['status']}"
        for g in card.get("performance", {}).get("subgroups", [])
    ]
    privacy = card.get("privacy", {})
    return {"intended_use": card.get("intended_use", ""), "not_intended_use": card.get("not_intended_use", ""),
            "inputs": card.get("inputs", ""), "performance": performance, "calibration": calibration, "subgroups": subgroups,
            "limits": list(card.get("limits", [])), "written": card.get("written", ""),
            "privacy": f"differential privacy {privacy.get('differential_privacy', 'n/a')}; secure aggregation "
                       f"{privacy.get('secure_aggregation', 'n/a')}; {privacy.get('what_left_the_sites', '')}"}  # fmt: skip


def render_card(explanation: Explanation, row: Mapping[str, Any], trained: TrainedModels, method: str = "gradient") -> str:
    """One patient's self-contained HTML page: `row` (a row of predictions.csv, its saliency share included), the
    clinical factors the model used and the saliency figure (`saliency_figure`)."""
    from tace.common.clinical import NUMERIC

    record = explanation.record
    figure = saliency_figure(explanation.image, explanation.saliency, explanation.mask, explanation.spacing, trained.preprocess.sequences)
    factors = (*NUMERIC, "sex", "tumour_number", "child_pugh", "bclc_stage", "albi_grade", "portal_vein_invasion", "tace_type")
    template = _templates().get_template("card.html.j2")
    return template.render(
        patient_id=record.patient_id,
        row=row,
        responder=row["predicted_group"] == RESPONSE_GROUPS[1],
        cutoffs_note=trained.cutoffs_note or "fixed on the training sites",
        clinical=[(k.replace("_", " "), record.clinical.get(k)) for k in factors],
        method="Gradient" if method == "gradient" else "Grad-CAM",
        png=base64.b64encode(figure).decode("ascii"),
        disclaimer=DISCLAIMER,
        model=_model_facts(trained),
    )


def _write_card(folder: Path, explanation: Explanation, row: Mapping[str, Any], trained: TrainedModels, method: str) -> Path:
    path = folder / f"{explanation.record.patient_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_card(explanation, row, trained, method), encoding="utf-8")
    return path


def render_index(table: pd.DataFrame, trained: TrainedModels) -> str:
    """``index.html``: every patient of `table` (predictions.csv) with their numbers, linking their cards."""
    return (
        _templates().get_template("index.html.j2").render(rows=table.to_dict("records"), model=_model_facts(trained), disclaimer=DISCLAIMER)
    )


def _privacy_text(privacy: dict[str, Any]) -> str:
    """How the model's training was protected, in words, from its model file."""
    if "note" in privacy:
        return str(privacy["note"])
    if str(privacy.get("dp", "false")).lower() in ("true", "1"):
        unit = "per patient at each site" if privacy.get("dp-mode") == "sample" else "per hospital"
        return f"trained with differential privacy ({unit}, budget ε = {privacy.get('dp-target-epsilon')})"
    return "trained without differential privacy"
