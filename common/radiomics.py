"""Radiomics of the target tumour: IBSI shape, first-order and texture features per phase, and tumour-to-liver contrast.

Computed at a site from the network-input box (`tace.common.preprocess`: phases z-scored per phase, ``(C, D, H, W)``)
and the tumour mask on the same grid. The definitions follow the Image Biomarker Standardisation Initiative (IBSI 1,
Zwanenburg et al., Radiology 2020; reference manual arXiv:1612.07003); `tests/test_radiomics.py` checks every IBSI
feature here against the published values of the IBSI digital phantom. Texture matrices are 3D: the GLCM (symmetric,
Chebyshev distance 1) and the GLRLM are computed for each of the 13 directions and their features averaged over
the directions ("3D, averaged"); the GLSZM uses 26-connected zones. The ``shell`` group (tumour against the liver
just around it) is not IBSI. ``docs/preprocessing.md`` lists every feature with its IBSI identifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist
from skimage.measure import marching_cubes

from tace.common.errors import ConfigError, TaceError


class RadiomicsError(TaceError):
    """A patient's tumour mask or box cannot give radiomics features (empty or tiny mask, non-finite voxels, ...)."""


@dataclass(frozen=True)
class RadiomicsSettings:
    """How intensities are discretised for texture and entropy, and the liver shell. One setting for all sites.

    Parameters
    ----------
    discretisation : "bin_number" or "bin_width"
        IBSI fixed bin number (FBN: `bin_number` bins between the tumour's own minimum and maximum) or fixed bin
        size (FBS: bins of `bin_width` starting at `bin_origin`). FBN is the default, as IBSI recommends for
        intensities without a calibrated unit such as MRI; the z-scored phases make FBS usable too.
    bin_number : int
        Number of grey levels for FBN.
    bin_width, bin_origin : float
        Bin width and lower bound for FBS, in the phase's SD units (the box is z-scored per phase). Intensities
        below the origin fall into the first bin.
    shell_mm : float
        The liver shell is the voxels outside the mask within this distance (mm, centre to centre) of it.
    min_voxels : int
        Smallest tumour mask accepted (voxels); smaller masks are refused: texture needs neighbouring voxels.
    """

    discretisation: Literal["bin_number", "bin_width"] = "bin_number"
    bin_number: int = 32
    bin_width: float = 0.25
    bin_origin: float = -5.0
    shell_mm: float = 10.0
    min_voxels: int = 8

    def __post_init__(self) -> None:
        if self.discretisation not in ("bin_number", "bin_width"):
            raise ConfigError(f"discretisation must be 'bin_number' or 'bin_width', not {self.discretisation!r}")
        if int(self.bin_number) != self.bin_number or not 2 <= self.bin_number <= 256:
            raise ConfigError("bin_number must be an integer from 2 to 256")
        if not (np.isfinite(self.bin_width) and self.bin_width > 0 and np.isfinite(self.bin_origin)):
            raise ConfigError("bin_width must be a positive number and bin_origin a finite number (SD units)")
        if not (np.isfinite(self.shell_mm) and self.shell_mm > 0):
            raise ConfigError("shell_mm must be a positive number of millimetres")
        if int(self.min_voxels) != self.min_voxels or self.min_voxels < 2:
            raise ConfigError("min_voxels must be an integer >= 2")


