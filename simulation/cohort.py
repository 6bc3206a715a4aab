"""The synthetic multi-centre TACE cohort: latent biology -> clinical factors, MRI, response and PFS per centre.

The generative model is documented in docs/synthetic-cohort.md. In short, each patient has an imaging-phenotype
latent ``u_img`` (seen only through the images) and clinical factors (seen only through the manifest, apart
from tumour size, which both show). The response is Bernoulli with

    logit p = b_centre + W_IMG * u_img + W_CLIN * c_std

where ``c_std`` is a standardised score of the clinical factors, so a model using both beats either alone. PFS is
exponential with a hazard lowered by response and a good clinical score, censored administratively and by loss
to follow-up. The truth (latents, p, uncensored times, oracle AUCs) goes to ``ground_truth/``, which nothing in
training or analysis reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tace.common.errors import TaceError
from tace.common.genesets import write_gmt
from tace.common.imageio import write_image
from tace.common.manifest import COLUMNS, write_manifest
from tace.common.preprocess import PreprocessConfig
from tace.simulation.phantom import PHASES, Acquisition, Anatomy, TumourSpec, render

W_IMG = 1.4
W_CLIN = 1.4
GENERATOR_VERSION = 4

_FLIP_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
_FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
_c, _s = math.cos(math.radians(6)), math.sin(math.radians(6))
_OBLIQUE = (_c, -_s, 0.0, _s, _c, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class CentreProfile:
    """One centre: its role in the demo study, size, scanner protocol and case mix.

    diameter_shift : added to log tumour diameter (case mix). afp_shift : added to log10 AFP. deb_rate : share of
    drug-eluting-bead TACE. intercept : response logit offset (responder rate). missing_rate : multiplies the
    baseline missingness of optional clinical columns.
    """

    site_id: str
    role: str
    n_patients: int
    acquisition: Acquisition
    age_mean: float = 60.0
    diameter_shift: float = 0.0
    afp_shift: float = 0.0
    deb_rate: float = 0.3
    intercept: float = 0.1
    missing_rate: float = 1.0


@dataclass(frozen=True)
class PhenotypeModel:
    """How the imaging latent u shows in the target tumour: per sign, ``clip(base + slope * u + noise * N(0, 1))``.

    Signs: arterial-phase hyperenhancement (aphe) and washout (relative to the liver), necrosis (radius fraction of
    the non-enhancing core), capsule (delayed rim) and heterogeneity (texture amplitude). Higher u: hypervascular,
    encapsulated, solid. Panel variants of the generator change which signs carry u.
    """

    aphe: tuple[float, float, float] = (0.75, 0.35, 0.12)
    washout: tuple[float, float, float] = (0.35, 0.08, 0.12)
    necrosis: tuple[float, float, float] = (0.32, -0.15, 0.08)
    capsule: tuple[float, float, float] = (0.45, 0.3, 0.15)
    heterogeneity: tuple[float, float, float] = (0.22, -0.08, 0.06)

    def draw(self, rng: np.random.Generator, u: np.ndarray) -> dict[str, np.ndarray]:
        """The signs of the target tumours of patients with latents `u` (in the order the fields are declared)."""
        n = len(u)
        out = {}
        for name, (low, high) in SIGN_RANGES.items():
            base, slope, noise = getattr(self, name)
            out[name] = np.clip(base + slope * u + noise * rng.normal(size=n), low, high)
        return out


#: The range each sign is clipped to (what the renderer accepts).
SIGN_RANGES = {"aphe": (0.05, 1.8), "washout": (0.0, 0.8), "necrosis": (0.0, 0.75), "capsule": (0.0, 1.2), "heterogeneity": (0.03, 0.5)}
PHENOTYPE = PhenotypeModel()


@dataclass(frozen=True)
class Preset:
    name: str
    centres: tuple[CentreProfile, ...]
    n_radiogenomics: int
    n_genes: int
    preprocess: PreprocessConfig = PreprocessConfig()
    val_fraction: float = 0.3
    n_unmatched: tuple[int, int] = (0, 0)  # (image-only patients, expression-only samples) in radiogenomics
    phenotype: PhenotypeModel = PHENOTYPE


def _acq(spacing: tuple[float, float, float], size: tuple[int, int, int], **kw: Any) -> Acquisition:
    return Acquisition(spacing=spacing, size=size, **kw)


def _demo() -> Preset:
    centres = (
        CentreProfile("site-a", "train", 150, _acq((1.8, 1.8, 5.0), (112, 112, 36), intensity_scale=900, table_offset_mm=(0, 0, -620)), 58, 0.0, 0.0, 0.25, 0.15),
        CentreProfile("site-b", "train", 130, _acq((2.0, 2.0, 4.0), (104, 104, 44), direction=_FLIP_XY, intensity_scale=2400, noise_sd=0.05, bias_strength=0.25), 61, 0.1, 0.15, 0.45, -0.05),
        CentreProfile("site-c", "train", 120, _acq((1.6, 1.6, 6.0), (128, 128, 30), direction=_FLIP_Z, intensity_scale=420, noise_sd=0.035, fmt="nrrd", table_offset_mm=(12, -30, 150)), 63, -0.1, -0.1, 0.2, 0.3, 1.5),
        CentreProfile("site-d", "holdout", 110, _acq((2.2, 2.2, 4.5), (96, 96, 40), direction=_OBLIQUE, intensity_scale=1500, noise_sd=0.045, bias_strength=0.3, fmt="mha"), 57, 0.15, 0.2, 0.5, -0.1),
        CentreProfile("site-e", "holdout", 100, _acq((1.9, 1.9, 5.0), (108, 108, 36), intensity_scale=3100, noise_sd=0.04, fmt="nii"), 62, -0.05, 0.05, 0.35, 0.2, 0.5),
    )  # fmt: skip
    return Preset("demo", centres, n_radiogenomics=80, n_genes=20000, n_unmatched=(2, 3))


def _tiny() -> Preset:
    demo = _demo()
    sizes = (8, 8, 8, 6, 6)
    centres = tuple(
        replace(c, n_patients=n, acquisition=replace(c.acquisition, spacing=(12.0, 12.0, 14.0), size=(16, 16, 14)))
        for c, n in zip(demo.centres, sizes, strict=True)
    )
    tiny_box = PreprocessConfig(spacing_mm=(8.0, 8.0, 8.0), box_voxels=(8, 8, 8))
    return Preset("tiny", centres, n_radiogenomics=24, n_genes=1500, preprocess=tiny_box, n_unmatched=(1, 1))


def _small_centres() -> Preset:
    """The demo with small training centres: 60 training patients each (86 patients, 30 % of them validation)."""
    demo = _demo()
    return replace(demo, name="small-centres", centres=tuple(replace(c, n_patients=86) if c.role == "train" else c for c in demo.centres))


def _coarse() -> Preset:
    """The demo acquired coarsely and anisotropically: about 4 x 4 x 7 mm voxels over the same fields of view."""
    demo = _demo()
    centres = []
    for i, c in enumerate(demo.centres):
        a = c.acquisition
        spacing = (3.8 + 0.2 * i, 3.8 + 0.2 * i, 6.5 + 0.25 * i)
        size = tuple(max(8, round(n * sp / new)) for n, sp, new in zip(a.size, a.spacing, spacing, strict=True))
        centres.append(replace(c, acquisition=replace(a, spacing=spacing, size=size)))  # type: ignore[arg-type]
    return replace(demo, name="coarse", centres=tuple(centres))


def _enhancement_signs() -> Preset:
    """Response shows in the enhancement ratios (arterial hyperenhancement, washout); necrosis, capsule and texture
    hardly carry it."""
    model = PhenotypeModel(aphe=(0.75, 0.45, 0.10), washout=(0.35, 0.16, 0.08), necrosis=(0.32, -0.03, 0.08),
                           capsule=(0.45, 0.05, 0.15), heterogeneity=(0.22, -0.01, 0.06))  # fmt: skip
    return replace(_demo(), name="enhancement-signs", phenotype=model)


def _texture_signs() -> Preset:
    """Response shows in texture and necrosis; enhancement, washout and capsule hardly carry it."""
    model = PhenotypeModel(aphe=(0.75, 0.06, 0.12), washout=(0.35, 0.02, 0.12), necrosis=(0.32, -0.2, 0.05),
                           capsule=(0.45, 0.05, 0.15), heterogeneity=(0.22, -0.11, 0.035))  # fmt: skip
    return replace(_demo(), name="texture-signs", phenotype=model)


def _scanners() -> Preset:
    """Centres whose scanners differ more: field strength (noise, bias field), orientation and intensity scale."""
    protocols = (
        dict(direction=_OBLIQUE, intensity_scale=180.0, noise_sd=0.07, bias_strength=0.35),  # 1.5 T, old coil
        dict(direction=_FLIP_XY, intensity_scale=5200.0, noise_sd=0.025, bias_strength=0.1),  # 3 T
        dict(direction=_FLIP_Z, intensity_scale=650.0, noise_sd=0.06, bias_strength=0.4),
        dict(direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), intensity_scale=9000.0, noise_sd=0.03, bias_strength=0.2),
        dict(direction=_OBLIQUE, intensity_scale=300.0, noise_sd=0.08, bias_strength=0.3),
    )
    demo = _demo()
    centres = tuple(replace(c, acquisition=replace(c.acquisition, **kw)) for c, kw in zip(demo.centres, protocols, strict=True))  # type: ignore[arg-type]
    return replace(demo, name="scanners", centres=centres)


PRESETS: dict[str, Callable[[], Preset]] = {"demo": _demo, "tiny": _tiny, "small-centres": _small_centres, "coarse": _coarse,
                                            "enhancement-signs": _enhancement_signs, "texture-signs": _texture_signs, "scanners": _scanners}  # fmt: skip
#: The cohort variants model changes are judged on (benchmarks/bench_quality.py): each differs from the demo in what a
#: real consortium's data may differ in.
PANEL = ("demo", "small-centres", "coarse", "enhancement-signs", "texture-signs", "scanners")


def make_preset(name: str, n_sites: int | None = None, patients_per_site: int | None = None, fmt: str | None = None) -> Preset:
    """A named preset, optionally with another number of sites (profiles reused in turn; the last two hold out
    when there are at least three), another number of patients per site, or one file format for all sites."""
    if name not in PRESETS:
        raise TaceError(f"unknown preset {name!r}", f"valid presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]()
    centres = list(preset.centres)
    if n_sites is not None:
        if n_sites < 1:
            raise TaceError("--n-sites must be at least 1")
        base = centres
        centres = []
        for i in range(n_sites):
            role = "holdout" if n_sites >= 3 and i >= n_sites - 2 else "train"
            profile = base[i % len(base)]
            # A training centre needs patients enough to train (and to clear sites' minimum): holdout profiles are small.
            n = max(profile.n_patients, base[0].n_patients) if role == "train" else profile.n_patients
            centres.append(replace(profile, site_id=f"site-{_letters(i)}", role=role, n_patients=n))
    if patients_per_site is not None:
        if patients_per_site < 2:
            raise TaceError("--patients-per-site must be at least 2")
        centres = [replace(c, n_patients=patients_per_site) for c in centres]
    if fmt is not None:
        valid = ("nii.gz", "nii", "nrrd", "mha", "dicom")
        if fmt not in valid:
            raise TaceError(f"unknown image format {fmt!r}", f"valid formats: {', '.join(valid)}")
        centres = [replace(c, acquisition=_for_format(c.acquisition, fmt)) for c in centres]
    return replace(preset, centres=tuple(centres))


def _for_format(acq: Acquisition, fmt: str) -> Acquisition:
    if fmt == "dicom" and np.linalg.det(np.array(acq.direction).reshape(3, 3)) < 0:
        # DICOM series are right-handed; a feet-first stack is stored as a head-first one.
        return replace(acq, fmt=fmt, direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return replace(acq, fmt=fmt)


def _letters(i: int) -> str:
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(97 + r) + out
    return out


# ---------------------------------------------------------------------------------------------------------------
# Patient-level model
# ---------------------------------------------------------------------------------------------------------------


def _clinical(rng: np.random.Generator, n: int, centre: CentreProfile) -> dict[str, np.ndarray]:
    """Latents and clinical factors for `n` patients of a centre (true values, before missingness)."""
    burden = rng.normal(size=n)  # tumour burden: size, number, AFP, portal-vein invasion, BCLC
    function = rng.normal(size=n)  # liver function: Child-Pugh, ALBI
    age = np.clip(rng.normal(centre.age_mean, 9.5, n), 30, 88).round()
    sex = np.where(rng.random(n) < 0.82, "M", "F")
    diameter = np.clip(np.exp(np.log(48) + centre.diameter_shift + 0.2 * burden + 0.35 * rng.normal(size=n)), 12, 150)
    count_score = 0.6 * burden + rng.normal(0, 0.8, n)
    number = np.where(count_score < 0.35, "1", np.where(count_score < 1.3, "2-3", ">3"))
    pvi = (rng.random(n) < 1 / (1 + np.exp(-(-2.4 + 0.9 * burden)))).astype(int)
    afp = 10 ** np.clip(1.8 + centre.afp_shift + 0.55 * burden + 0.85 * rng.normal(size=n), -0.3, 6)
    cp_b = function + 0.5 * rng.normal(size=n) > 1.15
    albi = np.where(function < -0.25, 1, np.where(function < 1.25, 2, 3))
    bclc = np.where(pvi == 1, "C", np.where((number != "1") | (diameter > 50), "B", np.where((diameter < 20) & ~cp_b, "0", "A")))
    deb = rng.random(n) < centre.deb_rate
    return {
        "burden": burden, "function": function, "age": age, "sex": sex, "diameter": diameter, "number": number,
        "pvi": pvi, "afp": afp, "child_pugh": np.where(cp_b, "B", "A"), "albi": albi, "bclc": bclc,
        "tace_type": np.where(deb, "deb", "conventional"),
    }  # fmt: skip


def clinical_score_raw(c: dict[str, np.ndarray]) -> np.ndarray:
    """The clinical part of the response logit before standardisation (higher = more likely to respond)."""
    zlogd = (np.log(c["diameter"]) - np.log(48)) / 0.43
    zafp = (np.log10(c["afp"]) - 1.8) / 1.0
    # Tumour size is visible in the images too; most of this score is not (AFP, liver function, invasion, technique),
    # which is what lets a model fusing images and clinical factors beat either alone, as in the study.
    return (
        -0.45 * zlogd
        - 0.45 * (c["number"] == "2-3")
        - 0.9 * (c["number"] == ">3")
        - 0.9 * c["pvi"]
        - 0.65 * zafp
        - 0.5 * (c["albi"] - 1)
        - 0.4 * (c["child_pugh"] == "B")
        + 0.45 * (c["tace_type"] == "deb")
    )


@lru_cache(maxsize=1)
def _clinical_score_moments() -> tuple[float, float]:
    """Mean and SD of the raw clinical score in a large reference population (fixed seed: deterministic)."""
    ref = CentreProfile("reference", "train", 0, _acq((1, 1, 1), (2, 2, 2)))
    raw = clinical_score_raw(_clinical(np.random.default_rng(20250101), 50000, ref))
    return float(raw.mean()), float(raw.std())


def _phenotype(rng: np.random.Generator, u: np.ndarray, model: PhenotypeModel = PHENOTYPE) -> dict[str, np.ndarray]:
    """Target-tumour appearance driven by the imaging latent u (see `PhenotypeModel`)."""
    return model.draw(rng, u)


def _image_features(pheno: dict[str, np.ndarray], diameter: np.ndarray, number: np.ndarray) -> np.ndarray:
    """What a patient's images show of the response model: the target tumour's signs, its size, the number of
    tumours (``(N, 8)``)."""
    return np.column_stack([*(pheno[k] for k in SIGN_RANGES), np.log(diameter), number == "2-3", number == ">3"]).astype(float)


@lru_cache(maxsize=8)
def image_oracle(phenotype: PhenotypeModel) -> tuple[tuple[float, ...], float]:
    """The best response probability from what the images show, as a logistic model of `_image_features` fitted
    on a large reference population (fixed seed: deterministic). Its AUC is the image-only oracle: what no image
    model can beat on average (rendering, noise and partial volume only lose information)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(20251129)
    n = 200_000
    ref = CentreProfile("reference", "train", 0, _acq((1, 1, 1), (2, 2, 2)))
    clin = _clinical(rng, n, ref)
    mean, sd = _clinical_score_moments()
    u = rng.normal(size=n)
    pheno = phenotype.draw(rng, u)
    response = _outcomes(rng, u, (clinical_score_raw(clin) - mean) / sd, ref.intercept)["response"]
    fit = LogisticRegression(C=1e4, max_iter=2000).fit(_image_features(pheno, clin["diameter"], clin["number"]), response)
    return tuple(float(c) for c in fit.coef_[0]), float(fit.intercept_[0])


