"""Result objects refuse nonsense when they are made, naming the argument (as highdicom's content classes do).

A result that exists can be written: a label map that does not fit its volume, a probability outside
[0, 1] or two segments with one number is an error where the pipeline makes it, not a broken SEG or
SR at the PACS.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.results import (
    ClassificationResult,
    DensityResult,
    Feature,
    ModelIdentity,
    SegmentationResult,
    SegmentDefinition,
    SegmentStatistics,
)
from pipelines.volume import SourceFrame, Volume

MODEL = ModelIdentity("test-model", "1.0")
LUNG = SegmentDefinition(1, "Right lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung, codes.SCT.Right)
OTHER_LUNG = SegmentDefinition(2, "Left lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung, codes.SCT.Left)
FINDING = Code("233604007", "SCT", "Pneumonia")
DENSE = Code("129717001", "SCT", "Scattered fibroglandular densities")


def volume(slices: int = 3, rows: int = 16, columns: int = 12) -> Volume:
    return Volume(
        pixels=np.zeros((slices, rows, columns), np.float32),
        origin_mm=np.zeros(3),
        spacing_mm=(1.0, 1.0, 1.0),
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 1.0, 0]),
        slice_direction=np.array([0, 0, 1.0]),
        source_frames=[SourceFrame("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{i}") for i in range(slices)],
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        frame_of_reference_uid=None,
        modality="CT",
    )


def statistics(number: int = 1, **changes: object) -> SegmentStatistics:
    fields: dict[str, object] = {
        "number": number,
        "volume_ml": 1.5,
        "mean_intensity": -800.0,
        "intensity_unit": "[hnsf'U]",
        "largest_slice_index": 1,
        "outline_rc": np.zeros((0, 2)),
    }
    fields.update(changes)
    return SegmentStatistics(**fields)  # type: ignore[arg-type]


def segmentation(**changes: object) -> SegmentationResult:
    fields: dict[str, object] = {
        "model": MODEL,
        "volume": volume(),
        "labelmap": np.zeros((3, 16, 12), np.uint8),
        "segments": [LUNG, OTHER_LUNG],
        "statistics": [statistics(1), statistics(2)],
    }
    fields.update(changes)
    return SegmentationResult(**fields)  # type: ignore[arg-type]


def classification(**changes: object) -> ClassificationResult:
    fields: dict[str, object] = {
        "model": MODEL,
        "volume": volume(1),
        "finding": FINDING,
        "probability": 0.7,
        "threshold": 0.5,
        "heatmap": np.zeros((16, 12), np.float32),
        "hotspot_box_rc": (0.0, 0.0, 12.0, 16.0),
    }
    fields.update(changes)
    return ClassificationResult(**fields)  # type: ignore[arg-type]


def density(**changes: object) -> DensityResult:
    fields: dict[str, object] = {
        "model": MODEL,
        "volume": volume(1),
        "category": "B",
        "category_code": DENSE,
        "probabilities": {"A": 0.1, "B": 0.7, "C": 0.15, "D": 0.05},
        "features": [Feature("dense_fraction", Code("DF", "99AINODE", "Fraction"), 23.5, "%")],
    }
    fields.update(changes)
    return DensityResult(**fields)  # type: ignore[arg-type]


def refused(error: type[Exception], argument: str) -> pytest.RaisesContext[Exception]:
    """The constructor raises ``error`` with a message that names ``argument``."""
    return pytest.raises(error, match=re.escape(f'Argument "{argument}'))


def test_well_formed_results_are_accepted() -> None:
    assert segmentation().segments == [LUNG, OTHER_LUNG]
    assert classification().present
    assert density().category == "B"


# -- segmentation -----------------------------------------------------------------------------------
def test_segmentation_refuses_a_label_map_of_another_shape_than_its_volume() -> None:
    with refused(ValueError, "labelmap") as info:
        segmentation(labelmap=np.zeros((3, 16, 11), np.uint8))
    assert "(3, 16, 12)" in str(info.value)


def test_segmentation_refuses_a_label_map_that_is_not_unsigned_integers() -> None:
    with refused(ValueError, "labelmap"):
        segmentation(labelmap=np.zeros((3, 16, 12), np.float32))
    with refused(ValueError, "labelmap"):
        segmentation(labelmap=np.zeros((3, 16, 12), np.int16))
    with refused(TypeError, "labelmap"):
        segmentation(labelmap=[[[0]]])


def test_segmentation_refuses_a_label_value_that_no_segment_has() -> None:
    labelmap = np.zeros((3, 16, 12), np.uint8)
    labelmap[1, 2, 3] = 3
    with refused(ValueError, "labelmap") as info:
        segmentation(labelmap=labelmap)
    assert "3" in str(info.value)


def test_segmentation_refuses_two_segments_with_one_number() -> None:
    twin = replace(OTHER_LUNG, number=1)
    with refused(ValueError, "segments") as info:
        segmentation(segments=[LUNG, twin], statistics=[statistics(1)])
    assert "one segment per number" in str(info.value)


def test_segmentation_refuses_no_segment_and_what_is_not_a_segment() -> None:
    with refused(ValueError, "segments"):
        segmentation(segments=[], statistics=[])
    with refused(TypeError, "segments[1]"):
        segmentation(segments=[LUNG, "Left lung"], statistics=[statistics(1)])


def test_segmentation_refuses_statistics_of_an_unknown_or_repeated_segment() -> None:
    with refused(ValueError, "statistics"):
        segmentation(statistics=[statistics(3)])
    with refused(ValueError, "statistics"):
        segmentation(statistics=[statistics(1), statistics(1)])
    with refused(ValueError, "statistics[0]"):
        segmentation(statistics=[statistics(1, largest_slice_index=3)])


def test_segmentation_refuses_a_volume_or_model_of_the_wrong_type() -> None:
    with refused(TypeError, "volume"):
        segmentation(volume=np.zeros((3, 16, 12)))
    with refused(TypeError, "model"):
        segmentation(model="test-model 1.0")


def test_segment_definition_refuses_a_number_a_seg_cannot_hold_and_an_empty_label() -> None:
    for number in (0, -1, 65536):
        with refused(ValueError, "number"):
            replace(LUNG, number=number)
    with refused(TypeError, "number"):
        replace(LUNG, number=1.0)
    with refused(ValueError, "label"):
        replace(LUNG, label="  ")


def test_segment_definition_refuses_codes_that_are_not_codes() -> None:
    with refused(TypeError, "property_type"):
        replace(LUNG, property_type="Lung")
    with refused(TypeError, "category"):
        replace(LUNG, category=None)
    with refused(TypeError, "laterality"):
        replace(LUNG, laterality="Right")


def test_segment_statistics_refuse_negative_or_not_finite_measurements() -> None:
    with refused(ValueError, "volume_ml"):
        statistics(volume_ml=-0.1)
    with refused(ValueError, "mean_intensity"):
        statistics(mean_intensity=float("nan"))
    with refused(ValueError, "largest_slice_index"):
        statistics(largest_slice_index=-1)
    with refused(ValueError, "outline_rc"):
        statistics(outline_rc=np.zeros((4, 3)))
    with refused(ValueError, "outline_rc"):
        statistics(outline_rc=np.array([[0.5, np.inf]]))


# -- classification -----------------------------------------------------------------------------------
@pytest.mark.parametrize("probability", [-0.01, 1.01, float("nan"), float("inf")])
def test_classification_refuses_a_probability_outside_zero_to_one(probability: float) -> None:
    with refused(ValueError, "probability"):
        classification(probability=probability)


def test_classification_refuses_a_threshold_outside_zero_to_one_and_a_probability_that_is_no_number() -> None:
    with refused(ValueError, "threshold"):
        classification(threshold=1.5)
    with refused(TypeError, "probability"):
        classification(probability="0.7")
    with refused(TypeError, "probability"):
        classification(probability=True)


def test_classification_accepts_the_bounds_of_a_probability() -> None:
    assert not classification(probability=0.0).present
    assert classification(probability=1.0, threshold=1.0).present


def test_classification_refuses_a_heat_map_off_the_image_grid_or_out_of_range() -> None:
    with refused(ValueError, "heatmap") as info:
        classification(heatmap=np.zeros((12, 16), np.float32))
    assert "(16, 12)" in str(info.value)
    with refused(ValueError, "heatmap"):
        classification(heatmap=np.full((16, 12), 1.5, np.float32))
    with refused(ValueError, "heatmap"):
        classification(heatmap=np.full((16, 12), np.nan, np.float32))


def test_classification_refuses_a_hot_spot_box_that_is_not_a_box() -> None:
    with refused(ValueError, "hotspot_box_rc"):
        classification(hotspot_box_rc=(0.0, 0.0, 12.0))
    with refused(ValueError, "hotspot_box_rc"):
        classification(hotspot_box_rc=(10.0, 0.0, 2.0, 16.0))
    with refused(ValueError, "hotspot_box_rc[3]"):
        classification(hotspot_box_rc=(0.0, 0.0, 12.0, float("nan")))


def test_classification_refuses_a_finding_that_is_not_a_code() -> None:
    with refused(TypeError, "finding"):
        classification(finding="Pneumonia")


# -- density -----------------------------------------------------------------------------------------
def test_density_refuses_a_probability_outside_zero_to_one_naming_its_category() -> None:
    with refused(ValueError, "probabilities['C']"):
        density(probabilities={"A": 0.1, "B": 0.7, "C": 1.2})


def test_density_refuses_a_category_without_a_probability() -> None:
    with refused(ValueError, "category"):
        density(category="E")
    with refused(ValueError, "category"):
        density(category="")


def test_density_refuses_features_that_are_not_features_and_a_broken_outline() -> None:
    with refused(TypeError, "features[0]"):
        density(features=[("dense_fraction", 23.5)])
    with refused(ValueError, "breast_outline_rc"):
        density(breast_outline_rc=np.zeros((5,)))


def test_feature_refuses_a_value_that_is_not_finite_and_an_empty_unit() -> None:
    concept = Code("DF", "99AINODE", "Fraction")
    with refused(ValueError, "value"):
        Feature("dense_fraction", concept, float("nan"), "%")
    with refused(ValueError, "unit"):
        Feature("dense_fraction", concept, 1.0, "")
    with refused(TypeError, "concept"):
        Feature("dense_fraction", "DF", 1.0, "%")


def test_model_identity_refuses_an_empty_name_or_version() -> None:
    with refused(ValueError, "name"):
        ModelIdentity("", "1.0")
    with refused(ValueError, "version"):
        ModelIdentity("lung-seg", " ")
    with refused(TypeError, "version"):
        ModelIdentity("lung-seg", 1.0)  # type: ignore[arg-type]
