"""Preprocessing one patient: all phases resampled onto one tumour-centred box, normalised per phase.

The box is defined in physical (LPS) space with identity direction, so a volume's storage orientation, voxel
spacing and file format do not matter: every phase is resampled directly from its own grid onto the box in one
interpolation. Output is a float32 array ``(C, D, H, W)`` = (phases, z, y, x).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from tace.common.dicom import read_mask
from tace.common.errors import ConfigError, ImageReadError
from tace.common.imageio import ImageInfo, image_info, inspect_image, read_checked
from tace.common.manifest import MASK_COLUMN, REQUIRED_SEQUENCES, SEQUENCE_COLUMNS, PatientRecord

#: Bump when the preprocessing code changes what it produces: invalidates every cache entry.
#: 2: NaN/infinite/constant images are refused (version 1 cached them as zeros); DICOM SEG/RTSTRUCT masks.
#: 3: intensities against the liver around the tumour (`intensity_reference`).
PIPELINE_VERSION = 3


INTENSITY_REFERENCES = ("liver", "box")
#: The shell of tissue around the tumour whose median intensity is a phase's reference (``intensity_reference =
#: "liver"``), in mm from the tumour's edge: 3 mm clears the partial-volume edge and a capsule, 15 mm stays close to
#: the tumour (the liver's own bias field and enhancement vary over larger distances).
SHELL_MM = (3.0, 15.0)
#: Fewer in-scan shell voxels than this (a tumour filling the box): the reference is the box's non-tumour voxels.
MIN_REFERENCE_VOXELS = 50


@dataclass(frozen=True)
class PreprocessConfig:
    """How MRI volumes become network input. Every site of a study must use the same configuration.

    Parameters
    ----------
    sequences : tuple of str
        Sequences stacked as channels, in order (``arterial``, ``portal_venous``, ``delayed``, ``t2``, ``dwi``).
    spacing_mm : (x, y, z)
        Voxel spacing of the box, mm.
    box_voxels : (x, y, z)
        Box size in voxels. The tensor is ``(C, z, y, x)``.
    large_tumour : "crop" or "rescale"
        A tumour (plus `margin_mm` on each side) larger than the box: ``crop`` keeps the spacing and cuts the
        tumour at the box edge; ``rescale`` coarsens the spacing of that patient's box uniformly until it fits.
    margin_mm : float
        Context kept around the tumour when deciding whether it fits, mm.
    clip_percentiles : (low, high)
        Per-phase intensity clipping before normalising, computed over the voxels of the box inside the scan.
    intensity_reference : "liver" or "box"
        What each phase's intensities are expressed against. ``liver``: the ratio to the median of the shell of
        tissue 3-15 mm around the tumour (the liver the tumour sits in), minus 1, so that the surrounding liver is 0
        and a tumour enhancing 75 % above it is 0.75 in every patient: the relative signs radiologists read
        (hyperenhancement, washout, capsule) keep their size whatever the scanner's gain, the bias field or how much
        of the box the tumour fills; the clipping range includes the tumour's own percentiles, so a small tumour is
        not clipped away. ``box``: clip to the box's percentiles and z-score over the box (mean 0, SD 1), which
        scales every patient's contrast by the box's own spread (and clips a tumour under 0.5 % of the box).
    """

    sequences: tuple[str, ...] = REQUIRED_SEQUENCES
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 3.0)
    box_voxels: tuple[int, int, int] = (48, 48, 32)
    large_tumour: Literal["crop", "rescale"] = "crop"
    margin_mm: float = 5.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_reference: Literal["liver", "box"] = "liver"

    def __post_init__(self) -> None:
        # Normalise types so that equal configurations have equal fingerprints (2 and 2.0 are the same spacing).
        try:
            object.__setattr__(self, "sequences", tuple(str(s) for s in self.sequences))
            object.__setattr__(self, "spacing_mm", tuple(float(v) for v in self.spacing_mm))
            object.__setattr__(self, "box_voxels", tuple(int(v) for v in self.box_voxels))
            object.__setattr__(self, "margin_mm", float(self.margin_mm))
            object.__setattr__(self, "clip_percentiles", tuple(float(v) for v in self.clip_percentiles))
        except (TypeError, ValueError):
            raise ConfigError("spacing_mm, box_voxels, margin_mm and clip_percentiles must be numbers") from None
        unknown = [s for s in self.sequences if s not in SEQUENCE_COLUMNS]
        if unknown or not self.sequences:
            raise ConfigError(f"unknown sequence(s) {unknown}", f"valid sequences: {', '.join(SEQUENCE_COLUMNS)}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ConfigError("spacing_mm must be three positive numbers (x, y, z) in mm")
        if len(self.box_voxels) != 3 or min(self.box_voxels) < 4:
            raise ConfigError("box_voxels must be three integers >= 4 (x, y, z)")
        if self.large_tumour not in ("crop", "rescale"):
            raise ConfigError(f"large_tumour must be 'crop' or 'rescale', not {self.large_tumour!r}")
        if self.intensity_reference not in INTENSITY_REFERENCES:
            valid = " or ".join(repr(r) for r in INTENSITY_REFERENCES)
            raise ConfigError(f"intensity_reference must be {valid}, not {self.intensity_reference!r}")
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError("clip_percentiles must satisfy 0 <= low < high <= 100")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The output tensor shape ``(C, D, H, W)``."""
        x, y, z = self.box_voxels
        return (len(self.sequences), z, y, x)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def fingerprint(self) -> str:
        """A stable text identity of the configuration and pipeline version (part of the cache key)."""
        return json.dumps({"pipeline": PIPELINE_VERSION, **self.to_dict()}, sort_keys=True)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> PreprocessConfig:
        """Build from a mapping with hyphenated or underscored keys; unknown keys are an error listing valid ones."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(
                    f"unknown preprocessing key {key!r}", "valid keys: " + ", ".join(sorted(f.replace("_", "-") for f in fields))
                )
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


@dataclass(frozen=True)
class PreprocessInfo:
    """What happened to one patient (site-local; never sent anywhere). When the tensor was just computed, also the
    tumour mask on its box (uint8 ``(D, H, W)``) and the box's spacing (x, y, z) in mm, as `box_mask` gives them,
    so that the radiomics features need not read the mask again; a cached tensor comes without them."""

    tumour_extent_mm: tuple[float, float, float]
    cropped: bool
    scale: float
    tumour: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    spacing_mm: tuple[float, float, float] | None = dataclasses.field(default=None, compare=False)


def tumour_corners(mask: sitk.Image) -> np.ndarray:
    """The eight physical (LPS, mm) corners ``(8, 3)`` of the largest connected tumour component's bounding box on
    the mask's own grid (voxel edges, so a one-voxel tumour has the voxel's size)."""
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(binary), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    if not stats.HasLabel(1):
        raise ImageReadError("empty-mask", "tumour mask has no voxel inside the tumour", "segment the target tumour (non-zero inside it)")
    start = np.array(stats.GetBoundingBox(1)[:3], dtype=float)
    size = np.array(stats.GetBoundingBox(1)[3:], dtype=float)
    return np.array([mask.TransformContinuousIndexToPhysicalPoint(tuple(start - 0.5 + size * np.array(c))) for c in np.ndindex(2, 2, 2)])


def tumour_bounds(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS, mm) lower and upper corners of the largest connected tumour component's bounding box."""
    pts = tumour_corners(mask)
    return pts.min(axis=0), pts.max(axis=0)