def image_oracle_probability(
    phenotype: PhenotypeModel, pheno: dict[str, np.ndarray], diameter: np.ndarray, number: np.ndarray
) -> np.ndarray:
    """`image_oracle`'s probability for patients with these signs, diameters (mm) and tumour counts."""
    coef, intercept = image_oracle(phenotype)
    return 1 / (1 + np.exp(-(_image_features(pheno, diameter, number) @ np.array(coef) + intercept)))


def _anatomy(rng: np.random.Generator, diameter: float, number: str, pheno: dict[str, float]) -> tuple[Anatomy, np.ndarray]:
    """A patient's anatomy with the target tumour (largest) first; also where the scanner centres its FOV."""
    body_centre = (rng.normal(0, 5), rng.normal(0, 5))
    liver_centre = np.array([-55 + rng.normal(0, 8), 5 + rng.normal(0, 8), rng.normal(0, 10)])
    liver_radii = np.array([rng.uniform(85, 105), rng.uniform(70, 85), rng.uniform(70, 90)])

    def place(max_frac: float) -> tuple[float, float, float]:
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        pos = liver_centre + v * liver_radii * rng.uniform(0, max_frac)
        return (float(pos[0]), float(pos[1]), float(pos[2]))

    def tumour(d: float, centre: tuple[float, float, float], jitter: float) -> TumourSpec:
        radii = (d / 2, d / 2 * rng.uniform(0.8, 1.0), d / 2 * rng.uniform(0.75, 1.0))
        return TumourSpec(
            centre=centre, radii=radii,
            aphe=float(np.clip(pheno["aphe"] + jitter * rng.normal(), 0.05, 1.8)),
            washout=float(np.clip(pheno["washout"] + jitter * rng.normal(), 0, 0.8)),
            necrosis=float(np.clip(pheno["necrosis"] + jitter * rng.normal(), 0, 0.75)) if d > 15 else 0.0,
            capsule=float(np.clip(pheno["capsule"] + jitter * rng.normal(), 0, 1.2)),
            heterogeneity=float(np.clip(pheno["heterogeneity"] + jitter * rng.normal() / 3, 0.03, 0.5)),
            lobulation=float(rng.uniform(0.03, 0.12)),
            texture_seed=int(rng.integers(2**31)),
        )  # fmt: skip

    target = tumour(diameter, place(0.45), 0.0)
    extra = {"1": 0, "2-3": int(rng.integers(1, 3)), ">3": int(rng.integers(3, 6))}[number]
    tumours = [target]
    for _ in range(extra):
        tumours.append(tumour(rng.uniform(10, max(12, 0.6 * diameter)), place(0.75), 0.15))
    vessels = []
    for _ in range(3):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        start = liver_centre + rng.normal(0, 25, 3)
        vessels.append((tuple(float(a) for a in start), tuple(float(a) for a in v), float(rng.uniform(3, 6))))
    anatomy = Anatomy(
        body_centre=body_centre, body_radii=(rng.uniform(150, 185), rng.uniform(110, 135)),
        liver_centre=tuple(float(a) for a in liver_centre), liver_radii=tuple(float(a) for a in liver_radii),  # type: ignore[arg-type]
        liver_shape_seed=int(rng.integers(2**31)), vessels=tuple(vessels),  # type: ignore[arg-type]
        aorta=(15 + rng.normal(0, 4), 45 + rng.normal(0, 4), rng.uniform(9, 12)), tumours=tuple(tumours),
    )  # fmt: skip
    fov = np.array([body_centre[0] - 30 + rng.normal(0, 10), body_centre[1] + rng.normal(0, 10), target.centre[2] + rng.normal(0, 15)])
    return anatomy, fov


