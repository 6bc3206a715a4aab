"""Radiomics features: every IBSI feature against the IBSI digital phantom's reference values, a larger anisotropic
volume against PyRadiomics, names, invariances, degenerate tumours and the tumour-to-liver contrast."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tace.common.errors import ConfigError, TaceError
from tace.common.preprocess import PreprocessConfig, box_grid, preprocess_images, tumour_bounds
from tace.common.radiomics import (
    CHANNEL_FEATURES,
    FEATURE_NAMES,
    IBSI_IDS,
    SHAPE_FEATURES,
    RadiomicsError,
    RadiomicsSettings,
    extract,
    feature_names,
)
from tace.simulation.phantom import Acquisition, Anatomy, TumourSpec, render

DATA = Path(__file__).resolve().parent / "data"
#: The digital phantom needs no discretisation; both IBSI algorithms leave its grey levels 1..6 as they are.
PHANTOM_SETTINGS = {
    "fixed bin number": RadiomicsSettings(discretisation="bin_number", bin_number=6),
    "fixed bin size": RadiomicsSettings(discretisation="bin_width", bin_width=1.0, bin_origin=1.0),
}


def load_phantom() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    data = json.loads((DATA / "ibsi" / "digital_phantom.json").read_text())
    return np.array(data["image"], dtype=np.float32)[None], np.array(data["mask"], dtype=np.uint8), tuple(data["spacing_mm_xyz"])


def load_reference() -> dict[str, dict[str, str]]:
    with open(DATA / "ibsi" / "digital_phantom_reference.csv", newline="", encoding="utf-8") as fh:
        return {row["key"]: row for row in csv.DictReader(fh)}


def ibsi_tolerance(row: dict[str, str]) -> float:
    """IBSI's tolerance where it gives one; else the value is exact to the 3 significant digits it is reported with."""
    if row["tolerance"]:
        return float(row["tolerance"])
    value = abs(float(row["value"]))
    return 0.5 * 10 ** (np.floor(np.log10(value)) - 2) if value else 1e-12


def phantom_features(settings: RadiomicsSettings) -> dict[str, float]:
    image, mask, spacing = load_phantom()
    values = extract(image, mask, spacing, settings)
    return {name.removeprefix("c0_"): float(v) for name, v in zip(feature_names(1), values, strict=True)}


def reference_row(name: str, by_id: dict[str, dict[str, str]], by_key: dict[str, dict[str, str]]) -> dict[str, str] | None:
    if name == "glszm_small_zone_emphasis":  # IBSI feature without an identifier in the manual's source
        return by_key["szm_small_zone_emphasis"]
    if name == "firstorder_sd":
        return by_id["ECT3"]  # compared as its square, IBSI's intensity variance
    return by_id.get(IBSI_IDS[name]) if IBSI_IDS[name] else None


@pytest.mark.parametrize("settings", PHANTOM_SETTINGS.values(), ids=PHANTOM_SETTINGS.keys())
def test_every_ibsi_feature_matches_the_digital_phantom(settings: RadiomicsSettings) -> None:
    by_key = load_reference()
    by_id = {row["ibsi_id"]: row for row in by_key.values() if row["ibsi_id"]}
    features = phantom_features(settings)
    compared, failures = [], []
    for name, value in features.items():
        row = reference_row(name, by_id, by_key)
        if row is None:
            assert name.startswith("shell_"), f"{name} has no IBSI reference and is not a documented non-IBSI feature"
            continue
        value = value**2 if name == "firstorder_sd" else value
        expected, tol = float(row["value"]), ibsi_tolerance(row)
        compared.append(name)
        if not abs(value - expected) <= tol * (1 + 1e-9):
            failures.append(f"{name} ({row['ibsi_id']} {row['name']}): {value:.6g}, IBSI {expected:g} +- {tol:g}")
    assert not failures, "\n".join(failures)
    # Every shape, first-order and texture feature was compared; only the non-IBSI shell group was not.
    assert len(compared) == len(FEATURE_NAMES) - sum(n.startswith("shell_") for n in CHANNEL_FEATURES) == 91


