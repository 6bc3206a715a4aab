"""Preprocessing: shapes, invariance to orientation / spacing / file format, padding, large tumours, config."""

from __future__ import annotations

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
    array, _ = run(images, mask)
    for c in range(3):
        assert abs(array[c].mean()) < 1e-4 and abs(array[c].std() - 1) < 1e-3
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
    array, _ = run(images, mask, PreprocessConfig(spacing_mm=(2, 2, 3), box_voxels=(40, 24, 16)))
    assert np.all(array[:, :, :, 0] == 0)  # the first x columns lie outside the scan
    inside = array[0] != 0
    assert abs(array[0][inside].mean()) < 1e-3 and abs(array[0][inside].std() - 1) < 1e-2


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
