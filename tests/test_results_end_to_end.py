"""Results reach a real PACS: the real CT in, DICOM-SEG and TID 1500 SR out, stored in Orthanc (issue 4).

The node runs as ``ainode serve`` with the bundled lung-seg model; DCMTK storescu plays the scanner,
Orthanc the PACS. What Orthanc stores is read back with highdicom and judged by dciodvfy. The CT is
TCIA Lung-PET-CT-Dx subject A0002 (CC BY 4.0), read in place.
"""

from __future__ import annotations

import threading
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.support.cli import status
from tests.support.dicom import copy_as_other_patient
from tests.support.nodeproc import NodeProcess, node_config
from tests.support.peers import dciodvfy_errors, storescu
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.filterwarnings("ignore::UserWarning")]

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def lung_config(tmp_path: Path, orthanc, outputs: list[str], workers: int = 1) -> dict:
    config = node_config(tmp_path, orthanc)
    config["node"]["workers"] = workers
    config["peers"]["pacs"]["outputs"] = outputs
    config["routes"] = [
        {"name": "ct-lungs", "match": {"Modality": "CT"}, "pipeline": "lung-seg", "destinations": ["pacs"],
         "stable_after_s": 2}
    ]  # fmt: skip
    return config


def results_by_class(orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for instance_id in orthanc.find_instances(StudyInstanceUID=study_uid):
        ds = orthanc.instance_dataset(instance_id)
        if ds.get("Manufacturer") == "dicom-ai-node":
            out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.rglob("*.dcm"))]


def test_ct_study_gets_seg_sr_and_sc_in_orthanc_on_the_right_patient_and_series(tmp_path, orthanc, ct_dir):
    orthanc.clear()
    config = lung_config(tmp_path, orthanc, ["seg", "sr", "sc"])
    sources = headers(ct_dir)
    soft = [ds for ds in sources if str(ds.ConvolutionKernel).startswith("B40")]  # the softer reconstruction
    study_uid = sources[0].StudyInstanceUID
    with NodeProcess(config, tmp_path / "n", cli=True) as node:
        assert storescu(ct_dir, node.port, calling_ae="CTSCANNER").returncode == 0
        found = wait_for(
            lambda: (r := results_by_class(orthanc, study_uid)) and SEG_CLASS in r and COMPREHENSIVE_3D_SR in r and r,
            timeout_s=240,
            what="SEG and SR in Orthanc",
            node=node,
        )
        jobs = status(node)["jobs"]
        assert [(j["pipeline"], j["state"]) for j in jobs] == [("lung-seg", "done")]
        # SC: one per slice with lung; wait for all deliveries to end.
        wait_for(lambda: not status(node)["counts"]["deliveries"].get("pending"), timeout_s=120, node=node)
    found = results_by_class(orthanc, study_uid)

    (seg_ds,) = found[SEG_CLASS]
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert (seg.PatientID, seg.StudyInstanceUID) == (sources[0].PatientID, study_uid)
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == soft[0].SeriesInstanceUID  # the series the model was run on
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in soft
    }
    assert seg.FrameOfReferenceUID == soft[0].FrameOfReferenceUID
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["Left lung", "Right lung"]

    (sr_ds,) = found[COMPREHENSIVE_3D_SR]
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    assert (sr.PatientID, sr.StudyInstanceUID) == (sources[0].PatientID, study_uid)
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    assert {g.referenced_segment.referenced_sop_instance_uid for g in volumetric} == {seg_ds.SOPInstanceUID}
    for group in volumetric:
        litres = group.get_measurements(name=pydicom.sr.codedict.codes.SCT.Volume)[0].value / 1000
        assert 0.5 < litres < 4.0  # each lung of this 24 cm CT
    planar_sources = {
        g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for g in sr.content.get_planar_roi_measurement_groups()
    }
    assert planar_sources <= {ds.SOPInstanceUID for ds in soft}

    captures = found[SC_CLASS]
    assert 20 <= len(captures) <= len(soft)
    assert all(c.PatientID == sources[0].PatientID and c.BurnedInAnnotation == "YES" for c in captures)

    # What the PACS stored is valid by the standard's own checker.
    for ds in (seg_ds, sr_ds, captures[0]):
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], ds.SOPClassUID


def test_two_patients_sent_at_once_each_get_only_their_own_results(tmp_path, orthanc, ct_dir):
    """Patient safety: results of concurrent studies carry their own source's Patient ID and Study UID."""
    orthanc.clear()
    studies = {}
    for pid in ("AI-TEST-1", "AI-TEST-2"):
        folder = tmp_path / pid
        studies[pid] = (copy_as_other_patient([ct_dir / "series-3-B40f"], folder, pid, f"Test^{pid}"), folder)
    config = lung_config(tmp_path, orthanc, ["seg", "sr"], workers=2)
    with NodeProcess(config, tmp_path / "n", cli=True) as node:
        codes: dict[str, int] = {}

        def send(pid: str, folder: Path) -> None:
            codes[pid] = storescu(folder, node.port, calling_ae=f"SCANNER{pid[-1]}").returncode

        threads = [threading.Thread(target=send, args=(pid, folder)) for pid, (_, folder) in studies.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == {"AI-TEST-1": 0, "AI-TEST-2": 0}
        for pid, (study_uid, _) in studies.items():
            wait_for(
                lambda uid=study_uid: len(sum(results_by_class(orthanc, uid).values(), [])) == 2,
                timeout_s=240,
                what=f"SEG and SR of {pid}",
                node=node,
            )
    for pid, (study_uid, folder) in studies.items():
        own = {ds.SOPInstanceUID for ds in headers(folder)}
        results = sum(results_by_class(orthanc, study_uid).values(), [])
        assert sorted(str(r.Modality) for r in results) == ["SEG", "SR"]
        for ds in results:
            assert (ds.PatientID, str(ds.PatientName), ds.StudyInstanceUID) == (pid, f"Test^{pid}", study_uid)
            assert ds.AccessionNumber == f"ACC-{pid}"
        seg = next(r for r in results if r.Modality == "SEG")
        referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == own
        sr = next(r for r in results if r.Modality == "SR")
        evidence = {
            ref.ReferencedSOPInstanceUID
            for s in sr.CurrentRequestedProcedureEvidenceSequence
            for series in s.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert evidence == own | {seg.SOPInstanceUID}