def test_the_left_out_glcm_duplicates_match_ibsi_through_their_identities() -> None:
    """Sum average, dissimilarity and cluster tendency are not in the vector: on a symmetric GLCM they equal
    2 x joint average, difference average and sum variance. The identities hold on IBSI's own values."""
    by_id = {row["ibsi_id"]: row for row in load_reference().values() if row["ibsi_id"]}
    f = phantom_features(PHANTOM_SETTINGS["fixed bin number"])
    for value, ibsi_id in ((2 * f["glcm_joint_average"], "ZGXS"), (f["glcm_difference_average"], "8S9J"), (f["glcm_sum_variance"], "DG8W")):
        assert abs(value - float(by_id[ibsi_id]["value"])) <= ibsi_tolerance(by_id[ibsi_id])


# PyRadiomics' name of each feature it shares with us: all but the shell group and 8 shape features it does not compute
# (compactness 1 and 2, spherical disproportion, asphericity, the bounding-box and convex-hull densities).
PYRADIOMICS = {
    "shape_volume_mesh": "shape_MeshVolume", "shape_volume_voxels": "shape_VoxelVolume", "shape_surface_area": "shape_SurfaceArea",
    "shape_surface_volume_ratio": "shape_SurfaceVolumeRatio", "shape_sphericity": "shape_Sphericity",
    "shape_max_3d_diameter": "shape_Maximum3DDiameter", "shape_major_axis_length": "shape_MajorAxisLength",
    "shape_minor_axis_length": "shape_MinorAxisLength", "shape_least_axis_length": "shape_LeastAxisLength",
    "shape_elongation": "shape_Elongation", "shape_flatness": "shape_Flatness",
    "firstorder_mean": "firstorder_Mean", "firstorder_sd": "firstorder_Variance", "firstorder_skewness": "firstorder_Skewness",
    "firstorder_kurtosis": "firstorder_Kurtosis", "firstorder_minimum": "firstorder_Minimum", "firstorder_p10": "firstorder_10Percentile",
    "firstorder_median": "firstorder_Median", "firstorder_p90": "firstorder_90Percentile", "firstorder_maximum": "firstorder_Maximum",
    "firstorder_iqr": "firstorder_InterquartileRange", "firstorder_range": "firstorder_Range",
    "firstorder_mean_absolute_deviation": "firstorder_MeanAbsoluteDeviation",
    "firstorder_robust_mean_absolute_deviation": "firstorder_RobustMeanAbsoluteDeviation", "firstorder_energy": "firstorder_Energy",
    "firstorder_root_mean_square": "firstorder_RootMeanSquared", "firstorder_entropy": "firstorder_Entropy",
    "firstorder_uniformity": "firstorder_Uniformity",
    "glcm_joint_maximum": "glcm_MaximumProbability", "glcm_joint_average": "glcm_JointAverage", "glcm_joint_variance": "glcm_SumSquares",
    "glcm_joint_entropy": "glcm_JointEntropy", "glcm_difference_average": "glcm_DifferenceAverage",
    "glcm_difference_variance": "glcm_DifferenceVariance", "glcm_difference_entropy": "glcm_DifferenceEntropy",
    "glcm_sum_variance": "glcm_ClusterTendency", "glcm_sum_entropy": "glcm_SumEntropy", "glcm_angular_second_moment": "glcm_JointEnergy",
    "glcm_contrast": "glcm_Contrast", "glcm_inverse_difference": "glcm_Id", "glcm_inverse_difference_normalised": "glcm_Idn",
    "glcm_inverse_difference_moment": "glcm_Idm", "glcm_inverse_difference_moment_normalised": "glcm_Idmn",
    "glcm_inverse_variance": "glcm_InverseVariance", "glcm_correlation": "glcm_Correlation", "glcm_autocorrelation": "glcm_Autocorrelation",
    "glcm_cluster_shade": "glcm_ClusterShade", "glcm_cluster_prominence": "glcm_ClusterProminence",
    "glcm_information_correlation_1": "glcm_Imc1", "glcm_information_correlation_2": "glcm_Imc2",
    "glrlm_short_run_emphasis": "glrlm_ShortRunEmphasis", "glrlm_long_run_emphasis": "glrlm_LongRunEmphasis",
    "glrlm_low_grey_level_run_emphasis": "glrlm_LowGrayLevelRunEmphasis", "glrlm_high_grey_level_run_emphasis": "glrlm_HighGrayLevelRunEmphasis",
    "glrlm_short_run_low_grey_level_emphasis": "glrlm_ShortRunLowGrayLevelEmphasis",
    "glrlm_short_run_high_grey_level_emphasis": "glrlm_ShortRunHighGrayLevelEmphasis",
    "glrlm_long_run_low_grey_level_emphasis": "glrlm_LongRunLowGrayLevelEmphasis",
    "glrlm_long_run_high_grey_level_emphasis": "glrlm_LongRunHighGrayLevelEmphasis",
    "glrlm_grey_level_non_uniformity": "glrlm_GrayLevelNonUniformity",
    "glrlm_grey_level_non_uniformity_normalised": "glrlm_GrayLevelNonUniformityNormalized",
    "glrlm_run_length_non_uniformity": "glrlm_RunLengthNonUniformity",
    "glrlm_run_length_non_uniformity_normalised": "glrlm_RunLengthNonUniformityNormalized", "glrlm_run_percentage": "glrlm_RunPercentage",
    "glrlm_grey_level_variance": "glrlm_GrayLevelVariance", "glrlm_run_length_variance": "glrlm_RunVariance",
    "glrlm_run_entropy": "glrlm_RunEntropy",
    "glszm_small_zone_emphasis": "glszm_SmallAreaEmphasis", "glszm_large_zone_emphasis": "glszm_LargeAreaEmphasis",
    "glszm_low_grey_level_zone_emphasis": "glszm_LowGrayLevelZoneEmphasis", "glszm_high_grey_level_zone_emphasis": "glszm_HighGrayLevelZoneEmphasis",
    "glszm_small_zone_low_grey_level_emphasis": "glszm_SmallAreaLowGrayLevelEmphasis",
    "glszm_small_zone_high_grey_level_emphasis": "glszm_SmallAreaHighGrayLevelEmphasis",
    "glszm_large_zone_low_grey_level_emphasis": "glszm_LargeAreaLowGrayLevelEmphasis",
    "glszm_large_zone_high_grey_level_emphasis": "glszm_LargeAreaHighGrayLevelEmphasis",
    "glszm_grey_level_non_uniformity": "glszm_GrayLevelNonUniformity",
    "glszm_grey_level_non_uniformity_normalised": "glszm_GrayLevelNonUniformityNormalized",
    "glszm_zone_size_non_uniformity": "glszm_SizeZoneNonUniformity",
    "glszm_zone_size_non_uniformity_normalised": "glszm_SizeZoneNonUniformityNormalized", "glszm_zone_percentage": "glszm_ZonePercentage",
    "glszm_grey_level_variance": "glszm_GrayLevelVariance", "glszm_zone_size_variance": "glszm_ZoneVariance",
    "glszm_zone_size_entropy": "glszm_ZoneEntropy",
}  # fmt: skip


