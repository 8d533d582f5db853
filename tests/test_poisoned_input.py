"""Poisoned studies are refused before analysis, with a specific reason, and nothing is published.

Each of these came back as a confident result before (issue 12, item 3; issue 10's corpus): a CT with
Rescale Slope "NaN" as lungs of 0.0 mL, a CT marked MONOCHROME1 as 0.6 mL (its Hounsfield units
inverted), and one study with two Patient IDs as a SEG and SR labelled with the second patient only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from pipelines.notanalysed import NotAnalysable, NotAnalysedReason
from pipelines.volume import load_volume
from tests.support.runners import onnx_study_runner
from tests.support.series import SIZE, ct_series, enhanced_ct, projection, save, slice_pixels


@pytest.mark.parametrize("slope", ["NaN", "inf", "0", "-1", "abc"])
def test_a_rescale_slope_that_is_not_a_finite_positive_number_refuses_the_series(slope: str) -> None:
    slices = ct_series(3)
    # As read from a file: pydicom converts the value only when it is used (setting "abc" would raise here).
    slices[1]._dict[Tag("RescaleSlope")] = RawDataElement(
        Tag("RescaleSlope"), "DS", len(slope), slope.encode(), 0, False, True
    )

    with pytest.raises(NotAnalysable) as refused:
        load_volume(slices)

    assert refused.value.outcome.reason is NotAnalysedReason.INVALID_PIXEL_VALUES
    assert "RescaleSlope" in refused.value.outcome.detail


def test_a_non_finite_rescale_intercept_refuses_the_series() -> None:
    slices = ct_series(3)
    slices[2].RescaleIntercept = "NaN"

    with pytest.raises(NotAnalysable, match="invalid-pixel-values: RescaleIntercept"):
        load_volume(slices)


def test_a_ct_marked_monochrome1_keeps_its_hounsfield_units() -> None:
    clean = load_volume(ct_series(3))
    marked = ct_series(3)
    for ds in marked:
        ds.PhotometricInterpretation = "MONOCHROME1"

    np.testing.assert_array_equal(load_volume(marked).pixels, clean.pixels)


def test_a_radiograph_in_monochrome1_is_still_shown_bright_where_dense() -> None:
    pixels = np.tile(np.arange(SIZE, dtype=np.uint16) * 50, (SIZE, 1))
    as_m2 = load_volume([projection(pixels)]).pixels
    as_m1 = load_volume([projection(pixels.max() - pixels, photometric="MONOCHROME1")]).pixels

    np.testing.assert_array_equal(np.argsort(as_m1[0, 0]), np.argsort(as_m2[0, 0]))


def test_a_study_with_two_patient_ids_is_not_analysed_and_the_reason_names_no_patient(tmp_path: Path) -> None:
    slices = ct_series(20)
    for k, ds in enumerate(slices):
        ds.PatientID = "PAT-A-4711" if k < 10 else "PAT-B-0815"
        ds.PatientName = "Alpha^Ann" if k < 10 else "Beta^Bob"
    files = [save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(slices)]

    outcome = onnx_study_runner().run("lung-seg", {str(slices[0].SeriesInstanceUID): files}, {"seg", "sr"})

    assert outcome.datasets == []
    assert outcome.not_analysed is not None and outcome.not_analysed.startswith("patient-mismatch: ")
    assert "2 different PatientID values" in outcome.not_analysed
    for value in ("PAT-A", "PAT-B", "Alpha", "Beta"):
        assert value not in outcome.not_analysed


def test_two_patients_in_different_series_of_one_study_are_a_mismatch_too(tmp_path: Path) -> None:
    first, second = ct_series(20), ct_series(20, origin=(-11.2, -11.2, 40.0))
    for ds in second:
        ds.PatientID = "SOMEONE-ELSE"
    files = {
        str(series[0].SeriesInstanceUID): [save(ds, tmp_path / f"{n}-{k}.dcm") for k, ds in enumerate(series)]
        for n, series in enumerate((first, second))
    }

    outcome = onnx_study_runner().run("lung-seg", files, {"seg"})

    assert outcome.not_analysed is not None and outcome.not_analysed.startswith("patient-mismatch: ")


def test_an_instance_that_leaves_the_name_empty_is_not_another_patient(tmp_path: Path) -> None:
    slices = ct_series(20)
    for k, ds in enumerate(slices):
        ds.PatientName = "Alpha^Ann" if k else ""
    files = [save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(slices)]

    # Without the validated domain: a 32 x 32 synthetic CT is outside lung-seg's.
    outcome = onnx_study_runner(domain=False).run("lung-seg", {str(slices[0].SeriesInstanceUID): files}, {"seg"})

    assert outcome.not_analysed is None


def test_an_enhanced_ct_without_functional_groups_is_refused_before_inference() -> None:
    ds = enhanced_ct([0.0, 2.5, 5.0], np.stack([slice_pixels(k) for k in range(3)]))
    del ds.SharedFunctionalGroupsSequence
    del ds.PerFrameFunctionalGroupsSequence

    with pytest.raises(NotAnalysable, match="inconsistent-geometry: CT frames without patient geometry: 3 of 3"):
        load_volume([ds])


def test_a_legacy_multi_frame_ct_with_an_orientation_but_no_positions_is_refused() -> None:
    ds = ct_series(1)[0]
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    del ds.ImagePositionPatient

    with pytest.raises(NotAnalysable, match="2 of 2 without Image Position"):
        load_volume([ds])


def test_a_series_larger_than_the_jobs_memory_budget_is_not_analysed_before_anything_is_decoded(
    tmp_path: Path,
) -> None:
    slices = ct_series(20)
    files = [save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(slices)]
    # 20 slices of 32 x 32 as float32 are 80 KiB; a budget of 1 KiB stands for a series too large for the machine.
    runner = onnx_study_runner(domain=False, max_volume_bytes=1024)

    outcome = runner.run("lung-seg", {str(slices[0].SeriesInstanceUID): files}, {"seg"})

    assert outcome.not_analysed is not None and outcome.not_analysed.startswith("volume-too-large: ")
    assert outcome.model_s is None, "nothing was loaded or run"
