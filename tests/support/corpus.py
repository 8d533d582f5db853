"""A corpus of messy sources, and the node's end-to-end run on each of them (issue 10).

Each source is a real (or phantom) study with the kind of defect real archives hold: headers that
break the standard (invalid DA, TM, AS and DS values, over-long LO and SH, missing Type 2 attributes,
retired Person Name forms, a Referenced Study Sequence item without its SOP Class), other character
sets, private tags and sequences, Pixel Spacing 0\\0 or none, MONOCHROME1, odd Bits Stored, compressed
pixels, and poisoned values (a Rescale Slope of NaN, two patients in one study). They are made in the
test's own folders from:

- the real chest CT (TCIA Lung-PET-CT-Dx A0002, read in place through :mod:`tests.support.data`);
- pydicom's bundled real images (``get_testdata_file``): RG1, a PA chest CR in MONOCHROME1 with 15 of
  16 bits stored and Pixel Spacing 0\\0 (uncompressed and JPEG 2000); RG3, a CR with no pixel spacing
  at all (10 bits, lossy JPEG 2000); single CT slices;
- the phantoms the reference models were trained on (a chest radiograph, a mammogram).

:func:`analyse` hands a study to the node's study runner as a worker does (every series of the study,
the route's pipeline and outputs), writes each result object as the spool does, and judges every file
written: dciodvfy's errors, and dsrdump on each SR.
"""

from __future__ import annotations

import copy
import subprocess
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ImplicitVRLittleEndian,
    generate_uid,
)

from onnx_models.training.mammo_phantom import make_mammo_phantom
from onnx_models.training.xray_phantom import make_xray_phantom
from pipelines.enums import SR_CLASSES, ResultKind
from pipelines.study import RunOutcome, StudyRunner
from tests.support.data import ct_dir, real_series
from tests.support.dicom import CR_IMAGE_STORAGE, MG_FOR_PRESENTATION, synthetic_image
from tests.support.peers import DCMTK, dciodvfy_errors

#: Files of one study by Series Instance UID: what a worker hands the study runner.
StudyFiles = dict[str, list[Path]]
#: A change made to every instance of a series, or to a whole series.
Edit = Callable[[Dataset], None]
SeriesEdit = Callable[[list[Dataset]], None]

#: The real CT's series: the soft kernel the lung pipeline chooses, and the sharp one.
SOFT_KERNEL = "series-3-B40f"
SHARP_KERNEL = "series-2-B70f"

#: The pipeline the default routes (node/default_config.yaml) give a study of each modality.
PIPELINE_OF_MODALITY = {"CT": "lung-seg", "CR": "chest-xray", "DX": "chest-xray", "MG": "breast-density"}
#: What a PACS destination asks of each pipeline: the SEG only exists for segmentations.
OUTPUTS_OF_PIPELINE = {
    "lung-seg": frozenset({ResultKind.SEG, ResultKind.SR, ResultKind.SC}),
    "chest-xray": frozenset({ResultKind.SR, ResultKind.SC}),
    "breast-density": frozenset({ResultKind.SR, ResultKind.SC}),
}

DSRDUMP = DCMTK / "dsrdump"


# -- values as modalities write them ------------------------------------------------------------
def set_raw(ds: Dataset, keyword: str, vr: str, text: str) -> None:
    """Give ``keyword`` the value ``text`` byte for byte, as a modality wrote it, unchecked by pydicom.

    pydicom refuses to make an invalid DS ("1,62") from a string; a file holds it all the same, and
    pydicom reads it back as the string it is. Text is padded to even length with a space (PS3.5 7.1.1).
    """
    tag = Tag(keyword)
    value = text.encode("latin-1")
    if len(value) % 2:
        value += b" "
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def raw(keyword: str, vr: str, text: str) -> Edit:
    """An edit that sets ``keyword`` to ``text`` with :func:`set_raw`."""
    return lambda ds: set_raw(ds, keyword, vr, text)


def drop(*keywords: str) -> Edit:
    """An edit that removes attributes (those a modality left out)."""

    def edit(ds: Dataset) -> None:
        for keyword in keywords:
            ds.pop(Tag(keyword), None)

    return edit