# Every feature with its IBSI identifier ("" where IBSI defines none: a derived or non-IBSI feature). The order of
# these tables is the order of the feature vector; never reorder, only append (with a new name).
_SHAPE: tuple[tuple[str, str], ...] = (
    ("volume_mesh", "RNU0"),  # mm3
    ("volume_voxels", "YEKZ"),  # mm3
    ("surface_area", "C0JK"),  # mm2
    ("surface_volume_ratio", "2PR5"),  # 1/mm
    ("compactness_1", "SKGS"),
    ("compactness_2", "BQWJ"),
    ("spherical_disproportion", "KRCK"),
    ("sphericity", "QCFX"),
    ("asphericity", "25C7"),
    ("max_3d_diameter", "L0JK"),  # mm
    ("major_axis_length", "TDIC"),  # mm
    ("minor_axis_length", "P9VJ"),  # mm
    ("least_axis_length", "7J51"),  # mm
    ("elongation", "Q3CK"),
    ("flatness", "N17B"),
    ("volume_density_aabb", "PBX1"),
    ("area_density_aabb", "R59B"),
    ("volume_density_convex_hull", "R3ER"),
    ("area_density_convex_hull", "7T7F"),
)
_FIRST_ORDER: tuple[tuple[str, str], ...] = (
    ("mean", "Q4LE"),
    ("sd", ""),  # the square root of IBSI's intensity variance (ECT3)
    ("skewness", "KE2A"),
    ("kurtosis", "IPH6"),  # excess kurtosis
    ("minimum", "1GSF"),
    ("p10", "QG58"),
    ("median", "Y12H"),
    ("p90", "8DWT"),
    ("maximum", "84IY"),
    ("iqr", "SALO"),
    ("range", "2OJQ"),
    ("mean_absolute_deviation", "4FUA"),
    ("robust_mean_absolute_deviation", "1128"),
    ("median_absolute_deviation", "N72L"),
    ("energy", "N8CA"),
    ("root_mean_square", "5ZWQ"),
    ("entropy", "TLU2"),  # of the discretised intensities, log2
    ("uniformity", "BJ5W"),
)
# Left out as exact duplicates on a symmetric GLCM: sum average (= 2 x joint average), dissimilarity (= difference
# average), cluster tendency (= sum variance); the tests check these identities against IBSI's values.
_GLCM: tuple[tuple[str, str], ...] = (
    ("joint_maximum", "GYBY"),
    ("joint_average", "60VM"),
    ("joint_variance", "UR99"),
    ("joint_entropy", "TU9B"),
    ("difference_average", "TF7R"),
    ("difference_variance", "D3YU"),
    ("difference_entropy", "NTRS"),
    ("sum_variance", "OEEB"),
    ("sum_entropy", "P6QZ"),
    ("angular_second_moment", "8ZQL"),
    ("contrast", "ACUI"),
    ("inverse_difference", "IB1Z"),
    ("inverse_difference_normalised", "NDRX"),
    ("inverse_difference_moment", "WF0Z"),
    ("inverse_difference_moment_normalised", "1QCO"),
    ("inverse_variance", "E8JP"),
    ("correlation", "NI2N"),
    ("autocorrelation", "QWB0"),
    ("cluster_shade", "7NFM"),
    ("cluster_prominence", "AE86"),
    ("information_correlation_1", "R8DG"),
    ("information_correlation_2", "JN9H"),
)
_GLRLM: tuple[tuple[str, str], ...] = (
    ("short_run_emphasis", "22OV"),
    ("long_run_emphasis", "W4KF"),
    ("low_grey_level_run_emphasis", "V3SW"),
    ("high_grey_level_run_emphasis", "G3QZ"),
    ("short_run_low_grey_level_emphasis", "HTZT"),
    ("short_run_high_grey_level_emphasis", "GD3A"),
    ("long_run_low_grey_level_emphasis", "IVPO"),
    ("long_run_high_grey_level_emphasis", "3KUM"),
    ("grey_level_non_uniformity", "R5YN"),
    ("grey_level_non_uniformity_normalised", "OVBL"),
    ("run_length_non_uniformity", "W92Y"),
    ("run_length_non_uniformity_normalised", "IC23"),
    ("run_percentage", "9ZK5"),
    ("grey_level_variance", "8CE5"),
    ("run_length_variance", "SXLW"),
    ("run_entropy", "HJ9O"),
)
_GLSZM: tuple[tuple[str, str], ...] = (
    ("small_zone_emphasis", ""),  # IBSI feature; the manual's source at the cited commit prints no identifier for it
    ("large_zone_emphasis", "48P8"),
    ("low_grey_level_zone_emphasis", "XMSY"),
    ("high_grey_level_zone_emphasis", "5GN9"),
    ("small_zone_low_grey_level_emphasis", "5RAI"),
    ("small_zone_high_grey_level_emphasis", "HW1V"),
    ("large_zone_low_grey_level_emphasis", "YH51"),
    ("large_zone_high_grey_level_emphasis", "J17V"),
    ("grey_level_non_uniformity", "JNSA"),
    ("grey_level_non_uniformity_normalised", "Y1RO"),
    ("zone_size_non_uniformity", "4JP3"),
    ("zone_size_non_uniformity_normalised", "VB3A"),
    ("zone_percentage", "P30P"),
    ("grey_level_variance", "BYLV"),
    ("zone_size_variance", "3NSA"),
    ("zone_size_entropy", "GU8N"),
)
# Not IBSI: the tumour against the liver shell around it, in the phase's SD units (what radiologists read as arterial
# hyperenhancement and portal-venous/delayed washout). A linear model over the phases forms washout itself.
_SHELL: tuple[tuple[str, str], ...] = (
    ("mean", ""),  # mean intensity of the shell
    ("sd", ""),
    ("contrast_mean", ""),  # tumour mean - shell mean
    ("contrast_median", ""),  # tumour median - shell median
    ("brighter_fraction", ""),  # share of tumour voxels above the shell's 75th percentile
    ("darker_fraction", ""),  # share of tumour voxels below the shell's 25th percentile
)

