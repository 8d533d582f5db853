"""Messy sources end to end (issue 10): each ends in valid results or in a specific "not analysed", never a raise.

Every case is one study as real archives send it, with one defect (tests/support/corpus.py makes them
from the real chest CT, pydicom's real radiographs and the models' phantoms). It is analysed as the node
does — the node's study runner on every series of the study, the default route's pipeline, the outputs a
PACS asks for (CT: lung-seg, SEG + SR + SC; CR/DX: chest-xray, SR + SC; MG: breast-density, SR + SC) —
and every object is written to disk as the spool writes it. Each case states the one ending that is
right for it, and why:

- results: every object written has no dciodvfy error, dsrdump reads every SR (exit 0, nothing on
  stderr), and the case's own check holds (e.g. no invented pixel spacing, the clean study's volumes);
- not analysed: ``RunOutcome.not_analysed`` starts with the stable code of the reason, nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset

from pipelines.enums import ResultKind
from pipelines.notanalysed import NotAnalysedReason
from pipelines.study import StudyRunner
from tests.support.corpus import (
    SHARP_KERNEL,
    SOFT_KERNEL,
    CaseRun,
    Corpus,
    Edit,
    StudyFiles,
    add_private_tags,
    analyse,
    as_dx,
    as_monochrome1,
    assign,
    drop,
    in_implicit_vr,
    junk_above_high_bit,
    measurements,
    new_patient,
    on_each,
    on_half,
    raw,
    reference_study_by_instance_only,
    renumbered,
    rle_compressed,
    stated_spacings,
    write_study,
)
from tests.support.runners import onnx_study_runner

# pydicom warns about every invalid value it reads: reading them is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- what a case expects ------------------------------------------------------------------------
@dataclass
class Runs:
    """Each case analysed once per module: cases compare themselves with the clean study's run."""

    corpus: Corpus
    runner: StudyRunner
    root: Path
    _done: dict[str, CaseRun] = field(default_factory=dict, init=False)

    def of(self, case: Case) -> CaseRun:
        if case.id not in self._done:
            folder = self.root / case.id
            study = case.build(self.corpus, folder / "source")
            self._done[case.id] = analyse(self.runner, study, folder / "results")
        return self._done[case.id]

    def of_id(self, case_id: str) -> CaseRun:
        return self.of(CASES_BY_ID[case_id])


Check = Callable[[CaseRun, Runs], None]


@dataclass(frozen=True)
class Results:
    """The right ending is results, all valid; ``check`` says what else must hold of them."""

    check: Check | None = None

    def __str__(self) -> str:
        return "results"


@dataclass(frozen=True)
class NotAnalysedAs:
    """The right ending is "not analysed" with this reason, and nothing written."""

    reason: NotAnalysedReason

    def __str__(self) -> str:
        return f"not analysed '{self.reason.value}'"


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Corpus, Path], StudyFiles]
    expected: Results | NotAnalysedAs
    #: Why that ending is the right one.
    why: str


# -- builders -------------------------------------------------------------------------------------
def real_ct(*edits: Edit) -> Callable[[Corpus, Path], StudyFiles]:
    """The real CT's soft-kernel series with ``edits`` made to every slice."""
    return lambda corpus, folder: corpus.real_ct(folder, on_each(*edits))


def phantom(make: Callable[[Corpus], Dataset], *edits: Edit) -> Callable[[Corpus, Path], StudyFiles]:
    """A study of one image made by ``make``, with ``edits``."""

    def build(corpus: Corpus, folder: Path) -> StudyFiles:
        ds = make(corpus)
        for edit in edits:
            edit(ds)
        return write_study(folder, [ds])

    return build


def pydicom_image(name: str, *edits: Edit) -> Callable[[Corpus, Path], StudyFiles]:
    """A study of one of pydicom's real images, with ``edits``."""
    return phantom(lambda corpus: corpus.pydicom_image(name), *edits)


