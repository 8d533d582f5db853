"""Which series of a study a pipeline takes.

A study usually holds several series: localizers, thin and thick reconstructions with soft
and sharp kernels, secondary captures, other modalities. Each pipeline wants one: a CT
segmentation wants an axial, original, soft-kernel volume with enough slices, the thinner the
better; a chest-radiograph classifier the frontal view; a mammography model a "for
presentation" CC or MLO view. Selection reads headers only (no pixel data).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
)

from pipelines.enums import Task
from pipelines.notanalysed import NotAnalysable, NotAnalysedReason

#: SOP classes that carry images a pipeline can use, by modality family.
VOLUME_CLASSES = {CTImageStorage, EnhancedCTImageStorage, MRImageStorage, EnhancedMRImageStorage}
FOR_PROCESSING = {DigitalXRayImageStorageForProcessing, DigitalMammographyXRayImageStorageForProcessing}
PROJECTION_CLASSES = {
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForPresentation,
    BreastTomosynthesisImageStorage,
    *FOR_PROCESSING,
}

DEFAULT_MIN_SLICES = 16


@dataclass(frozen=True)
class Candidate:
    series_instance_uid: str
    #: Larger is better; compared as a tuple.
    score: tuple[float, ...]
    description: str


def _number(ds: Dataset, keyword: str, default: float) -> float:
    """A numeric header value for ranking; ``default`` when absent, empty, not a number, or not positive."""
    try:
        value = float(ds.get(keyword) or default)
    except (TypeError, ValueError, OverflowError):
        return default
    return value if np.isfinite(value) and value > 0 else default


def _image_type(ds: Dataset) -> list[str]:
    return [str(v).upper() for v in ds.get("ImageType", [])]


def kernel_sharpness(kernel: object) -> float:
    """A number that grows with the sharpness of a reconstruction kernel (vendor conventions).

    Siemens "B30f"/"I40f"/"Br40d": the number is the sharpness (soft ~20-40, sharp ~60-80);
    GE: SOFT < STANDARD < DETAIL < LUNG < BONE/EDGE; Philips: A/B soft, C/D/E/L/Y sharper;
    Canon/Toshiba FC: FC01-FC18 body (soft), FC50+ lung/bone. Unknown kernels rank in the middle.
    """
    # Siemens writes two values (Br40d\3: kernel, iterative strength); pydicom gives a MultiValue, which is no list.
    text = (
        " ".join(map(str, kernel))
        if isinstance(kernel, Sequence) and not isinstance(kernel, str)
        else str(kernel or "")
    )
    text = text.upper().strip()
    if not text:
        return 50.0
    named = {"SOFT": 20, "SMOOTH": 20, "STANDARD": 40, "BODY": 40, "DETAIL": 60, "CHST": 60, "LUNG": 75,
             "BONE": 80, "BONEPLUS": 85, "EDGE": 90, "SHARP": 80}  # fmt: skip
    for word, value in named.items():
        if re.search(rf"\b{word}\b", text):
            return float(value)
    m = re.match(r"^(?:FC)(\d+)", text)
    if m:
        n = int(m.group(1))
        return 30.0 if n < 30 else 75.0
    m = re.match(r"^[A-Z]{1,2}[A-Z]?(\d{2})", text)
    if m:
        return float(m.group(1))
    m = re.match(r"^([A-EL-Y])$", text)
    if m:
        return {"A": 20, "B": 30, "C": 50, "D": 60, "E": 70, "L": 75, "Y": 80}.get(m.group(1), 50.0)
    return 50.0


def _is_axial(ds: Dataset) -> bool:
    ori = ds.get("ImageOrientationPatient")
    if ori is None or len(ori) != 6:
        return False
    normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
    return abs(normal[2]) > 0.9


_NOT_ORIGINAL = {"LOCALIZER", "DERIVED", "SECONDARY", "SCOUT"}


def _is_original(ds: Dataset) -> bool:
    return not _NOT_ORIGINAL & set(_image_type(ds))


def _volumetric(task: Task, modalities: Sequence[str]) -> bool:
    return task is Task.SEGMENTATION and not set(modalities) & {"CR", "DX", "MG"}


def _volume_candidate(uid: str, headers: Sequence[Dataset], modalities: Sequence[str], min_slices: int) -> Candidate:
    first = headers[0]
    modality = str(first.get("Modality", ""))
    kernel = first.get("ConvolutionKernel")
    desc = f"{modality} {len(headers)} images, kernel {kernel or '?'}, '{first.get('SeriesDescription', '')}'"
    if modality not in modalities:
        raise ValueError(f"modality {modality}, not {'/'.join(modalities)}")
    images = [h for h in headers if str(h.get("SOPClassUID")) in VOLUME_CLASSES]
    if not images:
        raise ValueError(f"no {'/'.join(modalities)} image objects (SOP class {first.get('SOPClassUID')})")
    usable = [h for h in images if _is_original(h)]
    if not usable:
        raise ValueError(f"only localizer/derived/secondary images (ImageType {'/'.join(_image_type(images[0]))})")
    n = sum(int(_number(h, "NumberOfFrames", 1)) for h in usable)
    if n < min_slices:
        raise ValueError(f"{n} slices, at least {min_slices} needed")
    if not all(_is_axial(h) for h in usable if "ImageOrientationPatient" in h):
        raise ValueError("not axial")
    # Thickness and kernel of the images that will be analysed (the first file may be a localizer).
    # Slice spacing comes from the positions; a broken Slice Thickness ("8 mm") only ranks as unknown.
    thickness = _number(usable[0], "SliceThickness", 5.0)
    kernel = usable[0].get("ConvolutionKernel")
    # Prefer thin slices, then a soft kernel (segmentation wants little noise), then more slices.
    return Candidate(uid, (-round(thickness, 1), -kernel_sharpness(kernel), n), desc)


_FRONTAL = {"PA", "AP"}
_LATERAL = {"LL", "RL", "LATERAL", "LAT", "RLD", "LLD"}


def _projection_candidate(uid: str, headers: Sequence[Dataset], modalities: Sequence[str]) -> Candidate:
    first = headers[0]
    modality = str(first.get("Modality", ""))
    view = str(first.get("ViewPosition", "")).upper().strip()
    desc = f"{modality} {len(headers)} images, view {view or '?'}, '{first.get('SeriesDescription', '')}'"
    if modality not in modalities:
        raise ValueError(f"modality {modality}, not {'/'.join(modalities)}")
    images = [h for h in headers if str(h.get("SOPClassUID")) in PROJECTION_CLASSES | VOLUME_CLASSES]
    if not images:
        raise ValueError(f"no projection image objects (SOP class {first.get('SOPClassUID')})")
    if modality == "MG":
        presentation = [h for h in images if str(h.get("SOPClassUID")) not in FOR_PROCESSING]
        if not presentation:
            raise ValueError("only 'for processing' mammograms")
        view_code = ""
        vc = first.get("ViewCodeSequence")
        if vc:
            view_code = str(vc[0].get("CodeMeaning", "")).lower()
        preferred = 2 if "cranio" in view_code or view == "CC" else 1 if "medio" in view_code or view == "MLO" else 0
        return Candidate(uid, (preferred, len(presentation)), desc)
    text = f"{view} {first.get('SeriesDescription', '')} {first.get('ProtocolName', '')}".upper()
    if view in _LATERAL or (not view and re.search(r"\bLAT", text)):
        raise ValueError(f"lateral view ({view or 'series description'})")
    frontal = 2 if view in _FRONTAL else 1 if re.search(r"\b(PA|AP|FRONTAL)\b", text) else 0
    return Candidate(uid, (frontal, -len(images)), desc)


def rank_series(
    series: Mapping[str, Sequence[Dataset]],
    task: Task | str,
    modalities: Sequence[str],
    min_slices: int = DEFAULT_MIN_SLICES,
) -> tuple[list[Candidate], dict[str, str]]:
    """Candidates best first, and why each other series was rejected (parameters as :func:`select_series`)."""
    candidates, rejected = [], {}
    volumetric = _volumetric(Task(task), modalities)
    for uid, headers in series.items():
        if not headers:
            continue
        try:
            if volumetric:
                candidates.append(_volume_candidate(uid, headers, modalities, min_slices))
            else:
                candidates.append(_projection_candidate(uid, headers, modalities))
        except ValueError as exc:
            rejected[uid] = str(exc)
    candidates.sort(key=lambda c: c.score, reverse=True)
    return candidates, rejected


def select_series(
    series: Mapping[str, Sequence[Dataset]],
    task: Task | str,
    modalities: Sequence[str],
    min_slices: int = DEFAULT_MIN_SLICES,
) -> str:
    """The SeriesInstanceUID the pipeline should analyse, or NotAnalysable(NO_SUITABLE_SERIES).

    Parameters
    ----------
    series
        Headers (no pixel data needed) of every instance of the study, by SeriesInstanceUID.
    task
        The model's task (its manifest's ``task``); its value ("segmentation", ...) is taken too and
        becomes the enum on entry.
    modalities
        Modalities the model accepts (Modality attribute, e.g. ["CT"], ["CR", "DX"], ["MG"]).
    """
    candidates, rejected = rank_series(series, task, modalities, min_slices)
    if not candidates:
        why = "; ".join(f"{uid}: {reason}" for uid, reason in rejected.items()) or "the study has no series"
        raise NotAnalysable(NotAnalysedReason.NO_SUITABLE_SERIES, why)
    return candidates[0].series_instance_uid


def usable_instances(headers: Sequence[Dataset], task: Task | str, modalities: Sequence[str]) -> list[int]:
    """Indices of the instances of a chosen series that the pipeline should load.

    A volume takes the original image objects of the series (a localizer or a derived image that
    shares the series is left out, as selection did when it counted slices); a one-image model takes
    the single best image (frontal over lateral, "for presentation" over "for processing"), because
    a radiograph series often holds several views.
    """
    if _volumetric(Task(task), modalities):
        return [i for i, h in enumerate(headers) if str(h.get("SOPClassUID")) in VOLUME_CLASSES and _is_original(h)]
    scored = []
    for i, h in enumerate(headers):
        try:
            scored.append((_projection_candidate(str(i), [h], modalities).score, -i))
        except ValueError:
            continue
    return [-max(scored)[1]] if scored else []
