"""Each result object succeeds or fails on its own, and none states geometry its source does not give.

Issue 10, items 2 and 3: a Fuji CR without Patient Orientation lost its SR because its Secondary
Capture could not be built; a Philips CR with Pixel Spacing 0\\0 got an SC stating 1.0\\1.0 mm.
Every object written here is judged by dciodvfy.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from pydicom import Dataset

import pipelines.dicom as writers
from pipelines.dicom import write_each, write_results
from pipelines.enums import ResultKind
from pipelines.volume import InPlaneSpacing, load_volume
from tests.support.dicom import CR_IMAGE_STORAGE, EQUIPMENT, classification_result, synthetic_image
from tests.support.peers import dciodvfy_errors
from tests.support.runners import onnx_study_runner
from tests.support.series import ct_series, save


def radiograph(**changes: object) -> Dataset:
    """A CR chest radiograph as Fuji and Philips write them; ``changes`` set (or, with None, remove) attributes."""
    ds = synthetic_image("CR", CR_IMAGE_STORAGE, extra={"BodyPartExamined": "CHEST", "ViewPosition": "PA"})
    ds.PixelSpacing = [0.15, 0.15]
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def classified(ds: Dataset):
    """A classification result on ``ds`` whose volume is loaded as the node loads it (spacing as the header gives)."""
    return dataclasses.replace(classification_result(ds), volume=load_volume([ds]))


def judged(objects: list[Dataset], tmp_path: Path) -> None:
    for k, obj in enumerate(objects):
        path = tmp_path / f"{k}-{obj.Modality}.dcm"
        obj.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], f"{obj.Modality} {obj.SOPClassUID}"


def test_a_radiograph_without_patient_orientation_gets_its_secondary_capture_and_its_sr(tmp_path: Path) -> None:
    ds = radiograph(PatientOrientation=None)

    objects = write_results(classified(ds), [ds], EQUIPMENT, {"sr", "sc"})

    sc = next(o for o in objects if o.Modality == "OT")
    assert {o.Modality for o in objects} == {"SR", "OT"}
    # General Image, Type 2C: present and empty when the source does not say how the patient lies.
    assert "PatientOrientation" in sc and not sc.PatientOrientation
    judged(objects, tmp_path)


def test_when_one_output_cannot_be_built_the_others_still_are(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = radiograph()

    def broken(*args: object, **kwargs: object) -> list[Dataset]:
        raise TypeError("Patient orientation is required if coordinate system is PATIENT")

    monkeypatch.setattr(writers, "make_secondary_captures", broken)
    written = write_each(classified(ds), [ds], EQUIPMENT, {"sr", "sc"})

    assert [o.Modality for o in written.datasets] == ["SR"]
    assert set(written.failed) == {ResultKind.SC}
    with pytest.raises(TypeError):  # the all-or-nothing form still says what went wrong
        write_results(classified(ds), [ds], EQUIPMENT, {"sr", "sc"})


def test_the_job_keeps_what_was_built_and_names_each_output_that_was_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.support.node_parts import STABLE_AFTER_S, build_node

    def broken(*args: object, **kwargs: object) -> list[Dataset]:
        raise TypeError("the SC writer broke")

    monkeypatch.setattr(writers, "make_secondary_captures", broken)
    node = build_node(tmp_path)
    slices = ct_series(20)
    node.receive(slices)
    assert node.assembler.tick(now=node.clock.advance(STABLE_AFTER_S + 1))
    caplog.set_level(logging.WARNING)

    class LungRunner:  # the real study runner, asked for every output kind
        def run(self, pipeline, series_files, outputs):  # type: ignore[no-untyped-def]
            # Without the validated domain: a 32 x 32 synthetic CT is outside lung-seg's.
            return onnx_study_runner(domain=False).run("lung-seg", series_files, {"seg", "sr", "sc"})

    assert node.worker(runner=LungRunner()).run_once()

    (job,) = node.jobs()
    assert job.state.value == "done"
    assert job.reason is not None and job.reason.startswith("sc not built: TypeError: the SC writer broke")
    assert sorted(r.kind for r in node.results()) == ["seg", "sr"]
    assert "sc not built" in caplog.text


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"PixelSpacing": [0, 0]}, None),
        ({"PixelSpacing": None}, None),
        ({"PixelSpacing": None, "ImagerPixelSpacing": [0.2, 0.2]}, None),  # at the detector, not in the patient
        ({"PixelSpacing": ["nan", "nan"]}, None),
        ({"PixelSpacing": [0.15, 0.15]}, [0.15, 0.15]),
    ],
    ids=["zero", "absent", "imager-only", "nan", "valid"],
)
def test_the_secondary_capture_states_only_the_pixel_spacing_the_source_gives(
    changes: dict[str, object], expected: list[float] | None, tmp_path: Path
) -> None:
    ds = radiograph(**changes)

    (sc,) = write_results(classified(ds), [ds], EQUIPMENT, {"sc"})

    assert (list(map(float, sc.PixelSpacing)) if "PixelSpacing" in sc else None) == expected
    judged([sc], tmp_path)


def test_a_volume_knows_whether_its_spacing_is_in_the_patient_at_the_detector_or_unknown() -> None:
    assert load_volume([radiograph()]).in_plane_spacing is InPlaneSpacing.PATIENT
    imager = radiograph(PixelSpacing=None, ImagerPixelSpacing=[0.2, 0.2])
    assert load_volume([imager]).in_plane_spacing is InPlaneSpacing.DETECTOR
    unknown = load_volume([radiograph(PixelSpacing=[0, 0])])
    assert unknown.in_plane_spacing is InPlaneSpacing.UNKNOWN and unknown.spacing_mm[1:] == (1.0, 1.0)


def test_a_ct_without_valid_pixel_spacing_is_not_analysed_rather_than_measured_in_assumed_millimetres(
    tmp_path: Path,
) -> None:
    slices = ct_series(20, pixel_spacing=(0.0, 0.0))
    files = [save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(slices)]

    runner = onnx_study_runner(domain=False)  # the spacing, not the synthetic matrix, is what is refused here
    outcome = runner.run("lung-seg", {str(slices[0].SeriesInstanceUID): files}, {"seg", "sr"})

    assert outcome.datasets == []
    assert outcome.not_analysed is not None and outcome.not_analysed.startswith("unknown-pixel-spacing: ")
