"""Manifests written for an earlier version keep loading: a retired key that changed nothing is accepted."""

from __future__ import annotations

import pytest
import yaml

from pipelines.manifest import ManifestError, load_manifest
from tests.support import REPO


def _manifest_with(tmp_path, **preprocessing):
    folder = tmp_path / "model"
    folder.mkdir()
    data = yaml.safe_load((REPO / "onnx_models" / "chest-xray" / "model.yaml").read_text())
    data["preprocessing"].update(preprocessing)
    (folder / "model.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_a_manifest_with_invert_monochrome1_true_still_loads(tmp_path):
    manifest = load_manifest(_manifest_with(tmp_path, invert_monochrome1=True))
    assert manifest.name == "chest-xray"


def test_invert_monochrome1_false_is_refused_with_what_the_loader_does(tmp_path):
    with pytest.raises(ManifestError, match="invert_monochrome1: only true is possible"):
        load_manifest(_manifest_with(tmp_path, invert_monochrome1=False))


def _manifest_edited(tmp_path, change):
    folder = tmp_path / "model"
    folder.mkdir()
    data = yaml.safe_load((REPO / "onnx_models" / "chest-xray" / "model.yaml").read_text())
    change(data)
    (folder / "model.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_a_manifest_written_before_domain_existed_loads_and_declares_no_domain(tmp_path):
    manifest = load_manifest(_manifest_edited(tmp_path, lambda d: d.pop("domain")))
    assert manifest.name == "chest-xray" and manifest.domain is None


def test_domain_modalities_outside_the_models_modalities_are_refused(tmp_path):
    folder = _manifest_edited(tmp_path, lambda d: d["domain"].update(modalities=["CR", "MG"]))
    with pytest.raises(ManifestError, match=r"domain.modalities \['MG'\] are not among the model's modalities"):
        load_manifest(folder)


def test_a_profile_whose_precision_does_not_match_its_features_names_the_field(tmp_path):
    folder = _manifest_edited(tmp_path, lambda d: d["domain"]["profile"]["precision"].pop())
    with pytest.raises(ManifestError, match=r"domain\.profile: .*precision must be a 5 x 5 matrix"):
        load_manifest(folder)


def test_a_bound_whose_minimum_exceeds_its_maximum_is_refused(tmp_path):
    folder = _manifest_edited(tmp_path, lambda d: d["domain"].update(matrix={"min": 2048, "max": 256}))
    with pytest.raises(ManifestError, match=r"domain\.matrix: .*min 2048.0 is greater than max 256.0"):
        load_manifest(folder)
