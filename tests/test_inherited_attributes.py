"""Results stay valid whatever their source carries in the attributes they inherit (issue 10, item 1).

highdicom copies the Patient and Study modules of the first source into every SEG and SR, and the SC
takes the patient, study and equipment attributes of its image; a TCIA CT's Referenced Study Sequence
item without its SOP Class made both SEG and SR fail dciodvfy. Each case here damages a source the way
archives, anonymisers and modalities do, writes the lung segmentation (SEG, SR, SC) of a synthetic CT
and the classification (SR, SC) of a radiograph, and judges every object: dciodvfy without errors
(warnings about the source's values are acceptable), DCMTK's dsrdump reads the SR, no private element,
the source's datasets untouched, and a DEBUG line naming what was dropped without its value.
"""

from __future__ import annotations

import io
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pipelines.dicom import write_results
from pipelines.dicom.source import header_copy, ordered_sources
from pipelines.enums import ResultKind
from tests.support.dicom import (
    EQUIPMENT,
    chest_xray_source,
    classification_result,
    load_ct_series,
    lung_result,
    volume_from_slices,
)
from tests.support.peers import dciodvfy_errors
from tests.support.series import SIZE, ct_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEGMENTATION_OUTPUTS = [ResultKind.SEG, ResultKind.SR, ResultKind.SC]
CLASSIFICATION_OUTPUTS = [ResultKind.SR, ResultKind.SC]
DSRDUMP = Path("/usr/bin/dsrdump")
SOURCE_LOG = "pipelines.dicom.source"


# -- sources ---------------------------------------------------------------------------------------------------
def _body_with_lungs() -> np.ndarray:
    """Stored values (intercept -1024) of a soft-tissue disc with two air-filled lungs."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    hu = np.full((SIZE, SIZE), -1000.0)
    hu[(yy - 16) ** 2 + (xx - 16) ** 2 < 15**2] = 40
    for cx in (9, 23):
        hu[(yy - 16) ** 2 + (xx - cx) ** 2 < 5**2] = -850
    return (hu + 1024).astype(np.uint16)


def _with_patient_and_study(ds: Dataset) -> Dataset:
    ds.PatientName = "Synthetic^Patient"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime = "20260101", "101010"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "S1", "ACC1", ""
    ds.Manufacturer = "Synthetic Vendor"
    ds.SeriesNumber = 3
    return ds


def synthetic_ct() -> list[Dataset]:
    """Eight 32 x 32 slices of a body with two lungs (enough for the threshold segmentation's opening)."""
    slices = ct_series(8, with_pixels=False)
    for ds in slices:
        ds.PixelData = _body_with_lungs().tobytes()
        _with_patient_and_study(ds)
    return slices


def encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def as_received(ds: Dataset) -> Dataset:
    """``ds`` written and read back, as the node reads a stored instance (raw elements, converted on access)."""
    return pydicom.dcmread(io.BytesIO(encoded(ds)))


def put(ds: Dataset, keyword: str, vr: str, value: bytes | str) -> None:
    """Store ``value`` as the bytes of ``keyword``, as a modality wrote them (pydicom would refuse some in memory)."""
    data = value.encode("latin-1") if isinstance(value, str) else value
    data += b" " * (len(data) % 2)
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)


def stored(*values: tuple[str, str, bytes | str]) -> Callable[[Dataset], None]:
    """A damage that stores each (keyword, VR, value) as :func:`put` does."""

    def apply(ds: Dataset) -> None:
        for keyword, vr, value in values:
            put(ds, keyword, vr, value)

    return apply


def item(**attributes: object) -> Dataset:
    out = Dataset()
    for keyword, value in attributes.items():
        setattr(out, keyword, value)
    return out


# -- the corpus of damage ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Damage:
    apply: Callable[[Dataset], None]
    #: Words the DEBUG log must hold: the dropped or emptied attribute (and what made an item invalid).
    logged: tuple[str, ...]
    #: The damaged value, which no log line may hold (values identify the patient).
    secret: str | None = None


def _broken_referenced_study(ds: Dataset) -> None:
    # What the TCIA CT carries: an item with the instance but not its SOP Class.
    ds.ReferencedStudySequence = [item(ReferencedSOPInstanceUID="1.2.826.0.1.3680043.8.498.7771")]


def _items_without_type1(ds: Dataset) -> None:
    ds.ProcedureCodeSequence = [item(CodeValue="SECRET-PROC", CodingSchemeDesignator="99LOCAL")]
    ds.OtherPatientIDsSequence = [item(IssuerOfPatientID="HOSPITAL-B")]
    ds.AdmittingDiagnosesCodeSequence = [item(CodeValue="J18", CodeMeaning="Pneumonia")]
    ds.ReferringPhysicianIdentificationSequence = [item(InstitutionName="Clinic")]


