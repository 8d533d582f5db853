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
}


def ucum(unit: str) -> Code:
    """A UCUM unit as a DICOM code (Coding Scheme Designator "UCUM")."""
    return Code(unit, "UCUM", UCUM_MEANINGS.get(unit, unit))


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
