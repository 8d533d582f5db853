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
