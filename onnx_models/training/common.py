"""Helpers shared by the training scripts: reproducibility, ONNX export, writing a model folder."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "onnx_models"

SCT_ANATOMICAL_STRUCTURE = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical structure"}
SCT_LUNG = {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}
SCT_LEFT = {"value": "7771000", "scheme": "SCT", "meaning": "Left"}
SCT_RIGHT = {"value": "24028007", "scheme": "SCT", "meaning": "Right"}


def seed_everything(seed: int, threads: int = 2) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # the SVM script does not need torch
        return
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_model_folder(folder: Path, manifest: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Write model.yaml (with the SHA-256 of the model.onnx already in ``folder``) and metrics.json."""
    manifest = {**manifest, "sha256": sha256_file(folder / "model.onnx")}
    with open(folder / "model.yaml", "w") as f:
        f.write("# Written by onnx_models/training; see MODEL_CARD.md and docs/models.md for the schema.\n")
        yaml.safe_dump(manifest, f, sort_keys=False, allow_unicode=True)
    with open(folder / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")


def export_torch(model: Any, example: Any, path: Path, input_name: str, output_names: list[str]) -> None:
    """Export a torch module to ONNX with a dynamic batch axis (TorchScript exporter, opset 17)."""
    import torch

    model.eval()
    dynamic = {input_name: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[input_name],
        output_names=output_names,
        dynamic_axes=dynamic,
        opset_version=17,
        dynamo=False,
    )


#: The breast-density SVM's input: these features of pipelines.svm, in this order (its training and the
#: profile of its validated domain both read them).
BREAST_DENSITY_FEATURES = [
    "dense_fraction",
    "intensity_mean",
    "intensity_std",
    "intensity_p50",
    "intensity_p90",
    "glcm_contrast",
    "glcm_entropy",
    "glcm_homogeneity",
]
