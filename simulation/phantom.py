"""Rendering synthetic multi-phase liver MRI: anatomy defined in physical space, sampled on a scanner's grid.

Anatomy (body, liver, vessels, tumours) is a set of analytic shapes in LPS millimetres, so the same patient can
be rendered on any grid (spacing, field of view, orientation) and still be the same patient. Tumour appearance
per phase follows the phenotype in `TumourSpec`; the scanner adds a bias field, Rician noise and its own
intensity scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

PHASES = ("arterial", "portal_venous", "delayed")

# Relative signal per phase of each tissue (liver parenchyma in the arterial phase = 1).
TISSUE = {
    "air": (0.02, 0.02, 0.02),
    "body": (0.75, 0.85, 0.85),
    "liver": (1.0, 1.35, 1.25),
    "aorta": (3.2, 1.8, 1.4),
    "portal": (1.1, 2.3, 1.6),
    "necrosis": (0.35, 0.38, 0.40),
}


@dataclass(frozen=True)
class Acquisition:
    """A centre's scanner protocol: grid, orientation, intensity scale, noise and bias field, file format."""

    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    intensity_scale: float = 1000.0
    noise_sd: float = 0.04
    bias_strength: float = 0.15
    table_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fmt: str = "nii.gz"


@dataclass(frozen=True)
class TumourSpec:
    """One tumour: position and radii (mm) and its phenotype.

    aphe : arterial-phase hyperenhancement, fraction above liver. washout : portal/delayed hypointensity
    (fraction below liver). necrosis : radius fraction of the non-enhancing core. capsule : delayed-phase rim
    enhancement. heterogeneity : amplitude of internal texture.
    """

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    aphe: float
    washout: float
    necrosis: float
    capsule: float
    heterogeneity: float
    lobulation: float = 0.08
    texture_seed: int = 0


