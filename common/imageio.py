"""Reading MRI volumes (NIfTI, NRRD, MetaImage, DICOM series) with SimpleITK, and checking they can be trusted.

SimpleITK 2.5 reads a truncated NIfTI without complaint (missing voxels become 0) and turns NaN stored in a
float NIfTI into 0, so `inspect_image` compares the voxel payload a header promises with what the file holds,
and with ``deep=True`` decompresses everything and reads NIfTI float voxels from the raw bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from tace.common.errors import ImageReadError

_PIXEL_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
    sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8,
}  # fmt: skip
_PIXEL_BY_NAME = {sitk.GetPixelIDValueAsString(k): k for k in _PIXEL_BYTES}
# NIfTI datatype codes -> numpy dtype (only those SimpleITK reads as scalars).
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}

_REEXPORT = "re-export the image from PACS or the research archive and check the copy finished"


@dataclass(frozen=True)
class ImageInfo:
    """Header facts about one volume. Sizes and spacings are in SimpleITK order (x, y, z); spacing in mm."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    dimension: int
    components: int
    pixel_type: str
    format: str


def image_info(image: sitk.Image, fmt: str = "") -> ImageInfo:
    """The header facts of an image already in memory."""
    return ImageInfo(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()),
                     image.GetDimension(), image.GetNumberOfComponentsPerPixel(), sitk.GetPixelIDValueAsString(image.GetPixelID()), fmt)  # fmt: skip


def continuous_index(info: ImageInfo, points: np.ndarray) -> np.ndarray:
    """Physical points (LPS mm, ``(n, 3)``) as continuous (x, y, z) voxel indices of the grid `info`."""
    direction = np.array(info.direction, dtype=float).reshape(3, 3)
    return (np.asarray(points, dtype=float) - np.array(info.origin)) @ np.linalg.inv(direction * np.array(info.spacing)).T


def image_format(path: Path) -> str:
    """Name the storage format of `path` ("nifti", "nifti-gz", "nrrd", "meta", "dicom"), or raise."""
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return "nifti-gz"
    if name.endswith(".nii"):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "meta"
    raise ImageReadError(
        "unsupported-format",
        "file type is not supported",
        "use NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd) or a folder with one DICOM series",
    )


def _exists(path: Path) -> None:
    if not path.exists():
        raise ImageReadError("missing-file", "file or folder not found", "check the path and that the export is complete")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ImageReadError(
            "permission-denied", "file or folder cannot be read by this account", "give the account running TACE-FL read access"
        )


def _os_error(exc: OSError) -> ImageReadError:
    if isinstance(exc, PermissionError):
        return ImageReadError(
            "permission-denied", "a file of this image cannot be read by this account", "give the account running TACE-FL read access"
        )
    if isinstance(exc, IsADirectoryError):
        return ImageReadError("unreadable", "a folder stands where a data file is expected", _REEXPORT)
    if isinstance(exc, FileNotFoundError):
        return ImageReadError("missing-file", "a data file of this image is missing", "copy the header's data file next to it")
    return ImageReadError("unreadable", f"file cannot be read ({exc.strerror or exc})", _REEXPORT)


def data_files(path: Path) -> list[Path]:
    """Every file holding `path`'s data: the file itself, plus the detached voxel file of a .nhdr/.mhd header,
    or every file of a DICOM folder."""
    path = Path(path)
    if path.is_dir():
        return sorted(f for f in path.iterdir() if f.is_file())
    name = path.name.lower()
    detached: str | None = None
    if name.endswith(".nhdr"):
        fields, _ = _text_header(path, re.compile(r"^\s*$"))
        detached = fields.get("data file") or fields.get("datafile")
    elif name.endswith(".mhd"):
        fields, _ = _text_header(path, re.compile(r"^\s*ElementDataFile\s*=", re.IGNORECASE))
        detached = fields.get("elementdatafile")
        detached = None if detached and detached.upper() == "LOCAL" else detached
    files = [path]
    if detached and detached.upper() != "LIST":
        files.append(path.parent / detached)
    return files