def test_an_anisotropic_tumour_agrees_with_pyradiomics() -> None:
    """A 1373-voxel lobulated tumour on 1.5 x 2 x 3 mm voxels (an axis mix-up would show), 32 bins: PyRadiomics
    3.0.1's values (tests/reference/pyradiomics_golden.py) agree within 1e-6 relative, after its conventions:
    variance for SD, kurtosis not excess, principal axes from the N (not N - 1, as IBSI) covariance."""
    image, mask = np.load(DATA / "radiomics" / "volume_image.npy"), np.load(DATA / "radiomics" / "volume_mask.npy")
    golden = json.loads((DATA / "radiomics" / "pyradiomics_values.json").read_text())
    reference = golden["values"]
    values = extract(image[None], mask, tuple(golden["_meta"]["spacing_xyz"]), RadiomicsSettings(bin_number=32))
    ours = {name.removeprefix("c0_"): float(v) for name, v in zip(feature_names(1), values, strict=True)}
    n = int(mask.sum())
    failures = []
    for name, theirs_name in PYRADIOMICS.items():
        value = ours[name]
        value = value**2 if name == "firstorder_sd" else value
        value = value + 3.0 if name == "firstorder_kurtosis" else value
        value = value * np.sqrt((n - 1) / n) if name.endswith("axis_length") else value
        if not np.isclose(value, reference[theirs_name], rtol=1e-6, atol=1e-9):
            failures.append(f"{name}: {value:.9g}, PyRadiomics {theirs_name} {reference[theirs_name]:.9g}")
    assert not failures, "\n".join(failures)


