"""Series -> geometry-aware volume.

Slices are ordered by their position along the slice normal (the projection of Image
Position (Patient) on the cross product of the two direction cosines of Image Orientation
(Patient), PS3.3 C.7.6.2.1.1), never by InstanceNumber, which scanners number in either
direction or restart. Pixel values are brought to modality units (Rescale Slope/Intercept,
or the Pixel Value Transformation of enhanced objects) and MONOCHROME1 is inverted so that
brighter always means more attenuation, except on quantitative images (CT): there Photometric
Interpretation is only a display instruction and Hounsfield units stay as they are. Multi-frame
objects (enhanced CT/MR with functional groups, multi-frame projection images) give one slice per
frame.

Unsuitable input raises :class:`~pipelines.notanalysed.NotAnalysable` with a specific reason.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.pixels import pixel_array

from pipelines.notanalysed import NotAnalysable, NotAnalysedReason
from pipelines.pixeldata import PIXEL_KEYWORDS, pixel_data_problem

#: Modalities whose images are slices of a volume: without patient geometry they cannot be placed.
CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
#: Photometric interpretations a single-channel pipeline can use.
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class InPlaneSpacing(str, Enum):
    """Where a volume's row and column spacing came from, and so what a length measured on it means."""

    #: Pixel Spacing (or the Pixel Measures functional group): millimetres in the patient.
    PATIENT = "PixelSpacing"
    #: Imager Pixel Spacing only (projection radiographs): millimetres at the detector, not corrected for
    #: the geometric magnification of the patient (PS3.3 C.8.11.7.1.1); lengths are slightly too large.
    DETECTOR = "ImagerPixelSpacing"
    #: No valid spacing (absent, zero, negative or not a number): the volume's spacing is one pixel, lengths
    #: and areas in millimetres are unknown and must not be written.
    UNKNOWN = "unknown"

    @property
    def known(self) -> bool:
        return self is not InPlaneSpacing.UNKNOWN


@dataclass(frozen=True)
class SourceFrame:
    """Which stored instance (and frame of it) a slice of a volume came from."""

    sop_class_uid: str
    sop_instance_uid: str
    #: 1-based frame number for multi-frame instances, None for single-frame ones.
    frame_number: int | None = None


@dataclass
class Volume:
    """Pixels of one series in patient space.

    ``pixels`` has shape (slices, rows, columns), in modality units (Hounsfield units
    for CT after Rescale Slope/Intercept; MONOCHROME1 already inverted so that higher
    values are brighter): int16 when every value the headers allow is a whole number
    that fits (a CT of 12 stored bits, slope 1: half the memory of float32), else float32. Slices are ordered along the
    slice normal (increasing ``slice_direction`` · ImagePositionPatient), never by
    InstanceNumber.
    """

    pixels: np.ndarray
    #: ImagePositionPatient of the first slice (mm, patient LPS).
    origin_mm: np.ndarray
    #: (between slices, between rows, between columns) in mm; row spacing = PixelSpacing[0].
    spacing_mm: tuple[float, float, float]
    #: Direction cosines: row direction (along a row, increasing column), column direction, slice normal.
    row_direction: np.ndarray
    column_direction: np.ndarray
    slice_direction: np.ndarray
    source_frames: list[SourceFrame]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str
    #: Where ``spacing_mm[1:]`` came from; when UNKNOWN they are 1.0 (pixel units) and nothing in mm is valid.
    in_plane_spacing: InPlaneSpacing = InPlaneSpacing.PATIENT

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    def slice_position_mm(self, index: int) -> np.ndarray:
        """ImagePositionPatient of slice ``index``."""
        return np.asarray(self.origin_mm, float) + index * self.spacing_mm[0] * np.asarray(self.slice_direction, float)

    def affine(self) -> np.ndarray:
        """4x4 matrix from (slice, row, column) indices to patient LPS millimetres."""
        m = np.eye(4)
        m[:3, 0] = np.asarray(self.slice_direction, float) * self.spacing_mm[0]
        m[:3, 1] = np.asarray(self.column_direction, float) * self.spacing_mm[1]
        m[:3, 2] = np.asarray(self.row_direction, float) * self.spacing_mm[2]
        m[:3, 3] = np.asarray(self.origin_mm, float)
        return m


# -- per-frame geometry ------------------------------------------------------------------------
@dataclass
class _Frame:
    ds: Dataset
    frame_index: int | None  # 0-based index into a multi-frame object, None for single frame
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    spacing_source: InPlaneSpacing
    slope: float
    intercept: float