#: Shape features: computed once from the mask, first in the feature vector.
SHAPE_FEATURES: tuple[str, ...] = tuple(f"shape_{n}" for n, _ in _SHAPE)
#: Features computed for every phase channel, in this order, after the shape features.
CHANNEL_FEATURES: tuple[str, ...] = tuple(
    f"{family}_{n}"
    for family, table in (("firstorder", _FIRST_ORDER), ("glcm", _GLCM), ("glrlm", _GLRLM), ("glszm", _GLSZM), ("shell", _SHELL))
    for n, _ in table
)
#: Every feature's base name in a stable order: `feature_names` prefixes the channel features with their channel.
FEATURE_NAMES: tuple[str, ...] = SHAPE_FEATURES + CHANNEL_FEATURES
#: IBSI identifier of each base name ("" for derived or non-IBSI features, and small zone emphasis, see above).
IBSI_IDS: dict[str, str] = {f"shape_{n}": c for n, c in _SHAPE} | {
    f"{family}_{n}": c
    for family, table in (("firstorder", _FIRST_ORDER), ("glcm", _GLCM), ("glrlm", _GLRLM), ("glszm", _GLSZM), ("shell", _SHELL))
    for n, c in table
}

# The 13 directions of a 3D neighbourhood at Chebyshev distance 1 (z, y, x), one of each opposite pair.
_DIRECTIONS = np.array(
    [
        (0, 0, 1),
        (0, 1, 0),
        (0, 1, 1),
        (0, 1, -1),
        (1, 0, 0),
        (1, 0, 1),
        (1, 0, -1),
        (1, 1, 0),
        (1, -1, 0),
        (1, 1, 1),
        (1, 1, -1),
        (1, -1, 1),
        (1, -1, -1),
    ]
)


def feature_names(channels: int | Sequence[str]) -> list[str]:
    """Names of the entries of `extract`'s vector: the shape features, then `CHANNEL_FEATURES` per channel.

    Parameters
    ----------
    channels : int or sequence of str
        The number of channels (named ``c0``, ``c1``, ...) or their names, e.g. the sequences of the preprocessing
        configuration (``arterial_glcm_contrast``).
    """
    names = [f"c{i}" for i in range(channels)] if isinstance(channels, int) else [str(c) for c in channels]
    return list(SHAPE_FEATURES) + [f"{ch}_{n}" for ch in names for n in CHANNEL_FEATURES]