def dicom_files(folder: Path) -> list[str]:
    """The sorted file names of the single DICOM series in `folder`; raises if there is none or several."""
    reader = sitk.ImageSeriesReader()
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK prints build paths to stderr for non-DICOM files
    try:
        ids = reader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if not ids:
        raise ImageReadError(
            "unreadable", "folder holds no readable DICOM series", "point the manifest at the folder holding the series' .dcm files"
        )
    if len(ids) > 1:
        raise ImageReadError(
            "multiple-series", f"folder holds {len(ids)} DICOM series", "give each series (phase) its own folder and point the manifest at one"
        )  # fmt: skip
    return list(reader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def read_image(path: Path | str) -> sitk.Image:
    """Read a volume (file or DICOM series folder) with SimpleITK; raise `ImageReadError` with a hint on failure."""
    path = Path(path)
    _exists(path)
    fmt = image_format(path)
    try:
        for f in data_files(path):
            _exists(f)
        if fmt == "dicom":
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(dicom_files(path))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageReadError("unreadable", f"image cannot be read ({_itk_reason(exc)})", _REEXPORT) from None
    except OSError as exc:
        raise _os_error(exc) from None
    _check_scalar_3d(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), tuple(image.GetSize()))
    return image


def _itk_reason(exc: RuntimeError) -> str:
    # ITK messages carry source-file paths and line numbers; keep only the description.
    text = str(exc).strip().splitlines()
    desc = [ln for ln in text if ln.strip().lower().startswith("description:")]
    reason = desc[-1].split(":", 1)[1].strip() if desc else (text[-1] if text else "unknown error")
    return reason[:200]


def _check_scalar_3d(dimension: int, components: int, size: tuple[int, ...]) -> None:
    if dimension != 3:
        raise ImageReadError(
            "not-3d", f"image is {dimension}-dimensional, a 3D volume is required",
            "export one 3D volume per phase (split 4D/dynamic series; 2D slices belong in a DICOM series folder)",
        )  # fmt: skip
    if components != 1:
        raise ImageReadError(
            "not-scalar",
            f"image has {components} values per voxel, one is required",
            "export the grey-scale MR image, not a colour rendering",
        )
    if min(size) < 2:
        raise ImageReadError("not-3d", "image has a single slice along one axis", "export the whole 3D volume")


def inspect_image(path: Path | str, deep: bool = False, is_mask: bool = False) -> ImageInfo:
    """Read a volume's header and check the file holds the voxel data it promises.

    Parameters
    ----------
    path : Path or str
        An image file or a DICOM series folder.
    deep : bool
        Also decompress and read every voxel: detects truncated compressed files, non-finite voxels (also those
        SimpleITK silently zeroes in NIfTI) and constant images.
    is_mask : bool
        The volume is a tumour mask: with `deep`, an empty mask (no voxel > 0) is an error, a constant one is not.

    Raises
    ------
    ImageReadError
        The first problem `examine_image` finds, with ``kind`` one of missing-file, unsupported-format, unreadable,
        truncated, not-3d, not-scalar, multiple-series, uneven-slices, non-finite, constant-image, empty-mask.
    """
    examined = examine_image(path, deep, is_mask)
    if examined.problems:
        raise examined.problems[0]
    assert examined.info is not None
    return examined.info


@dataclass
class Examined:
    """Everything `examine_image` found about one volume: its header (None when unreadable), every problem, and
    the voxels when they were read (``deep``)."""

    info: ImageInfo | None
    problems: list[ImageReadError] = field(default_factory=list)
    image: sitk.Image | None = None


