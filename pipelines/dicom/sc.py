"""Secondary Capture fallback for viewers without SEG / SR support (many PACS viewers).

Each SC image is a source image rendered as the scanner asked (its window, else the 1st-99th
percentile), with the result burned in as colour — segment outlines, or the classifier's heat map
and hot-spot box, or the breast region and density category — and a banner saying what it is and
that it is not for diagnostic use. Burned In Annotation is YES and Image Type DERIVED\\SECONDARY, so
no one mistakes it for an acquired image; Source Image Sequence names the image it was made from.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage as ndi

from pipelines.dicom.air import Equipment, add_air_attributes, series_description
from pipelines.dicom.colours import HOT_SPOT_COLOUR, PALETTE, segment_colour
from pipelines.dicom.source import header_copy
from pipelines.dicom.uids import ResultUids
from pipelines.enums import ResultKind
from pipelines.results import ClassificationResult, DensityResult, SegmentationResult
from pipelines.volume import InPlaneSpacing, Volume, inverted_on_load

BANNER = "AI result - not for diagnostic use"


def _first_number(ds: Dataset, keyword: str) -> float | None:
    """The first value of a numeric attribute, or None when absent or not a finite number ("40HU" is real)."""
    try:
        value = ds.get(keyword)
        number = float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return number if np.isfinite(number) else None


def grey_image(pixels: np.ndarray, source: Dataset) -> np.ndarray:
    """One slice in modality units -> 8-bit grey, through the source's first window or its 1-99th percentile."""
    center, width = _first_number(source, "WindowCenter"), _first_number(source, "WindowWidth")
    if inverted_on_load(source):
        center, width = None, None  # the window is in inverted units; the volume is not
    if center is None or width is None or width <= 0:
        low, high = (float(v) for v in np.percentile(pixels, [1, 99]))
        center, width = (low + high) / 2, max(high - low, 1e-6)
    grey = np.clip((pixels - (center - width / 2)) / width, 0.0, 1.0)
    return (grey * 255).astype(np.uint8)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def burn_outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Draw the boundary of ``mask`` in ``colour``, a pixel thicker on large images so it stays visible."""
    edge = mask & ~ndi.binary_erosion(mask)
    if max(mask.shape) > 384:
        edge = ndi.binary_dilation(edge)
    rgb[edge] = colour


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """A blue-green-yellow-red ramp for values 0..1 (RGB float 0..255)."""
    stops = np.array([[0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]], float)
    x = np.clip(heat, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return stops[i] * (1 - f) + stops[i + 1] * f


def burn_heatmap(rgb: np.ndarray, heat: np.ndarray, floor: float = 0.2) -> None:
    """Blend the heat map over the image where it exceeds ``floor``, more opaque where it is hotter."""
    alpha = (np.clip((heat - floor) / (1 - floor), 0, 1) * 0.55)[..., None]
    rgb[:] = (rgb * (1 - alpha) + heat_colours(heat) * alpha).astype(np.uint8)


def burn_box(rgb: np.ndarray, box: tuple[float, float, float, float], colour: tuple[int, int, int]) -> None:
    c0, r0, c1, r1 = (int(round(v)) for v in box)
    image = Image.fromarray(rgb)
    width = max(1, max(rgb.shape[:2]) // 256)
    ImageDraw.Draw(image).rectangle([c0, r0, max(c0, c1 - 1), max(r0, r1 - 1)], outline=colour, width=width)
    rgb[:] = np.asarray(image)


def burn_banner(rgb: np.ndarray, lines: Sequence[str]) -> None:
    """Text lines on a dark band across the top of the image."""
    image = Image.fromarray(rgb)
    # About 40 characters per image width, smaller when a line would not fit (default font ~0.55 em/char).
    longest = max(len(line) for line in lines)
    size = max(8, min(rgb.shape[1] // 40, int(rgb.shape[1] * 0.95 / (0.55 * longest))))
    font = ImageFont.load_default(size=size)
    band = int(size * 1.3 * len(lines) + size * 0.6)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, rgb.shape[1], band], fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text(
            (size // 2, size // 3 + i * int(size * 1.3)),
            line,
            fill=(255, 255, 0) if i == 0 else (255, 255, 255),
            font=font,
        )
    rgb[:] = np.asarray(image)


def _orientation_letters(direction: np.ndarray) -> str:
    """PS3.3 C.7.6.1.1.1: the patient axes a row / column direction points along, most significant first."""
    letters = []
    for axis in np.argsort(-np.abs(direction)):
        if abs(direction[axis]) > 1e-3:
            letters.append(("L", "P", "H")[axis] if direction[axis] > 0 else ("R", "A", "F")[axis])
    return "".join(letters[:3])


def patient_orientation(volume: Volume, source: Dataset) -> tuple[str, str]:
    own = source.get("PatientOrientation")
    if own is not None and len(own) == 2 and all(own):
        return (str(own[0]), str(own[1]))
    if "ImageOrientationPatient" in source or volume.modality not in ("CR", "DX", "MG"):
        return (_orientation_letters(np.asarray(volume.row_direction, float)),
                _orientation_letters(np.asarray(volume.column_direction, float)))  # fmt: skip
    return ("", "")


def _capture(
    rgb: np.ndarray,
    volume: Volume,
    index: int,
    source: Dataset,
    equipment: Equipment,
    model_description: str,
    uids: ResultUids,
    series_number: int,
    instance_number: int,
    result_model,
    source_label: str = "",
) -> hd.sc.SCImage:
    orientation = patient_orientation(volume, source)
    oriented = all(orientation)
    # Pixel Spacing is written only as the source gives it (in the patient). Imager Pixel Spacing is at the
    # detector, and an unknown spacing (absent, 0\\0) is unknown: an invented 1 mm would make every length a
    # viewer measures on the SC wrong.
    spacing = volume.spacing_mm[1:] if volume.in_plane_spacing is InPlaneSpacing.PATIENT else None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header_copy(source),
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.series(ResultKind.SC),
        series_number=series_number,
        sop_instance_uid=uids.instance(ResultKind.SC, instance_number),
        instance_number=instance_number,
        manufacturer=equipment.manufacturer,
        # highdicom annotates pixel_spacing as ints; PS3.3 C.8.6.2 Nominal Scanned Pixel Spacing is DS (mm).
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),  # type: ignore[arg-type]
        # highdicom's SC knows only the PATIENT and SLIDE coordinate systems and wants an orientation for PATIENT;
        # radiographs often lack Patient Orientation (Type 2C, absent on many CR/DX). Then a placeholder goes in
        # here and Patient Orientation is written empty (unknown) right below, before anyone sees the object.
        patient_orientation=orientation if oriented else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(model_description, result_model, source_label),
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.serial_number,
        institution_name=equipment.institution_name,
    )
    if not oriented:
        sc.PatientOrientation = []  # empty; General Image, Type 2C: required without Image Orientation (Patient)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    # General Series Laterality is Type 2C (paired body parts); dciodvfy wants it present, empty when unknown.
    sc.Laterality = str(source.get("ImageLaterality") or source.get("Laterality") or "")
    sc.DerivationDescription = f"{BANNER}; {model_description} by {result_model.name} {result_model.version}"[:1024]
    frame = volume.source_frames[index]
    item = Dataset()
    item.ReferencedSOPClassUID = frame.sop_class_uid
    item.ReferencedSOPInstanceUID = frame.sop_instance_uid
    if frame.frame_number is not None:
        item.ReferencedFrameNumber = frame.frame_number
    sc.SourceImageSequence = [item]
    add_air_attributes(sc, equipment, result_model)
    return sc


def _by_uid(datasets: Sequence[Dataset]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def make_secondary_captures(
    result: SegmentationResult | ClassificationResult | DensityResult,
    datasets: Sequence[Dataset],
    equipment: Equipment,
    uids: ResultUids,
    *,
    series_number: int,
    source_label: str = "",
) -> list[hd.sc.SCImage]:
    """The SC series of one result: one image per slice with a segment, or one per classified image."""
    volume = result.volume
    sources = _by_uid(datasets)
    model = result.model
    out: list[hd.sc.SCImage] = []

    def source_of(index: int) -> Dataset:
        return sources[str(volume.source_frames[index].sop_instance_uid)]

    if isinstance(result, SegmentationResult):
        present = sorted(result.segments, key=lambda s: s.number)
        for index in np.flatnonzero((result.labelmap > 0).any(axis=(1, 2))):
            source = source_of(int(index))
            rgb = _rgb(grey_image(volume.pixels[index], source))
            names = []
            for s in present:
                mask = result.labelmap[index] == s.number
                if mask.any():
                    burn_outline(rgb, mask, segment_colour(s.number))
                    names.append(s.label)
            burn_banner(rgb, [BANNER, f"{model.name} {model.version}: {', '.join(names)}"])
            out.append(
                _capture(
                    rgb,
                    volume,
                    int(index),
                    source,
                    equipment,
                    "segmentation overlay",
                    uids,
                    series_number,
                    len(out) + 1,
                    model,
                    source_label,
                )  # fmt: skip
            )
        return out
    source = source_of(0)
    rgb = _rgb(grey_image(volume.pixels[0], source))
    if isinstance(result, ClassificationResult):
        burn_heatmap(rgb, result.heatmap)
        burn_box(rgb, result.hotspot_box_rc, HOT_SPOT_COLOUR)
        verdict = "present" if result.present else "absent"
        summary = f"{result.finding.meaning} {verdict} (p = {result.probability:.2f}, threshold {result.threshold:.2f})"
        what = "heat map"
    else:
        height, width = int(volume.pixels.shape[1]), int(volume.pixels.shape[2])
        outline = np.zeros((height, width), bool)
        if len(result.breast_outline_rc):
            cols = np.clip((result.breast_outline_rc[:, 0]).astype(int), 0, width - 1)
            rows = np.clip((result.breast_outline_rc[:, 1]).astype(int), 0, height - 1)
            image = Image.fromarray(np.zeros((height, width), np.uint8))
            ImageDraw.Draw(image).line(list(zip(cols.tolist(), rows.tolist(), strict=True)), fill=1,
                                       width=max(1, max(height, width) // 256))  # fmt: skip
            outline = np.asarray(image) > 0
            rgb[outline] = PALETTE[1]
        probability = result.probabilities.get(result.category, 0.0)
        summary = f"Breast composition {result.category} - {result.category_code.meaning} (p = {probability:.2f})"
        what = "breast density overlay"
    burn_banner(rgb, [BANNER, f"{model.name} {model.version}: {summary}"])
    return [_capture(rgb, volume, 0, source, equipment, what, uids, series_number, 1, model, source_label)]
