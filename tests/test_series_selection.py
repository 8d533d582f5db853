"""Which series of a study a pipeline takes (pipelines/select.py), and why it skips the others.

Headers are built in the test (tests/support/series.py) without pixels, as selection reads headers only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    generate_uid,
)

from pipelines.notanalysed import NotAnalysable, NotAnalysedReason
from pipelines.select import kernel_sharpness, rank_series, select_series
from tests.support.data import real_series
from tests.support.series import (
    CORONAL,
    CR_IMAGE,
    DX_IMAGE,
    MR_IMAGE,
    SAGITTAL,
    SECONDARY_CAPTURE,
    SIZE,
    ct_series,
    ct_slice,
    noise,
    projection,
)


# -- series selection ------------------------------------------------------------------------------
def _study(**series: list[Dataset]) -> tuple[dict[str, list[Dataset]], dict[str, str]]:
    """Headers by SeriesInstanceUID, and the UID of each named series."""
    by_uid = {str(datasets[0].SeriesInstanceUID): datasets for datasets in series.values()}
    return by_uid, {name: str(datasets[0].SeriesInstanceUID) for name, datasets in series.items()}


def _ct_study() -> tuple[dict[str, list[Dataset]], dict[str, str]]:
    return _study(
        localizer=[
            ct_slice(
                (0.0, 0.0, 0.0),
                orientation=CORONAL,
                series_uid="1.2.826.0.1.3680043.8.498.101",
                kernel="T20f",
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                instance_number=k + 1,
            )
            for k in range(2)
        ],
        thick_soft=ct_series(20, step_mm=5.0, thickness_mm=5.0, kernel="B30f", with_pixels=False),
        thin_sharp=ct_series(40, step_mm=1.0, thickness_mm=1.0, kernel="B70f", with_pixels=False),
        thin_soft=ct_series(40, step_mm=1.0, thickness_mm=1.0, kernel="B30f", with_pixels=False),
        thin_soft_mpr=ct_series(
            60,
            step_mm=0.6,
            thickness_mm=0.6,
            kernel="B30f",
            image_type=("DERIVED", "SECONDARY", "AXIAL"),
            with_pixels=False,
        ),
        thin_soft_sagittal=ct_series(
            40, step_mm=0.6, thickness_mm=0.6, kernel="B30f", orientation=SAGITTAL, with_pixels=False
        ),
        dose_report=[
            ct_slice(
                (0.0, 0.0, 0.0),
                series_uid="1.2.826.0.1.3680043.8.498.102",
                sop_class=SECONDARY_CAPTURE,
                image_type=("DERIVED", "SECONDARY", "OTHER"),
            )
        ],
    )


def test_ct_selection_takes_the_thin_soft_original_axial_series() -> None:
    study, uid = _ct_study()

    assert select_series(study, task="segmentation", modalities=["CT"]) == uid["thin_soft"]


def test_ct_ranking_puts_thin_before_thick_and_soft_before_sharp_and_says_why_others_are_rejected() -> None:
    study, uid = _ct_study()

    candidates, rejected = rank_series(study, task="segmentation", modalities=["CT"])

    assert [c.series_instance_uid for c in candidates] == [uid["thin_soft"], uid["thin_sharp"], uid["thick_soft"]]
    assert set(rejected) == {uid["localizer"], uid["thin_soft_mpr"], uid["thin_soft_sagittal"], uid["dose_report"]}
    assert "localizer/derived/secondary" in rejected[uid["localizer"]]
    assert "localizer/derived/secondary" in rejected[uid["thin_soft_mpr"]]
    assert "not axial" in rejected[uid["thin_soft_sagittal"]]
    assert "no CT image objects" in rejected[uid["dose_report"]]


def test_sagittal_series_is_not_selected() -> None:
    study, uid = _study(sagittal=ct_series(40, orientation=SAGITTAL, with_pixels=False))

    with pytest.raises(NotAnalysable) as info:
        select_series(study, task="segmentation", modalities=["CT"])

    assert info.value.outcome.reason is NotAnalysedReason.NO_SUITABLE_SERIES
    assert f"{uid['sagittal']}: not axial" in info.value.outcome.detail


@pytest.mark.parametrize(
    ("soft", "sharp"),
    [
        ("B30f", "B70f"),  # Siemens
        ("Br40d", "Br64d"),  # Siemens, newer names
        ("SOFT", "BONE"),  # GE
        ("STANDARD", "LUNG"),  # GE
        ("B", "D"),  # Philips
        ("FC08", "FC52"),  # Canon / Toshiba
    ],
)
def test_soft_kernel_is_preferred_whatever_the_vendor_convention(soft: str, sharp: str) -> None:
    assert kernel_sharpness(soft) < kernel_sharpness(sharp)
    study, uid = _study(
        sharp=ct_series(20, kernel=sharp, with_pixels=False),
        soft=ct_series(20, kernel=soft, with_pixels=False),
    )

    assert select_series(study, task="segmentation", modalities=["CT"]) == uid["soft"]


def test_multi_valued_kernel_is_read_by_its_first_value() -> None:
    # Siemens writes Convolution Kernel with two values (kernel, iterative strength): Br40d\3.
    header = ct_slice((0.0, 0.0, 0.0), kernel="Br40d")
    header.ConvolutionKernel = ["Br40d", "3"]

    assert kernel_sharpness(header.ConvolutionKernel) == kernel_sharpness("Br40d") == 40


def test_no_suitable_series_lists_each_series_and_its_reason() -> None:
    study, uid = _study(
        mr=ct_series(30, modality="MR", sop_class=MR_IMAGE, with_pixels=False),
        short=ct_series(5, with_pixels=False),
        localizer=ct_series(2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), with_pixels=False),
    )

    with pytest.raises(NotAnalysable) as info:
        select_series(study, task="segmentation", modalities=["CT"])

    detail = info.value.outcome.detail
    assert info.value.outcome.reason is NotAnalysedReason.NO_SUITABLE_SERIES
    assert f"{uid['mr']}: modality MR, not CT" in detail
    assert f"{uid['short']}: 5 slices, at least 16 needed" in detail
    assert f"{uid['localizer']}: only localizer/derived/secondary images" in detail


def test_empty_study_has_no_suitable_series() -> None:
    with pytest.raises(NotAnalysable) as info:
        select_series({}, task="segmentation", modalities=["CT"])

    assert info.value.outcome.reason is NotAnalysedReason.NO_SUITABLE_SERIES


def _radiograph_series(view: str, *, modality: str = "DX", description: str = "") -> list[Dataset]:
    ds = projection(
        np.zeros((SIZE, SIZE), np.uint16),
        view=view,
        modality=modality,
        sop_class=DX_IMAGE if modality == "DX" else CR_IMAGE,
        description=description,
    )
    del ds.PixelData
    return [ds]


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_chest_radiograph_selection_takes_the_frontal_view(modality: str) -> None:
    study, uid = _study(
        lateral=_radiograph_series("LL", modality=modality),
        frontal=_radiograph_series("PA", modality=modality),
        lateral_by_description=_radiograph_series("", modality=modality, description="THORAX LAT"),
    )

    candidates, rejected = rank_series(study, task="classification", modalities=["CR", "DX"])

    assert [c.series_instance_uid for c in candidates] == [uid["frontal"]]
    assert "lateral" in rejected[uid["lateral"]] and "lateral" in rejected[uid["lateral_by_description"]]
    assert select_series(study, task="classification", modalities=["CR", "DX"]) == uid["frontal"]


def test_radiograph_frontal_view_code_ranks_above_a_described_one() -> None:
    study, uid = _study(
        described=_radiograph_series("", description="CHEST PA"),
        coded=_radiograph_series("AP"),
    )

    assert select_series(study, task="classification", modalities=["CR", "DX"]) == uid["coded"]


def test_lateral_only_radiograph_study_is_not_analysable() -> None:
    study, uid = _study(lateral=_radiograph_series("RL"))

    with pytest.raises(NotAnalysable) as info:
        select_series(study, task="classification", modalities=["CR", "DX"])

    assert info.value.outcome.reason is NotAnalysedReason.NO_SUITABLE_SERIES
    assert uid["lateral"] in info.value.outcome.detail and "lateral" in info.value.outcome.detail


def test_one_image_model_takes_the_frontal_image_of_a_series_that_also_holds_the_lateral() -> None:
    from pipelines.select import usable_instances

    series_uid = generate_uid()
    pixels = noise(5)
    views = [projection(pixels, view=v, series_uid=series_uid) for v in ("LL", "PA", "LL")]
    assert usable_instances(views, "classification", ["CR", "DX"]) == [1]
    assert usable_instances([views[0]], "classification", ["CR", "DX"]) == []  # lateral only: nothing to take


# -- the real chest CT -------------------------------------------------------------------------
def test_real_ct_study_selects_the_soft_kernel_series(ct_dir: Path) -> None:
    headers = {}
    for name in ("series-2-B70f", "series-3-B40f"):
        series = [dcmread(p, stop_before_pixels=True) for p in real_series(ct_dir, name)]
        headers[str(series[0].SeriesInstanceUID)] = series

    chosen = select_series(headers, task="segmentation", modalities=["CT"])

    assert headers[chosen][0].ConvolutionKernel == "B40f"