def _clinical_trial_without_sponsor(ds: Dataset) -> None:
    ds.ClinicalTrialProtocolID = "PROTO-1"
    ds.ClinicalTrialSiteID, ds.ClinicalTrialSiteName = "SITE-1", ""
    ds.ClinicalTrialSubjectID = "SUBJECT-SECRET-17"


def _private_elements(ds: Dataset) -> None:
    ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x10, "LO", "private-root-value")
    ds.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "SQ", [item(PatientID="private-in-sequence")])
    other = item(PatientID="ALT-1", TypeOfPatientID="TEXT")
    other.private_block(0x0029, "ACME 1.0", create=True).add_new(0x10, "LO", "private-in-an-item")
    ds.OtherPatientIDsSequence = [other]


CORPUS: dict[str, Damage] = {
    "referenced study item without its SOP class": Damage(
        _broken_referenced_study, ("ReferencedStudySequence", "ReferencedSOPClassUID"), "1.2.826.0.1.3680043.8.498.7771"
    ),
    "sequence items without their Type 1 attributes": Damage(
        _items_without_type1,
        (
            "ProcedureCodeSequence",
            "CodeMeaning",
            "OtherPatientIDsSequence",
            "AdmittingDiagnosesCodeSequence",
            "ReferringPhysicianIdentificationSequence",
            "PersonIdentificationCodeSequence",
        ),
        "SECRET-PROC",
    ),
    "patient name with six components": Damage(
        stored(("PatientName", "PN", "Doe^John^Quincy^Dr^Jr^Extra")), ("PatientName",), "Quincy"
    ),
    "person name group over 64 characters": Damage(
        stored(("ReferringPhysicianName", "PN", "Longname" * 9 + "^Anna")),
        ("ReferringPhysicianName",),
        "Longname" * 9,
    ),
    "ISO date": Damage(stored(("PatientBirthDate", "DA", "1961-07-14")), ("PatientBirthDate",), "1961-07-14"),
    "month 13": Damage(stored(("StudyDate", "DA", "20191340")), ("StudyDate",), "20191340"),
    "time 25:61": Damage(stored(("StudyTime", "TM", "25:61")), ("StudyTime",), "25:61"),
    "age without its leading zero": Damage(stored(("PatientAge", "AS", "45Y")), ("PatientAge",), "45Y"),
    "age without its unit": Damage(stored(("PatientAge", "AS", "045")), ("PatientAge",), "045"),
    "weight that is no number": Damage(stored(("PatientWeight", "DS", "heavy")), ("PatientWeight",), "heavy"),
    "size over 16 characters": Damage(
        stored(("PatientSize", "DS", "1.75000000000000001")), ("PatientSize",), "1.75000000000000001"
    ),
    "LO over 64 characters": Damage(
        stored(("PatientID", "LO", "PID" + "7" * 67), ("StudyDescription", "LO", "CT " * 30)),
        ("PatientID", "StudyDescription"),
        "PID" + "7" * 67,
    ),
    "SH over 16 characters": Damage(
        stored(("AccessionNumber", "SH", "ACC-2019-000012345"), ("StudyID", "SH", "STUDY-00000000042")),
        ("AccessionNumber", "StudyID"),
        "ACC-2019-000012345",
    ),
    "patient's sex outside its enumerated values": Damage(stored(("PatientSex", "CS", "U")), ("PatientSex",)),
    "clinical trial subject without its sponsor": Damage(
        _clinical_trial_without_sponsor, ("clinical-trial-subject", "ClinicalTrialSponsorName"), "SUBJECT-SECRET-17"
    ),
    "private elements and sequences": Damage(_private_elements, ("private", "(0029,1010)"), "private-in-an-item"),
}


# -- judging ---------------------------------------------------------------------------------------------------------
def _has_private(ds: Dataset) -> bool:
    return any(elem.tag.is_private for elem in ds.iterall())


def judge(objects: list[Dataset], tmp_path: Path) -> list[Dataset]:
    """Save every object; assert dciodvfy finds no error, dsrdump reads the SRs, nothing private; read them back."""
    read_back: list[Dataset] = []
    for number, ds in enumerate(objects):
        path = tmp_path / f"{number}-{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], f"{ds.Modality} {number}"
        assert not _has_private(ds), f"{ds.Modality} {number} carries a private element"
        if ds.Modality == "SR":
            # DCMTK's SR module warns ("W:") about ISO 2022 code extensions, a source's Japanese included.
            dump = subprocess.run([str(DSRDUMP), str(path)], capture_output=True, timeout=60)
            stderr = dump.stderr.decode("utf-8", "replace")  # the dump is in the SR's character set
            errors = [line for line in stderr.splitlines() if not line.startswith("W: ")]
            assert (dump.returncode, errors) == (0, []), f"dsrdump: {stderr}"
        read_back.append(pydicom.dcmread(path))
    return read_back