def assign(**values: object) -> Edit:
    """An edit that sets valid values through pydicom (character sets, photometric interpretation...)."""

    def edit(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return edit


def on_each(*edits: Edit) -> SeriesEdit:
    """A series edit that applies ``edits`` to every instance."""

    def edit(series: list[Dataset]) -> None:
        for ds in series:
            for one in edits:
                one(ds)

    return edit


def on_half(*edits: Edit) -> SeriesEdit:
    """A series edit that applies ``edits`` to every second instance (e.g. another Patient ID on half the slices)."""

    def edit(series: list[Dataset]) -> None:
        for ds in series[1::2]:
            for one in edits:
                one(ds)

    return edit


def reference_study_by_instance_only(ds: Dataset) -> None:
    """A Referenced Study Sequence item with a Referenced SOP Instance UID and no Referenced SOP Class UID.

    Both are Type 1 in the SOP Instance Reference Macro (PS3.3 Table 10-11); RIS interfaces send the
    Study Instance UID alone.
    """
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid(entropy_srcs=["corpus referenced study", str(ds.StudyInstanceUID)])
    ds.ReferencedStudySequence = [item]


def add_private_tags(ds: Dataset) -> None:
    """Private elements of several VRs in two private blocks, and a private sequence holding a private sequence."""
    block = ds.private_block(0x0011, "ACME CORPUS 1.0", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "US", 7)
    block.add_new(0x03, "DS", "1.5")
    block.add_new(0x04, "OB", bytes(range(16)))
    inner = Dataset()
    inner_block = inner.private_block(0x0011, "ACME CORPUS 1.0", create=True)
    inner_block.add_new(0x10, "SH", "inner")
    nested = Dataset()
    nested.private_block(0x0011, "ACME CORPUS 1.0", create=True).add_new(0x20, "UL", 42)
    inner_block.add_new(0x11, "SQ", [nested])
    inner.ReferencedSOPInstanceUID = str(ds.SOPInstanceUID)  # a standard element inside a private item
    block.add_new(0x05, "SQ", [inner, Dataset()])
    other = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    other.add_new(0x27, "SH", "/1.0:1")
    other.add_new(0x28, "OB", b"\x00\x01\x02\x03")


def in_implicit_vr(ds: Dataset) -> None:
    """Write the instance in Implicit VR Little Endian: its private elements are read back as UN."""
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def rle_compressed(series: list[Dataset]) -> None:
    """Each instance RLE Lossless compressed (a syntax storescu -xr and many archives send)."""
    from pydicom.uid import RLELossless

    for ds in series:
        ds.compress(RLELossless)


def new_patient(patient_id: str, name: str) -> Edit:
    return assign(PatientID=patient_id, PatientName=name)


def renumbered(number: str | None, description: str | None) -> Edit:
    """Series Number (Type 2, so possibly empty) and Series Description (Type 3) as given; None removes."""

    def edit(ds: Dataset) -> None:
        for keyword, value in (("SeriesNumber", number), ("SeriesDescription", description)):
            if value is None:
                ds.pop(Tag(keyword), None)
            else:
                set_raw(ds, keyword, "IS" if keyword == "SeriesNumber" else "LO", value)

    return edit


# -- the sources --------------------------------------------------------------------------------
class Corpus:
    """The sources every case is made from, read once per test module and copied for each case."""

    def __init__(self) -> None:
        self._ct: dict[str, list[Dataset]] = {}

    # The real CT ---------------------------------------------------------------------------------
    def ct_series(self, name: str = SOFT_KERNEL) -> list[Dataset]:
        """Copies of one series of the real CT (skips the test where the CT is absent)."""
        if name not in self._ct:
            self._ct[name] = [dcmread(p) for p in real_series(ct_dir(), name)]
        return [copy.deepcopy(ds) for ds in self._ct[name]]

    def real_ct(self, folder: Path, *edits: SeriesEdit, series: Sequence[str] = (SOFT_KERNEL,)) -> StudyFiles:
        """The real CT's ``series`` with ``edits`` applied to each, written to ``folder``."""
        instances = []
        for name in series:
            one = self.ct_series(name)
            for edit in edits:
                edit(one)
            instances += one
        return write_study(folder, instances)

    # pydicom's bundled images ---------------------------------------------------------------------
    @staticmethod
    def pydicom_image(name: str) -> Dataset:
        """One of pydicom's test images (from pydicom-data where it is not in pydicom itself)."""
        path = get_testdata_file(name)
        if path is None:
            pytest.skip(f"pydicom test file {name} is not installed (pip install pydicom-data)")
        return dcmread(str(path))

    # Phantoms --------------------------------------------------------------------------------------
    @staticmethod
    def chest_phantom(modality: str = "CR", *, seed: int = 4242, opacity: bool = True, **extra: object) -> Dataset:
        """A frontal chest radiograph phantom as a 12-bit MONOCHROME2 CR (or DX) with a PA view."""
        sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else CR_IMAGE_STORAGE
        image = make_xray_phantom(np.random.default_rng(seed), opacity=opacity).image
        return phantom_instance(image, modality, sop_class, ViewPosition="PA", BodyPartExamined="CHEST", **extra)

    @staticmethod
    def mammo_phantom(*, seed: int = 4243, category: str = "C", **extra: object) -> Dataset:
        """A left CC mammogram phantom, "for presentation", 12-bit MONOCHROME2."""
        image = make_mammo_phantom(np.random.default_rng(seed), category=category).image
        return phantom_instance(
            image, "MG", MG_FOR_PRESENTATION, ViewPosition="CC", ImageLaterality="L", BodyPartExamined="BREAST",
            PresentationIntentType="FOR PRESENTATION", **extra,
        )  # fmt: skip


def phantom_instance(image: np.ndarray, modality: str, sop_class_uid: str, **extra: object) -> Dataset:
    """A phantom image (float, bright = dense) as a 12-bit MONOCHROME2 single-frame instance with spacing 0.2 mm."""
    scaled = image.astype(np.float64)
    scaled = (scaled - scaled.min()) / max(float(scaled.max() - scaled.min()), 1e-9) * 4000
    ds = synthetic_image(modality, sop_class_uid, rows=image.shape[0], columns=image.shape[1], extra=extra)
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelData = scaled.astype(np.uint16).tobytes()
    return ds


def as_dx(ds: Dataset) -> None:
    """A CR instance re-labelled as a DX "for presentation" one (what a DR room writes), with its own UIDs."""
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["corpus dx", str(ds.SOPInstanceUID)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["corpus dx", str(ds.SeriesInstanceUID)])
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def as_monochrome1(ds: Dataset) -> None:
    """The same picture stored as MONOCHROME1 (minimum is white): stored values inverted within Bits Stored."""
    top = (1 << int(ds.BitsStored)) - 1
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16)
    ds.PixelData = (top - pixels).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.pop(Tag("WindowCenter"), None)
    ds.pop(Tag("WindowWidth"), None)


