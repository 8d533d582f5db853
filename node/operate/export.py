"""Research export (issue 13): one row per result report, pseudonymous unless asked otherwise.

The node keeps its numbers where a PACS keeps them: in the TID 1500 reports (Comprehensive 3D SR) it
wrote to the spool. The export reads each report back and flattens its measurement groups into
columns, named after what was measured and where, in the report's own words:

- a NUM item (volume, mean attenuation, area, probability, threshold, an SVM feature) becomes
  ``<finding>_<derivation>_<concept>_<unit>``, e.g. ``left_lung_volume_ml``,
  ``left_lung_mean_attenuation_coefficient_hu``, ``opacity_probability``;
- a qualitative evaluation (present/absent, the density category) becomes ``<finding>`` (its coded
  meaning), e.g. ``opacity`` = "Absent", ``breast_composition`` = "Heterogeneously dense".

The finding is the group's Finding Site ("Left lung") or else its Finding ("Opacity"). Beside them, each
row names the model (name, version, SHA-256 of the ONNX file from the manifest of that name and
version), the study date, and the source series' modality and body part. Patients appear only as a
keyed hash (HMAC-SHA256 with the site's secret) of issuer and patient ID: the same patient has the same
key in every export with the same secret, and no key without the secret leads back to the ID. Names,
IDs, birth dates, accession numbers and UIDs are written only with ``with_phi``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import IO, Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Instance, Job, JobState, Result, Series
from node.config import ExportSettings

#: A key shorter than this is refused: a pseudonym is only as strong as its secret.
MIN_KEY_BYTES = 16

#: Concept names (code meanings) of TID 1500 items that describe a group rather than measure it.
_DESCRIPTORS = {"Finding", "Finding category", "Finding Site", "Tracking Identifier", "Tracking Unique Identifier"}
#: UCUM units as they read in a column name; "1" (a ratio or a probability) adds nothing.
_UNIT_WORDS = {"1": "", "[hnsf'U]": "hu", "%": "pct", "ml": "ml", "mm2": "mm2", "mm": "mm", "bit": "bit"}


class ExportFormat(str, Enum):
    PARQUET = "parquet"
    CSV = "csv"


class PseudonymKeyMissing(Exception):
    """No site secret (or a too short one): the export refuses to make unkeyed patient hashes."""


@dataclass(frozen=True)
class ExportQuery:
    """Which results to export.

    Parameters
    ----------
    since, until
        The time the node made the result (its SR), UTC; ``until`` excluded. None: open-ended.
    pipeline
        Only results of this pipeline (model name as routes name it).
    with_phi
        Also write the patient's name, ID, issuer, birth date, the accession number and the UIDs.
    """

    since: datetime | None = None
    until: datetime | None = None
    pipeline: str | None = None
    with_phi: bool = False

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f'Argument "{name}" must be timezone-aware (UTC), got {value}.')
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError(f'Argument "until" ({self.until}) must come after "since" ({self.since}).')


def parse_time(text: str, *, end_of_day: bool = False) -> datetime:
    """``YYYY-MM-DD`` (midnight UTC; with ``end_of_day`` the next midnight, so the day is included) or ISO 8601."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
            return day + timedelta(days=1) if end_of_day else day
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO 8601 time") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def pseudonym_key(settings: ExportSettings, env: Mapping[str, str] | None = None) -> bytes:
    """The site secret: the file ``pseudonym_key_file`` names, else the variable ``pseudonym_key_env``."""
    env = os.environ if env is None else env
    if settings.pseudonym_key_file is not None:
        path = settings.pseudonym_key_file
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise PseudonymKeyMissing(f"cannot read the pseudonym key file {path} (export.pseudonym_key_file): "
                                      f"{exc.strerror}") from None  # fmt: skip
        where = f"the file {path} (export.pseudonym_key_file)"
    else:
        key = env.get(settings.pseudonym_key_env, "").strip().encode()
        where = f"the environment variable {settings.pseudonym_key_env} (export.pseudonym_key_env)"
        if not key:
            raise PseudonymKeyMissing(
                f"no pseudonym key: set {where} to the site's secret (at least {MIN_KEY_BYTES} characters, e.g. "
                "`openssl rand -hex 32`), or name a file in export.pseudonym_key_file; the export does not "
                "write unkeyed patient hashes"
            )
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyMissing(f"the pseudonym key in {where} is shorter than {MIN_KEY_BYTES} characters")
    return key


def patient_key(key: bytes, issuer: str, patient_id: str) -> str:
    """HMAC-SHA256 of issuer and patient ID (a backslash cannot occur in either, PS3.5 LO), hex."""
    return hmac.new(key, f"{issuer}\\{patient_id}".encode(), hashlib.sha256).hexdigest()