def box_grid(lower: np.ndarray, upper: np.ndarray, config: PreprocessConfig) -> tuple[sitk.Image, PreprocessInfo]:
    """The reference grid: `config.box_voxels` centred on the tumour, identity direction, maybe rescaled."""
    extent = upper - lower
    spacing = np.array(config.spacing_mm, dtype=float)
    size = np.array(config.box_voxels)
    needed = extent + 2 * config.margin_mm
    ratio = float(np.max(needed / (size * spacing)))
    scale = max(ratio, 1.0) if config.large_tumour == "rescale" else 1.0
    spacing = spacing * scale
    cropped = bool(np.any(extent > size * spacing + 1e-6))
    centre = (lower + upper) / 2
    origin = centre - (size - 1) / 2 * spacing
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetOrigin(tuple(float(o) for o in origin))
    grid.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return grid, PreprocessInfo(tuple(float(e) for e in extent), cropped, scale)  # type: ignore[arg-type]


def normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Percentile-clip then z-score the finite voxels of one phase; voxels outside the scan (NaN) become 0.

    Written by hand because MONAI's NormalizeIntensity cannot exclude the outside-the-scan padding by an
    explicit mask (only by value == 0, which real tissue can take).
    """
    inside = np.isfinite(values)
    out = np.zeros_like(values, dtype=np.float32)
    if not inside.any():
        return out
    v = values[inside]
    lo, hi = np.percentile(v, [low, high])
    v = np.clip(v, lo, hi)
    std = float(v.std())
    out[inside] = (v - v.mean()) / (std if std > 1e-6 else 1.0)
    return out


def reference_region(tumour: np.ndarray, spacing_xyz: tuple[float, float, float], inside: np.ndarray) -> np.ndarray:
    """The voxels of the box whose median intensity is a phase's reference: in-scan tissue `SHELL_MM` from the
    tumour (`tumour`: boolean ``(D, H, W)``), else every in-scan voxel outside the tumour, else every in-scan voxel."""
    return _reference(_shell(tumour, spacing_xyz), tumour, inside)


def _shell(tumour: np.ndarray, spacing_xyz: tuple[float, float, float]) -> np.ndarray:
    """The voxels `SHELL_MM` from the tumour (none when there is no tumour voxel)."""
    from scipy.ndimage import distance_transform_edt

    if not tumour.any():
        return np.zeros_like(tumour, dtype=bool)
    distance = distance_transform_edt(~tumour, sampling=tuple(reversed(spacing_xyz)))
    return (distance > SHELL_MM[0]) & (distance <= SHELL_MM[1])


def _reference(shell: np.ndarray, tumour: np.ndarray, inside: np.ndarray) -> np.ndarray:
    in_shell = shell & inside
    if in_shell.sum() >= MIN_REFERENCE_VOXELS:
        return in_shell
    outside = ~tumour & inside
    return outside if outside.sum() >= MIN_REFERENCE_VOXELS else inside


def normalise_to_reference(
    values: np.ndarray, reference: np.ndarray, low: float, high: float, tumour: np.ndarray | None = None
) -> np.ndarray:
    """Percentile-clip one phase, then express it as the ratio to the median of its `reference` voxels minus 1
    (the reference tissue at 0); voxels outside the scan (NaN) become 0. The clipping range is the box's
    percentiles widened to the `tumour` voxels' own, so that a small tumour (under 0.5 % of the box) is not clipped
    to the liver's range. A phase whose reference median is not positive (not a magnitude image) is z-scored
    instead (`normalise`)."""
    inside = np.isfinite(values)
    out = np.zeros_like(values, dtype=np.float32)
    if not inside.any():
        return out
    lo, hi = np.percentile(values[inside], [low, high])
    if tumour is not None and (tumour & inside).any():
        t_lo, t_hi = np.percentile(values[tumour & inside], [low, high])
        lo, hi = min(lo, t_lo), max(hi, t_hi)
    clipped = np.clip(values, lo, hi)
    region = reference & inside
    level = float(np.median(clipped[region])) if region.any() else 0.0
    if not level > 1e-3 * max(float(hi - lo), abs(float(hi)), 1e-12):
        return normalise(values, low, high)
    out[inside] = clipped[inside] / level - 1.0
    return out


def preprocess_images(images: Mapping[str, sitk.Image], mask: sitk.Image, config: PreprocessConfig) -> tuple[np.ndarray, PreprocessInfo]:
    """Resample the configured sequences onto the tumour box and normalise them.

    Parameters
    ----------
    images : mapping of sequence name to SimpleITK image
    mask : SimpleITK image, non-zero inside the target tumour
    config : PreprocessConfig

    Returns
    -------
    array : np.ndarray, float32, shape ``(C, D, H, W)``
    info : PreprocessInfo
    """
    lower, upper = tumour_bounds(mask)
    grid, info = box_grid(lower, upper, config)
    phases = []
    for seq in config.sequences:
        moving = sitk.Cast(images[seq], sitk.sitkFloat32)
        # NaN marks box voxels outside the scan so they are left out of the intensity statistics.
        resampled = sitk.Resample(moving, grid, sitk.Transform(), sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
        phases.append(sitk.GetArrayFromImage(resampled))
    box_tumour, spacing = _on_grid(mask, grid)
    if config.intensity_reference == "box":
        channels = [normalise(values, *config.clip_percentiles) for values in phases]
    else:
        tumour = box_tumour.astype(bool)
        shell = _shell(tumour, spacing)
        # Each phase against the shell's voxels inside its own scan: a phase's field of view does not move another's.
        channels = [
            normalise_to_reference(values, _reference(shell, tumour, np.isfinite(values)), *config.clip_percentiles, tumour=tumour)
            for values in phases
        ]
    info = dataclasses.replace(info, tumour=box_tumour, spacing_mm=spacing)
    return np.stack(channels).astype(np.float32, copy=False), info


def _on_grid(mask: sitk.Image, grid: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The tumour mask on the box (nearest neighbour, uint8 ``(D, H, W)``) and the box's spacing (x, y, z) in mm."""
    resampled = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    x, y, z = (float(v) for v in grid.GetSpacing())
    return sitk.GetArrayFromImage(resampled), (x, y, z)