def test_names_are_stable_and_match_the_vector() -> None:
    assert FEATURE_NAMES == SHAPE_FEATURES + CHANNEL_FEATURES
    assert set(IBSI_IDS) == set(FEATURE_NAMES) and len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert (len(SHAPE_FEATURES), len(CHANNEL_FEATURES)) == (19, 78)
    names = feature_names(("arterial", "portal_venous", "delayed"))
    assert names[:19] == list(SHAPE_FEATURES) and names[19] == "arterial_firstorder_mean" and names[-1] == "delayed_shell_darker_fraction"
    assert feature_names(2)[19 + 78] == "c1_firstorder_mean" and len(feature_names(2)) == 19 + 2 * 78
    image, mask = tumour_box(seed=1)
    values = extract(image, mask, (2.0, 2.0, 3.0))
    assert values.shape == (len(feature_names(3)),) and values.dtype == np.float64 and np.isfinite(values).all()
    assert np.array_equal(values, extract(image, mask, (2.0, 2.0, 3.0)))  # deterministic


def tumour_box(seed: int, shape=(24, 32, 32), channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A small box with a smooth random texture and an ellipsoidal tumour off the box centre, its 10 mm shell
    inside the box (on 2 x 2 x 3 mm voxels)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    image = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 1.2) for _ in range(channels)]).astype(np.float32)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    mask = ((zz - 11) / 5.0) ** 2 + ((yy - 15) / 7.0) ** 2 + ((xx - 16) / 6.0) ** 2 <= 1.0
    return image, mask.astype(np.uint8)


def test_invariant_to_flips_axis_swaps_translation_and_fbn_intensity_scale() -> None:
    """With equal in-plane spacing, flipping and swapping y and x leave every feature unchanged (the 13 directions
    and the mesh map onto themselves); so does moving the tumour in the box; and fixed-bin-number texture does not
    see an affine intensity change (first-order features do, as they should)."""
    image, mask = tumour_box(seed=2)
    spacing = (2.0, 2.0, 3.0)
    base = extract(image, mask, spacing)
    flipped = extract(image[:, ::-1, ::-1, :], mask[::-1, ::-1, :], spacing)
    swapped = extract(image.transpose(0, 1, 3, 2), mask.transpose(0, 2, 1), spacing)
    moved = extract(np.roll(image, (2, -3, 1), axis=(1, 2, 3)), np.roll(mask, (2, -3, 1), axis=(0, 1, 2)), spacing)
    for other in (flipped, swapped, moved):
        np.testing.assert_allclose(other, base, rtol=1e-9, atol=1e-9)
    scaled = extract(image * np.float32(4.0) + np.float32(8.0), mask, spacing)
    names = feature_names(3)
    texture = np.array([n.split("_", 2)[1] in ("glcm", "glrlm", "glszm") or n.endswith(("_entropy", "_uniformity")) for n in names])
    np.testing.assert_allclose(scaled[texture], base[texture], rtol=1e-9, atol=1e-9)
    assert scaled[names.index("c0_firstorder_mean")] == pytest.approx(4 * base[names.index("c0_firstorder_mean")] + 8, rel=1e-6)


def test_spacing_is_x_y_z_and_shape_is_in_millimetres() -> None:
    """A 10-voxel rod along x (the last array axis): 3 mm voxels along x make it 30 mm long, along z only 2 mm wide."""
    image = np.zeros((1, 6, 6, 14), dtype=np.float32)
    mask = np.zeros((6, 6, 14), dtype=np.uint8)
    mask[2:4, 2:4, 2:12] = 1
    image[0][mask > 0] = np.arange(40) % 3
    long_x = dict(zip(feature_names(1), extract(image, mask, (3.0, 1.0, 1.0)), strict=True))
    long_z = dict(zip(feature_names(1), extract(image, mask, (1.0, 1.0, 3.0)), strict=True))
    assert long_x["shape_volume_voxels"] == long_z["shape_volume_voxels"] == 40 * 3.0
    assert long_x["shape_major_axis_length"] > 2.5 * long_z["shape_major_axis_length"]
    assert 30.0 <= long_x["shape_max_3d_diameter"] <= 31.0  # the mesh spans 10 x 3 mm, and the rod's width adds
    assert long_z["shape_elongation"] > long_x["shape_elongation"]