def chest_dx(corpus: Corpus) -> Dataset:
    return corpus.chest_phantom("DX")


def mammogram(corpus: Corpus) -> Dataset:
    return corpus.mammo_phantom()


def other_patient_in_sharp_series(corpus: Corpus, folder: Path) -> StudyFiles:
    """The study's two series, the sharp one labelled with another patient (a merge gone wrong at the RIS)."""
    soft = corpus.ct_series(SOFT_KERNEL)
    sharp = corpus.ct_series(SHARP_KERNEL)
    for ds in sharp:
        new_patient("Lung_Dx-B0099", "Other^Patient")(ds)
    return write_study(folder, soft + sharp)


def real_ct_rle(corpus: Corpus, folder: Path) -> StudyFiles:
    return corpus.real_ct(folder, rle_compressed)


def two_patients_in_one_series(corpus: Corpus, folder: Path) -> StudyFiles:
    return corpus.real_ct(folder, on_half(new_patient("Lung_Dx-B0099", "Other^Patient")))


# -- checks -----------------------------------------------------------------------------------------
def has_secondary_capture(run: CaseRun, runs: Runs) -> None:
    assert run.of_kind(ResultKind.SC), f"no Secondary Capture among {run.ending}"


def lungs_measured(run: CaseRun, runs: Runs) -> None:
    volumes = [m for m in measurements(run.of_kind(ResultKind.SR)[0]) if m.unit == "ml"]
    assert len(volumes) == 2 and all(m.value > 100 for m in volumes), volumes
    assert run.of_kind(ResultKind.SEG) and run.of_kind(ResultKind.SC)


def same_measurements_as(case_id: str, relative: float = 0.0) -> Check:
    """Every number of the report equals the one of ``case_id``'s report (the same study without the defect)."""

    def check(run: CaseRun, runs: Runs) -> None:
        reference = runs.of_id(case_id)
        assert reference.objects, f"the reference case {case_id} has no results: {reference.ending}"
        (expected,), (actual,) = reference.of_kind(ResultKind.SR), run.of_kind(ResultKind.SR)
        got, wanted = measurements(actual), measurements(expected)
        assert [(m.concept, m.unit) for m in got] == [(m.concept, m.unit) for m in wanted]
        assert [m.value for m in got] == pytest.approx(
            [m.value for m in wanted], rel=relative, abs=1e-4 * bool(relative)
        )

    return check


def same_probability_as(case_id: str, tolerance: float = 0.01) -> Check:
    def check(run: CaseRun, runs: Runs) -> None:
        reference = runs.of_id(case_id)
        assert reference.objects, f"the reference case {case_id} has no results: {reference.ending}"
        (expected,), (actual,) = reference.of_kind(ResultKind.SR), run.of_kind(ResultKind.SR)
        probability = [m.value for m in measurements(actual) if m.concept == "Probability"]
        wanted = [m.value for m in measurements(expected) if m.concept == "Probability"]
        assert probability == pytest.approx(wanted, abs=tolerance)

    return check


def no_invented_spacing(run: CaseRun, runs: Runs) -> None:
    """The source states no valid pixel size: no result may state one (1.0\\1.0 is a guess), nor an area in mm²."""
    has_secondary_capture(run, runs)
    for ds in run.objects:
        assert stated_spacings(ds) == {}, f"{ds.Modality} {ds.SOPInstanceUID} states {stated_spacings(ds)}"
    for sr in run.of_kind(ResultKind.SR):
        assert [m for m in measurements(sr) if m.unit in ("mm2", "mm", "ml")] == []


def patient_name_kept(name: str) -> Check:
    """Every result carries the patient's name as the source spells it (encoded in a character set that holds it)."""

    def check(run: CaseRun, runs: Runs) -> None:
        for ds in run.objects:
            assert str(ds.PatientName) == name, (ds.Modality, ds.get("SpecificCharacterSet"), str(ds.PatientName))

    return check


