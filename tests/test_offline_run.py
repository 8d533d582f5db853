"""``ainode run``: route, run and write result objects offline, exactly as the node would send them.

Every pipeline runs on real or phantom input and every kind of object it writes is judged by
dciodvfy (dicom3tools). The CT is TCIA Lung-PET-CT-Dx subject A0002 (CC BY 4.0), read in place;
the radiograph and the mammogram are the phantoms the reference models were trained on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from onnx_models.training.mammo_phantom import make_mammo_phantom
from onnx_models.training.xray_phantom import make_xray_phantom
from pipelines.runtime import ModelRegistry, bundled_models_dir
from pipelines.study import run_pipeline
from pipelines.volume import load_volume
from tests.support import REPO
from tests.support.dicom import CR_IMAGE_STORAGE, MG_FOR_PRESENTATION, radiograph_file
from tests.support.peers import dciodvfy_errors

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ainode_run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.operate.cli", "run", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def written(out: Path) -> dict[str, list[pydicom.Dataset]]:
    """Objects written under ``out`` by modality; the first two of each kind judged by dciodvfy."""
    found: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        found.setdefault(str(ds.Modality), []).append(ds)
        if len(found[str(ds.Modality)]) <= 2:
            assert dciodvfy_errors(path) == [], path
    return found


def test_ct_study_is_routed_to_lung_seg_and_written_as_seg_sr_and_sc(ct_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    run = ainode_run(ct_dir, "--out", out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pipeline lung-seg (route ct-lungs)" in run.stdout
    objects = written(out)
    assert len(objects["SEG"]) == 1 and len(objects["SR"]) == 1 and len(objects["OT"]) >= 20
    soft = {
        ds.SOPInstanceUID
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in (ct_dir / "series-3-B40f").glob("*.dcm"))
    }
    seg = objects["SEG"][0]
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == soft
    # The offline run writes what the node would send: a second run makes the very same objects.
    again = tmp_path / "again"
    assert ainode_run(ct_dir, "--out", again, "--outputs", "seg,sr").returncode == 0
    assert {ds.SOPInstanceUID for kind in ("SEG", "SR") for ds in objects[kind]} == {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in again.rglob("*.dcm")
    }


def test_chest_radiograph_is_classified_with_report_and_heat_map_capture(tmp_path: Path):
    phantom = make_xray_phantom(np.random.default_rng(4242), opacity=True)
    source = radiograph_file(tmp_path / "cr.dcm", phantom.image, "CR", CR_IMAGE_STORAGE, ViewPosition="PA",
                             BodyPartExamined="CHEST")  # fmt: skip
    out = tmp_path / "out"
    run = ainode_run(tmp_path / "cr.dcm", "--out", out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pipeline chest-xray (route cr-dx-chest)" in run.stdout
    objects = written(out)
    assert sorted(objects) == ["OT", "SR"]
    sr = objects["SR"][0]
    assert sr.PatientID == source.PatientID and sr.StudyInstanceUID == source.StudyInstanceUID
    # The report states what the pipeline computes for this image, verdict and probability.
    model = ModelRegistry(bundled_models_dir()).get("chest-xray")
    expected = run_pipeline(model, load_volume([tmp_path / "cr.dcm"]))
    groups = sr.ContentSequence[-1].ContentSequence
    items = [i for group in groups for i in group.ContentSequence]
    verdicts = [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Opacity"]
    assert {v.ConceptCodeSequence[0].CodeMeaning for v in verdicts} == {"Present" if expected.present else "Absent"}
    numbers = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in items if i.ValueType == "NUM"}
    probability, threshold = numbers["Probability"], numbers["Threshold Value"]  # on the image-level finding
    assert float(probability.MeasuredValueSequence[0].NumericValue) == pytest.approx(expected.probability, abs=1e-4)
    assert float(threshold.MeasuredValueSequence[0].NumericValue) == pytest.approx(expected.threshold)


def test_mammogram_gets_a_density_report(tmp_path: Path):
    phantom = make_mammo_phantom(np.random.default_rng(4243), category="C")
    radiograph_file(tmp_path / "mg.dcm", phantom.image, "MG", MG_FOR_PRESENTATION, ViewPosition="CC",
                    ImageLaterality="L", BodyPartExamined="BREAST")  # fmt: skip
    out = tmp_path / "out"
    run = ainode_run(tmp_path / "mg.dcm", "--out", out)
    assert run.returncode == 0, run.stdout + run.stderr
    objects = written(out)
    assert sorted(objects) == ["OT", "SR"]
    expected = run_pipeline(
        ModelRegistry(bundled_models_dir()).get("breast-density"), load_volume([tmp_path / "mg.dcm"])
    )
    assert expected.category_code.meaning in str(objects["SR"][0])
    assert expected.category == "C"  # the phantom is drawn as category C; the model card reports 97.5 % accuracy


def test_unsuitable_input_is_reported_as_not_analysed_and_writes_nothing(ct_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    run = ainode_run(ct_dir / "series-3-B40f", "--out", out, "--pipeline", "chest-xray")
    assert run.returncode == 3, run.stdout + run.stderr  # nothing failed, nothing written: scripts can tell
    assert "not analysed: no-suitable-series" in run.stdout and "modality CT, not CR/DX" in run.stdout
    assert not list(out.rglob("*.dcm"))


def test_exit_code_tells_a_script_whether_anything_was_written(tmp_path: Path):
    from pydicom.data import get_testdata_file

    mr = get_testdata_file("MR_small.dcm")  # no route for MR among the defaults
    run = ainode_run(mr, "--out", tmp_path / "out")
    assert run.returncode == 3, run.stdout + run.stderr
    assert "series not routed: " in run.stdout and "no result written" in run.stderr
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    run = ainode_run(junk, mr, "--out", tmp_path / "out")
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{junk}: not a readable DICOM file" in run.stderr
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_config_can_omit_empty_seg_frames(ct_dir: Path, tmp_path: Path):
    config = tmp_path / "ainode.yaml"
    config.write_text("results: {omit_empty_seg_frames: true}\n")
    run = ainode_run(
        ct_dir / "series-3-B40f",
        "--out",
        tmp_path / "out",
        "--outputs",
        "seg",
        "--config",
        config,
        "--pipeline",
        "lung-seg",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (seg,) = written(tmp_path / "out")["SEG"]
    # 30 slices x 2 lungs when every frame is written; the slices above and below a lung are left out.
    assert 30 <= seg.NumberOfFrames < 60


def test_a_study_uid_that_is_a_path_cannot_write_outside_the_output_folder(tmp_path: Path):
    image = make_xray_phantom(np.random.default_rng(3), opacity=True).image
    source = tmp_path / "in" / "cr.dcm"
    source.parent.mkdir()
    radiograph_file(source, image, "CR", CR_IMAGE_STORAGE, BodyPartExamined="CHEST", ViewPosition="PA")
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = "../../../escape-offline"
    ds.save_as(source)
    out = tmp_path / "deep" / "er" / "out"

    run = ainode_run(source, "--out", out)

    assert run.returncode == 1, run.stdout + run.stderr
    assert "not a valid DICOM UID" in run.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p != source] == []