def examine_image(path: Path | str, deep: bool = False, is_mask: bool = False) -> Examined:
    """Like `inspect_image`, but listing every problem of the file instead of stopping at the first.

    The header is read first (without it nothing else can be said); then the voxel payload is checked against it
    (truncated, corrupt; with `deep`, NaN stored in a float NIfTI); then, with `deep`, every voxel is read
    (`voxel_problems`). A header that reads is returned even when the voxels have problems, so the caller can still
    compare the file's geometry with the other images of the patient.
    """
    path = Path(path)
    try:
        info = _header_info(path)
    except ImageReadError as exc:
        return Examined(None, [exc])
    except OSError as exc:
        return Examined(None, [_os_error(exc)])
    out = Examined(info)
    try:
        _check_payload(path, info, deep)
    except ImageReadError as exc:
        out.problems.append(exc)
    except OSError as exc:
        out.problems.append(_os_error(exc))
    if deep and not any(p.kind in ("truncated", "corrupt", "unreadable", "missing-file", "permission-denied") for p in out.problems):
        try:
            out.image = read_image(path)
        except ImageReadError as exc:
            out.problems.append(exc)
        else:
            seen = {p.kind for p in out.problems}
            out.problems += [p for p in voxel_problems(sitk.GetArrayViewFromImage(out.image), is_mask) if p.kind not in seen]
    return out


def read_checked(path: Path | str, is_mask: bool = False) -> sitk.Image:
    """Read a volume for preprocessing, refusing what must never reach the cache: a truncated file, NaN or infinite
    voxels (also those SimpleITK turns into 0 in a float NIfTI), a constant image, an empty or multi-label mask.

    Raises the first problem as `ImageReadError` (see `inspect_image` for the kinds).
    """
    path = Path(path)
    try:
        info = _header_info(path)
        _check_payload(path, info, deep=False)
        if info.format in ("nifti", "nifti-gz"):
            _check_nifti_finite(path)
    except OSError as exc:
        raise _os_error(exc) from None
    image = read_image(path)
    problems = voxel_problems(sitk.GetArrayViewFromImage(image), is_mask)
    if problems:
        raise problems[0]
    return image


def voxel_problems(array: np.ndarray, is_mask: bool = False) -> list[ImageReadError]:
    """Every problem of a volume's voxels: non-finite values; for an image, a constant one; for a mask, no voxel
    inside the tumour or more than one label."""
    problems = []
    finite = np.isfinite(array)
    if not finite.all():
        problems.append(_nonfinite())
    values = array[finite] if not finite.all() else array
    if is_mask:
        if not np.any(values > 0):
            problems.append(
                ImageReadError("empty-mask", "tumour mask has no voxel inside the tumour", "segment the target tumour (non-zero inside it)")
            )
        labels = np.unique(values[values != 0])
        if len(labels) > 1:
            problems.append(
                ImageReadError(
                    "multi-label-mask",
                    f"mask holds {len(labels)} different labels; only the target tumour may be non-zero",
                    "export a binary mask of the target tumour (a label map with liver or other lesions would be read as one big tumour)",
                )
            )
    elif values.size == 0 or float(values.min()) == float(values.max()):
        problems.append(ImageReadError("constant-image", "every voxel has the same value", "the export is blank; re-export the image"))
    return problems