def _outcomes(rng: np.random.Generator, u: np.ndarray, c_std: np.ndarray, intercept: float) -> dict[str, np.ndarray]:
    logit = intercept + W_IMG * u + W_CLIN * c_std
    p = 1 / (1 + np.exp(-logit))
    response = (rng.random(len(u)) < p).astype(int)
    # PFS: exponential, median ~300 days for a typical non-responder; response and a good profile lower the hazard.
    log_hazard = np.log(np.log(2) / 300) - 0.8 * response - 0.35 * c_std - 0.25 * u
    t_true = rng.exponential(1 / np.exp(log_hazard))
    censor = np.minimum(rng.uniform(540, 1800, len(u)), rng.exponential(4000 / np.log(2), len(u)))
    observed = np.maximum(np.ceil(np.minimum(t_true, censor)), 1)
    return {"logit": logit, "p_true": p, "response": response, "pfs_true_days": t_true, "censor_days": censor,
            "pfs_days": observed.astype(int), "pfs_event": (t_true <= censor).astype(int)}  # fmt: skip


# Baseline probability that an optional clinical value is missing in a manifest (scaled per centre).
MISSINGNESS = {
    "afp_ng_ml": 0.05,
    "tumour_diameter_mm": 0.03,
    "albi_grade": 0.08,
    "child_pugh": 0.03,
    "tace_type": 0.02,
    "portal_vein_invasion": 0.02,
}


