"""Declarative routing: first match wins, conditions on any tag, never our own results (issue 2, item 5)."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from node.assemble.router import Router
from node.config import Config, Route

OWN_UID = "1.2.826.0.1.3680043.8.498.1"


def routes(*specs: dict) -> list[Route]:
    return Config.model_validate({"routes": list(specs)}).routes


def ct(**attrs) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def test_first_matching_route_wins():
    router = Router(
        routes(
            {"name": "thin", "match": {"Modality": "CT", "SliceThickness": {"range": [0, 3]}}, "pipeline": "a"},
            {"name": "any-ct", "match": {"Modality": "CT"}, "pipeline": "b"},
        ),
        OWN_UID,
    )
    assert router.route(ct(SliceThickness=1.0)).route.name == "thin"
    decision = router.route(ct(SliceThickness=5.0))
    assert decision.route.name == "any-ct"


def test_each_condition_kind_and_its_reason():
    router = Router(
        routes(
            {
                "name": "chest",
                "match": {
                    "Modality": {"one_of": ["CT", "PT"]},
                    "BodyPartExamined": {"regex": "(?i)chest|thorax"},
                    "(0018,0050)": {"range": [0.5, 5]},
                    "Manufacturer": "GE MEDICAL SYSTEMS",
                },
                "pipeline": "lung-seg",
            }
        ),
        OWN_UID,
    )
    ok = router.route(ct(BodyPartExamined="THORAX", SliceThickness="5.0"))
    assert ok.route is not None
    assert "Modality CT in ['CT', 'PT']" in ok.reason and "SliceThickness 5.0 in [0.5, 5.0]" in ok.reason
    too_thick = router.route(ct(BodyPartExamined="CHEST", SliceThickness="7.5"))
    assert too_thick.route is None and "SliceThickness 7.5 not in [0.5, 5.0]" in too_thick.reason
    wrong_part = router.route(ct(BodyPartExamined="HEAD", SliceThickness="1"))
    assert wrong_part.route is None and "BodyPartExamined HEAD not ~ /(?i)chest|thorax/" in wrong_part.reason


def test_missing_attribute_never_matches():
    router = Router(routes({"name": "r", "match": {"BodyPartExamined": "CHEST"}, "pipeline": "p"}), OWN_UID)
    ds = ct()
    assert "BodyPartExamined" not in ds
    decision = router.route(ds)
    assert decision.route is None and "BodyPartExamined missing" in decision.reason


def test_multi_valued_attribute_matches_when_any_value_does():
    router = Router(routes({"name": "r", "match": {"ImageType": "AXIAL"}, "pipeline": "p"}), OWN_UID)
    assert router.route(ct(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])).route is not None
    assert router.route(ct(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])).route is None


@pytest.mark.parametrize(
    "mark",
    [
        {"Manufacturer": "dicom-ai-node"},
        {"DeviceUID": OWN_UID},
        {"ContributingEquipmentSequence": [("Manufacturer", "dicom-ai-node")]},
        {"ContributingEquipmentSequence": [("DeviceUID", OWN_UID), ("Manufacturer", "Renamed")]},
    ],
)
def test_node_never_routes_its_own_results(mark):
    """PACS forward everything back, our SEG/SR included: routing them again would loop."""
    router = Router(routes({"name": "everything", "match": {}, "pipeline": "p"}), OWN_UID)
    ds = ct(Modality="SEG")
    for key, value in mark.items():
        if key == "ContributingEquipmentSequence":
            item = Dataset()
            for k, v in value:
                setattr(item, k, v)
            ds.ContributingEquipmentSequence = [item]
        else:
            setattr(ds, key, value)
    decision = router.route(ds)
    assert decision.route is None and decision.reason.startswith("ignored: produced by this node")


def test_someone_elses_seg_is_routed_normally():
    router = Router(routes({"name": "seg", "match": {"Modality": "SEG"}, "pipeline": "p"}), OWN_UID)
    assert router.route(ct(Modality="SEG", Manufacturer="Other AI")).route is not None