@dataclass(frozen=True)
class Anatomy:
    """The patient: body cylinder, liver, vessels and tumours (the first tumour is the target)."""

    body_centre: tuple[float, float]
    body_radii: tuple[float, float]
    liver_centre: tuple[float, float, float]
    liver_radii: tuple[float, float, float]
    liver_shape_seed: int
    vessels: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...]
    aorta: tuple[float, float, float]
    tumours: tuple[TumourSpec, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Grid:
    """A scanner's voxel grid in LPS millimetres: voxel (ix, iy, iz) lies at ``origin + axes @ (ix, iy, iz)``.

    Coordinates are affine in the indices, so a plane wave ``cos(k . p)`` factors over the axes; `waves` uses this
    to evaluate smooth random fields without a transcendental per voxel and wave.
    """

    origin: np.ndarray  # (3,) position of voxel (0, 0, 0)
    axes: np.ndarray  # (3, 3): column j is the step of index j (x, y, z), direction times spacing
    size: tuple[int, int, int]  # (nx, ny, nz)

    @classmethod
    def of(cls, acq: Acquisition, centre: np.ndarray) -> Grid:
        """The acquisition's grid centred on `centre`."""
        size = np.array(acq.size)
        axes = np.array(acq.direction, dtype=float).reshape(3, 3) * np.array(acq.spacing, dtype=float)[None, :]
        return cls(np.asarray(centre, dtype=float) - axes @ ((size - 1) / 2), axes, (int(size[0]), int(size[1]), int(size[2])))

    def full(self) -> Box:
        return (slice(0, self.size[2]), slice(0, self.size[1]), slice(0, self.size[0]))

    def box_around(self, lower: np.ndarray, upper: np.ndarray) -> Box | None:
        """The index box (z, y, x slices) holding the world-space box [lower, upper]; None when outside the grid."""
        corners = np.array([[lo if bit == "0" else hi for lo, hi, bit in zip(lower, upper, f"{c:03b}", strict=True)] for c in range(8)])
        idx = np.linalg.solve(self.axes, (corners - self.origin).T)  # (3, 8): x, y, z indices of the corners
        lo = np.maximum(np.floor(idx.min(axis=1)).astype(int), 0)
        hi = np.minimum(np.ceil(idx.max(axis=1)).astype(int) + 1, np.array(self.size))
        if np.any(hi <= lo):
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

    def coords(self, box: Box) -> np.ndarray:
        """World coordinates (3, z, y, x) of the voxel centres in `box` (float32)."""
        iz, iy, ix = (np.arange(b.start, b.stop, dtype=float) for b in box)
        pts = (self.origin[:, None, None, None] + self.axes[:, 0, None, None, None] * ix[None, None, None, :]
               + self.axes[:, 1, None, None, None] * iy[None, None, :, None] + self.axes[:, 2, None, None, None] * iz[None, :, None, None])  # fmt: skip
        return pts.astype(np.float32)


Box = tuple[slice, slice, slice]


def grid_points(acq: Acquisition, centre: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Coordinates (3, z, y, x) of the voxel centres of a grid centred on `centre`, and the origin to write."""
    grid = Grid.of(acq, centre)
    # The scanner's own coordinate frame is shifted by its table offset: anatomy and mask move together.
    written = grid.origin + np.array(acq.table_offset_mm)
    return grid.coords(grid.full()), (float(written[0]), float(written[1]), float(written[2]))


def _soft(inside: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator from a signed 'inside' distance (positive inside), mimicking partial-volume edges."""
    return 1.0 / (1.0 + np.exp(-np.clip(inside / width, -30, 30)))


def waves(grid: Grid, box: Box, seed: int, n: int, wavelength: tuple[float, float]) -> np.ndarray:
    """A smooth random field (sum of `n` plane waves of random direction, wavelength and phase), roughly unit
    variance, over the voxels of `box`.

    ``k . p`` is affine in the voxel indices, so each wave is ``cos(a(z, y) + b(x)) = cos a cos b - sin a sin b``:
    two outer products instead of a cosine per voxel. The sum runs in a fixed order without BLAS, so the field is
    the same whatever the number of threads or processes.
    """
    rng = np.random.default_rng(seed)
    iz, iy, ix = (np.arange(b.start, b.stop, dtype=float) for b in box)
    out = np.zeros((len(iz), len(iy), len(ix)), dtype=np.float32)
    for _ in range(n):
        v = rng.normal(size=3)
        k = v * 2 * np.pi / rng.uniform(*wavelength) / np.linalg.norm(v)
        step = k @ grid.axes  # the phase change per x, y and z index
        a = float(k @ grid.origin) + rng.uniform(0, 2 * np.pi) + step[2] * iz[:, None] + step[1] * iy[None, :]
        b = step[0] * ix
        out += np.cos(a).astype(np.float32)[:, :, None] * np.cos(b).astype(np.float32)[None, None, :]
        out -= np.sin(a).astype(np.float32)[:, :, None] * np.sin(b).astype(np.float32)[None, None, :]
    return out * np.float32(np.sqrt(2.0 / n))


#: Normalised radius beyond which a tumour contributes nothing (its soft edge is below 1e-13 there).
_TUMOUR_REACH = 2.6


def _tumour_radius(pts: np.ndarray, grid: Grid, box: Box, t: TumourSpec) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the surface), lobulated by a low-frequency field, over `box`."""
    rel = (pts - np.array(t.centre, dtype=np.float32)[:, None, None, None]) / np.array(t.radii, dtype=np.float32)[:, None, None, None]
    r = np.sqrt((rel**2).sum(axis=0))
    return r * (1 + t.lobulation * waves(grid, box, t.texture_seed + 1, 3, (30.0, 60.0)))


def _tumour(signal: list[np.ndarray], grid: Grid, t: TumourSpec) -> tuple[Box, np.ndarray] | None:
    """Paint one tumour into the phases' `signal` (in place) within its reach; returns its box and normalised radius
    there (None when it lies outside the grid)."""
    centre, radii = np.array(t.centre), np.array(t.radii)
    box = grid.box_around(centre - _TUMOUR_REACH * radii, centre + _TUMOUR_REACH * radii)
    if box is None:
        return None
    pts = grid.coords(box)
    r = _tumour_radius(pts, grid, box, t)
    inside = _soft(1 - r, 0.04)
    core = _soft(t.necrosis - r, 0.04) if t.necrosis > 0 else np.zeros_like(r)
    rim_width = 2.5 / float(np.mean(t.radii))  # a ~2.5 mm capsule, in normalised-radius units
    rim = np.exp(-(((r - 1.0) / rim_width) ** 2)) * t.capsule
    texture = 1 + t.heterogeneity * waves(grid, box, t.texture_seed, 14, (5.0, 25.0))
    liver_sig = [TISSUE["liver"][p] for p in range(3)]
    tumour_sig = [
        liver_sig[0] * (1 + t.aphe) * texture,
        liver_sig[1] * (1 - 0.5 * t.washout) * texture,
        liver_sig[2] * (1 - t.washout) * texture + 0.6 * rim,
    ]
    for p in range(3):
        sig = tumour_sig[p] * (1 - core) + TISSUE["necrosis"][p] * core
        signal[p][box] = signal[p][box] * (1 - inside) + sig * inside
    return box, r


def _layer(signal: list[np.ndarray], weight: np.ndarray, tissue: str) -> None:
    """Overwrite `signal` (in place) with `tissue` where `weight` (a soft indicator) says so."""
    for p in range(3):
        signal[p] = signal[p] * (1 - weight) + np.float32(TISSUE[tissue][p]) * weight


def _background(anatomy: Anatomy, grid: Grid, pts: np.ndarray) -> list[np.ndarray]:
    """Per phase, the signal of air, body, liver, aorta and vessels; later structures overwrite earlier ones."""
    bx, by = anatomy.body_centre
    ra, rb = anatomy.body_radii
    body = _soft(1 - np.sqrt(((pts[0] - bx) / ra) ** 2 + ((pts[1] - by) / rb) ** 2), 0.01)
    centre, radii = (np.array(v, dtype=np.float32)[:, None, None, None] for v in (anatomy.liver_centre, anatomy.liver_radii))
    lrel = (pts - centre) / radii
    lr = np.sqrt((lrel**2).sum(axis=0)) * (1 + 0.07 * waves(grid, grid.full(), anatomy.liver_shape_seed, 4, (80.0, 160.0)))
    liver = _soft(1 - lr, 0.02) * body
    signal = [np.full(pts.shape[1:], TISSUE["air"][p], dtype=np.float32) for p in range(3)]
    _layer(signal, body, "body")
    _layer(signal, liver, "liver")
    ax, ay, ar = anatomy.aorta
    _layer(signal, _soft(ar - np.sqrt((pts[0] - ax) ** 2 + (pts[1] - ay) ** 2), 1.0), "aorta")
    for start, direction, radius in anatomy.vessels:
        s, v = np.array(start, dtype=np.float32)[:, None, None, None], np.array(direction, dtype=np.float32)[:, None, None, None]
        rel = pts - s
        along = (rel * v).sum(axis=0)
        dist = np.sqrt(np.maximum((rel**2).sum(axis=0) - along**2, 0))
        _layer(signal, _soft(radius - dist, 0.8) * liver, "portal")
    return signal


def render(anatomy: Anatomy, acq: Acquisition, fov_centre: np.ndarray, seed: int) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """Render the three contrast phases and the target-tumour mask on the acquisition's grid.

    Returns images as int16 SimpleITK images (scaled by the centre's intensity scale) and a uint8 mask.
    """
    rng = np.random.default_rng(seed)
    grid = Grid.of(acq, fov_centre)
    written = grid.origin + np.array(acq.table_offset_mm)
    origin = (float(written[0]), float(written[1]), float(written[2]))
    pts = grid.coords(grid.full())
    signal = _background(anatomy, grid, pts)
    mask = np.zeros(pts.shape[1:], dtype=np.uint8)
    for i, t in enumerate(anatomy.tumours):
        painted = _tumour(signal, grid, t)
        if i == 0 and painted is not None:
            box, r = painted
            mask[box] = r < 1.0
            if not mask.any():  # a tumour smaller than a voxel: a reader would still mark the voxel holding it
                mask[box].flat[int(np.argmin(r))] = 1
    # Scanner: smooth multiplicative bias field, Rician noise, intensity scale, int16 storage.
    centred = (pts - np.asarray(fov_centre, dtype=np.float32)[:, None, None, None]) / np.float32(150.0)
    coeff = rng.normal(size=4).astype(np.float32)
    bias = np.exp(
        acq.bias_strength * (coeff[0] * centred[0] + coeff[1] * centred[1] + coeff[2] * centred[2] + coeff[3] * centred[0] * centred[1])
    )
    images = {}
    for p, name in enumerate(PHASES):
        clean = signal[p] * bias
        real = clean + np.float32(acq.noise_sd) * rng.standard_normal(clean.shape, dtype=np.float32)
        imag = np.float32(acq.noise_sd) * rng.standard_normal(clean.shape, dtype=np.float32)
        noisy = np.sqrt(real**2 + imag**2)
        images[name] = _to_image(np.clip(noisy * np.float32(acq.intensity_scale), 0, 32767).astype(np.int16), acq, origin)
    return images, _to_image(mask, acq, origin)


def _to_image(array: np.ndarray, acq: Acquisition, origin: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in acq.spacing))
    image.SetDirection(tuple(float(d) for d in acq.direction))
    image.SetOrigin(origin)
    return image
