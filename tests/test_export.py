"""``ainode export`` (issue 13): one row per result report, its numbers as in the SR, no patient data.

A real node (``ainode serve``, the bundled models) gets three studies by DCMTK storescu: a chest CT
(a copy of one series of TCIA A0002, CC BY 4.0) and a chest radiograph of one patient, a mammogram of
another (the phantoms the reference models were trained on). The export is then run as an
administrator runs it, and read back with pyarrow.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.models import AuditEvent, Job, Result
from onnx_models.training.mammo_phantom import make_mammo_phantom
from onnx_models.training.xray_phantom import make_xray_phantom
from pipelines.runtime import bundled_models_dir
from tests.support.cli import ainode, status
from tests.support.dicom import CR_IMAGE_STORAGE, MG_FOR_PRESENTATION, radiograph_file
from tests.support.nodeproc import NodeProcess, node_config
from tests.support.peers import storescu
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.dcmtk,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

KEY = "a-site-secret-of-enough-length"
OTHER_KEY = "another-site-secret-entirely"
#: The patient of the CT and the radiograph, and the patient of the mammogram.
PATIENT = {
    "PatientID": "EXP-4711",
    "PatientName": "Exportova^Jana",
    "PatientBirthDate": "19620305",
    "IssuerOfPatientID": "HOSP-A",
    "AccessionNumber": "ACC-EXP-1",
}
OTHER_PATIENT = {
    "PatientID": "EXP-0815",
    "PatientName": "Mustermann^Erika",
    "PatientBirthDate": "19711224",
    "IssuerOfPatientID": "HOSP-A",
    "AccessionNumber": "ACC-EXP-2",
}
PHI_VALUES = [
    v
    for p in (PATIENT, OTHER_PATIENT)
    for v in (p["PatientID"], p["AccessionNumber"], p["PatientBirthDate"], *p["PatientName"].split("^"))
] + ["1962-03-05", "1971-12-24"]


def copy_ct_series(series_dir: Path, out: Path, patient: dict[str, str]) -> str:
    """The CT series as a study of ``patient``: new Study, Series, Frame of Reference and SOP Instance UIDs."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True)
    for path in sorted(series_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword, value in patient.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / path.name, enforce_file_format=True)
    return study_uid


@dataclass
class ExportedNode:
    config_path: Path
    database_url: str
    spool: Path
    #: Study Instance UID of each source, by pipeline.
    studies: dict[str, str]
    #: The study date of each source, by pipeline.
    study_dates: dict[str, str]


@pytest.fixture(scope="module")
def processed(tmp_path_factory, orthanc, ct_dir) -> ExportedNode:
    tmp = tmp_path_factory.mktemp("export")
    sources = tmp / "sources"
    studies = {"lung-seg": copy_ct_series(ct_dir / "series-3-B40f", sources / "ct", PATIENT)}
    (sources / "cr").mkdir()
    xray = make_xray_phantom(np.random.default_rng(4242), opacity=True).image
    cr = radiograph_file(
        sources / "cr" / "cr.dcm", xray, "CR", CR_IMAGE_STORAGE,
        ViewPosition="PA", BodyPartExamined="CHEST", StudyDate="20250301", **PATIENT,
    )  # fmt: skip
    (sources / "mg").mkdir()
    mg = radiograph_file(
        sources / "mg" / "mg.dcm", make_mammo_phantom(np.random.default_rng(4243), category="C").image, "MG",
        MG_FOR_PRESENTATION, ViewPosition="CC", ImageLaterality="L", BodyPartExamined="BREAST",
        StudyDate="20250302", **OTHER_PATIENT,
    )  # fmt: skip
    studies |= {"chest-xray": str(cr.StudyInstanceUID), "breast-density": str(mg.StudyInstanceUID)}
    ct_date = str(pydicom.dcmread(next((sources / "ct").glob("*.dcm")), stop_before_pixels=True).StudyDate)
    dates = {"lung-seg": ct_date, "chest-xray": "20250301", "breast-density": "20250302"}

    config = node_config(tmp, orthanc)
    config["peers"]["pacs"]["outputs"] = ["sr"]
    route = {"destinations": ["pacs"], "stable_after_s": 1}
    config["routes"] = [
        {"name": "ct-lungs", "match": {"Modality": "CT"}, "pipeline": "lung-seg"} | route,
        {"name": "cr-dx-chest", "match": {"Modality": ["CR", "DX"]}, "pipeline": "chest-xray"} | route,
        {"name": "mg-density", "match": {"Modality": "MG"}, "pipeline": "breast-density"} | route,
    ]
    with NodeProcess(config, tmp / "node", cli=True) as node:
        for folder in ("ct", "cr", "mg"):
            sent = storescu(sources / folder, node.port, calling_ae="MODALITY")
            assert sent.returncode == 0, sent.stderr
        jobs = wait_for(
            lambda: (j := status(node)["jobs"]) and len(j) == 3 and all(x["state"] == "done" for x in j) and j,
            timeout_s=400,
            what="three jobs done",
            node=node,
        )
        assert sorted(j["pipeline"] for j in jobs) == sorted(studies)
    return ExportedNode(node.config_path, config["node"]["database_url"], Path(config["node"]["spool_dir"]), studies,
                        dates)  # fmt: skip