def study_key(key: bytes, study_instance_uid: str) -> str:
    """HMAC-SHA256 of the Study Instance UID, for joining the results of one study without its UID."""
    return hmac.new(key, f"study\\{study_instance_uid}".encode(), hashlib.sha256).hexdigest()


# -- reading a TID 1500 report back ----------------------------------------------------------------
def _meaning(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(attribute)
    return str(seq[0].CodeMeaning) if seq else ""


def _words(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def _groups(report: Dataset) -> Iterator[Dataset]:
    """The Measurement Group containers under the report's Imaging Measurements."""
    for item in _children(report):
        if item.ValueType == "CONTAINER" and _meaning(item) == "Imaging Measurements":
            yield from (g for g in _children(item) if g.ValueType == "CONTAINER")


def _algorithm(items: Iterable[Dataset]) -> tuple[str, str] | None:
    texts = {_meaning(i): str(i.TextValue) for i in items if i.ValueType == "TEXT"}
    if "Algorithm Name" in texts:
        return texts["Algorithm Name"], texts.get("Algorithm Version", "")
    return None


@dataclass
class ReportContent:
    """What a TID 1500 report states: its measurements as columns, and the model that made them."""

    values: dict[str, float | str]
    model: tuple[str, str] | None


def read_report(sr: Dataset) -> ReportContent:
    """Flatten the measurement groups of a TID 1500 report into named values (see the module's docstring)."""
    values: dict[str, float | str] = {}
    model = None
    for group in _groups(sr):
        items = _children(group)
        model = model or _algorithm(items)
        by_name = {_meaning(i): i for i in items}
        where = by_name.get("Finding Site") or by_name.get("Finding")
        finding = _words(_meaning(where, "ConceptCodeSequence")) if where is not None else ""
        for item in items:
            concept = _meaning(item)
            if concept in _DESCRIPTORS:
                continue
            if item.ValueType == "NUM" and item.get("MeasuredValueSequence"):
                measured = item.MeasuredValueSequence[0]
                unit = str(measured.MeasurementUnitsCodeSequence[0].CodeValue)
                modifiers = {_meaning(m): _meaning(m, "ConceptCodeSequence") for m in _children(item)
                             if m.ValueType == "CODE"}  # fmt: skip
                parts = [finding, _words(modifiers.get("Derivation", "")), _words(concept),
                         _UNIT_WORDS.get(unit, _words(unit))]  # fmt: skip
                values.setdefault("_".join(p for p in parts if p), float(measured.NumericValue))
            elif item.ValueType == "CODE" and item.RelationshipType == "CONTAINS":
                name = _words(concept)
                column = name if not finding or finding == name else f"{finding}_{name}"
                values.setdefault(column, _meaning(item, "ConceptCodeSequence"))
    return ReportContent(values, model)


# -- rows ------------------------------------------------------------------------------------------
#: The columns every export has, in this order; measurement columns follow, sorted.
BASE_COLUMNS = (
    "patient_key",
    "study_key",
    "study_date",
    "modality",
    "body_part",
    "pipeline",
    "route",
    "model_name",
    "model_version",
    "model_sha256",
    "result_time",
)
#: Added with ``with_phi``.
PHI_COLUMNS = (
    "patient_name",
    "patient_id",
    "issuer_of_patient_id",
    "patient_birth_date",
    "accession_number",
    "study_instance_uid",
    "sr_sop_instance_uid",
)


def _dicom_date(value: object) -> date | None:
    text = str(value or "").strip()
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def _source_header(session: Session, spool_root: Path, sr: Dataset) -> tuple[str | None, str | None]:
    """Modality and body part of the series the model ran on (the report's evidence), from the node's records."""
    series_uids = [
        str(series.SeriesInstanceUID)
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
    ]
    for series_uid in series_uids:
        series = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()
        if series is None or series.modality in (None, "SEG"):
            continue
        path = session.scalar(select(Instance.path).where(Instance.series_id == series.id).limit(1))
        body_part = None
        if path is not None and (spool_root / path).is_file():
            header = pydicom.dcmread(spool_root / path, stop_before_pixels=True, specific_tags=["BodyPartExamined"])
            body_part = str(header.get("BodyPartExamined", "")).strip() or None
        return series.modality, body_part
    return None, None


def export_rows(
    sessions: sessionmaker[Session],
    spool_root: Path,
    key: bytes,
    query: ExportQuery,
    model_sha256: Mapping[tuple[str, str], str],
) -> list[dict[str, Any]]:
    """One row per TID 1500 report of a finished job, oldest first (see the module's docstring)."""
    stmt = (
        select(Result, Job)
        .join(Job, Job.id == Result.job_id)
        .where(Result.kind == "sr", Job.state == JobState.DONE)
        .order_by(Result.created_at, Result.id)
    )
    if query.since is not None:
        stmt = stmt.where(Result.created_at >= query.since)
    if query.until is not None:
        stmt = stmt.where(Result.created_at < query.until)
    if query.pipeline is not None:
        stmt = stmt.where(Job.pipeline == query.pipeline)
    rows = []
    with sessions() as session:
        for result, job in session.execute(stmt).all():
            path = spool_root / result.path
            if not path.is_file():
                continue  # removed from the spool by hand: nothing to read the numbers from
            sr = pydicom.dcmread(path)
            content = read_report(sr)
            name, version = content.model or (job.pipeline, "")
            modality, body_part = _source_header(session, spool_root, sr)
            row: dict[str, Any] = {
                "patient_key": patient_key(key, str(sr.get("IssuerOfPatientID", "")), str(sr.get("PatientID", ""))),
                "study_key": study_key(key, str(sr.StudyInstanceUID)),
                "study_date": _dicom_date(sr.get("StudyDate")),
                "modality": modality,
                "body_part": body_part,
                "pipeline": job.pipeline,
                "route": job.route,
                "model_name": name,
                "model_version": version,
                "model_sha256": model_sha256.get((name, version)),
                "result_time": result.created_at,
            }
            if query.with_phi:
                row |= {
                    "patient_name": str(sr.get("PatientName", "")),
                    "patient_id": str(sr.get("PatientID", "")),
                    "issuer_of_patient_id": str(sr.get("IssuerOfPatientID", "")),
                    "patient_birth_date": _dicom_date(sr.get("PatientBirthDate")),
                    "accession_number": str(sr.get("AccessionNumber", "")),
                    "study_instance_uid": str(sr.StudyInstanceUID),
                    "sr_sop_instance_uid": str(sr.SOPInstanceUID),
                }
            rows.append(row | {f"m_{k}" if k in row else k: v for k, v in content.values.items()})
    return rows


# -- writing ---------------------------------------------------------------------------------------
def to_table(rows: list[dict[str, Any]], with_phi: bool = False) -> Any:
    """A pyarrow table: the base columns, then the measurement columns sorted (numbers as float64)."""
    import pyarrow as pa

    fixed = [*BASE_COLUMNS, *(PHI_COLUMNS if with_phi else ())]
    types: dict[str, pa.DataType] = {c: pa.string() for c in fixed}
    types |= {"study_date": pa.date32(), "result_time": pa.timestamp("us", tz="UTC")}
    if with_phi:
        types["patient_birth_date"] = pa.date32()
    measured = sorted({k for row in rows for k in row} - set(fixed))
    for column in measured:
        values = [row[column] for row in rows if row.get(column) is not None]
        types[column] = pa.float64() if all(isinstance(v, float) for v in values) else pa.string()
    schema = pa.schema([pa.field(c, types[c]) for c in [*fixed, *measured]])
    return pa.Table.from_pylist(rows, schema=schema)


def write_table(table: Any, fmt: ExportFormat, out: Path | IO[bytes]) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if fmt is ExportFormat.PARQUET:
        pq.write_table(table, out)
    else:
        pcsv.write_csv(table, out)


def stdout_bytes() -> IO[bytes]:
    return sys.stdout.buffer


def run_export(
    sessions: sessionmaker[Session],
    spool_root: Path,
    key: bytes,
    query: ExportQuery,
    model_sha256: Mapping[tuple[str, str], str],
    fmt: ExportFormat,
    out: Path | None,
    actor: str,
) -> int:
    """Write the export to ``out`` (None: stdout, CSV only); returns the number of rows.

    The export is audited (an ``operator`` event naming ``actor``): with ``with_phi`` it carries patient data
    out of the node, and the site's audit trail must show who took it.
    """
    if out is None and fmt is ExportFormat.PARQUET:
        raise ValueError("parquet is written to a file: pass -o FILE")
    rows = export_rows(sessions, spool_root, key, query, model_sha256)
    table = to_table(rows, query.with_phi)
    if out is None:
        write_table(table, fmt, stdout_bytes())
        sys.stdout.flush()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        write_table(table, fmt, tmp)
        tmp.replace(out)  # a reader never sees half a file
    what = ", ".join(
        f"{name} {value}"
        for name, value in (("pipeline", query.pipeline), ("since", query.since), ("until", query.until))
        if value is not None
    )
    detail = f"{len(rows)} result(s) as {fmt.value}{' WITH PHI' if query.with_phi else ''}" + (
        f"; {what}" if what else ""
    )
    with sessions() as session, session.begin():
        session.add(AuditEvent(kind="operator", actor=actor[:128], subject="export", detail=detail[:2000]))
    return len(rows)