def extract(image: np.ndarray, mask: np.ndarray, spacing_mm: Sequence[float], settings: RadiomicsSettings | None = None) -> np.ndarray:
    """Radiomics features of one patient's tumour.

    Parameters
    ----------
    image : np.ndarray, shape ``(C, D, H, W)``
        The phases on the tumour box (z, y, x), e.g. `preprocess_record`'s tensor (z-scored per phase).
    mask : np.ndarray, shape ``(D, H, W)``
        The tumour on the same grid (non-zero inside), e.g. `box_mask`'s.
    spacing_mm : (x, y, z)
        Voxel spacing of the box in mm, in the order `PreprocessConfig` and `box_mask` give it.
    settings : RadiomicsSettings, optional

    Returns
    -------
    np.ndarray, float64, shape ``(len(feature_names(C)),)``, all finite.

    Raises
    ------
    RadiomicsError
        The mask is empty or smaller than ``settings.min_voxels``, the box holds non-finite values around the
        tumour, no voxel of the box lies outside the tumour, or the shapes do not agree.
    """
    settings = settings or RadiomicsSettings()
    image = np.asarray(image)
    roi = np.asarray(mask) > 0
    if image.ndim != 4 or roi.ndim != 3 or image.shape[1:] != roi.shape:
        raise RadiomicsError(
            f"image of shape {image.shape} and mask of shape {roi.shape} do not agree",
            "pass the phases as (C, D, H, W) and the tumour mask on the same (D, H, W) grid",
        )
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise RadiomicsError("spacing_mm must be three positive voxel sizes (x, y, z) in mm")
    n_voxels = int(roi.sum())
    if n_voxels == 0:
        raise RadiomicsError("the tumour mask is empty on the box", "check the patient's mask file and its mask_label")
    if n_voxels < settings.min_voxels:
        raise RadiomicsError(
            f"the tumour mask has {n_voxels} voxel(s) on the box; radiomics needs at least {settings.min_voxels}",
            "check the mask, or use a finer spacing_mm for small tumours",
        )
    sampling = spacing[::-1]  # (z, y, x), the array's axis order
    crop = _crop(roi, sampling, settings.shell_mm)
    roi = roi[crop]
    box = image[(slice(None), *crop)].astype(np.float64)
    if not np.isfinite(box).all():
        raise RadiomicsError("the box holds NaN or infinite values around the tumour", "re-run preprocessing for this patient")
    shell = _shell(roi, sampling, settings.shell_mm)
    geometry = _Geometry(roi)
    parts = [_shape(roi, sampling, geometry)]
    for channel in box:
        values = channel[roi]
        grey, n_grey = discretise(values, settings)
        parts += [
            _first_order(values, grey),
            _glcm(geometry, grey, n_grey),
            _glrlm(geometry, grey, n_grey),
            _glszm(geometry, grey, n_grey),
            _shell_contrast(values, channel[shell]),
        ]
    features = np.concatenate(parts)
    bad = ~np.isfinite(features)
    if bad.any():  # a guard: every degenerate case above has a defined value, so this is a bug
        names = [n for n, b in zip(feature_names(image.shape[0]), bad, strict=True) if b]
        raise RadiomicsError(f"features {', '.join(names[:10])} are undefined for this tumour", "report this as a bug")
    return features


def discretise(values: np.ndarray, settings: RadiomicsSettings) -> tuple[np.ndarray, int]:
    """IBSI discretisation of the tumour's intensities: grey levels ``1..n_grey`` and ``n_grey``.

    Fixed bin number: ``floor(N (x - min) / (max - min)) + 1``, and ``N`` for the maximum (so a constant tumour
    falls entirely into the top bin, as IBSI's formula gives). Fixed bin size: ``floor((x - origin) / width) + 1``,
    at least 1; the number of grey levels is then the highest level present.
    """
    if settings.discretisation == "bin_number":
        n_grey = int(settings.bin_number)
        low, high = float(values.min()), float(values.max())
        grey = np.full(values.shape, n_grey, dtype=np.int64)
        if high > low:
            below = values < high
            grey[below] = np.minimum(np.floor(n_grey * (values[below] - low) / (high - low)).astype(np.int64) + 1, n_grey)
        return grey, n_grey
    grey = np.maximum(np.floor((values - settings.bin_origin) / settings.bin_width).astype(np.int64) + 1, 1)
    return grey, int(grey.max())


# ---------------------------------------------------------------------------------------------------------------
# Geometry shared by the phases: the region's voxels and their neighbours along each direction.


def _crop(roi: np.ndarray, sampling: tuple[float, ...], shell_mm: float) -> tuple[slice, slice, slice]:
    """The mask's bounding box widened by the shell (clipped to the box): every feature needs only this region."""
    idx = np.nonzero(roi)
    margin = [int(np.ceil(shell_mm / s)) for s in sampling]
    z, y, x = (slice(max(int(i.min()) - m, 0), min(int(i.max()) + m + 1, n)) for i, m, n in zip(idx, margin, roi.shape, strict=True))
    return z, y, x