def export(node: ExportedNode, *args: str, key: str | None = KEY) -> Any:
    env = {"AINODE_PSEUDONYM_KEY": key} if key is not None else {"AINODE_PSEUDONYM_KEY": ""}
    return ainode("export", "--config", str(node.config_path), *args, env=env)


def export_parquet(node: ExportedNode, tmp_path: Path, *args: str, key: str = KEY) -> pa.Table:
    out = tmp_path / f"export-{len(list(tmp_path.glob('*.parquet')))}.parquet"
    run = export(node, "--format", "parquet", "-o", str(out), *args, key=key)
    assert run.returncode == 0, run.stderr
    return pq.read_table(out)


def by_pipeline(table: pa.Table) -> dict[str, dict[str, Any]]:
    rows = table.to_pylist()
    assert len({r["pipeline"] for r in rows}) == len(rows)
    return {r["pipeline"]: r for r in rows}


def sr_of(node: ExportedNode, pipeline: str) -> pydicom.Dataset:
    engine = make_engine(node.database_url)
    with make_session_factory(engine)() as session:
        (path,) = session.scalars(
            select(Result.path).join(Job).where(Job.pipeline == pipeline, Result.kind == "sr")
        ).all()
    engine.dispose()
    return pydicom.dcmread(node.spool / path)


def numbers_in(sr: pydicom.Dataset) -> list[float]:
    """Every NUM content item's value in the report's Imaging Measurements, read without the exporter."""
    found: list[float] = []

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "NUM":
                found.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    walk(measurements.ContentSequence)
    return sorted(found)


def group_value(sr: pydicom.Dataset, site: str, concept: str) -> float:
    """The NUM ``concept`` of the measurement group whose Finding Site is ``site``."""
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for group in measurements.ContentSequence:
        items = group.ContentSequence
        sites = [i.ConceptCodeSequence[0].CodeMeaning for i in items if i.ValueType == "CODE"
                 and i.ConceptNameCodeSequence[0].CodeMeaning == "Finding Site"]  # fmt: skip
        for item in items:
            if sites == [site] and item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeMeaning == concept:
                return float(item.MeasuredValueSequence[0].NumericValue)
    raise AssertionError(f"no {concept} of {site} in the report")


def measurement_numbers(row: dict[str, Any], table: pa.Table) -> list[float]:
    from node.operate.export import BASE_COLUMNS

    return sorted(
        float(row[f.name])
        for f in table.schema
        if f.name not in BASE_COLUMNS and pa.types.is_floating(f.type) and row[f.name] is not None
    )


def manifest(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((bundled_models_dir() / name / "model.yaml").read_text()))


def test_parquet_export_has_one_row_per_result_with_the_reports_numbers_and_the_model(processed, tmp_path):
    table = export_parquet(processed, tmp_path)
    rows = by_pipeline(table)
    assert sorted(rows) == ["breast-density", "chest-xray", "lung-seg"]
    for pipeline, row in rows.items():
        sr = sr_of(processed, pipeline)
        # Every number the report states, and nothing else, is in the row.
        assert measurement_numbers(row, table) == pytest.approx(numbers_in(sr)), pipeline
        card = manifest(pipeline)
        assert (row["model_name"], row["model_version"], row["model_sha256"]) == (
            card["name"], card["version"], card["sha256"]
        )  # fmt: skip
        assert row["study_date"].strftime("%Y%m%d") == processed.study_dates[pipeline]
    lungs, xray, density = rows["lung-seg"], rows["chest-xray"], rows["breast-density"]
    sr = sr_of(processed, "lung-seg")
    for side in ("Left lung", "Right lung"):
        prefix = side.lower().replace(" ", "_")
        assert lungs[f"{prefix}_volume_ml"] == group_value(sr, side, "Volume") > 100
        assert lungs[f"{prefix}_mean_attenuation_coefficient_hu"] == group_value(sr, side, "Attenuation Coefficient")
        assert lungs[f"{prefix}_area_mm2"] == group_value(sr, side, "Area")
    assert (lungs["modality"], lungs["body_part"]) == ("CT", "CHEST")
    assert (xray["modality"], xray["body_part"]) == ("CR", "CHEST")
    assert xray["opacity"] in ("Present", "Absent") and 0 <= xray["opacity_probability"] <= 1
    assert (density["modality"], density["body_part"]) == ("MG", "BREAST")
    assert density["breast_composition"] == "Heterogeneously dense"  # the phantom is drawn as category C
    assert density["breast_composition_fibroglandular_tissue_fraction_pct"] > 0