def test_an_empty_or_tiny_mask_is_refused_clearly() -> None:
    image, mask = tumour_box(seed=3)
    with pytest.raises(RadiomicsError, match="empty") as err:
        extract(image, np.zeros_like(mask), (2.0, 2.0, 3.0))
    assert isinstance(err.value, TaceError) and "mask_label" in err.value.hint
    single = np.zeros_like(mask)
    single[11, 15, 16] = 1
    with pytest.raises(RadiomicsError, match="1 voxel"):
        extract(image, single, (2.0, 2.0, 3.0))
    with pytest.raises(RadiomicsError, match="1 voxel"):  # a single voxel has no texture or axes, whatever the setting
        extract(image, single, (2.0, 2.0, 3.0), RadiomicsSettings(min_voxels=2))
    scattered = np.zeros_like(mask)
    scattered[2, 2, 2] = scattered[11, 15, 16] = 1
    with pytest.raises(RadiomicsError, match="neighbours"):
        extract(image, scattered, (2.0, 2.0, 3.0), RadiomicsSettings(min_voxels=2))


def test_two_voxels_and_a_single_slice_give_defined_values() -> None:
    image, mask = tumour_box(seed=4)
    pair = np.zeros_like(mask)
    pair[11, 15, 16:18] = 1
    values = extract(image, pair, (2.0, 2.0, 3.0), RadiomicsSettings(min_voxels=2))
    assert np.isfinite(values).all()
    flat = np.zeros_like(mask)
    flat[11] = mask[11]  # one slice: no voxel pairs across slices, those directions are left out of the average
    assert np.isfinite(extract(image, flat, (2.0, 2.0, 3.0))).all()


def test_a_constant_tumour_gives_the_documented_values_not_nan() -> None:
    image, mask = tumour_box(seed=5, channels=1)
    image[0][mask > 0] = 0.7
    for settings in (RadiomicsSettings(), RadiomicsSettings(discretisation="bin_width")):
        f = dict(zip(feature_names(1), extract(image, mask, (2.0, 2.0, 3.0), settings), strict=True))
        assert np.isfinite(list(f.values())).all()
        assert (f["c0_firstorder_sd"], f["c0_firstorder_skewness"], f["c0_firstorder_kurtosis"]) == (0.0, 0.0, 0.0)
        assert (f["c0_firstorder_entropy"], f["c0_firstorder_uniformity"]) == (0.0, 1.0)
        assert (f["c0_glcm_correlation"], f["c0_glcm_information_correlation_1"], f["c0_glcm_information_correlation_2"]) == (1.0, 0.0, 0.0)
        assert (f["c0_glcm_contrast"], f["c0_glcm_joint_entropy"], f["c0_glcm_angular_second_moment"]) == (0.0, 0.0, 1.0)
        assert f["c0_glszm_grey_level_variance"] == pytest.approx(0.0, abs=1e-12) == f["c0_glrlm_grey_level_variance"]
    # Fixed bin number puts a constant tumour in the top bin, as IBSI's formula does for the maximum.
    f = dict(zip(feature_names(1), extract(image, mask, (2.0, 2.0, 3.0), RadiomicsSettings(bin_number=16)), strict=True))
    assert f["c0_glcm_joint_average"] == 16.0


def test_bad_input_is_refused_with_what_to_do() -> None:
    image, mask = tumour_box(seed=6)
    with pytest.raises(RadiomicsError, match="do not agree"):
        extract(image, mask[:-1], (2.0, 2.0, 3.0))
    with pytest.raises(RadiomicsError, match="spacing_mm"):
        extract(image, mask, (2.0, 0.0, 3.0))
    broken = image.copy()
    broken[1, 11, 15, 16] = np.nan
    with pytest.raises(RadiomicsError, match="NaN"):
        extract(broken, mask, (2.0, 2.0, 3.0))
    with pytest.raises(RadiomicsError, match="fills the whole box") as err:
        extract(image, np.ones_like(mask), (2.0, 2.0, 3.0))
    assert "rescale" in err.value.hint


