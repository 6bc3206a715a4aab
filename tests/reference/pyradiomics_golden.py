"""Cross-check volume for tace.common.radiomics and PyRadiomics' values for it (tests/data/radiomics/).

Run twice, from the repository root:

    .venv/bin/python tests/reference/pyradiomics_golden.py volume
    PYRAD_PYTHON tests/reference/pyradiomics_golden.py values

The first writes ``volume_image.npy`` and ``volume_mask.npy`` (numpy and scipy only; the spacing is `SPACING_XYZ`). The second needs PyRadiomics, which does not install into
the project's environment (its sdist needs numpy at build time: ``pip install numpy SimpleITK scipy`` in a separate
virtual environment, then ``pip install --no-build-isolation pyradiomics``); it writes ``pyradiomics_values.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "radiomics"
SPACING_XYZ = (1.5, 2.0, 3.0)  # anisotropic on every axis, so a swapped axis shows


def make_volume() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(20261129)
    shape = (16, 18, 20)  # z, y, x
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    # A lobulated ellipsoid (mm), off-centre, with a smooth random surface.
    pz, py, px = (zz - 7.5) * SPACING_XYZ[2], (yy - 9.0) * SPACING_XYZ[1], (xx - 10.5) * SPACING_XYZ[0]
    radius = np.sqrt((px / 12.0) ** 2 + (py / 14.0) ** 2 + (pz / 18.0) ** 2)
    bumps = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    mask = (radius + 0.8 * bumps) < 1.0
    # Texture: smooth noise, an enhancing rim and a darker core, as an MRI phase z-scored over a box.
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) * 3.0
    image = 1.5 + texture + 1.2 * np.exp(-(((radius - 0.85) / 0.15) ** 2)) - 1.5 * np.exp(-((radius / 0.4) ** 2))
    np.save(OUT / "volume_image.npy", image.astype(np.float32))
    np.save(OUT / "volume_mask.npy", mask.astype(np.uint8))
    print(f"{int(mask.sum())} voxels in the mask")


def pyradiomics_values() -> None:
    import radiomics
    import SimpleITK as sitk
    from radiomics import featureextractor

    image = sitk.GetImageFromArray(np.load(OUT / "volume_image.npy").astype(np.float64))
    mask = sitk.GetImageFromArray(np.load(OUT / "volume_mask.npy"))
    for img in (image, mask):
        img.SetSpacing(SPACING_XYZ)
    settings = {"binCount": 32, "force2D": False, "symmetricalGLCM": True, "distances": [1], "additionalInfo": False, "label": 1}
    extractor = featureextractor.RadiomicsFeatureExtractor(**settings)
    extractor.disableAllFeatures()
    for name in ("shape", "firstorder", "glcm", "glrlm", "glszm"):
        extractor.enableFeatureClassByName(name)
    result = extractor.execute(image, mask)
    values = {k.removeprefix("original_"): float(v) for k, v in result.items() if k.startswith("original_")}
    meta = {"pyradiomics": radiomics.__version__, "numpy": np.__version__, "settings": settings, "spacing_xyz": SPACING_XYZ}
    (OUT / "pyradiomics_values.json").write_text(json.dumps({"_meta": meta, "values": values}, indent=1, sort_keys=True) + "\n")
    print(f"{len(values)} values")


if __name__ == "__main__":
    {"volume": make_volume, "values": pyradiomics_values}[sys.argv[1]]()
