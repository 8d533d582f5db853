"""Coded concepts the result writers use, in one place (PS3.16 values, checked against pydicom's dictionary)."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: TID 1410 / 1411 measurements.
VOLUME = codes.SCT.Volume  # SCT 118565006
AREA = codes.SCT.Area  # SCT 42798000
#: Mean HU is "Attenuation Coefficient" with the derivation "Mean", as TID 1419 and dcmqi write it.
ATTENUATION_COEFFICIENT = codes.DCM.AttenuationCoefficient  # DCM 112031
MEAN = codes.SCT.Mean  # SCT 373098007
#: A model's output probability (DCM 122157 "Probability").
PROBABILITY = codes.DCM.Probability
#: The operating point a classifier's probability is compared with to call the finding present (DCM 122411
#: "Threshold Value"; PS3.16 has no code for a decision threshold of its own, and TID 1501 is extensible).
THRESHOLD = codes.DCM.ThresholdValue
#: Qualitative values of a classifier's finding at its threshold.
PRESENT = codes.SCT.Present  # SCT 52101004
ABSENT = codes.SCT.Absent  # SCT 272519000
#: Name of the SVM's qualitative evaluation (DCM 111006 "Breast composition").
BREAST_COMPOSITION = codes.DCM.BreastComposition

#: UCUM units by code, with the meanings DICOM writes for them.
UCUM_MEANINGS = {
    "ml": "milliliter",
    "mm2": "square millimeter",
    "[hnsf'U]": "Hounsfield unit",
    "1": "no units",
    "%": "percent",
    "bit": "bit",
    "mm": "millimeter",
    "{pixels}": "pixels",
}


def ucum(unit: str) -> Code:
    """A UCUM unit as a DICOM code (Coding Scheme Designator "UCUM")."""
    return Code(unit, "UCUM", UCUM_MEANINGS.get(unit, unit))


# Finding sites with their side in the code itself (SNOMED CT lateralised body structures, preferred terms).
# OHIF 3.13 labels an SR outline with the Code Meaning of its Finding Site and ignores the site's Laterality
# modifier; a site of "Lung" with modifier "Right" reads "Lung" there. The pre-coordinated code reads "Right
# lung", and the modifier (PS3.16 TID 1419 row 3) stays for readers that look for it: the two agree.
_LATERALISED: dict[tuple[str, str], Code] = {
    (codes.SCT.Lung.value, codes.SCT.Right.value): Code("3341006", "SCT", "Right lung"),
    (codes.SCT.Lung.value, codes.SCT.Left.value): Code("44029006", "SCT", "Left lung"),
}


def finding_site(structure: Code, laterality: Code | None) -> Code:
    """A finding site's anatomic location: the lateralised structure where SNOMED CT has one, else ``structure``."""
    if laterality is None or structure.scheme_designator != "SCT" or laterality.scheme_designator != "SCT":
        return structure
    return _LATERALISED.get((structure.value, laterality.value), structure)


def acquisition_modality(modality: str) -> Code | None:
    """Modality (0008,0060) as its CID 29 "Acquisition Modality" code (TID 1602 row 1), None if it has none."""
    return next((code for code in codes.cid29.concepts.values() if code.value == modality.strip().upper()), None)


#: TID 1601: highdicom (and its reader, for anonymous IMAGE items) names an image library entry "Source".
IMAGE_LIBRARY_ENTRY = Code("260753009", "SCT", "Source")


# "Procedure reported" (TID 1500 row 4, CID 100): the imaging procedure the report is about,
# never the algorithm. Chest-specific codes where Body Part Examined says so.
_CT = Code("77477000", "SCT", "Computed tomography")
_CT_CHEST = Code("169069000", "SCT", "Computed tomography of chest")
_XR = codes.SCT.PlainRadiography  # SCT 168537006
_XR_CHEST = Code("399208008", "SCT", "Plain chest X-ray")
_MG = codes.SCT.Mammography  # SCT 71651007
_MR = Code("113091000", "SCT", "Magnetic resonance imaging")
_IMAGING = Code("363679005", "SCT", "Imaging")


def procedure_reported(source: Dataset) -> Code:
    """The imaging procedure of ``source`` (its Modality and Body Part Examined) as TID 1500 reports it."""
    modality = str(source.get("Modality", "")).upper()
    body_part = str(source.get("BodyPartExamined", "")).upper()
    chest = "CHEST" in body_part or "THORAX" in body_part
    if modality == "CT":
        return _CT_CHEST if chest else _CT
    if modality in ("CR", "DX"):
        return _XR_CHEST if chest else _XR
    if modality == "MG":
        return _MG
    if modality == "MR":
        return _MR
    return _IMAGING