def write_both(ct: list[Dataset], radiograph: Dataset) -> list[Dataset]:
    """The lung segmentation of ``ct`` (SEG, SR, SC) and the classification of ``radiograph`` (SR, SC)."""
    segmentation = write_results(lung_result(volume_from_slices(ct)), ct, EQUIPMENT, SEGMENTATION_OUTPUTS)
    classification = write_results(classification_result(radiograph), [radiograph], EQUIPMENT, CLASSIFICATION_OUTPUTS)
    assert sorted({str(o.Modality) for o in segmentation}) == ["OT", "SEG", "SR"]
    return segmentation + classification


def damaged_sources(damage: Callable[[Dataset], None]) -> tuple[list[Dataset], Dataset]:
    ct, radiograph = synthetic_ct(), chest_xray_source()
    for ds in [*ct, radiograph]:
        damage(ds)
    return [as_received(ds) for ds in ct], as_received(radiograph)


@pytest.mark.parametrize("case", list(CORPUS))
def test_results_from_a_damaged_source_have_no_dciodvfy_errors_and_log_what_was_dropped(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    damage = CORPUS[case]
    ct, radiograph = damaged_sources(damage.apply)
    before = [encoded(ds) for ds in [*ct, radiograph]]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=SOURCE_LOG):
        objects = write_both(ct, radiograph)
    judge(objects, tmp_path)
    assert [encoded(ds) for ds in [*ct, radiograph]] == before  # the caller's datasets are not modified
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name == SOURCE_LOG and r.levelno == logging.DEBUG)
    for word in damage.logged:
        assert word in ours, f"{word} not in the DEBUG log:\n{ours}"
    if damage.secret is not None:
        assert not [r.getMessage() for r in caplog.records if damage.secret in r.getMessage()]