def _first(seq_owner: Dataset | None, seq: str, attr: str) -> object | None:
    if seq_owner is None or seq not in seq_owner or not seq_owner[seq].value:
        return None
    return _get(seq_owner[seq].value[0], attr)


def _group(ds: Dataset, index: int, seq: str, attr: str) -> object | None:
    """An attribute of a functional group: per-frame first, then shared (PS3.3 C.7.6.16)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        value = _first(per_frame[index], seq, attr)
        if value is not None:
            return value
    shared = ds.get("SharedFunctionalGroupsSequence")
    return _first(shared[0] if shared else None, seq, attr)


def _spacing(value: object | None) -> tuple[float, float] | None:
    if value is None:
        return None
    numbers = _floats(value, 2)
    # 0\\0, negative, NaN or infinite spacings occur in real headers: they give no spacing at all.
    if numbers is None or not np.all(np.isfinite(numbers)) or numbers.min() <= 0:
        return None
    return (float(numbers[0]), float(numbers[1]))


def _floats(value: object | None, count: int) -> np.ndarray | None:
    """``count`` numbers of a multi-valued attribute; None when absent, of another multiplicity or not numeric."""
    # A malformed header (one value where three are due) is "no geometry", not a TypeError.
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or len(value) != count:
        return None
    try:
        return np.asarray([float(v) for v in value])
    except (TypeError, ValueError):
        return None


def _rescale(ds: Dataset, keyword: str, value: object | None, default: float) -> float:
    """A Rescale Slope or Intercept as a number; not a finite number (a slope not above 0) refuses the input.

    "NaN" or a non-numeric slope would turn every voxel into nonsense that a pipeline still measures: a CT
    with a NaN slope came back as lungs of 0.0 mL.
    """
    if value is None or value == "":
        return default
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or (keyword == "RescaleSlope" and number <= 0):
        raise NotAnalysable(
            NotAnalysedReason.INVALID_PIXEL_VALUES,
            f"{keyword} of {ds.get('SOPInstanceUID')} is not a finite"
            f"{' positive' if keyword == 'RescaleSlope' else ''} number",
        )
    return number


def _get(ds: Dataset, keyword: str) -> object | None:
    """An attribute's value, or ``"invalid"`` when pydicom cannot convert it (a DS of "abc" raises on access)."""
    try:
        return ds.get(keyword)
    except (TypeError, ValueError, OverflowError):
        return "invalid"