@dataclass
class PatientPlan:
    """Everything needed to render and write one patient (picklable, for worker processes)."""

    site_id: str
    patient_id: str
    folder: str
    anatomy: Anatomy
    acquisition: Acquisition
    fov_centre: tuple[float, float, float]
    seed: int


def _plan_centre(
    centre: CentreProfile, rng: np.random.Generator, val_fraction: float, phenotype: PhenotypeModel = PHENOTYPE
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[PatientPlan]]:
    """Manifest rows, ground-truth rows and render plans for one centre."""
    n = centre.n_patients
    clin = _clinical(rng, n, centre)
    mean, sd = _clinical_score_moments()
    c_std = (clinical_score_raw(clin) - mean) / sd
    u = rng.normal(size=n)
    pheno = _phenotype(rng, u, phenotype)
    out = _outcomes(rng, u, c_std, centre.intercept)
    p_image = image_oracle_probability(phenotype, pheno, clin["diameter"], clin["number"])
    splits = _stratified_split(rng, out["response"], val_fraction) if centre.role == "train" else np.array(["test"] * n)
    manifest_rows, truth_rows, plans = [], [], []
    for i in range(n):
        pid = f"{centre.site_id}-{i + 1:04d}"
        p_pheno = {k: float(v[i]) for k, v in pheno.items()}
        anatomy, fov = _anatomy(rng, float(clin["diameter"][i]), str(clin["number"][i]), p_pheno)
        folder = f"images/{pid}"
        plans.append(
            PatientPlan(
                centre.site_id,
                pid,
                folder,
                anatomy,
                centre.acquisition,
                (float(fov[0]), float(fov[1]), float(fov[2])),
                int(rng.integers(2**31)),
            )
        )
        ext = "" if centre.acquisition.fmt == "dicom" else "." + centre.acquisition.fmt
        mask_ext = ".nii.gz" if centre.acquisition.fmt == "dicom" else ext
        measured = float(clin["diameter"][i]) * (1 + 0.05 * rng.normal())
        row: dict[str, Any] = {
            "patient_id": pid, "split": splits[i],
            **{f"{ph}_path": f"{folder}/{ph}{ext}" for ph in PHASES},
            "mask_path": f"{folder}/mask{mask_ext}",
            "age": int(clin["age"][i]), "sex": clin["sex"][i], "afp_ng_ml": round(float(clin["afp"][i]), 1),
            "tumour_diameter_mm": round(min(max(measured, 5), 300), 1), "tumour_number": clin["number"][i],
            "child_pugh": clin["child_pugh"][i], "bclc_stage": clin["bclc"][i], "albi_grade": int(clin["albi"][i]),
            "portal_vein_invasion": int(clin["pvi"][i]), "tace_type": clin["tace_type"][i],
            "response": int(out["response"][i]), "pfs_days": int(out["pfs_days"][i]), "pfs_event": int(out["pfs_event"][i]),
        }  # fmt: skip
        for col, rate in MISSINGNESS.items():
            if rng.random() < rate * centre.missing_rate:
                row[col] = None
        manifest_rows.append(row)
        truth_rows.append({
            "site_id": centre.site_id, "patient_id": pid, "split": splits[i], "role": centre.role, "u_img": u[i],
            "clinical_score": c_std[i], "p_image": p_image[i],
            **{k: out[k][i] for k in ("logit", "p_true", "response", "pfs_true_days", "censor_days")},
            **{k: pheno[k][i] for k in pheno}, "diameter_true_mm": clin["diameter"][i],
            "n_tumours": len(anatomy.tumours),
        })  # fmt: skip
    return manifest_rows, truth_rows, plans