def all_of(*checks: Check) -> Check:
    def check(run: CaseRun, runs: Runs) -> None:
        for one in checks:
            one(run, runs)

    return check


JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"  # PS3.5 H.3.1
CHINESE_NAME = "Wang^XiaoDong=王^小东"  # PS3.5 K.2
UNICODE_NAME = "Gāo^Jürgen=高^尤尔根"

CASES = [
    # The real CT, one defect at a time -------------------------------------------------------------
    Case("ct-clean", real_ct(), Results(lungs_measured),
         "the reference: a clean chest CT is segmented, its lungs measured"),
    Case("ct-referenced-study-item-without-sop-class", real_ct(reference_study_by_instance_only), Results(),
         "Referenced Study Sequence is Type 3 context for the result objects: a broken item is left out, "
         "never copied invalid"),
    Case("ct-retired-person-name-forms",
         real_ct(assign(PatientName="DOE JANE", ReferringPhysicianName="DR HOUSE", OperatorsName="TECH 1",
                        PerformingPhysicianName="SMITH, JOHN")),
         Results(), "single-component names are valid PN (dciodvfy only warns 'Retired Person Name form')"),
    Case("ct-invalid-da",
         real_ct(raw("StudyDate", "DA", "2007-04-25"), raw("SeriesDate", "DA", "25.04.2007"),
                 raw("PatientBirthDate", "DA", "19541301"), raw("ContentDate", "DA", "0")),
         Results(), "dates are not needed to analyse; an invalid Type 2 date is written empty, not copied"),
    Case("ct-invalid-tm",
         real_ct(raw("StudyTime", "TM", "17:33:33"), raw("SeriesTime", "TM", "25:61"),
                 raw("ContentTime", "TM", "5 pm")),
         Results(), "times are not needed to analyse; an invalid Type 2 time is written empty, not copied"),
    Case("ct-invalid-as", real_ct(raw("PatientAge", "AS", "53 years")), Results(),
         "Patient's Age (Type 3) is not needed to analyse; an invalid one is left out of the results"),
    Case("ct-invalid-ds-patient-size-weight",
         real_ct(raw("PatientSize", "DS", "1,62"), raw("PatientWeight", "DS", "62kg")),
         Results(), "size and weight are not needed to analyse; invalid ones are left out of the results"),
    Case("ct-invalid-ds-slice-thickness", real_ct(raw("SliceThickness", "DS", "8 mm")), Results(),
         "slice spacing comes from Image Position (Patient); Slice Thickness only ranks series and "
         "must not be copied invalid"),
    Case("ct-invalid-ds-window",
         real_ct(raw("WindowCenter", "DS", "40HU\\-600HU"), raw("WindowWidth", "DS", "350HU\\1200HU")),
         Results(), "a window only renders the SC: without a valid one the SC uses the image's percentiles"),
    Case("ct-ds-over-16-characters",
         real_ct(raw("PixelSpacing", "DS", "0.64648437500000000\\0.64648437500000000"),
                 raw("SliceLocation", "DS", "312.000000000000000")),
         Results(lungs_measured),
         "the numbers are right, only too long (a common exporter bug): used, and written as valid DS"),
    Case("ct-overlong-lo-sh",
         real_ct(raw("AccessionNumber", "SH", "ACC-2007-04-25-000123456"), raw("StudyID", "SH", "STUDY-ID-0000000001"),
                 raw("StudyDescription", "LO", "Thorax^AThoraxRoutine (Adult) " + "with contrast " * 5),
                 raw("SeriesDescription", "LO", "ThoraxRoutine 8.0.0 B40f " + "reconstruction " * 5),
                 raw("InstitutionName", "LO", "University Hospital of Somewhere, Department of " + "Radiology " * 3),
                 raw("StationName", "SH", "CT-SCANNER-ROOM-0001")),
         Results(), "identifying text is copied into the results only within its VR's length"),
    Case("ct-missing-type2",
         real_ct(drop("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                      "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer", "SeriesNumber",
                      "PositionReferenceIndicator", "InstanceNumber", "PatientPosition")),
         Results(), "Type 2 attributes a modality left out are written empty in the results"),
    Case("ct-charset-iso-2022-ir-87",
         real_ct(assign(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName=JAPANESE_NAME)),
         Results(patient_name_kept(JAPANESE_NAME)), "the results carry the name in a character set that holds it"),
    Case("ct-charset-gb18030", real_ct(assign(SpecificCharacterSet="GB18030", PatientName=CHINESE_NAME)),
         Results(patient_name_kept(CHINESE_NAME)), "the results carry the name in a character set that holds it"),
    Case("ct-charset-iso-ir-192", real_ct(assign(SpecificCharacterSet="ISO_IR 192", PatientName=UNICODE_NAME)),
         Results(patient_name_kept(UNICODE_NAME)), "the results carry the name in a character set that holds it"),
    Case("ct-private-tags-and-sequences", real_ct(add_private_tags), Results(lungs_measured),
         "private data is the vendor's: ignored by the analysis, never copied invalid into the results"),
    Case("ct-private-sequences-implicit-vr", real_ct(add_private_tags, in_implicit_vr), Results(lungs_measured),
         "in Implicit VR private elements arrive as UN: ignored, and the study analysed as any other"),
    Case("ct-rle-lossless", real_ct_rle, Results(same_measurements_as("ct-clean")),
         "lossless compression changes no pixel: the same measurements as the clean study"),
    Case("ct-pixel-spacing-0-0", real_ct(raw("PixelSpacing", "DS", "0\\0")),
         NotAnalysedAs(NotAnalysedReason.UNKNOWN_PIXEL_SPACING),
         "lung volumes in mL need the pixel size; 0\\0 states none"),
    Case("ct-pixel-spacing-absent", real_ct(drop("PixelSpacing")),
         NotAnalysedAs(NotAnalysedReason.UNKNOWN_PIXEL_SPACING),
         "lung volumes in mL need the pixel size; the header has none"),
    # Poisoned values ---------------------------------------------------------------------------------
    Case("ct-rescale-slope-nan", real_ct(raw("RescaleSlope", "DS", "NaN")),
         NotAnalysedAs(NotAnalysedReason.INVALID_PIXEL_VALUES),
         "with a slope of NaN no pixel has a Hounsfield value"),
    Case("ct-rescale-intercept-not-a-number", real_ct(raw("RescaleIntercept", "DS", "-1024HU")),
         NotAnalysedAs(NotAnalysedReason.INVALID_PIXEL_VALUES),
         "an intercept that is no number gives no Hounsfield value"),
    Case("ct-marked-monochrome1", real_ct(assign(PhotometricInterpretation="MONOCHROME1")),
         Results(same_measurements_as("ct-clean")),
         "Photometric Interpretation is a display instruction, not a change of Hounsfield values: "
         "the same HU, so the clean study's volumes"),
    Case("ct-two-patient-ids-in-one-series", two_patients_in_one_series,
         NotAnalysedAs(NotAnalysedReason.PATIENT_MISMATCH),
         "half the slices name another patient: a result would carry a patient some sources lack"),
    Case("ct-two-patient-ids-across-series", other_patient_in_sharp_series,
         NotAnalysedAs(NotAnalysedReason.PATIENT_MISMATCH),
         "the study's instances name two patients: which one the results belong to is unknown"),
    # pydicom's real CT slices ----------------------------------------------------------------------
    Case("pydicom-ct-small-single-slice", pydicom_image("CT_small.dcm"),
         NotAnalysedAs(NotAnalysedReason.NO_SUITABLE_SERIES), "one slice is no volume for a lung segmentation"),
    Case("pydicom-ct-j2k-lossless-single-slice", pydicom_image("693_J2KR.dcm"),
         NotAnalysedAs(NotAnalysedReason.NO_SUITABLE_SERIES), "one slice is no volume for a lung segmentation"),
    # Radiographs: pydicom's real chest CR and the chest phantom --------------------------------------
    Case("cr-real-monochrome1-15-bits-pixel-spacing-0-0", pydicom_image("RG1_UNCR.dcm"),
         Results(no_invented_spacing),
         "MONOCHROME1 and 15 of 16 bits are plain grey images; with Pixel Spacing 0\\0 and no Imager Pixel "
         "Spacing the classification stands, but nothing may state a pixel size or an area in mm²"),
    Case("cr-real-j2k-lossless", pydicom_image("RG1_J2KR.dcm"),
         Results(all_of(no_invented_spacing, same_probability_as("cr-real-monochrome1-15-bits-pixel-spacing-0-0",
                                                                  tolerance=1e-4))),
         "JPEG 2000 lossless: the same pixels, so the same probability as the uncompressed file"),
    Case("cr-real-j2k-lossy-10-bits-no-pixel-spacing", pydicom_image("RG3_J2KI.dcm"), Results(no_invented_spacing),
         "no spacing attribute at all: classified, with no invented pixel size in the results"),
    Case("cr-without-patient-orientation", pydicom_image("RG1_UNCR.dcm", drop("PatientOrientation")),
         Results(all_of(has_secondary_capture, no_invented_spacing)),
         "Patient Orientation is Type 2C in CR: unknown is empty, and the SC is still made"),
    Case("dx-real-monochrome1-15-bits-without-patient-orientation",
         pydicom_image("RG1_UNCR.dcm", as_dx, drop("PatientOrientation")), Results(no_invented_spacing),
         "the real chest CR as a DR room labels it: classified, with an SC and no invented pixel size"),
    Case("dx-phantom", phantom(chest_dx), Results(has_secondary_capture), "the reference DX"),
    Case("dx-without-patient-orientation", phantom(chest_dx, drop("PatientOrientation")),
         Results(all_of(has_secondary_capture, same_probability_as("dx-phantom", 1e-4))),
         "orientation is not needed to classify; the SC is made without it"),
    Case("dx-monochrome1", phantom(chest_dx, as_monochrome1), Results(same_probability_as("dx-phantom")),
         "MONOCHROME1 is the same picture with inverted stored values: the same probability"),
    Case("dx-12-of-16-bits-junk-above-high-bit", phantom(chest_dx, junk_above_high_bit),
         Results(same_probability_as("dx-phantom", 1e-4)),
         "bits above High Bit are no part of a pixel value (PS3.5 8.1.1): the same probability"),
    Case("dx-pixel-spacing-and-imager-spacing-0-0",
         phantom(chest_dx, raw("PixelSpacing", "DS", "0\\0"), raw("ImagerPixelSpacing", "DS", "0\\0")),
         Results(no_invented_spacing), "classified, with no invented pixel size in the results"),
    # Mammograms: the density phantom ---------------------------------------------------------------
    Case("mg-phantom", phantom(mammogram), Results(has_secondary_capture), "the reference mammogram"),
    Case("mg-monochrome1", phantom(mammogram, as_monochrome1),
         Results(same_measurements_as("mg-phantom", relative=1e-3)),
         "MONOCHROME1 is the same picture: the same density features and category"),
    Case("mg-without-pixel-spacing-or-orientation",
         phantom(mammogram, drop("ImagerPixelSpacing", "PatientOrientation")), Results(no_invented_spacing),
         "density is relative to the breast's own fat: assessed without a pixel size"),
]  # fmt: skip
CASES_BY_ID = {case.id: case for case in CASES}