def require_sequences(record: PatientRecord, config: PreprocessConfig) -> None:
    """Raise `missing-sequence` if the row lacks an image for a sequence the configuration uses."""
    missing = [s for s in config.sequences if s not in record.images]
    if missing:
        raise ImageReadError(
            "missing-sequence", f"row {record.row} has no {', '.join(SEQUENCE_COLUMNS[s] for s in missing)}",
            "every patient needs each sequence the study's preprocessing uses; fill the column or drop the sequence from the config",
            column=SEQUENCE_COLUMNS[missing[0]],
        )  # fmt: skip


def _read_located(path: Path, column: str, rel: str) -> sitk.Image:
    try:
        return read_checked(path)
    except ImageReadError as exc:
        exc.column, exc.file = column, rel
        raise


def read_record_mask(record: PatientRecord, root: Path, images: Mapping[str, sitk.Image] | None = None) -> sitk.Image:
    """One row's tumour mask in any format the manifest takes (`tace.common.dicom.read_mask`), with its
    `mask_label`; an RTSTRUCT is filled onto the row's images (`images` when already read, else their headers)."""
    grids: list[tuple[str, ImageInfo]] = []
    for seq, rel in record.images.items():
        if images is not None and seq in images:
            grids.append((SEQUENCE_COLUMNS[seq], image_info(images[seq])))
            continue
        try:
            grids.append((SEQUENCE_COLUMNS[seq], inspect_image(root / rel)))
        except ImageReadError:
            continue  # an unreadable phase is reported on its own column
    try:
        return read_mask(record.mask_path(root), record.mask_label, grids)
    except ImageReadError as exc:
        exc.column, exc.file = MASK_COLUMN, record.mask
        raise


def preprocess_record(record: PatientRecord, root: Path, config: PreprocessConfig) -> tuple[np.ndarray, PreprocessInfo]:
    """Read one manifest row's images from disk and preprocess them (see `preprocess_images`).

    A failure raises `ImageReadError` naming the column and file concerned.
    """
    require_sequences(record, config)
    images = {seq: _read_located(record.image_path(seq, root), SEQUENCE_COLUMNS[seq], record.images[seq]) for seq in config.sequences}
    mask = read_record_mask(record, root, images)
    try:
        return preprocess_images(images, mask, config)
    except ImageReadError as exc:
        exc.column, exc.file = exc.column or "mask_path", exc.file or record.mask
        raise


def box_mask(record: PatientRecord, root: Path, config: PreprocessConfig) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The tumour mask on the patient's network-input box: uint8 ``(D, H, W)`` (nearest neighbour), and the box's
    voxel spacing (x, y, z) in mm (larger than the configured one when a large tumour was rescaled)."""
    mask = read_record_mask(record, root)
    grid, _ = box_grid(*tumour_bounds(mask), config)
    return _on_grid(mask, grid)
