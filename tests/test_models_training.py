"""The training scripts reproduce a model folder: ``--tiny`` trains a miniature model in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.manifest import load_manifest
from pipelines.modelcheck import check_model_dir
from tests.support import REPO


@pytest.mark.parametrize(
    ("script", "metric"),
    [("train_lung_seg", "dice_lungs"), ("train_chest_xray", "accuracy"), ("train_breast_density", "accuracy")],
)
def test_tiny_training_run_writes_a_model_folder_that_passes_models_check(script: str, metric: str, tmp_path: Path):
    out = tmp_path / script
    run = subprocess.run(
        [sys.executable, "-m", f"onnx_models.training.{script}", "--tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = check_model_dir(out)
    assert report.ok, str(report)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics[metric] <= 1.0
    assert (out / "model.yaml").read_text().count("sha256:") == 1
    # The script records what the model was validated on, with the profile of its preprocessed input.
    domain = load_manifest(out).domain
    assert domain is not None and domain.profile is not None and domain.profile.threshold > 0