def junk_above_high_bit(ds: Dataset) -> None:
    """Set bits above High Bit in a quarter of the pixels, as old modalities kept overlays there.

    They are no part of the pixel value (PS3.5 8.1.1: Bits Stored, High Bit), so the result must not change.
    """
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).copy()
    high = int(ds.HighBit)
    junk = np.uint16((0xFFFF << (high + 1)) & 0xFFFF)
    pixels[::4] |= junk
    ds.PixelData = pixels.tobytes()


def write_study(folder: Path, instances: Iterable[Dataset]) -> StudyFiles:
    """Save ``instances`` as files in ``folder``, grouped by series as the node's spool would hand them over."""
    folder.mkdir(parents=True, exist_ok=True)
    files: StudyFiles = {}
    for index, ds in enumerate(instances):
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return files


# -- the run, as the node makes it ----------------------------------------------------------------
@dataclass
class CaseRun:
    """How one study's analysis ended, what it wrote, and what the validators said of it."""

    outcome: RunOutcome | None
    #: The kinds of result object the study was analysed for.
    wanted: frozenset[ResultKind] = frozenset()
    #: "ExceptionType: message (file:line)" when the runner or the writing of a result raised.
    raised: str | None = None
    #: The result objects as written (paths) and as read back from disk.
    written: list[Path] = field(default_factory=list)
    objects: list[Dataset] = field(default_factory=list)
    #: (file name, line) for each dciodvfy error and dsrdump complaint.
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ending(self) -> str:
        """The ending in one line, for assertion messages and the report."""
        if self.raised is not None:
            return f"raised {self.raised}"
        assert self.outcome is not None
        if self.outcome.not_analysed is not None:
            return f"not analysed: {self.outcome.not_analysed}"
        kinds = ", ".join(f"{ds.Modality} {ds.SeriesNumber}" for ds in self.objects[:4])
        more = f" (+{len(self.objects) - 4})" if len(self.objects) > 4 else ""
        return f"results: {kinds}{more}"

    def problem_report(self) -> str:
        """Each distinct complaint once, with the files it was made of (an SC series repeats one per image)."""
        files: dict[str, list[str]] = {}
        for name, line in self.problems:
            files.setdefault(line, []).append(name)
        return "\n".join(
            f"{line}  [{', '.join(names[:3])}{f' +{len(names) - 3} more' if len(names) > 3 else ''}]"
            for line, names in files.items()
        )

    @property
    def kinds(self) -> set[ResultKind]:
        return {kind for kind in ResultKind if self.of_kind(kind)}

    @property
    def failed_outputs(self) -> dict[str, str]:
        """Kinds the runner could not build, with why (``RunOutcome.failed_outputs`` where the runner has it)."""
        return dict(getattr(self.outcome, "failed_outputs", None) or {})

    def of_kind(self, kind: ResultKind) -> list[Dataset]:
        if kind is ResultKind.SEG:
            return [ds for ds in self.objects if ds.Modality == "SEG"]
        if kind is ResultKind.SR:
            return [ds for ds in self.objects if str(ds.SOPClassUID) in SR_CLASSES]
        return [ds for ds in self.objects if ds.Modality not in ("SEG", "SR")]


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" ({Path(last.filename).name}:{last.lineno})"


