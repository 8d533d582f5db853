"""The model input-domain guard (issue 10, item 6): input outside what a model was validated on is not analysed.

A model that has only seen phantoms must not report a confident finding on a real radiograph: the
manifest's ``domain`` names what it was validated on, ``run_pipeline`` measures each input against it,
and input outside it ends as "not analysed" with the measured value and the bound, never a finding.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import Dataset

from onnx_models.training.domain_profile import (
    HELD_OUT_SEED_OFFSET,
    TRAINING_SEED,
    breast_density_volumes,
    chest_xray_volumes,
    lung_seg_volumes,
)
from onnx_models.training.xray_phantom import make_xray_phantom
from pipelines.notanalysed import NotAnalysed, NotAnalysedReason
from pipelines.results import ClassificationResult, DensityResult, SegmentationResult
from pipelines.runtime import ModelRegistry, bundled_models_dir
from pipelines.study import run_pipeline
from tests.bench.domain_guard import ct_volume_of, drr_image, radiograph_headers, radiograph_volume
from tests.support.data import real_series

HELD_OUT_SEED = TRAINING_SEED + HELD_OUT_SEED_OFFSET


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(bundled_models_dir())


@pytest.fixture(scope="module")
def chest(registry):
    return registry.get("chest-xray")


def phantom_radiograph(seed: int = 800_101, size: int = 256):
    return radiograph_volume(make_xray_phantom(np.random.default_rng(seed), size).image, None)


def outside(outcome: object) -> str:
    assert isinstance(outcome, NotAnalysed), f"expected 'not analysed', got {type(outcome).__name__}"
    assert outcome.reason is NotAnalysedReason.OUTSIDE_VALIDATED_DOMAIN, str(outcome)
    return str(outcome)


@pytest.fixture(scope="module")
def real_ct(ct_dir: Path):
    series = real_series(ct_dir, "series-3-B40f")[0].parent
    return ct_volume_of(series)


def test_drr_of_the_real_ct_is_not_analysed_by_the_chest_model_naming_distance_and_bound(chest, real_ct):
    ct, _ = real_ct
    drr = radiograph_volume(drr_image(ct, "log"), float(ct.spacing_mm[2]))
    threshold = chest.manifest.domain.profile.threshold

    text = outside(run_pipeline(chest, drr, headers=radiograph_headers()))

    assert text.startswith("outside-validated-domain: input profile distance ")
    measured = float(text.split("input profile distance ", 1)[1].split(" ", 1)[0])
    assert measured > threshold
    assert f"outside 0..{threshold:.4g} (Mahalanobis over histogram_entropy_bits" in text


def test_held_out_phantoms_are_analysed_by_each_reference_model(registry):
    chest_headers, mammo_headers = radiograph_headers(), radiograph_headers("MG", "BREAST", "CC")
    for volume in chest_xray_volumes(HELD_OUT_SEED + 1, 12):
        result = run_pipeline(registry.get("chest-xray"), volume, headers=chest_headers)
        assert isinstance(result, ClassificationResult), f"{volume.pixels.shape}: {result}"
    for volume in breast_density_volumes(HELD_OUT_SEED + 1, 12):
        result = run_pipeline(registry.get("breast-density"), volume, headers=mammo_headers)
        assert isinstance(result, DensityResult), f"{volume.pixels.shape}: {result}"
    (ct,) = lung_seg_volumes(HELD_OUT_SEED + 1, 1)
    assert isinstance(run_pipeline(registry.get("lung-seg"), ct), SegmentationResult)


def test_the_real_ct_is_within_the_lung_models_domain(registry, real_ct):
    volume, datasets = real_ct
    assert isinstance(run_pipeline(registry.get("lung-seg"), volume, headers=datasets), SegmentationResult)


def test_a_manifest_without_domain_analyses_as_before(chest, real_ct, tmp_path: Path):
    folder = tmp_path / "chest-xray"
    shutil.copytree(bundled_models_dir() / "chest-xray", folder)
    data = yaml.safe_load((folder / "model.yaml").read_text())
    del data["domain"]
    (folder / "model.yaml").write_text(yaml.safe_dump(data))
    undeclared = ModelRegistry(tmp_path).get("chest-xray")
    assert undeclared.manifest.domain is None
    ct, _ = real_ct
    drr = radiograph_volume(drr_image(ct, "log"), float(ct.spacing_mm[2]))

    # Without a domain nothing is checked: the DRR gets a finding, as every input did before.
    assert isinstance(run_pipeline(undeclared, drr, headers=radiograph_headers(body_part="KNEE")), ClassificationResult)
    phantom = phantom_radiograph()
    with_domain, without = run_pipeline(chest, phantom), run_pipeline(undeclared, phantom)
    assert isinstance(with_domain, ClassificationResult) and isinstance(without, ClassificationResult)
    assert with_domain.probability == without.probability


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (radiograph_headers(body_part="KNEE"), "body part KNEE outside CHEST"),
        (radiograph_headers(view="LL"), "view position LL outside PA, AP"),
        (radiograph_headers(photometric="PALETTE COLOR"),
         "photometric interpretation PALETTE COLOR outside MONOCHROME1, MONOCHROME2"),
    ],
)  # fmt: skip
def test_header_outside_the_domain_names_the_attribute_its_value_and_the_bound(chest, headers, expected):
    text = outside(run_pipeline(chest, phantom_radiograph(), headers=headers))
    assert text.startswith(f"outside-validated-domain: {expected} (model chest-xray 1.0.0)")


def test_header_values_are_only_checked_where_the_source_carries_them(chest):
    silent = Dataset()
    silent.Modality = "DX"
    assert isinstance(run_pipeline(chest, phantom_radiograph(), headers=[silent]), ClassificationResult)


def test_matrix_outside_the_domain_names_rows_columns_and_bound(chest):
    big = np.kron(make_xray_phantom(np.random.default_rng(800_102)).image, np.ones((8, 8), np.float32))
    text = outside(run_pipeline(chest, radiograph_volume(big, None), headers=radiograph_headers()))
    assert text.startswith("outside-validated-domain: matrix 2048 x 2048 pixels outside 256..1024 pixels")


def test_pixel_spacing_outside_the_domain_names_spacing_and_bound(registry):
    (ct,) = lung_seg_volumes(HELD_OUT_SEED + 2, 1)
    fine = replace(ct, spacing_mm=(ct.spacing_mm[0], 0.4, 0.4))
    text = outside(run_pipeline(registry.get("lung-seg"), fine))
    assert text.startswith("outside-validated-domain: pixel spacing 0.4 x 0.4 mm outside 0.6..1.9 mm")


def test_wrong_modality_keeps_its_own_reason(chest):
    outcome = run_pipeline(chest, replace(phantom_radiograph(), modality="MG"))
    assert isinstance(outcome, NotAnalysed) and outcome.reason is NotAnalysedReason.WRONG_MODALITY


def test_models_check_prints_the_domain(capsys):
    from node.operate.cli import main

    assert main(["models", "check", str(bundled_models_dir() / "chest-xray")]) == 0
    printed = capsys.readouterr().out
    assert "validated domain" in printed
    for line in (
        "body parts: CHEST",
        "view positions: PA, AP",
        "matrix: 256..1024 pixels",
        "input profile: distance 0..",
    ):
        assert line in printed, printed
    assert "[ok] domain profile features" in printed
