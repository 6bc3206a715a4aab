"""Format round trips: NIfTI, NRRD, MetaImage and DICOM series hold the same voxels and geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from tace.common.errors import ImageReadError
from tace.common.imageio import image_format, inspect_image, read_image, write_image

OBLIQUE = (0.9945, -0.1045, 0.0, 0.1045, 0.9945, 0.0, 0.0, 0.0, 1.0)


def volume(direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)) -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(0, 3000, size=(9, 11, 13)).astype(np.int16))
    image.SetSpacing((1.5, 1.25, 4.0))
    image.SetOrigin((-100.5, 20.25, -600.0))
    image.SetDirection(direction)
    return image


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz", "v.nrrd", "v.mha", "v.mhd", "dicom_series"])
@pytest.mark.parametrize("direction", [(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), OBLIQUE, (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)])
def test_round_trip(tmp_path, name, direction):
    image = volume(direction)
    path = tmp_path / name
    write_image(image, path)
    back = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    # DICOM stores positions as decimal strings (6 decimals here) and NIfTI stores float32 geometry.
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-4)
    info = inspect_image(path, deep=True)
    assert info.size == (13, 11, 9) and info.dimension == 3
    assert info.format == image_format(path)


def test_dicom_needs_right_handed_orientation(tmp_path):
    with pytest.raises(ImageReadError, match="right-handed"):
        write_image(volume((1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)), tmp_path / "series")


def test_unsupported_suffix(tmp_path):
    with pytest.raises(ImageReadError) as info:
        write_image(volume(), tmp_path / "v.png")
    assert info.value.kind == "unsupported-format"