def test_results_of_the_real_ct_with_a_broken_referenced_study_item_have_no_dciodvfy_errors(
    ct_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # The issue's own case: the TCIA series, every slice with the anonymiser's half item.
    ct = [as_received(ds) for ds in load_ct_series(ct_dir / "series-3-B40f")]
    for ds in ct:
        _broken_referenced_study(ds)
    with caplog.at_level(logging.DEBUG, logger=SOURCE_LOG):
        objects = write_results(lung_result(volume_from_slices(ct)), ct, EQUIPMENT, SEGMENTATION_OUTPUTS)
    seg_and_sr = [o for o in objects if o.Modality in ("SEG", "SR")]
    assert len(seg_and_sr) == 2
    for ds in judge(seg_and_sr + [o for o in objects if o.Modality == "OT"][::10], tmp_path):
        assert "ReferencedStudySequence" not in ds
        assert ds.StudyInstanceUID == ct[0].StudyInstanceUID and ds.PatientName == ct[0].PatientName
    assert "ReferencedSOPClassUID (Type 1) is missing" in caplog.text


def test_valid_items_of_a_sequence_stay_when_a_broken_one_is_dropped(tmp_path: Path):
    valid = item(CodeValue="24627-2", CodingSchemeDesignator="LN", CodeMeaning="Chest CT")

    def two_procedures(ds: Dataset) -> None:
        ds.ProcedureCodeSequence = [item(CodeValue="NO-MEANING", CodingSchemeDesignator="99LOCAL"), valid]

    objects = judge(write_both(*damaged_sources(two_procedures)), tmp_path)
    for ds in objects:
        if ds.Modality in ("SEG", "SR"):
            codes = [(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning) for i in ds.ProcedureCodeSequence]
            assert codes == [("24627-2", "LN", "Chest CT")]


def test_a_retired_form_person_name_is_kept_and_an_invalid_one_emptied(tmp_path: Path):
    # "John Doe" (no carets) is a retired form: dciodvfy warns, the name is still the patient's. Seven
    # components are an error: the Type 2 Referring Physician's Name stays, empty.
    def names(ds: Dataset) -> None:
        put(ds, "PatientName", "PN", "John Doe")
        put(ds, "ReferringPhysicianName", "PN", "Who^Gregory^House^Dr^MD^PhD^Extra")

    for ds in judge(write_both(*damaged_sources(names)), tmp_path):
        assert str(ds.PatientName) == "John Doe"
        assert ds["ReferringPhysicianName"].is_empty


#: PS3.5 H.3.1: Yamada^Tarou=山田^太郎=やまだ^たろう in ISO 2022 IR 87, escaping back to ASCII before each delimiter.
JAPANESE = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"

CHARACTER_SETS: dict[str, tuple[str | list[str] | None, bytes | str, str]] = {
    # name: (Specific Character Set, Patient's Name as stored or as text, the name a reader must see)
    "Japanese, ISO 2022 IR 87 with an empty value 1": (
        ["", "ISO 2022 IR 87"],
        JAPANESE,
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
    ),
    # Issue 12 item 7: how Korean scanners write, an empty value 1 then the code extension (PS3.5 H.3.2 style).
    "Korean, ISO 2022 IR 149 with an empty value 1": (
        ["", "ISO 2022 IR 149"],
        "Hong^Gildong=洪^吉洞=홍^길동",
        "Hong^Gildong=洪^吉洞=홍^길동",
    ),
    "Latin-1, ISO 2022 IR 100 with an empty value 1": (["", "ISO 2022 IR 100"], "Gröbner^Wolfgang", "Gröbner^Wolfgang"),
    "ISO 2022 IR 6 alone": ("ISO 2022 IR 6", "Doe^Jane", "Doe^Jane"),
    "Chinese, GB18030": ("GB18030", "Wang^XiaoDong=王^小东", "Wang^XiaoDong=王^小东"),
    "UTF-8": ("ISO_IR 192", "Gröbner^Wolfgang=グレブナー^ヴォルフガング", "Gröbner^Wolfgang=グレブナー^ヴォルフガング"),
    "Latin-1 bytes without a Specific Character Set": (None, b"Gr\xf6bner^Wolfgang", "Gröbner^Wolfgang"),
    "ISO_IR 6 spelled out": ("ISO_IR 6", "Doe^Jane", "Doe^Jane"),
}


@pytest.mark.parametrize("case", list(CHARACTER_SETS))
def test_results_keep_the_patient_name_decodable_whatever_the_character_set(case: str, tmp_path: Path):
    character_set, name, expected = CHARACTER_SETS[case]

    def with_name(ds: Dataset) -> None:
        if character_set is None:
            ds.pop("SpecificCharacterSet", None)
        else:
            ds.SpecificCharacterSet = character_set
        encodings = convert_encodings(character_set)
        put(ds, "PatientName", "PN", name if isinstance(name, bytes) else encode_string(name, encodings))
        put(ds, "StudyDescription", "LO", encode_string(f"{expected.split('=')[-1]} CT", encodings))

    ct, radiograph = damaged_sources(with_name)
    assert str(ct[0].PatientName) == expected  # the source reads as the name it means
    for ds in judge(write_both(ct, radiograph), tmp_path):
        assert str(ds.PatientName) == expected, f"{ds.Modality} in {ds.get('SpecificCharacterSet')}"
        if ds.Modality in ("SEG", "SR"):
            assert ds.StudyDescription == str(ct[0].StudyDescription)


def test_a_source_with_an_invalid_study_instance_uid_gets_no_result_rather_than_an_invented_one():
    # A result must be in its source's study; with that UID broken there is no valid result to make.
    ct, radiograph = damaged_sources(stored(("StudyInstanceUID", "UI", "1.2.826.0.01.7")))
    with pytest.raises(ValueError, match="StudyInstanceUID") as raised:
        write_results(lung_result(volume_from_slices(ct)), ct, EQUIPMENT, SEGMENTATION_OUTPUTS)
    assert "1.2.826.0.01.7" not in str(raised.value)


def test_each_instance_of_a_series_is_cleaned_as_if_alone_when_they_inherit_different_values():
    # A series is cleaned once per distinct set of inherited values and the cleaning reused for the others (a
    # 300-slice CT): instances that differ (an archive's damage on some, private elements on one, a character set
    # that must be re-encoded with text outside the inherited modules) must each get what cleaning it alone gives.
    damages = list(CORPUS.values())
    slices = synthetic_ct()
    for index, ds in enumerate(slices[:6]):
        damages[(index * 5) % len(damages)].apply(ds)
    for ds in slices[6:]:
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        put(ds, "PatientName", "PN", JAPANESE)
        put(ds, "SeriesDescription", "LO", JAPANESE.split(b"=")[1])  # not inherited, but re-encoded with the rest
    ct = [as_received(ds) for ds in slices]
    volume = volume_from_slices(ct)

    sources = ordered_sources(volume, list(reversed(ct)))

    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct}
    assert len(sources) == len(ct)
    for source in sources:
        alone = header_copy(by_uid[str(source.SOPInstanceUID)])
        alone.pop("SliceThickness", None), source.pop("SliceThickness", None)  # set from the volume's step
        assert encoded_header(source) == encoded_header(alone), str(source.SOPInstanceUID)
    japanese = next(s for s in sources if s.SOPInstanceUID == ct[-1].SOPInstanceUID)
    assert str(japanese.SeriesDescription) == "山田^太郎" and japanese.SpecificCharacterSet == "ISO_IR 192"


def encoded_header(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=True)
    return buffer.getvalue()