def _stratified_split(rng: np.random.Generator, response: np.ndarray, val_fraction: float) -> np.ndarray:
    """'train'/'val' per patient, the val share taken within responders and non-responders separately (as a
    development centre splits its data), so that a small val split still holds both classes."""
    splits = np.array(["train"] * len(response), dtype=object)
    for cls in (0, 1):
        idx = np.flatnonzero(response == cls)
        if len(idx) < 2:
            continue
        n_val = max(1, round(val_fraction * len(idx)))
        splits[rng.permutation(idx)[:n_val]] = "val"
    return splits.astype(str)


def render_patient(plan: PatientPlan, site_dir: str) -> None:
    """Render one patient and write its phases and mask under `site_dir` (runs in a worker process)."""
    images, mask = render(plan.anatomy, plan.acquisition, np.array(plan.fov_centre), plan.seed)
    folder = Path(site_dir) / plan.folder
    fmt = plan.acquisition.fmt
    for phase, image in images.items():
        _write(image, folder / (phase if fmt == "dicom" else f"{phase}.{fmt}"))
    _write(mask, folder / ("mask.nii.gz" if fmt == "dicom" else f"mask.{fmt}"))


def _write(image: Any, path: Path) -> None:
    """`write_image` with fast compression: the generator's noisy volumes hardly compress, and zlib's default
    effort made writing them take as long as rendering. A .nii.gz is the .nii gzipped at level 1 by ISA-L's igzip (a
    standard gzip stream, several times faster than zlib), with no timestamp, so a cohort stays byte-identical for a
    seed; NRRD and MetaImage use SimpleITK's own compression at level 1."""
    import SimpleITK as sitk

    if path.name.endswith(".nii.gz"):
        raw = path.with_name(path.name[: -len(".nii.gz")] + ".tmp.nii")
        write_image(image, raw)
        from isal.igzip import compress

        path.write_bytes(compress(raw.read_bytes(), compresslevel=1, mtime=0))
        raw.unlink()
    elif path.suffix in (".nrrd", ".mha"):
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), True, 1)
    else:
        write_image(image, path)