# -- the tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    # The writers and the node's path on messy sources, as for an AI engineer's model that declares no
    # validated domain: the reference models' own domains refuse the real radiographs (tested below).
    return Runs(Corpus(), onnx_study_runner(domain=False), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def guarded_runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(Corpus(), onnx_study_runner(), tmp_path_factory.mktemp("corpus-guarded"))


REAL_RADIOGRAPHS = [case for case in CASES if case.id.startswith(("cr-real", "cr-without", "dx-real"))]


@pytest.mark.parametrize("case", REAL_RADIOGRAPHS, ids=[case.id for case in REAL_RADIOGRAPHS])
def test_the_reference_chest_model_refuses_real_radiographs_outside_its_validated_domain(
    case: Case, guarded_runs: Runs
) -> None:
    """Issue 10 item 6: trained on phantoms, it must not state a finding on a real film (and its reason says why)."""
    run = guarded_runs.of(case)
    assert run.raised is None and run.outcome is not None
    assert (run.outcome.not_analysed or "").startswith("outside-validated-domain: "), run.ending
    assert run.outcome.datasets == []


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_messy_source_ends_in_valid_results_or_its_specific_not_analysed_reason(case: Case, runs: Runs) -> None:
    run = runs.of(case)
    assert run.raised is None, f"expected {case.expected} ({case.why}); the run {run.ending}"
    assert run.outcome is not None
    if isinstance(case.expected, NotAnalysedAs):
        code = case.expected.reason.value
        assert (run.outcome.not_analysed or "").startswith(f"{code}: "), (
            f"expected not analysed '{code}' ({case.why}); the run ended in {run.ending}"
        )
        assert run.outcome.datasets == []
        return
    assert run.outcome.not_analysed is None and run.objects, (
        f"expected results ({case.why}); the run ended in {run.ending}"
    )
    assert run.failed_outputs == {}, f"outputs not built: {run.failed_outputs}"
    assert run.kinds == run.wanted, f"asked for {sorted(run.wanted)}, got {run.ending}"
    assert run.problems == [], run.problem_report()
    if case.expected.check is not None:
        case.expected.check(run, runs)


def _series_of(run: CaseRun) -> dict[str, tuple[str, str]]:
    """Result series of a run: (Series Number, Series Description) by Series Instance UID."""
    return {str(ds.SeriesInstanceUID): (str(ds.SeriesNumber), str(ds.SeriesDescription)) for ds in run.objects}


@pytest.mark.parametrize(
    "numbering",
    [pytest.param(None, id="series-numbered-2-and-3"),
     pytest.param(renumbered("", None), id="series-without-number-or-description")],
)  # fmt: skip
def test_two_ct_series_of_one_study_analysed_at_different_times_get_distinct_result_series(
    numbering: Edit | None, runs: Runs, tmp_path: Path
) -> None:
    """Each series analysed on its own (the second arrived later): a viewer must tell the two results apart."""
    edits = [on_each(numbering)] if numbering is not None else []
    first = runs.corpus.real_ct(tmp_path / "sharp", *edits, series=(SHARP_KERNEL,))
    second = runs.corpus.real_ct(tmp_path / "soft", *edits, series=(SOFT_KERNEL,))
    done = [analyse(runs.runner, study, tmp_path / f"results-{i}") for i, study in enumerate((first, second))]
    for run in done:
        assert run.raised is None and run.outcome is not None and run.outcome.not_analysed is None, run.ending
        assert run.failed_outputs == {}, f"outputs not built: {run.failed_outputs}"
        assert run.problems == [], run.problem_report()
    a, b = (_series_of(run) for run in done)
    assert not set(a) & set(b), "the same result Series Instance UID for two source series"
    numbers_a, numbers_b = {n for n, _ in a.values()}, {n for n, _ in b.values()}
    assert not numbers_a & numbers_b, f"result Series Numbers {sorted(numbers_a)} and {sorted(numbers_b)}"
    descriptions_a, descriptions_b = {d for _, d in a.values()}, {d for _, d in b.values()}
    assert not descriptions_a & descriptions_b, f"result Series Descriptions {descriptions_a & descriptions_b}"