def analyse(runner: StudyRunner, study: StudyFiles, out: Path, pipeline: str | None = None) -> CaseRun:
    """Analyse ``study`` as a worker does, write the results as the spool does, and judge every file.

    ``pipeline`` defaults to the route of the study's modality; the outputs are what a PACS destination
    of that route asks for. A raise is reported in :attr:`CaseRun.raised` rather than propagated, so
    that a test names the exception of its case.
    """
    first = dcmread(next(iter(study.values()))[0], stop_before_pixels=True)
    pipeline = pipeline or PIPELINE_OF_MODALITY[str(first.Modality)]
    wanted = OUTPUTS_OF_PIPELINE[pipeline]
    try:
        outcome = runner.run(pipeline, study, wanted)
    except Exception as exc:
        return CaseRun(outcome=None, wanted=wanted, raised=f"{type(exc).__name__}: {exc}{_where(exc)}")
    run = CaseRun(outcome=outcome, wanted=wanted)
    out.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(outcome.datasets):
        path = out / f"{index:03d}-{ds.Modality}.dcm"
        try:
            ds.save_as(path, enforce_file_format=True)  # as Spool.write_dataset does
        except Exception as exc:
            run.raised = f"writing {ds.Modality} {index}: {type(exc).__name__}: {exc}{_where(exc)}"
            return run
        run.written.append(path)
    run.objects = [dcmread(p) for p in run.written]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for lines in pool.map(_judge, run.written, run.objects):
            run.problems += lines
    return run


#: What dsrdump (DCMTK 3.6.7) prints for every file in a character set its VR checker lacks (ISO_IR 192,
#: GB18030), even with --disable-vr-checker: a limit of the tool, not a fault of the file.
DSRDUMP_CANNOT_CHECK = "W: The VR checker does not support this Specific Character Set: "


def dsrdump_problems(path: Path) -> list[str]:
    """What DCMTK's dsrdump says is wrong with an SR file: a non-zero exit or anything on stderr."""
    if not DSRDUMP.is_file():
        pytest.skip(f"DCMTK dsrdump not installed at {DSRDUMP}")
    # Bytes: dsrdump prints names in the file's own character set (GB18030 is no UTF-8).
    done = subprocess.run([str(DSRDUMP), str(path)], capture_output=True, timeout=120)
    stderr = done.stderr.decode("utf-8", errors="replace")
    lines = [
        f"dsrdump: {line}" for line in stderr.splitlines() if line.strip() and not line.startswith(DSRDUMP_CANNOT_CHECK)
    ]
    if done.returncode != 0:
        lines.insert(0, f"dsrdump exit code {done.returncode}")
    return lines


def _judge(path: Path, ds: Dataset) -> list[tuple[str, str]]:
    lines = dciodvfy_errors(path)
    if str(ds.SOPClassUID) in SR_CLASSES:
        lines += dsrdump_problems(path)
    return [(path.name, line) for line in lines]


# -- reading the results ------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """One NUM content item of a report: what it measures, its UCUM unit and value."""

    concept: str
    unit: str
    value: float


def measurements(sr: Dataset) -> list[Measurement]:
    """Every NUM item of an SR's content tree, in document order."""
    found: list[Measurement] = []

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "NUM" and item.get("MeasuredValueSequence"):
                measured = item.MeasuredValueSequence[0]
                found.append(
                    Measurement(
                        concept=str(item.ConceptNameCodeSequence[0].CodeMeaning),
                        unit=str(measured.MeasurementUnitsCodeSequence[0].CodeValue),
                        value=float(measured.NumericValue),
                    )
                )
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return found


#: Attributes by which an image states the size of its pixels.
SPACING_ATTRIBUTES = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")


def stated_spacings(ds: Dataset) -> dict[str, list[float]]:
    """The pixel spacings an object states, top level and in shared functional groups, by attribute."""
    found = {k: [float(v) for v in ds[k].value] for k in SPACING_ATTRIBUTES if k in ds and ds[k].value}
    for group in ds.get("SharedFunctionalGroupsSequence", []):
        for measures in group.get("PixelMeasuresSequence", []):
            if measures.get("PixelSpacing"):
                found["PixelMeasuresSequence/PixelSpacing"] = [float(v) for v in measures.PixelSpacing]
    return found