class _Geometry:
    """The region's voxels (in C order) and, per direction, the index of each voxel's neighbour ahead and behind."""

    def __init__(self, roi: np.ndarray) -> None:
        self.roi = roi
        self.coords = np.argwhere(roi)  # (N, 3), z, y, x
        self.n = len(self.coords)
        index = np.full(tuple(s + 2 for s in roi.shape), -1, dtype=np.int64)
        index[tuple((self.coords + 1).T)] = np.arange(self.n)
        self.ahead = np.stack([index[tuple((self.coords + 1 + d).T)] for d in _DIRECTIONS])  # (13, N), -1: none
        self.behind = np.stack([index[tuple((self.coords + 1 - d).T)] for d in _DIRECTIONS])
        self.pair_dir, self.pair_a = np.nonzero(self.ahead >= 0)  # neighbouring voxel pairs along each direction
        self.pair_b = self.ahead[self.pair_dir, self.pair_a]


# ---------------------------------------------------------------------------------------------------------------
# Feature families.


def _shape(roi: np.ndarray, sampling: tuple[float, ...], geometry: _Geometry) -> np.ndarray:
    """IBSI morphology from the mask: a marching-cubes mesh (iso-level 0.5 on the zero-padded mask) and the voxels."""
    verts, faces, _, _ = marching_cubes(np.pad(roi, 1).astype(np.float32), 0.5, spacing=sampling)
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    volume = abs(float(np.einsum("ij,ij->", a, np.cross(b, c)))) / 6.0
    area = float(np.linalg.norm(np.cross(b - a, c - a), axis=1).sum()) / 2.0
    voxel_volume = geometry.n * float(np.prod(sampling))
    sphere = (36.0 * np.pi * volume**2) ** (1.0 / 3.0)  # area of the sphere of the same volume
    hull = ConvexHull(verts)
    diameter = float(pdist(verts[hull.vertices]).max())
    # Principal axes of the voxel centres (mm): 4 sqrt(eigenvalue) of their (unbiased, N - 1) covariance, as IBSI.
    points = geometry.coords * np.asarray(sampling)
    eigen = np.sort(np.clip(np.linalg.eigvalsh(np.cov(points.T)), 0.0, None))[::-1]
    major, minor, least = (4.0 * np.sqrt(e) for e in eigen)
    extent = verts.max(axis=0) - verts.min(axis=0)
    box_area = 2.0 * (extent[0] * extent[1] + extent[1] * extent[2] + extent[0] * extent[2])
    return np.array(
        [
            volume,
            voxel_volume,
            area,
            area / volume,
            volume / (np.sqrt(np.pi) * area**1.5),
            36.0 * np.pi * volume**2 / area**3,
            area / sphere,
            sphere / area,
            area / sphere - 1.0,
            diameter,
            major,
            minor,
            least,
            np.sqrt(eigen[1] / eigen[0]),  # eigen[0] > 0: at least two distinct voxels
            np.sqrt(eigen[2] / eigen[0]),
            volume / float(np.prod(extent)),
            area / box_area,
            volume / hull.volume,
            area / hull.area,
        ]
    )