@pytest.mark.parametrize(
    "kwargs",
    [
        {"discretisation": "lloyd"},
        {"bin_number": 1},
        {"bin_number": 8.5},
        {"bin_width": 0.0},
        {"bin_origin": float("nan")},
        {"shell_mm": -1.0},
        {"min_voxels": 1},
    ],
)
def test_settings_are_validated(kwargs) -> None:
    with pytest.raises(ConfigError):
        RadiomicsSettings(**kwargs)


def test_shell_contrast_reads_enhancement_and_washout() -> None:
    """Not IBSI: a tumour 2 SD brighter than a flat liver has contrast 2 and all its voxels brighter; darker, the
    reverse; the shell is the liver within shell_mm of the tumour only."""
    image, mask = tumour_box(seed=7, channels=2)
    image[:] = 0.0
    image[0][mask > 0] = 2.0
    image[1][mask > 0] = -1.0
    image[:, :, :, :2] = 50.0  # far from the tumour (more than 10 mm): outside the shell
    f = dict(zip(feature_names(("arterial", "delayed")), extract(image, mask, (2.0, 2.0, 3.0)), strict=True))
    assert (f["arterial_shell_mean"], f["arterial_shell_sd"]) == (0.0, 0.0)
    assert (f["arterial_shell_contrast_mean"], f["arterial_shell_contrast_median"]) == (2.0, 2.0)
    assert (f["arterial_shell_brighter_fraction"], f["arterial_shell_darker_fraction"]) == (1.0, 0.0)
    assert (f["delayed_shell_contrast_mean"], f["delayed_shell_brighter_fraction"], f["delayed_shell_darker_fraction"]) == (-1.0, 0.0, 1.0)


def rendered_patient(aphe: float, washout: float) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A generated patient through the project's preprocessing: its network-input box and the mask on that box."""
    tumour = TumourSpec(centre=(-50.0, 5.0, 0.0), radii=(17.0, 15.0, 14.0), aphe=aphe, washout=washout, necrosis=0.2, capsule=0.5,
                        heterogeneity=0.2, texture_seed=3)  # fmt: skip
    anatomy = Anatomy(
        body_centre=(0.0, 0.0), body_radii=(160.0, 120.0), liver_centre=(-55.0, 5.0, 0.0), liver_radii=(95.0, 75.0, 80.0),
        liver_shape_seed=1, vessels=(((-50.0, 0.0, 0.0), (0.0, 0.6, 0.8), 4.0),), aorta=(15.0, 45.0, 10.0), tumours=(tumour,),
    )  # fmt: skip
    images, mask = render(anatomy, Acquisition(spacing=(1.8, 1.8, 4.0), size=(96, 96, 36)), np.array([-40.0, 0.0, 0.0]), seed=5)
    config = PreprocessConfig()
    box, _ = preprocess_images(images, mask, config)
    grid, _ = box_grid(*tumour_bounds(mask), config)  # as tace.common.preprocess.box_mask does for a manifest row
    on_box = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return box, sitk.GetArrayFromImage(on_box), grid.GetSpacing()


def test_a_preprocessed_patient_shows_hyperenhancement_and_washout() -> None:
    names = feature_names(PreprocessConfig().sequences)
    typical = dict(zip(names, extract(*rendered_patient(aphe=0.8, washout=0.4)), strict=True))
    assert np.isfinite(list(typical.values())).all()
    # The phases are expressed against the liver (ratio minus 1): a tumour enhancing 80 % above the liver, with a
    # necrotic core, is on average about 60 % brighter than the tissue around it, and 40 % washout leaves it darker.
    assert typical["arterial_shell_contrast_mean"] > 0.4 and typical["arterial_shell_brighter_fraction"] > 0.5
    assert typical["delayed_shell_contrast_mean"] < -0.2 and typical["delayed_shell_darker_fraction"] > 0.5
    assert 0.75 < typical["shape_sphericity"] <= 1.0
    flat = dict(zip(names, extract(*rendered_patient(aphe=0.0, washout=0.0)), strict=True))
    assert abs(flat["arterial_shell_contrast_mean"]) < 0.1 and abs(flat["delayed_shell_contrast_mean"]) < 0.1
    assert flat["arterial_shell_contrast_mean"] < typical["arterial_shell_contrast_mean"] - 0.4
    assert flat["delayed_shell_contrast_mean"] > typical["delayed_shell_contrast_mean"] + 0.2