def test_no_name_id_birth_date_or_uid_is_exported_without_with_phi(processed, tmp_path):
    out = tmp_path / "e.parquet"
    assert export(processed, "-o", str(out)).returncode == 0
    csv = export(processed, "--format", "csv")
    assert csv.returncode == 0, csv.stderr
    texts = {
        "parquet file": out.read_bytes().decode("latin-1"),
        "parquet values": str(pq.read_table(out).to_pylist()),
        "csv": csv.stdout,
    }
    for where, text in texts.items():
        for value in [*PHI_VALUES, *processed.studies.values()]:
            assert value not in text, f"{value!r} in the {where}"
    assert not {"patient_id", "patient_name", "patient_birth_date"} & set(pq.read_table(out).column_names)

    with_phi = by_pipeline(export_parquet(processed, tmp_path, "--with-phi"))
    lungs = with_phi["lung-seg"]
    assert (lungs["patient_id"], lungs["patient_name"], lungs["issuer_of_patient_id"]) == (
        PATIENT["PatientID"], PATIENT["PatientName"], PATIENT["IssuerOfPatientID"]
    )  # fmt: skip
    assert lungs["patient_birth_date"].strftime("%Y%m%d") == PATIENT["PatientBirthDate"]
    assert lungs["study_instance_uid"] == processed.studies["lung-seg"]
    # Patient data leaving the node is on the audit trail, with who took it.
    engine = make_engine(processed.database_url)
    with make_session_factory(engine)() as session:
        trail = session.scalars(select(AuditEvent).where(AuditEvent.subject == "export")).all()
    engine.dispose()
    assert any("WITH PHI" in (e.detail or "") and "ainode export" in (e.actor or "") for e in trail)


def test_csv_on_stdout_has_the_same_rows_as_parquet(processed, tmp_path):
    parquet = by_pipeline(export_parquet(processed, tmp_path))
    run = export(processed, "--format", "csv")
    assert run.returncode == 0, run.stderr
    csv = by_pipeline(pcsv.read_csv(io.BytesIO(run.stdout.encode())))
    assert sorted(csv) == sorted(parquet)
    for pipeline, row in parquet.items():
        for column, value in row.items():
            if isinstance(value, float):
                assert csv[pipeline][column] == pytest.approx(value), (pipeline, column)
            elif isinstance(value, str):
                assert csv[pipeline][column] == value, (pipeline, column)


def test_the_patient_key_is_a_keyed_hash_stable_per_patient_and_secret(processed, tmp_path):
    first = by_pipeline(export_parquet(processed, tmp_path))
    again = by_pipeline(export_parquet(processed, tmp_path))
    other = by_pipeline(export_parquet(processed, tmp_path, key=OTHER_KEY))
    assert {p: r["patient_key"] for p, r in first.items()} == {p: r["patient_key"] for p, r in again.items()}
    # One patient had the CT and the radiograph; another the mammogram.
    assert first["lung-seg"]["patient_key"] == first["chest-xray"]["patient_key"]
    assert first["lung-seg"]["patient_key"] != first["breast-density"]["patient_key"]
    assert all(first[p]["patient_key"] != other[p]["patient_key"] for p in first)
    expected = hmac.new(KEY.encode(), b"HOSP-A\\EXP-4711", hashlib.sha256).hexdigest()
    assert first["lung-seg"]["patient_key"] == expected


def test_pipeline_and_time_window_select_the_rows(processed, tmp_path):
    only = export_parquet(processed, tmp_path, "--pipeline", "chest-xray")
    assert only.column("pipeline").to_pylist() == ["chest-xray"]
    assert not [c for c in only.column_names if c.startswith("left_lung")]
    assert export_parquet(processed, tmp_path, "--until", "2000-01-01").num_rows == 0
    assert export_parquet(processed, tmp_path, "--since", "2000-01-01").num_rows == 3


def test_export_refuses_to_run_without_a_site_secret(processed, tmp_path):
    for key in (None, "short"):
        run = export(processed, "-o", str(tmp_path / "e.parquet"), key=key)
        assert run.returncode == 2, run.stderr
        assert "AINODE_PSEUDONYM_KEY" in run.stderr
    assert not (tmp_path / "e.parquet").exists()
