"""Keep patient-identifying values out of what the node records about a study (job reasons, log lines).

Exception texts quote values: pydicom's "Invalid value for VR DA: '1962-03-05'", highdicom's checks of
a name. A job reason is shown by ``ainode status`` and kept in the database; a log line goes to the
journal and to log collectors. Before either is written, the values of the study's identifying
attributes (PS3.15 Annex E's patient and study identifiers) are replaced by ``<patient data>``.
UIDs are not identifying here and stay (they are how the administrator finds the study).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom import Dataset, dcmread

#: Attributes whose values identify the patient (a subset of PS3.15 E.1-1 that source headers carry).
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
)
REDACTED = "<patient data>"
#: Shorter values ("F", "1", "AB") are not searched: they would redact ordinary words and numbers.
MIN_LENGTH = 3


def identifying_values(datasets: Iterable[Dataset]) -> frozenset[str]:
    """The values (and name components) of the identifying attributes of ``datasets``, as text."""
    found: set[str] = set()
    for ds in datasets:
        for keyword in IDENTIFYING:
            try:
                value = ds.get(keyword)
            except Exception:  # a value pydicom cannot convert is still in the raw element
                element = ds.get_item(keyword) if keyword in ds else None
                value = getattr(element, "value", None)
            if value in (None, ""):
                continue
            values = value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
            for v in values:
                text = v.decode("latin-1", "replace") if isinstance(v, bytes) else str(v)
                found.add(text.strip())
                # Person names: each component group and each component ("Yamada^Tarou=山田^太郎").
                for group in text.split("="):
                    found.add(group.strip())
                    found.update(part.strip() for part in group.split("^"))
                    found.add(" ".join(p for p in group.split("^") if p).strip())
    return frozenset(v for v in found if len(v) >= MIN_LENGTH)


def study_identifying_values(files_by_series: dict[str, list[Path]]) -> frozenset[str]:
    """The identifying values of a study, from the first and last file of each series.

    Not every file: a study whose instances name different patients is not analysed (its reason names
    no value), so within an analysed study the non-empty identifying values agree.
    """
    headers = []
    for paths in files_by_series.values():
        for path in dict.fromkeys([paths[0], paths[-1]] if paths else []):
            try:
                headers.append(dcmread(path, stop_before_pixels=True, specific_tags=list(IDENTIFYING)))
            except Exception:  # an unreadable file names nothing; the job reports it on its own
                continue
    return identifying_values(headers)


def redact(text: str | None, values: Iterable[str]) -> str | None:
    """``text`` with every occurrence of ``values`` (case-insensitive, longest first) replaced by ``<patient data>``."""
    if not text:
        return text
    ordered = sorted(set(values), key=len, reverse=True)
    if not ordered:
        return text
    pattern = re.compile("|".join(re.escape(v) for v in ordered), re.IGNORECASE)
    return pattern.sub(REDACTED, text)
