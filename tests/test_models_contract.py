"""The model contract: manifests, checksums, the shared session cache, ``models check`` and ``models list``."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.manifest import ManifestError, Task, load_manifest, parse_manifest
from pipelines.modelcheck import check_model_dir, models_list_rows
from pipelines.runtime import (
    ModelIntegrityError,
    ModelRegistry,
    UnknownModelError,
    bundled_models_dir,
    choose_providers,
    load_model,
)
from tests.support import REPO

BUNDLED = ["breast-density", "chest-xray", "lung-seg"]


@pytest.fixture
def density_copy(tmp_path: Path) -> Path:
    """A private copy of a small bundled model folder that a test may damage."""
    folder = tmp_path / "models" / "breast-density"
    shutil.copytree(bundled_models_dir() / "breast-density", folder)
    return folder


def edit_manifest(folder: Path, change) -> None:
    data = yaml.safe_load((folder / "model.yaml").read_text())
    change(data)
    (folder / "model.yaml").write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_models_pass_models_check(name: str):
    report = check_model_dir(bundled_models_dir() / name)
    assert report.ok, str(report)
    assert any(c.name == "dummy input runs" and c.passed for c in report.checks)


def test_bundled_manifests_carry_coded_labels():
    lung = load_manifest(bundled_models_dir() / "lung-seg")
    assert lung.task is Task.SEGMENTATION and lung.modalities == ["CT"]
    codes = {(label.type.value, label.laterality.value) for label in lung.segment_labels if label.laterality}
    assert codes == {("39607008", "7771000"), ("39607008", "24028007")}
    assert all(label.category.value == "91723000" for label in lung.segment_labels)


def test_bad_manifest_error_names_the_field_path(density_copy: Path):
    edit_manifest(density_copy, lambda d: d["outputs"][1]["labels"][2]["type"].update(value=None))
    with pytest.raises(ManifestError) as err:
        load_manifest(density_copy)
    assert f"{density_copy / 'model.yaml'}: outputs[1].labels[2].type.value: Input should be a valid string" in str(
        err.value
    )


def test_bad_window_center_is_named(tmp_path: Path):
    folder = tmp_path / "lung"
    folder.mkdir()
    data = yaml.safe_load((bundled_models_dir() / "lung-seg" / "model.yaml").read_text())
    data["preprocessing"]["hu_window"] = {"center": "lung", "width": 1400}
    (folder / "model.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError, match=r"model\.yaml: preprocessing\.hu_window\.center: Input should be a valid"):
        load_manifest(folder)


def test_missing_manifest_field_and_unknown_task_are_each_reported(density_copy: Path):
    def change(d):
        del d["sha256"]
        d["task"] = "regression"

    edit_manifest(density_copy, change)
    message = str(pytest.raises(ManifestError, load_manifest, density_copy).value)
    assert "sha256: Field required" in message
    assert "task: Input should be 'segmentation', 'classification' or 'svm'" in message


def test_manifest_that_is_not_yaml_is_one_clear_error(density_copy: Path):
    (density_copy / "model.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(density_copy)


def test_tampered_model_is_refused_before_a_session_exists(density_copy: Path, monkeypatch):
    data = bytearray((density_copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (density_copy / "model.onnx").write_bytes(bytes(data))
    created = []
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: created.append(a))
    with pytest.raises(ModelIntegrityError, match="does not match .* declared in model.yaml"):
        ModelRegistry(density_copy.parent).get("breast-density")
    assert created == []


def test_models_check_reports_tampered_model(density_copy: Path):
    with open(density_copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    report = check_model_dir(density_copy)
    assert not report.ok
    assert "checksum matches" in str(report) and "FAIL" in str(report)


def test_models_check_catches_output_shape_that_differs_from_manifest(density_copy: Path):
    # Declare a fifth category: the SVM still returns four probabilities.
    def change(d):
        labels = d["outputs"][1]["labels"]
        labels.append({**labels[-1], "number": 4, "name": "E"})

    edit_manifest(density_copy, change)
    report = check_model_dir(density_copy)
    failed = [c for c in report.checks if not c.passed]
    assert [c.name for c in failed] == ["output probabilities shape"], str(report)
    assert "(2, 4)" in failed[0].detail and "2x5" in failed[0].detail


def test_registry_shares_one_session_between_threads():
    registry = ModelRegistry(bundled_models_dir())
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(registry.get("breast-density"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(m.session) for m in seen}) == 1
    assert registry.get("breast-density") is seen[0]


def test_site_models_directory_overrides_a_bundled_model(density_copy: Path):
    edit_manifest(density_copy, lambda d: d.update(version="9.9.9"))
    registry = ModelRegistry([bundled_models_dir(), density_copy.parent])
    assert {m.name: m.version for m in registry.list()}["breast-density"] == "9.9.9"


def test_unknown_model_names_the_directories_searched(tmp_path: Path):
    with pytest.raises(UnknownModelError, match="no model named 'liver-seg'.*found: breast-density"):
        ModelRegistry([bundled_models_dir(), tmp_path]).get("liver-seg")


def test_provider_choice_is_cpu_here_and_overridable():
    assert choose_providers(None)[-1] == "CPUExecutionProvider"
    # Asking for CUDA on a CPU-only build falls back to CPU instead of failing.
    assert choose_providers(["CUDAExecutionProvider"]) == ["CPUExecutionProvider"]
    model = load_model(bundled_models_dir() / "breast-density", ["CPUExecutionProvider"], intra_op_threads=1)
    assert model.providers_in_use == ("CPUExecutionProvider",)
    probs = model.run(np.zeros((3, 8), np.float32))[1]
    assert probs.shape == (3, 4)


def test_models_list_rows_show_each_bundled_model_with_its_provider():
    rows = models_list_rows(ModelRegistry(bundled_models_dir()))
    assert [r["name"] for r in rows] == BUNDLED
    assert {r["name"]: r["task"] for r in rows} == {
        "breast-density": "svm",
        "chest-xray": "classification",
        "lung-seg": "segmentation",
    }
    assert all(r["provider"] == "CPUExecutionProvider" and r["version"] == "1.0.0" for r in rows)


def test_readme_worked_example_is_a_valid_manifest():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Bring your own model", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block.replace("9c1d...", "a" * 64))
    manifest = parse_manifest(data, "README.md")
    assert manifest.name == "liver-seg" and manifest.task is Task.SEGMENTATION
    assert manifest.segment_labels[0].type.value == "10200004"