def _header_info(path: Path) -> ImageInfo:
    """The header of an image file or DICOM folder, checked to be one 3D scalar volume (raises otherwise)."""
    _exists(path)
    for f in data_files(path):
        _exists(f)
        if f.is_dir():
            raise ImageReadError("unreadable", "a folder stands where a data file is expected", _REEXPORT)
    fmt = image_format(path)
    if fmt == "dicom":
        return _inspect_dicom(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError("unreadable", f"image header cannot be read ({_itk_reason(exc)})", _REEXPORT) from None
    info = ImageInfo(
        size=tuple(reader.GetSize()),
        spacing=tuple(reader.GetSpacing()),
        origin=tuple(reader.GetOrigin()),
        direction=tuple(reader.GetDirection()),
        dimension=reader.GetDimension(),
        components=reader.GetNumberOfComponents(),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        format=fmt,
    )
    _check_scalar_3d(info.dimension, info.components, info.size)
    return info


def _check_payload(path: Path, info: ImageInfo, deep: bool) -> None:
    """The voxel data the header promises is all there (and, with `deep`, decompresses and is finite in NIfTI)."""
    if info.format in ("nifti", "nifti-gz"):
        _check_nifti_payload(path, deep)
    elif info.format == "nrrd":
        _check_nrrd_payload(path, _payload_bytes(info.size, _PIXEL_BY_NAME.get(info.pixel_type, -1)), deep)
    elif info.format == "meta":
        _check_meta_payload(path, _payload_bytes(info.size, _PIXEL_BY_NAME.get(info.pixel_type, -1)), deep)


def _payload_bytes(size: tuple[int, ...], pixel_id: int) -> int:
    if pixel_id not in _PIXEL_BYTES:
        raise ImageReadError("not-scalar", "pixel type is not a scalar number", "export the grey-scale MR image")
    return int(np.prod(size)) * _PIXEL_BYTES[pixel_id]


def _truncated(promised: int, holds: int) -> ImageReadError:
    return ImageReadError(
        "truncated", f"file is truncated: the header promises {promised} bytes of voxel data, the file holds {max(holds, 0)}", _REEXPORT
    )  # fmt: skip


def _gunzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except EOFError:
        raise ImageReadError("truncated", "compressed file ends before its end-of-stream marker", _REEXPORT) from None
    except (OSError, zlib.error) as exc:
        raise ImageReadError("corrupt", f"compressed data is corrupt ({exc})", _REEXPORT) from None


def _nifti_header(head: bytes) -> tuple[str, int, int, tuple[int, ...]]:
    """(endianness, vox_offset, datatype, dims) from the first bytes of a NIfTI-1 or NIfTI-2 file."""
    for end in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(end + "i", head[:4])
        if sizeof_hdr == 348:
            dim = struct.unpack(end + "8h", head[40:56])
            datatype = struct.unpack(end + "h", head[70:72])[0]
            vox_offset = int(struct.unpack(end + "f", head[108:112])[0])
            return end, vox_offset, datatype, tuple(int(d) for d in dim[1 : dim[0] + 1])
        if sizeof_hdr == 540 and len(head) >= 540:
            datatype = struct.unpack(end + "h", head[12:14])[0]
            dim = struct.unpack(end + "8q", head[16:80])
            vox_offset = struct.unpack(end + "q", head[168:176])[0]
            return end, int(vox_offset), datatype, tuple(int(d) for d in dim[1 : dim[0] + 1])
    raise ImageReadError("unreadable", "not a NIfTI file (bad header size field)", _REEXPORT)


def _check_nifti_payload(path: Path, deep: bool) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    # Trust the bytes, not the suffix: a plain NIfTI named .nii.gz is read fine by ITK (zlib passes it through).
    compressed = magic == b"\x1f\x8b"
    if compressed:
        with gzip.open(path, "rb") as fh:
            try:
                head = fh.read(540)
            except (EOFError, OSError, zlib.error):
                raise ImageReadError("truncated", "compressed NIfTI header is damaged", _REEXPORT) from None
    else:
        with open(path, "rb") as fh:
            head = fh.read(540)
    if len(head) < 348:
        raise ImageReadError("truncated", "file is shorter than a NIfTI header", _REEXPORT)
    end, vox_offset, datatype, dims = _nifti_header(head)
    if datatype not in _NIFTI_DTYPES:
        raise ImageReadError("not-scalar", "NIfTI voxel type is not a scalar number", "export the grey-scale MR image")
    itemsize = np.dtype(_NIFTI_DTYPES[datatype]).itemsize
    promised = int(np.prod(dims)) * itemsize
    if not compressed:
        holds = path.stat().st_size - vox_offset
        if holds < promised:
            raise _truncated(promised, holds)
        if deep and datatype in (16, 64):
            raw = np.fromfile(path, dtype=end + _NIFTI_DTYPES[datatype], count=int(np.prod(dims)), offset=vox_offset)
            _raise_if_nonfinite(raw)
        return
    if not deep:
        # A gzip stream ends with the uncompressed length mod 2**32 (ISIZE): cheap and catches a cut-off file.
        with open(path, "rb") as fh:
            fh.seek(-4, 2)
            (isize,) = struct.unpack("<I", fh.read(4))
        if isize == (vox_offset + promised) % 2**32:
            return
    data = _gunzip(path)  # also reached when ISIZE disagrees (e.g. a multi-member gzip): decide on the real length
    holds = len(data) - vox_offset
    if holds < promised:
        raise _truncated(promised, holds)
    if deep and datatype in (16, 64):
        raw = np.frombuffer(data, dtype=end + _NIFTI_DTYPES[datatype], count=int(np.prod(dims)), offset=vox_offset)
        _raise_if_nonfinite(raw)


def _nonfinite() -> ImageReadError:
    return ImageReadError(
        "non-finite", "image holds NaN or infinite voxels", "re-export the image; NaN usually marks a failed reconstruction or conversion"
    )


def _raise_if_nonfinite(raw: np.ndarray) -> None:
    if not np.isfinite(raw).all():
        raise _nonfinite()


def _check_nifti_finite(path: Path) -> None:
    """Raise `non-finite` when a float NIfTI stores NaN or infinite voxels (SimpleITK hands them back as 0).
    Integer NIfTI cannot hold them and is not decompressed."""
    with open(path, "rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    with opener(path, "rb") as fh:
        head = fh.read(540)
    end, vox_offset, datatype, dims = _nifti_header(head)
    if datatype not in (16, 64):
        return
    data = _gunzip(path) if compressed else path.read_bytes()
    _raise_if_nonfinite(np.frombuffer(data, dtype=end + _NIFTI_DTYPES[datatype], count=int(np.prod(dims)), offset=vox_offset))


def _text_header(path: Path, terminator: re.Pattern[str]) -> tuple[dict[str, str], int]:
    """Parse a 'key: value' / 'key = value' text header; return fields and the byte offset where data starts."""
    fields: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as fh:
        for raw in fh:
            offset += len(raw)
            line = raw.decode("latin-1").rstrip("\r\n")
            if terminator.match(line):
                if line.strip():  # MetaImage: the ElementDataFile line is the last header line and belongs to it
                    key, _, value = line.partition("=")
                    fields[key.strip().lower()] = value.strip()
                break
            if line.startswith("#"):
                continue
            key, sep, value = line.partition(":=") if ":=" in line else line.partition(":") if ":" in line else line.partition("=")
            if sep:
                fields[key.strip().lower()] = value.strip()
            if offset > 65536:
                break
    return fields, offset


def _check_nrrd_payload(path: Path, promised: int, deep: bool) -> None:
    fields, offset = _text_header(path, re.compile(r"^\s*$"))
    encoding = fields.get("encoding", "raw").lower()
    data_file = fields.get("data file") or fields.get("datafile")
    target, start = (path.parent / data_file, 0) if data_file and data_file.upper() != "LIST" else (path, offset)
    if data_file and not target.exists():
        raise ImageReadError(
            "missing-file", "the NRRD header's detached data file is missing", "copy the .raw/.raw.gz file next to the .nhdr header"
        )
    if encoding == "raw":
        holds = target.stat().st_size - start
        if holds < promised:
            raise _truncated(promised, holds)
    elif encoding in ("gzip", "gz") and deep:
        with open(target, "rb") as fh:
            fh.seek(start)
            comp = fh.read()
        try:
            out = zlib.decompressobj(wbits=47)  # gzip or zlib stream
            data = out.decompress(comp)
            if not out.eof:
                raise ImageReadError("truncated", "compressed data ends before its end-of-stream marker", _REEXPORT)
        except zlib.error as exc:
            raise ImageReadError("corrupt", f"compressed data is corrupt ({exc})", _REEXPORT) from None
        if len(data) < promised:
            raise _truncated(promised, len(data))


def _check_meta_payload(path: Path, promised: int, deep: bool) -> None:
    fields, offset = _text_header(path, re.compile(r"^\s*ElementDataFile\s*=", re.IGNORECASE))
    data_file = fields.get("elementdatafile", "LOCAL")
    target, start = (path, offset) if data_file.upper() == "LOCAL" else (path.parent / data_file, 0)
    if not target.exists():
        raise ImageReadError(
            "missing-file", "the MetaImage header's data file is missing", "copy the .raw/.zraw file next to the .mhd header"
        )
    compressed = fields.get("compresseddata", "false").lower() == "true"
    holds = target.stat().st_size - start
    if not compressed:
        if holds < promised:
            raise _truncated(promised, holds)
        return
    size = fields.get("compresseddatasize")
    if size and size.isdigit() and holds < int(size):
        raise _truncated(int(size), holds)
    if deep:
        with open(target, "rb") as fh:
            fh.seek(start)
            out = zlib.decompressobj()
            try:
                data = out.decompress(fh.read())
            except zlib.error as exc:
                raise ImageReadError("corrupt", f"compressed data is corrupt ({exc})", _REEXPORT) from None
        if not out.eof or len(data) < promised:
            raise _truncated(promised, len(data))


def _inspect_dicom(folder: Path) -> ImageInfo:
    files = dicom_files(folder)
    if len(files) < 2:
        raise ImageReadError("not-3d", "DICOM series has a single slice", "export the whole 3D series into the folder")
    origins = []
    reader = sitk.ImageFileReader()
    first: ImageInfo | None = None
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise ImageReadError("unreadable", f"a slice of the DICOM series cannot be read ({Path(name).name})", _REEXPORT) from None
        origins.append(np.array(reader.GetOrigin()))
        if first is None:
            first = ImageInfo(
                size=tuple(reader.GetSize()), spacing=tuple(reader.GetSpacing()), origin=tuple(reader.GetOrigin()),
                direction=tuple(reader.GetDirection()), dimension=3, components=reader.GetNumberOfComponents(),
                pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()), format="dicom",
            )  # fmt: skip
    assert first is not None
    if first.components != 1:
        raise ImageReadError("not-scalar", "DICOM series is not grey-scale", "export the grey-scale MR image")
    steps = np.linalg.norm(np.diff(np.stack(origins), axis=0), axis=1)
    step = float(np.median(steps))
    if step <= 0 or np.max(np.abs(steps - step)) > max(0.01 * step, 0.01):
        raise ImageReadError(
            "uneven-slices", "slice positions of the DICOM series are unevenly spaced (a slice is missing or unreadable)",
            "re-export the complete series from PACS",
        )  # fmt: skip
    return ImageInfo(
        size=(first.size[0], first.size[1], len(files)), spacing=(first.spacing[0], first.spacing[1], step),
        origin=first.origin, direction=first.direction, dimension=3, components=1, pixel_type=first.pixel_type, format="dicom",
    )  # fmt: skip


def write_image(image: sitk.Image, path: Path | str, compress: bool = True) -> None:
    """Write a volume as NIfTI/NRRD/MetaImage (chosen by suffix) or, for a path without suffix, a DICOM series.

    A DICOM series is written one slice per file with the position and orientation tags a reader needs;
    intensities must be integer (MR images are stored as int16/uint16).
    """
    path = Path(path)
    if path.suffix:
        image_format(path)  # raises on an unsupported suffix
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=compress and not path.name.endswith(".nii"))
        return
    _write_dicom_series(image, path)


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    if image.GetPixelID() not in (sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkUInt8):
        raise ImageReadError("not-scalar", "DICOM series need integer voxels", "cast the image to int16 before writing")
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    if np.linalg.det(np.array(d).reshape(3, 3)) < 0:
        raise ImageReadError("bad-orientation", "a DICOM series needs a right-handed orientation", "flip the image's z axis first")
    # Deterministic UIDs derived from the folder name keep a generated cohort byte-identical for a seed.
    root = "1.2.826.0.1.3680043.8.498."
    digest = int(hashlib.sha256(str(folder.name).encode()).hexdigest()[:24], 16)
    series_uid, study_uid = f"{root}{digest}.1", f"{root}{digest}.2"
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000e": series_uid, "0020|000d": study_uid, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}", "0008|103e": folder.name,
        }  # fmt: skip
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k + 1:04d}.dcm"))
        writer.Execute(slice_)