def write_matrix(table: pd.DataFrame, path: Path) -> None:
    """A numeric table as CSV with 4 significant digits, as ``table.to_csv(path, float_format="%.4g")`` writes it
    but a row at a time (pandas formats cell by cell: seconds for the 20,000 x 80 expression matrix)."""
    row = ",".join(["%.4g"] * table.shape[1])
    values = table.to_numpy(dtype=float)
    lines = [",".join([str(table.index.name or ""), *map(str, table.columns)])]
    lines += [f"{name}," + row % tuple(v) for name, v in zip(table.index, values, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def auc_mann_whitney(y_true: Iterable[int], y_score: Iterable[float]) -> float | None:
    """ROC AUC as the Mann-Whitney probability P(score_pos > score_neg) + 0.5 P(tie); None if one class."""
    y = np.asarray(list(y_true))
    s = np.asarray(list(y_score), dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


@dataclass
class CohortResult:
    out: Path
    preset: Preset
    seed: int
    sites: dict[str, int] = field(default_factory=dict)
    oracle_auc: dict[str, float | None] = field(default_factory=dict)


def generate_cohort(
    out: Path | str,
    preset: Preset,
    seed: int = 0,
    gene_sets: Path | str | None = None,
    workers: int = 1,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
    overwrite: bool = False,
) -> CohortResult:
    """Generate the cohort: per-site folders with images and a manifest, a radiogenomics cohort, the truth.

    Parameters
    ----------
    out : Path
        Output folder; must be empty or absent unless `overwrite`.
    preset : Preset
        Centres, sizes and radiogenomics settings (see `make_preset`).
    seed : int
        Everything generated is a deterministic function of (preset, seed, gene_sets).
    gene_sets : Path, optional
        GMT file whose pathways and gene symbols the radiogenomics expression uses; a built-in synthetic
        collection is used when absent.
    workers : int
        Processes rendering images in parallel (the output does not depend on it).
    progress : callable, optional
        ``progress(iterable, total)`` wrapper for a progress bar.
    """
    from tace.simulation.radiogenomics import builtin_gene_sets, make_expression

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TaceError(f"output folder {out} is not empty", "choose a new --out folder, or pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    root_seq = np.random.SeedSequence([seed, GENERATOR_VERSION])
    centre_seeds = root_seq.spawn(len(preset.centres) + 1)
    columns = [c.name for c in COLUMNS if c.name not in ("t2_path", "dwi_path", "mask_label")]
    truth: list[dict[str, Any]] = []
    jobs: list[tuple[PatientPlan, str]] = []
    result = CohortResult(out=out, preset=preset, seed=seed)
    cohort_sites = []
    for centre, ss in zip(preset.centres, centre_seeds[:-1], strict=True):
        rng = np.random.default_rng(ss)
        rows, truth_rows, plans = _plan_centre(centre, rng, preset.val_fraction, phenotype=preset.phenotype)
        site_dir = out / "sites" / centre.site_id
        site_dir.mkdir(parents=True)
        write_manifest(site_dir / "manifest.csv", rows, columns)
        truth.extend(truth_rows)
        jobs.extend((p, str(site_dir)) for p in plans)
        result.sites[centre.site_id] = len(rows)
        cohort_sites.append({
            "site_id": centre.site_id, "suggested_role": centre.role, "manifest": f"sites/{centre.site_id}/manifest.csv",
            "n_patients": len(rows), "image_format": centre.acquisition.fmt,
        })  # fmt: skip

    # Radiogenomics cohort: images from a mix of protocols, no TACE outcome, plus an expression matrix.
    rg_rng = np.random.default_rng(centre_seeds[-1])
    rg_centre = replace(preset.centres[0], site_id="rg", role="holdout", n_patients=preset.n_radiogenomics + preset.n_unmatched[0])
    rows, rg_truth, plans = _plan_centre(rg_centre, rg_rng, 0.0, phenotype=preset.phenotype)
    for r in rows:
        r["response"] = r["pfs_days"] = r["pfs_event"] = None
    rg_dir = out / "radiogenomics"
    rg_dir.mkdir()
    write_manifest(rg_dir / "manifest.csv", rows, columns)
    jobs.extend((p, str(rg_dir)) for p in plans)
    expression, rg_meta = make_expression(
        rg_rng, [r["patient_id"] for r in rg_truth], np.array([t["u_img"] for t in rg_truth]),
        n_genes=preset.n_genes, gene_sets=gene_sets, n_image_only=preset.n_unmatched[0], n_expression_only=preset.n_unmatched[1],
    )  # fmt: skip
    write_matrix(expression, rg_dir / "expression.csv")
    if gene_sets is None:
        # The built-in collection is synthetic (no licence attached), so the cohort carries it for the analysis.
        write_gmt(rg_dir / "gene_sets.gmt", builtin_gene_sets(), "TACE-FL synthetic pathway")

    it: Iterable[Any]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(render_patient, plan, site) for plan, site in jobs]
            it = progress(futures, len(futures)) if progress else futures
            for f in it:
                f.result()
    else:
        it = progress(jobs, len(jobs)) if progress else jobs
        for plan, site in it:
            render_patient(plan, site)

    truth_df = pd.DataFrame(truth)
    gt = out / "ground_truth"
    gt.mkdir()
    truth_df.to_csv(gt / "patients.csv", index=False)
    pd.DataFrame(rg_truth).to_csv(gt / "radiogenomics_patients.csv", index=False)
    oracle: dict[str, Any] = {}
    for site_id, df in truth_df.groupby("site_id", sort=False):
        eval_df = df[df["split"].isin(["val", "test"])]
        auc = auc_mann_whitney(eval_df["response"], eval_df["p_true"])
        result.oracle_auc[str(site_id)] = auc
        oracle[str(site_id)] = {
            "role": str(df["role"].iloc[0]), "auc": auc, "auc_all_patients": auc_mann_whitney(df["response"], df["p_true"]),
            "auc_image": auc_mann_whitney(eval_df["response"], eval_df["p_image"]),
            "auc_clinical": auc_mann_whitney(eval_df["response"], eval_df["clinical_score"]),
            "n_eval": len(eval_df), "responder_rate": float(df["response"].mean()),
        }  # fmt: skip
    truth_summary = {
        "generator_version": GENERATOR_VERSION, "preset": preset.name, "seed": seed,
        "response_model": {"w_img": W_IMG, "w_clin": W_CLIN, "clinical_score_moments": _clinical_score_moments(),
                           "intercepts": {c.site_id: c.intercept for c in preset.centres}},
        "oracle": {"note": "AUC of the true response probability (auc), of the best probability from what the images show "
                           "(auc_image: the target tumour's signs, size and the number of tumours) and of the clinical part of "
                           "the response model (auc_clinical): on the val split of training sites, on all patients of holdout sites",
                   "sites": oracle},
        "radiogenomics": rg_meta,
    }  # fmt: skip
    (gt / "truth.json").write_text(json.dumps(truth_summary, indent=2, default=_json_default))
    cohort = {
        "generator": "tace-sim cohort", "generator_version": GENERATOR_VERSION, "preset": preset.name, "seed": seed,
        "sites": cohort_sites,
        "radiogenomics": {"manifest": "radiogenomics/manifest.csv", "expression": "radiogenomics/expression.csv",
                          "gene_sets": "radiogenomics/gene_sets.gmt" if gene_sets is None else str(Path(gene_sets).resolve())},
        "ground_truth": "ground_truth/ (for comparison only: no training or analysis code reads it)",
        "suggested_preprocessing": preset.preprocess.to_dict(),
        "acquisition": {c.site_id: asdict(c.acquisition) for c in preset.centres},
    }  # fmt: skip
    (out / "cohort.json").write_text(json.dumps(cohort, indent=2))
    return result


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj))


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
