"""Preprocessing: shapes, invariance to orientation / spacing / file format, padding, large tumours, config."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from tace.common.errors import ConfigError, ImageReadError
from tace.common.imageio import read_image, write_image
from tace.common.manifest import parse_manifest
from tace.common.preprocess import PreprocessConfig, preprocess_images, preprocess_record
from tace.simulation.phantom import Acquisition, Anatomy, TumourSpec, render
from tests.conftest import TINY_CONFIG

CONFIG = PreprocessConfig(spacing_mm=(2.0, 2.0, 3.0), box_voxels=(32, 32, 20))


def patient(diameter: float = 40.0, acq: Acquisition | None = None, fov_shift=(0.0, 0.0, 0.0)):
    tumour = TumourSpec(
        centre=(-50.0, 5.0, 0.0),
        radii=(diameter / 2, diameter / 2.3, diameter / 2.5),
        aphe=0.8,
        washout=0.4,
        necrosis=0.3,
        capsule=0.6,
        heterogeneity=0.2,
        texture_seed=3,
    )
    anatomy = Anatomy(
        body_centre=(0.0, 0.0), body_radii=(160.0, 120.0), liver_centre=(-55.0, 5.0, 0.0), liver_radii=(95.0, 75.0, 80.0),
        liver_shape_seed=1, vessels=(((-50.0, 0.0, 0.0), (0.0, 0.6, 0.8), 4.0),), aorta=(15.0, 45.0, 10.0), tumours=(tumour,),
    )  # fmt: skip
    acq = acq or Acquisition(spacing=(1.8, 1.8, 4.0), size=(96, 96, 36))
    images, mask = render(anatomy, acq, np.array([-40.0, 0.0, 0.0]) + np.array(fov_shift), seed=5)
    return images, mask


def run(images, mask, config=CONFIG):
    return preprocess_images(images, mask, config)


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (PreprocessConfig(), (3, 32, 48, 48)),
        (PreprocessConfig(box_voxels=(16, 24, 8)), (3, 8, 24, 16)),
        (PreprocessConfig(sequences=("arterial",), box_voxels=(8, 8, 8)), (1, 8, 8, 8)),
        (PreprocessConfig(sequences=("delayed", "arterial"), spacing_mm=(1, 1, 1), box_voxels=(20, 20, 20)), (2, 20, 20, 20)),
    ],
)
def test_shape_table(config, shape):
    images, mask = patient()
    array, info = run(images, mask, config)
    assert config.shape == shape == array.shape and array.dtype == np.float32
    assert np.isfinite(array).all()


def test_normalised_per_phase_and_channel_order():
    images, mask = patient()
    boxed, _ = run(images, mask, replace(CONFIG, intensity_reference="box"))
    for c in range(3):
        assert abs(boxed[c].mean()) < 1e-4 and abs(boxed[c].std() - 1) < 1e-3
    array, _ = run(images, mask)
    assert CONFIG.intensity_reference == "liver"
    swapped, _ = run(
        images,
        mask,
        PreprocessConfig(sequences=("delayed", "portal_venous", "arterial"), spacing_mm=CONFIG.spacing_mm, box_voxels=CONFIG.box_voxels),
    )
    np.testing.assert_array_equal(swapped, array[::-1])


def _apply(images, mask, fn):
    return {k: fn(v) for k, v in images.items()}, fn(mask)


@pytest.mark.parametrize(
    "transform",
    [
        lambda im: sitk.Flip(im, [True, False, False]),
        lambda im: sitk.Flip(im, [True, True, True]),
        lambda im: sitk.PermuteAxes(im, [1, 0, 2]),
        lambda im: sitk.DICOMOrient(im, "RAS"),
    ],
    ids=["flip-x", "flip-xyz", "permute-xy", "ras"],
)
def test_orientation_invariance(transform):
    images, mask = patient()
    ref, _ = run(images, mask)
    moved, _ = run(*_apply(images, mask, transform))
    np.testing.assert_allclose(moved, ref, atol=1e-4)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ""], ids=["nifti", "nrrd", "meta", "dicom"])
def test_format_invariance(tmp_path, suffix):
    images, mask = patient()
    ref, _ = run(images, mask)
    back = {}
    for name, image in images.items():
        write_image(image, tmp_path / f"{name}{suffix}")
        back[name] = read_image(tmp_path / f"{name}{suffix}")
    write_image(mask, tmp_path / "mask.nii.gz")
    out, _ = run(back, read_image(tmp_path / "mask.nii.gz"))
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_spacing_invariance():
    """The same patient stored at half the in-plane spacing: same tensor up to interpolation error.

    Tolerance (docs/preprocessing.md): correlation >= 0.995 and mean absolute difference <= 0.06 SD per phase.
    """
    images, mask = patient()
    ref, _ = run(images, mask)

    def finer(im: sitk.Image, interp=sitk.sitkLinear) -> sitk.Image:
        spacing = (im.GetSpacing()[0] / 2, im.GetSpacing()[1] / 2, im.GetSpacing()[2])
        size = [im.GetSize()[0] * 2, im.GetSize()[1] * 2, im.GetSize()[2]]
        origin = im.TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, 0))
        return sitk.Resample(im, size, sitk.Transform(), interp, origin, spacing, im.GetDirection(), 0, im.GetPixelID())

    out, _ = run({k: finer(v) for k, v in images.items()}, finer(mask, sitk.sitkNearestNeighbor))
    for c in range(3):
        assert np.corrcoef(out[c].ravel(), ref[c].ravel())[0, 1] >= 0.995
        assert np.abs(out[c] - ref[c]).mean() <= 0.06


def test_box_outside_the_scan_is_zero_padded():
    acq = Acquisition(spacing=(1.8, 1.8, 4.0), size=(64, 64, 30))
    images, mask = patient(acq=acq, fov_shift=(20.0, 0.0, 0.0))  # tumour near the -x edge of the field of view
    config = PreprocessConfig(spacing_mm=(2, 2, 3), box_voxels=(40, 24, 16), intensity_reference="box")
    array, _ = run(images, mask, config)
    assert np.all(array[:, :, :, 0] == 0)  # the first x columns lie outside the scan
    inside = array[0] != 0
    assert abs(array[0][inside].mean()) < 1e-3 and abs(array[0][inside].std() - 1) < 1e-2
    # Against the liver: the padding is 0 too, and the liver around the tumour (in the scan) is at 0.
    liver, info = run(images, mask, replace(config, intensity_reference="liver"))
    assert np.all(liver[:, :, :, 0] == 0)
    from tace.common.preprocess import reference_region

    tumour = info.tumour.astype(bool)
    region = reference_region(tumour, info.spacing_mm, np.isfinite(liver[0]) & (liver[0] != 0))
    assert abs(float(np.median(liver[0][region]))) < 0.02


def test_large_tumour_crop_or_rescale():
    images, mask = patient(diameter=110.0, acq=Acquisition(spacing=(2.5, 2.5, 5.0), size=(96, 96, 40)))
    small = dict(spacing_mm=(2.0, 2.0, 3.0), box_voxels=(24, 24, 16))
    cropped, info = run(images, mask, PreprocessConfig(**small))
    assert info.cropped and info.scale == 1.0
    rescaled, info2 = run(images, mask, PreprocessConfig(**small, large_tumour="rescale"))
    assert not info2.cropped and info2.scale > 2
    assert cropped.shape == rescaled.shape
    _, small_info = run(*patient(diameter=20.0), PreprocessConfig(**small, large_tumour="rescale"))
    assert small_info.scale == 1.0 and not small_info.cropped


def test_tumour_is_centred():
    images, mask = patient()
    grid_mask, _ = preprocess_images(
        {"arterial": sitk.Cast(mask, sitk.sitkFloat32)},
        mask,
        PreprocessConfig(sequences=("arterial",), spacing_mm=(2, 2, 3), box_voxels=(32, 32, 20)),
    )
    inside = grid_mask[0] > grid_mask[0].mean()
    centre = np.array(np.nonzero(inside)).mean(axis=1)
    np.testing.assert_allclose(centre, np.array([20, 32, 32]) / 2 - 0.5, atol=1.0)


def test_preprocess_record_from_disk(tiny_cohort):
    manifest = parse_manifest(tiny_cohort / "sites/site-d/manifest.csv")
    array, _ = preprocess_record(manifest.records[0], manifest.root, TINY_CONFIG)
    assert array.shape == TINY_CONFIG.shape
    with pytest.raises(ImageReadError, match="t2_path"):
        preprocess_record(manifest.records[0], manifest.root, PreprocessConfig(sequences=("arterial", "t2")))


def test_config_errors_name_the_key_and_list_valid_ones():
    with pytest.raises(ConfigError) as info:
        PreprocessConfig.from_mapping({"box-voxel": [8, 8, 8]})
    assert "box-voxel" in str(info.value) and "box-voxels" in str(info.value) and "spacing-mm" in str(info.value)
    assert PreprocessConfig.from_mapping({"box-voxels": [8, 8, 8], "large_tumour": "rescale"}).shape == (3, 8, 8, 8)
    with pytest.raises(ConfigError, match="valid sequences"):
        PreprocessConfig(sequences=("flair",))
    with pytest.raises(ConfigError, match="crop"):
        PreprocessConfig(large_tumour="shrink")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PreprocessConfig(spacing_mm=(0.0, 1.0, 1.0))


def _ball_patient(radius_mm: float, gain: float, aphe: float = 0.75, size=(40, 40, 40)):
    """Liver of intensity 100·gain everywhere (with a little noise), a ball of `radius_mm` at the centre enhancing
    `aphe` above it in the first phase, 40 % below it in the others; 2 mm isotropic voxels."""
    rng = np.random.default_rng(0)
    z, y, x = np.indices(size[::-1])
    centre = (np.array(size[::-1]) - 1) / 2
    ball = (((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) * 4.0) <= radius_mm**2
    images = {}
    for seq, factor in (("arterial", 1 + aphe), ("portal_venous", 0.6), ("delayed", 0.6)):
        values = 100.0 * gain * np.where(ball, factor, 1.0) * (1 + 0.02 * rng.normal(size=ball.shape))
        image = sitk.GetImageFromArray(values.astype(np.float32))
        image.SetSpacing((2.0, 2.0, 2.0))
        images[seq] = image
    mask = sitk.GetImageFromArray(ball.astype(np.uint8))
    mask.SetSpacing((2.0, 2.0, 2.0))
    return images, mask, ball


LIVER = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), box_voxels=(40, 40, 40), intensity_reference="liver")


@pytest.mark.parametrize("radius_mm", [6.0, 15.0, 30.0])
@pytest.mark.parametrize("gain", [0.5, 40.0])
def test_liver_reference_keeps_the_enhancement_ratio_whatever_the_gain_and_the_tumour_size(radius_mm, gain):
    images, mask, ball = _ball_patient(radius_mm, gain)
    array, _ = preprocess_images(images, mask, LIVER)
    # The surrounding liver is 0, the tumour its ratio to the liver minus 1, in every phase.
    for phase, expected in ((0, 0.75), (1, -0.4), (2, -0.4)):
        assert abs(float(np.median(array[phase][~ball]))) < 0.01
        assert float(np.median(array[phase][ball])) == pytest.approx(expected, abs=0.03)


def test_box_z_score_confounds_size_with_enhancement_and_the_liver_reference_does_not():
    (*small, small_ball), (*large, large_ball) = _ball_patient(6.0, 1.0), _ball_patient(30.0, 1.0)
    liver_small = float(np.median(preprocess_images(*small, LIVER)[0][0][small_ball]))
    liver_large = float(np.median(preprocess_images(*large, LIVER)[0][0][large_ball]))
    assert liver_small == pytest.approx(liver_large, abs=0.03)
    box = replace(LIVER, intensity_reference="box")
    box_small = float(np.median(preprocess_images(*small, box)[0][0][small_ball]))
    box_large = float(np.median(preprocess_images(*large, box)[0][0][large_ball]))
    assert abs(box_small - box_large) > 0.5  # the same 75 % enhancement, inputs 0.9 SD apart


def test_liver_reference_falls_back_when_the_tumour_fills_the_box_or_the_image_is_not_a_magnitude():
    from tace.common.preprocess import MIN_REFERENCE_VOXELS, normalise, normalise_to_reference, reference_region

    inside = np.ones((6, 6, 6), dtype=bool)
    full = np.ones((6, 6, 6), dtype=bool)
    assert reference_region(full, (2.0, 2.0, 2.0), inside).all()  # no tissue outside the tumour: every voxel
    nearly = full.copy()
    nearly[0] = False  # 36 voxels outside the tumour, none 3 mm away
    assert MIN_REFERENCE_VOXELS > 36 and reference_region(nearly, (2.0, 2.0, 2.0), inside).all()
    # A phase whose reference is not positive (a subtraction image, a phase map) is z-scored instead.
    rng = np.random.default_rng(1)
    values = rng.normal(size=(6, 6, 6)).astype(np.float32) - 5.0
    np.testing.assert_array_equal(normalise_to_reference(values, inside, 0.5, 99.5), normalise(values, 0.5, 99.5))
    # Voxels outside the scan stay 0 and out of the reference.
    values = np.full((6, 6, 6), 100.0, dtype=np.float32)
    values[0] = np.nan
    out = normalise_to_reference(values, inside, 0.5, 99.5)
    assert np.isfinite(out).all() and np.abs(out).max() < 1e-6


def test_intensity_reference_is_part_of_the_configuration_and_checked():
    assert PreprocessConfig(intensity_reference="box").fingerprint() != PreprocessConfig(intensity_reference="liver").fingerprint()
    with pytest.raises(ConfigError, match="intensity_reference must be 'liver' or 'box'"):
        PreprocessConfig(intensity_reference="tumour")  # type: ignore[arg-type]
    assert PreprocessConfig.from_mapping({"intensity-reference": "box"}).intensity_reference == "box"
