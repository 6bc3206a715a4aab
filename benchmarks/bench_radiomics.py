"""Benchmark of the radiomics extractor (tace.common.radiomics) on the network-input box.

Usage:
    python benchmarks/bench_radiomics.py [--repeats 5] [--diameters 15,30,50,80,110]

Generated patients (tace.simulation.phantom, one per tumour diameter in mm) go through the project's preprocessing
onto the default 48 x 48 x 32 box of 2 x 2 x 3 mm (three phases; a 110 mm tumour is cut at the box edge, as
``large_tumour = crop`` does), then `extract` runs on each box and its mask. Prints, per patient, the tumour's
voxels on the box and the median extraction time over the repeats, and the throughput over all patients.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk

from tace.common.preprocess import PreprocessConfig, box_grid, preprocess_images, tumour_bounds
from tace.common.radiomics import RadiomicsSettings, extract, feature_names
from tace.simulation.phantom import Acquisition, Anatomy, TumourSpec, render


def patient(diameter: float, config: PreprocessConfig, seed: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A generated patient's box, its tumour mask on the box, and the box spacing (x, y, z), mm."""
    tumour = TumourSpec(
        centre=(-50.0, 5.0, 0.0),
        radii=(diameter / 2, diameter / 2.3, diameter / 2.5),
        aphe=0.8,
        washout=0.4,
        necrosis=0.3,
        capsule=0.6,
        heterogeneity=0.3,
        texture_seed=seed,
    )
    anatomy = Anatomy(
        body_centre=(0.0, 0.0), body_radii=(160.0, 120.0), liver_centre=(-55.0, 5.0, 0.0), liver_radii=(95.0, 75.0, 80.0),
        liver_shape_seed=seed, vessels=(((-50.0, 0.0, 0.0), (0.0, 0.6, 0.8), 4.0),), aorta=(15.0, 45.0, 10.0), tumours=(tumour,),
    )  # fmt: skip
    acq = Acquisition(spacing=(1.5, 1.5, 3.0), size=(128, 128, 48))
    images, mask = render(anatomy, acq, np.array([-40.0, 0.0, 0.0]), seed=seed)
    box, _ = preprocess_images(images, mask, config)
    grid, _ = box_grid(*tumour_bounds(mask), config)
    on_box = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return box, sitk.GetArrayFromImage(on_box), grid.GetSpacing()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--diameters", default="15,30,50,80,110", help="tumour diameters (mm), one patient each")
    args = parser.parse_args()
    config = PreprocessConfig()
    settings = RadiomicsSettings()
    diameters = [float(d) for d in args.diameters.split(",") if d]
    n_features = len(feature_names(config.sequences))
    print(f"box {config.shape} at {config.spacing_mm} mm, {n_features} features, {settings}")
    print(f"{'diameter mm':>12} {'tumour voxels':>14} {'extract ms':>11}")
    total = 0.0
    for i, diameter in enumerate(diameters):
        box, mask, spacing = patient(diameter, config, seed=i + 1)
        extract(box, mask, spacing, settings)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            extract(box, mask, spacing, settings)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        total += median
        print(f"{diameter:>12.0f} {int(mask.sum()):>14d} {1000 * median:>11.1f}")
    print(f"throughput: {len(diameters) / total:.1f} patients/s (median times, one process)")


if __name__ == "__main__":
    main()