def _first_order(values: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """IBSI intensity-based statistics (population moments) and the discretised intensities' entropy and uniformity."""
    mean = values.mean()
    centred = values - mean
    var = float(np.mean(centred**2))
    # A constant tumour has no skewness or tail: 0 rather than 0 / 0.
    skew = float(np.mean(centred**3)) / var**1.5 if var > 0 else 0.0
    kurt = float(np.mean(centred**4)) / var**2 - 3.0 if var > 0 else 0.0
    p10, p25, median, p75, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    robust = values[(values >= p10) & (values <= p90)]
    # Two distinct values leave no voxel between the interpolated 10th and 90th percentiles: no central spread.
    robust_mad = float(np.mean(np.abs(robust - robust.mean()))) if robust.size else 0.0
    prob = np.bincount(grey)[1:] / grey.size
    prob = prob[prob > 0]
    return np.array(
        [
            mean,
            np.sqrt(var),
            skew,
            kurt,
            values.min(),
            p10,
            median,
            p90,
            values.max(),
            p75 - p25,
            values.max() - values.min(),
            np.mean(np.abs(centred)),
            robust_mad,
            np.mean(np.abs(values - median)),
            np.sum(values**2),
            np.sqrt(np.mean(values**2)),
            -np.sum(prob * np.log2(prob)),
            np.sum(prob**2),
        ]
    )


def _entropy(p: np.ndarray, axis: tuple[int, ...] | int) -> np.ndarray:
    """-sum p log2 p over `axis`, with 0 log 0 = 0."""
    return -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def _glcm(geometry: _Geometry, grey: np.ndarray, n_grey: int) -> np.ndarray:
    """IBSI GLCM features, one symmetric matrix per direction, averaged over the directions that hold a pair."""
    g = grey - 1
    code = geometry.pair_dir * n_grey * n_grey + g[geometry.pair_a] * n_grey + g[geometry.pair_b]
    counts = np.bincount(code, minlength=len(_DIRECTIONS) * n_grey * n_grey).reshape(-1, n_grey, n_grey).astype(np.float64)
    counts = counts + counts.transpose(0, 2, 1)
    totals = counts.sum(axis=(1, 2))
    counts = counts[totals > 0]  # a flat mask has no pairs across its slices: those directions are skipped
    if len(counts) == 0:
        raise RadiomicsError("no two voxels of the tumour mask are neighbours", "check the mask: it is scattered single voxels")
    p = counts / counts.sum(axis=(1, 2), keepdims=True)
    levels = np.arange(1, n_grey + 1, dtype=np.float64)
    i, j = levels[:, None], levels[None, :]
    diff = np.abs(i - j).astype(np.int64)
    total = (i + j).astype(np.int64) - 2
    p_flat = p.reshape(len(p), -1)
    p_minus = np.stack([np.bincount(diff.ravel(), weights=row, minlength=n_grey) for row in p_flat])  # k = 0..Ng-1
    p_plus = np.stack([np.bincount(total.ravel(), weights=row, minlength=2 * n_grey - 1) for row in p_flat])  # k = 2..2Ng
    k = np.arange(n_grey, dtype=np.float64)
    s = np.arange(2, 2 * n_grey + 1, dtype=np.float64)
    p_i = p.sum(axis=2)  # marginal; the matrix is symmetric, so both marginals are equal
    mu = p_i @ levels
    var = p_i @ levels**2 - mu**2
    var = np.clip(var, 0.0, None)
    d_mean = p_minus @ k
    s_mean = p_plus @ s
    joint_entropy = _entropy(p, axis=(1, 2))
    h_x = _entropy(p_i, axis=1)
    outer = p_i[:, :, None] * p_i[:, None, :]
    log_outer = np.log2(np.where(outer > 0, outer, 1.0))
    hxy1 = -np.sum(p * log_outer, axis=(1, 2))
    hxy2 = -np.sum(outer * log_outer, axis=(1, 2))
    autocorr = np.sum(p * (i * j)[None], axis=(1, 2))
    cluster = (i + j)[None] - 2 * mu[:, None, None]
    # One grey level along a direction: no variance to correlate, and nothing to inform. Correlation is then 1
    # (each voxel predicts its neighbour exactly), the information correlations 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = np.where(var > 1e-12, (autocorr - mu**2) / np.where(var > 1e-12, var, 1.0), 1.0)
        imc1 = np.where(h_x > 1e-12, (joint_entropy - hxy1) / np.where(h_x > 1e-12, h_x, 1.0), 0.0)
    imc2 = np.sqrt(1.0 - np.exp(-2.0 * np.clip(hxy2 - joint_entropy, 0.0, None)))
    inv_var_weights = np.zeros_like(k)
    inv_var_weights[1:] = 1.0 / k[1:] ** 2
    per_direction = np.stack(
        [
            p.max(axis=(1, 2)),
            mu,
            var,
            joint_entropy,
            d_mean,
            p_minus @ k**2 - d_mean**2,
            _entropy(p_minus, axis=1),
            p_plus @ s**2 - s_mean**2,
            _entropy(p_plus, axis=1),
            np.sum(p**2, axis=(1, 2)),
            p_minus @ k**2,
            p_minus @ (1.0 / (1.0 + k)),
            p_minus @ (1.0 / (1.0 + k / n_grey)),
            p_minus @ (1.0 / (1.0 + k**2)),
            p_minus @ (1.0 / (1.0 + (k / n_grey) ** 2)),
            p_minus @ inv_var_weights,
            correlation,
            autocorr,
            np.sum(p * cluster**3, axis=(1, 2)),
            np.sum(p * cluster**4, axis=(1, 2)),
            imc1,
            imc2,
        ],
        axis=1,
    )
    return per_direction.mean(axis=0)


def _glrlm(geometry: _Geometry, grey: np.ndarray, n_grey: int) -> np.ndarray:
    """IBSI GLRLM features per direction, averaged over the 13 directions."""
    n_dir, n = geometry.ahead.shape
    behind = geometry.behind
    same = (behind >= 0) & (grey[np.where(behind >= 0, behind, 0)] == grey[None, :])
    # Each voxel points to the previous voxel of its run (itself when it starts one); pointer jumping finds every
    # voxel's run start in log2(longest run) steps.
    offset = (np.arange(n_dir) * n)[:, None]
    own = np.arange(n)[None, :] + offset
    head = np.where(same, behind + offset, own).ravel()
    while True:
        jumped = head[head]
        if np.array_equal(jumped, head):
            break
        head = jumped
    lengths = np.bincount(head, minlength=n_dir * n)
    starts = np.flatnonzero(head == own.ravel())
    run_dir, run_voxel = np.divmod(starts, n)
    run_len = lengths[starts]
    longest = int(run_len.max())
    code = (run_dir * n_grey + grey[run_voxel] - 1) * longest + run_len - 1
    counts = np.bincount(code, minlength=n_dir * n_grey * longest).reshape(n_dir, n_grey, longest)
    return _size_features(counts.astype(np.float64), np.arange(1, longest + 1, dtype=np.float64), geometry.n).mean(axis=0)


def _glszm(geometry: _Geometry, grey: np.ndarray, n_grey: int) -> np.ndarray:
    """IBSI GLSZM features: zones are 26-connected voxels of one grey level."""
    volume = np.zeros(geometry.roi.shape, dtype=np.int64)
    volume[tuple(geometry.coords.T)] = grey
    structure = np.ones((3, 3, 3), dtype=bool)
    zone_level, zone_size = [], []
    for level in np.unique(grey):
        labels, n_zones = ndimage.label(volume == level, structure=structure)
        sizes = np.bincount(labels.ravel(), minlength=n_zones + 1)[1:]
        zone_level.append(np.full(n_zones, level))
        zone_size.append(sizes)
    levels, sizes_all = np.concatenate(zone_level), np.concatenate(zone_size)
    sizes, column = np.unique(sizes_all, return_inverse=True)
    counts = np.bincount((levels - 1) * len(sizes) + column, minlength=n_grey * len(sizes)).reshape(1, n_grey, len(sizes))
    return _size_features(counts.astype(np.float64), sizes.astype(np.float64), geometry.n)[0]


def _size_features(counts: np.ndarray, sizes: np.ndarray, n_voxels: int) -> np.ndarray:
    """The 16 IBSI features shared by the GLRLM and GLSZM of counts ``(M, Ng, S)`` (grey level x run length or zone
    size); `sizes` are the lengths or sizes of the S columns. Returns ``(M, 16)``."""
    n_grey = counts.shape[1]
    i = np.arange(1, n_grey + 1, dtype=np.float64)[None, :, None]
    j = sizes[None, None, :]
    n_s = counts.sum(axis=(1, 2))
    p = counts / n_s[:, None, None]
    by_level = p.sum(axis=2)
    by_size = p.sum(axis=1)
    mu_i = np.sum(p * i, axis=(1, 2))
    mu_j = np.sum(p * j, axis=(1, 2))
    return np.stack(
        [
            np.sum(p / j**2, axis=(1, 2)),
            np.sum(p * j**2, axis=(1, 2)),
            np.sum(p / i**2, axis=(1, 2)),
            np.sum(p * i**2, axis=(1, 2)),
            np.sum(p / (i**2 * j**2), axis=(1, 2)),
            np.sum(p * i**2 / j**2, axis=(1, 2)),
            np.sum(p * j**2 / i**2, axis=(1, 2)),
            np.sum(p * i**2 * j**2, axis=(1, 2)),
            np.sum(by_level**2, axis=1) * n_s,
            np.sum(by_level**2, axis=1),
            np.sum(by_size**2, axis=1) * n_s,
            np.sum(by_size**2, axis=1),
            n_s / n_voxels,
            np.sum(p * (i - mu_i[:, None, None]) ** 2, axis=(1, 2)),
            np.sum(p * (j - mu_j[:, None, None]) ** 2, axis=(1, 2)),
            _entropy(p, axis=(1, 2)),
        ],
        axis=1,
    )


def _shell(roi: np.ndarray, sampling: tuple[float, ...], shell_mm: float) -> np.ndarray:
    """Voxels outside the tumour within `shell_mm` of it (centre to centre, mm)."""
    if roi.all():
        raise RadiomicsError(
            "the tumour fills the whole box: no liver around it to compare with",
            "preprocess with large_tumour = 'rescale' so the box keeps a margin around the tumour",
        )
    distance = ndimage.distance_transform_edt(~roi, sampling=sampling)
    shell = (~roi) & (distance <= shell_mm)
    if not shell.any():
        raise RadiomicsError(f"no voxel lies within shell_mm = {shell_mm} mm of the tumour", "use a shell_mm of at least one voxel size")
    return shell


def _shell_contrast(tumour: np.ndarray, shell: np.ndarray) -> np.ndarray:
    """Tumour against the liver shell (not IBSI): shell mean and SD, mean and median differences, and the shares of
    tumour voxels brighter than the shell's upper quartile and darker than its lower quartile."""
    q25, median, q75 = np.percentile(shell, [25, 50, 75])
    return np.array(
        [
            shell.mean(),
            shell.std(),
            tumour.mean() - shell.mean(),
            np.median(tumour) - median,
            np.mean(tumour > q75),
            np.mean(tumour < q25),
        ]
    )


# -- model inputs ---------------------------------------------------------------------------------------------------
#: Bump when what `model_features` returns changes: the site's cache of model features is keyed by it.
MODEL_FEATURES_VERSION = 1
#: Per-channel families the radiomics model and the DLTRMLP fusion head read, beside every shape feature: the
#: intensity distribution in the tumour and the tumour against the liver around it (what radiologists read as
#: enhancement, washout and necrosis). The texture matrices add some 160 correlated features that a few hundred
#: patients cannot weigh (docs/training.md, "Quality": measured on the panel).
MODEL_FAMILIES: tuple[str, ...] = ("firstorder", "shell")


def model_feature_index(channels: int) -> np.ndarray:
    """Positions in `extract`'s vector of the features the models read (`MODEL_FAMILIES`, every shape feature)."""
    names = feature_names(channels)
    wanted = [i for i, n in enumerate(names) if n.startswith("shape_") or n.split("_", 1)[1].split("_", 1)[0] in MODEL_FAMILIES]
    return np.array(wanted, dtype=int)


def model_feature_names(channels: Sequence[str]) -> list[str]:
    names = feature_names(channels)
    return [names[i] for i in model_feature_index(len(channels))]


def model_inputs(features: np.ndarray, channels: int) -> np.ndarray:
    """The models' radiomics inputs from `extract` vectors ``(N, F)``: the `MODEL_FAMILIES` subset, signed-log."""
    return signed_log(np.asarray(features, dtype=np.float64)[:, model_feature_index(channels)])


def signed_log(x: np.ndarray) -> np.ndarray:
    """``sign(x) log(1 + |x|)``: a fixed, data-free compression of heavy tails (volumes in mm3, energies) to scales a
    linear model can weigh; monotone, so it keeps every feature's ranking."""
    return np.sign(x) * np.log1p(np.abs(x))