def _frames(ds: Dataset) -> list[_Frame]:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotAnalysable(NotAnalysedReason.MISSING_PIXEL_DATA, f"instance {ds.get('SOPInstanceUID')} has no pixels")
    damaged = pixel_data_problem(ds)
    if damaged is not None:
        # Before any list or array is sized from the header's numbers (Number of Frames 2147483647 is real).
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise NotAnalysable(NotAnalysedReason.UNDECODABLE, f"instance {ds.get('SOPInstanceUID')} ({name}): {damaged}")
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = []
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    for i in range(n):
        if enhanced:
            pos = _group(ds, i, "PlanePositionSequence", "ImagePositionPatient")
            ori = _group(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = _spacing(_group(ds, i, "PixelMeasuresSequence", "PixelSpacing"))
            source = InPlaneSpacing.PATIENT
            slope = _group(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _group(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
        else:
            pos = _get(ds, "ImagePositionPatient") if n == 1 else None
            ori = _get(ds, "ImageOrientationPatient")
            spacing, source = _spacing(_get(ds, "PixelSpacing")), InPlaneSpacing.PATIENT
            if spacing is None:
                spacing, source = _spacing(_get(ds, "ImagerPixelSpacing")), InPlaneSpacing.DETECTOR
            slope, intercept = _get(ds, "RescaleSlope"), _get(ds, "RescaleIntercept")
        frames.append(
            _Frame(
                ds=ds,
                frame_index=i if n > 1 else None,
                position=_floats(pos, 3),
                orientation=_floats(ori, 6),
                pixel_spacing=spacing,
                spacing_source=source if spacing is not None else InPlaneSpacing.UNKNOWN,
                slope=_rescale(ds, "RescaleSlope", slope, 1.0),
                intercept=_rescale(ds, "RescaleIntercept", intercept, 0.0),
            )
        )
    return frames


def _decode(ds: Dataset) -> np.ndarray:
    try:
        # pydicom.pixels.pixel_array, unlike Dataset.pixel_array, does not keep the decoded array on the
        # dataset: the volume is the only full copy (a 300-slice CT would otherwise be held twice).
        return pixel_array(ds)
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError by plugin
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise NotAnalysable(
            NotAnalysedReason.UNDECODABLE,
            # The decoder's first line only: a job reason is one line (some decoders' messages run to many).
            f"pixel data of {ds.get('SOPInstanceUID')} ({name}) cannot be decoded: {type(exc).__name__}: "
            f"{next((line for line in str(exc).splitlines() if line.strip()), '')}",
        ) from exc


_INT16 = np.iinfo(np.int16)


def _value_dtype(frames: Sequence[_Frame]) -> type[np.generic]:
    """int16 when the headers guarantee whole modality values within int16 for every frame, else float32.

    The range is the stored one (Bits Stored, Pixel Representation) shifted by the intercept; a slope
    other than 1, a fractional intercept, float pixel data or MONOCHROME1 (inverted after loading) give float32.
    """
    for f in frames:
        ds = f.ds
        if "PixelData" not in ds or f.slope != 1.0 or not float(f.intercept).is_integer():
            return np.float32
        if str(ds.get("PhotometricInterpretation", "")).strip() not in GRAYSCALE or inverted_on_load(ds):
            return np.float32
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0)
        if not 1 <= bits <= 16:
            return np.float32
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if low + f.intercept < _INT16.min or high + f.intercept > _INT16.max:
            return np.float32
    return np.int16


def _read(item: Dataset | str | Path) -> Dataset:
    return item if isinstance(item, Dataset) else dcmread(item)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# -- the steps of load_volume ------------------------------------------------------------------
def _slices_of(items: Sequence[Dataset], min_slices: int, photometric: Sequence[str]) -> list[_Frame]:
    """Every frame of every instance, in the order given; refuses a series without enough usable images."""
    if not items:
        raise NotAnalysable(NotAnalysedReason.TOO_FEW_SLICES, "the series has no instances")
    frames: list[_Frame] = []
    for ds in items:
        pi = str(ds.get("PhotometricInterpretation", "")).strip()
        if "PixelData" in ds and pi not in photometric:
            raise NotAnalysable(
                NotAnalysedReason.UNSUPPORTED_PHOTOMETRIC,
                f"Photometric Interpretation {pi or 'missing'} (this pipeline takes {', '.join(photometric)})",
            )
        frames.extend(_frames(ds))
    if len(frames) < min_slices:
        raise NotAnalysable(
            NotAnalysedReason.TOO_FEW_SLICES, f"{len(frames)} slice(s), this pipeline needs at least {min_slices}"
        )
    return frames


def _image_size(items: Sequence[Dataset]) -> tuple[int, int]:
    """Rows and Columns, the same for every instance of the series."""
    rows, cols = int(items[0].Rows), int(items[0].Columns)
    if any(int(ds.Rows) != rows or int(ds.Columns) != cols for ds in items):
        raise NotAnalysable(NotAnalysedReason.INCONSISTENT_GEOMETRY, "images of different sizes in one series")
    return rows, cols


@dataclass(frozen=True)
class _Placement:
    """The slices in their order along the slice normal, and where that puts them in patient space."""

    frames: list[_Frame]
    origin: np.ndarray
    #: Distance between slice centres (mm).
    step: float
    row_direction: np.ndarray
    column_direction: np.ndarray
    normal: np.ndarray


def _axes(frames: Sequence[_Frame]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row direction, column direction and slice normal of frames that share one orientation."""
    orientation = frames[0].orientation
    assert orientation is not None
    if any(not np.allclose(f.orientation, orientation, atol=1e-3) for f in frames):  # type: ignore[arg-type]
        raise NotAnalysable(NotAnalysedReason.INCONSISTENT_GEOMETRY, "slices with different orientations")
    row_cosines, column_cosines = orientation[:3], orientation[3:]
    # Broken exporters write all-zero or parallel direction cosines: there is no slice normal to sort along.
    lengths = float(np.linalg.norm(row_cosines) * np.linalg.norm(column_cosines))
    if lengths < 1e-6 or np.linalg.norm(np.cross(row_cosines, column_cosines)) / lengths < 0.99:
        raise NotAnalysable(
            NotAnalysedReason.INCONSISTENT_GEOMETRY,
            f"Image Orientation (Patient) {orientation.tolist()} is not two perpendicular directions",
        )
    row_dir, col_dir = _unit(row_cosines), _unit(column_cosines)
    return row_dir, col_dir, _unit(np.cross(row_dir, col_dir))


def _evenly_spaced_step(frames: Sequence[_Frame], along: np.ndarray, normal: np.ndarray, tolerance: float) -> float:
    """The slice gap of frames sorted along the normal; refuses duplicates, uneven gaps and sheared stacks."""
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise NotAnalysable(NotAnalysedReason.INCONSISTENT_GEOMETRY, "two slices at the same position (duplicates?)")
    step = float(np.median(gaps))
    if np.max(np.abs(gaps - step)) > tolerance * step:
        raise NotAnalysable(
            NotAnalysedReason.UNEVEN_SPACING,
            f"slice gaps from {gaps.min():.2f} to {gaps.max():.2f} mm (median {step:.2f} mm)",
        )
    progression = _unit(frames[-1].position - frames[0].position)  # type: ignore[operator]
    tilt_deg = float(np.degrees(np.arccos(min(1.0, abs(float(np.dot(progression, normal)))))))
    if tilt_deg > 0.5:
        raise NotAnalysable(
            NotAnalysedReason.GANTRY_TILT,
            f"slices are sheared by {tilt_deg:.1f} degrees from their normal (gantry tilt)",
        )
    return step


def _place_in_patient_space(frames: Sequence[_Frame], first: Dataset, spacing_tolerance: float) -> _Placement:
    """Frames that all have Image Position and Orientation (Patient): sorted along the slice normal."""
    row_dir, col_dir, normal = _axes(frames)
    along = np.array([float(np.dot(f.position, normal)) for f in frames])  # type: ignore[arg-type]
    order = np.argsort(along, kind="stable")
    ordered = [frames[i] for i in order]
    if len(ordered) > 1:
        step = _evenly_spaced_step(ordered, along[order], normal, spacing_tolerance)
    else:
        step = float(first.get("SliceThickness") or 1.0)
    tilt = first.get("GantryDetectorTilt")
    if tilt not in (None, "") and abs(float(tilt)) > 0.01:
        raise NotAnalysable(NotAnalysedReason.GANTRY_TILT, f"Gantry/Detector Tilt {float(tilt):g} degrees")
    origin = np.asarray(ordered[0].position, float)
    return _Placement(ordered, origin, step, row_dir, col_dir, normal)


def _place_without_geometry(frames: Sequence[_Frame], first: Dataset) -> _Placement:
    """Projection images (CR, DX, MG) and frames without patient geometry: identity axes, order as given."""
    if len(frames) > 1 and not all(f.frame_index is not None for f in frames):
        raise NotAnalysable(NotAnalysedReason.INCONSISTENT_GEOMETRY, "several images without Image Position (Patient)")
    row_dir, col_dir, normal = np.eye(3)
    step = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    return _Placement(list(frames), np.zeros(3), step, row_dir, col_dir, normal)


def _decode_slices(
    items: Sequence[Dataset], frames: Sequence[_Frame], rows: int, cols: int, *, release: bool = False
) -> np.ndarray:
    """The pixels of ``frames`` in modality units, one slice per frame in their order.

    ``release``: each instance's pixel data leaves its dataset once its frames are copied.
    """
    # Decode into a preallocated array: peak memory stays near the volume plus one decoded instance per core.
    dtype = _value_dtype(frames)
    pixels = np.empty((len(frames), rows, cols), dtype=dtype)
    slot_of: dict[int, list[tuple[int, _Frame]]] = {}
    for slot, f in enumerate(frames):
        slot_of.setdefault(id(f.ds), []).append((slot, f))

    def fill(ds: Dataset) -> None:
        array = _decode(ds)
        for slot, f in slot_of.get(id(ds), []):
            plane = array[f.frame_index] if f.frame_index is not None else array
            if plane.ndim != 2:
                raise NotAnalysable(
                    NotAnalysedReason.UNSUPPORTED_PHOTOMETRIC, f"frame has shape {plane.shape}, expected 2D"
                )
            # One pass per slice where possible: converting and rescaling 300 slices is most of the load time.
            dest = pixels[slot]
            if f.slope != 1.0:
                np.multiply(plane, np.float32(f.slope), out=dest, casting="unsafe")
                if f.intercept != 0.0:
                    dest += np.float32(f.intercept)
            elif f.intercept != 0.0 and dtype is np.int16 and plane.dtype.kind in "iu":
                # Integers modulo 2**16 throughout: the same values as adding in a wider type and casting (both
                # are that sum modulo 2**16, and the headers guarantee it fits), without a wider type, which made
                # this step 13 times slower (0.35 s for 300 CT slices).
                np.copyto(dest, plane, casting="unsafe")
                wrapped = (int(f.intercept) + 2**15) % 2**16 - 2**15
                np.add(dest, np.int16(wrapped), out=dest)
            elif f.intercept != 0.0:
                np.add(plane, np.float32(f.intercept), out=dest, casting="unsafe")
            else:
                dest[...] = plane
        if release:
            for keyword in PIXEL_KEYWORDS:
                ds.pop(keyword, None)

    # Instances decode on every core (decoders and NumPy release the GIL); each writes its own slots.
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        list(pool.map(fill, items))
    return pixels


def _quantitative(ds: Dataset) -> bool:
    """Pixel values in a physical unit (CT Hounsfield units, or a Rescale Type that names a unit)."""
    rescale_type = str(ds.get("RescaleType", "") or "").strip().upper()
    return str(ds.get("Modality", "")).strip() == "CT" or rescale_type in ("HU", "MGML", "BQML", "CNTS")


def inverted_on_load(ds: Dataset) -> bool:
    """MONOCHROME1 that the loader inverts: on a quantitative image it is only a display instruction."""
    return str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1" and not _quantitative(ds)


def _show_monochrome1_as_monochrome2(items: Sequence[Dataset], pixels: np.ndarray) -> None:
    """MONOCHROME1 (the minimum value is white): invert in place, so that higher values are always brighter.

    Not on quantitative images: Photometric Interpretation tells a display how to map values to grey, it
    never changes Hounsfield units (a CT marked MONOCHROME1 and inverted came back as lungs of 0.6 mL).
    """
    if any(inverted_on_load(ds) for ds in items):
        # Around the stored range, as the models were trained.
        lo, hi = float(pixels.min()), float(pixels.max())
        np.subtract(hi + lo, pixels, out=pixels)


def load_volume(
    datasets: Sequence[Dataset | str | Path],
    *,
    min_slices: int = 1,
    spacing_tolerance: float = 0.1,
    photometric: Sequence[str] = GRAYSCALE,
    release_pixel_data: bool = False,
) -> Volume:
    """Load one series (or one multi-frame object) into a :class:`Volume`.

    Parameters
    ----------
    datasets
        Instances of one series, as pydicom datasets with pixel data or as file paths, in any order.
    min_slices
        Fewer slices than this is "too few slices" (a CT pipeline wants a real volume).
    spacing_tolerance
        Largest allowed relative deviation of a gap between slice positions from the median gap.
    photometric
        Photometric Interpretations the pipeline accepts; others are "wrong photometric".
    release_pixel_data
        Take each instance's pixel data out of its dataset as soon as its slices are in the volume, for a
        caller that keeps the headers only: the pixels are then held once at the peak, not twice (the
        read bytes of 300 CT slices are as large as their volume, 157 MB).
    """
    items = [_read(d) for d in datasets]
    frames = _slices_of(items, min_slices, photometric)
    first = items[0]
    rows, cols = _image_size(items)
    if all(f.position is not None and f.orientation is not None for f in frames):
        placement = _place_in_patient_space(frames, first, spacing_tolerance)
    elif str(first.get("Modality", "")).strip() in CROSS_SECTIONAL:
        # An Enhanced CT without functional groups, or a legacy multi-frame CT with one orientation and no
        # positions: slices in an invented order and spacing would give a SEG no viewer can place.
        missing = sum(f.position is None for f in frames), sum(f.orientation is None for f in frames)
        raise NotAnalysable(
            NotAnalysedReason.INCONSISTENT_GEOMETRY,
            f"{first.get('Modality')} frames without patient geometry: {missing[0]} of {len(frames)} without"
            f" Image Position (Patient), {missing[1]} without Image Orientation (Patient)",
        )
    else:
        placement = _place_without_geometry(frames, first)
    pixels = _decode_slices(items, placement.frames, rows, cols, release=release_pixel_data)
    _show_monochrome1_as_monochrome2(items, pixels)
    frame_ref = first.get("FrameOfReferenceUID")
    ordered = placement.frames
    spacing_rc = ordered[0].pixel_spacing or (1.0, 1.0)
    return Volume(
        pixels=pixels,
        origin_mm=placement.origin,
        spacing_mm=(placement.step, spacing_rc[0], spacing_rc[1]),
        row_direction=placement.row_direction,
        column_direction=placement.column_direction,
        slice_direction=placement.normal,
        source_frames=[
            SourceFrame(
                str(f.ds.SOPClassUID),
                str(f.ds.SOPInstanceUID),
                None if f.frame_index is None else f.frame_index + 1,
            )
            for f in ordered
        ],
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(frame_ref) if frame_ref else None,
        modality=str(first.get("Modality", "")),
        in_plane_spacing=ordered[0].spacing_source,
    )
