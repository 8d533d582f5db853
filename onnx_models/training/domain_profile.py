"""The validated input domain of the reference models, written into their model.yaml.

    python3 -m onnx_models.training.domain_profile chest-xray       # rewrites the domain of model.yaml only
    python3 -m onnx_models.training.domain_profile all
    python3 -m onnx_models.training.domain_profile lung-seg --out /tmp/lung   # another model folder

Each model's ``domain`` declares the header values and geometry its phantoms stand for, and the
statistical profile of its preprocessed input: the features of :func:`pipelines.domain.input_features`
(the node's own preprocessing) on fresh phantoms from the generator the model was trained with — mean
and shrunk (Ledoit-Wolf) inverse covariance from one set, the distance threshold 1.1 times the largest
distance over a second, held-out set. The weights are not touched: model.yaml keeps its SHA-256.
The training scripts call :func:`domain_section` when they write a new model folder.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from onnx_models.training.common import BREAST_DENSITY_FEATURES, MODELS_DIR
from onnx_models.training.ct_phantom import make_ct_phantom
from onnx_models.training.mammo_phantom import make_mammo_phantom
from onnx_models.training.xray_phantom import make_xray_phantom
from pipelines.domain import input_features
from pipelines.manifest import MANIFEST_FILE, ModelManifest, parse_manifest
from pipelines.volume import InPlaneSpacing, SourceFrame, Volume

#: Seeds (added to the training seed) of the phantoms that fit the profile, that calibrate its threshold,
#: and that the benchmark (tests/bench/domain_guard.py) measures the false-refusal rate on.
REFERENCE_SEED_OFFSET = 200_000
CALIBRATION_SEED_OFFSET = 300_000
HELD_OUT_SEED_OFFSET = 400_000
#: The threshold is this factor times the largest distance among the held-out calibration phantoms: a
#: percentile (99.5th tried) refused 1 of 60 further phantoms of the chest model, whose tail is long.
MARGIN = 1.1
TRAINING_SEED = 1234
HEADER = "# Written by onnx_models/training; see MODEL_CARD.md and docs/models.md for the schema.\n"


def projection_volume(image: np.ndarray, modality: str, uid: str) -> Volume:
    """A phantom radiograph or mammogram as the loader makes one: a single image, no known pixel spacing.

    The phantoms have no physical scale, so they claim none (the models resize the whole image).
    """
    return Volume(
        pixels=image[None].astype(np.float32),
        origin_mm=np.zeros(3),
        spacing_mm=(1.0, 1.0, 1.0),
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 0, -1.0]),
        slice_direction=np.array([0, 1.0, 0]),
        source_frames=[SourceFrame("1.2.840.10008.5.1.4.1.1.1", uid)],
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid=uid,
        frame_of_reference_uid=None,
        modality=modality,
        in_plane_spacing=InPlaneSpacing.UNKNOWN,
    )


def ct_volume(hu: np.ndarray, pixel_mm: float, slice_mm: float, uid: str) -> Volume:
    """A phantom CT as an axial, head-first volume with its pixel spacing."""
    return Volume(
        pixels=hu,
        origin_mm=np.zeros(3),
        spacing_mm=(slice_mm, pixel_mm, pixel_mm),
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 1.0, 0]),
        slice_direction=np.array([0, 0, 1.0]),
        source_frames=[SourceFrame("1.2.840.10008.5.1.4.1.1.2", f"{uid}.{i}") for i in range(len(hu))],
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid=uid,
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2",
        modality="CT",
    )


#: Matrices (rows = columns) the chest phantoms are drawn at: the declared matrix range.
CHEST_MATRICES = (256, 384, 512, 768, 1024)
MAMMO_MATRICES = (256, 384, 512)


def chest_xray_volumes(seed: int, n: int) -> Iterator[Volume]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        size = int(rng.choice(CHEST_MATRICES))
        yield projection_volume(make_xray_phantom(rng, size).image, "DX", f"2.25.{seed}.{i}")


def lung_seg_volumes(seed: int, n: int) -> Iterator[Volume]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = make_ct_phantom(rng)
        yield ct_volume(p.hu, p.pixel_mm, p.slice_mm, f"2.25.{seed}.{i}")


def breast_density_volumes(seed: int, n: int) -> Iterator[Volume]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        size = int(rng.choice(MAMMO_MATRICES))
        yield projection_volume(make_mammo_phantom(rng, size).image, "MG", f"2.25.{seed}.{i}")


@dataclass(frozen=True)
class ReferenceDomain:
    """What one reference model's phantoms stand for, and how its profile is measured."""

    #: The manifest's domain without the profile (header values, geometry).
    bounds: dict[str, Any]
    features: list[str]
    volumes: Callable[[int, int], Iterator[Volume]]
    phantoms: str
    n_reference: int
    n_calibration: int
    intensity_range: list[float] | None = None
    tiny: tuple[int, int] = field(default=(24, 24))


DOMAINS: dict[str, ReferenceDomain] = {
    "chest-xray": ReferenceDomain(
        bounds={
            "modalities": ["CR", "DX"],
            "body_parts": ["CHEST"],
            "view_positions": ["PA", "AP"],
            "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
            "matrix": {"min": 256, "max": 1024},
        },
        # The shape of the intensity histogram and the flat share of the picture: a real radiograph's
        # continuous shading is what the phantoms' few flat tissue classes lack.
        features=[
            "histogram_entropy_bits",
            "histogram_top8_fraction",
            "flat_fraction",
            "gradient_p50_log",
            "gradient_p90_log",
        ],
        volumes=chest_xray_volumes,
        phantoms="xray_phantom.py chest phantoms, matrix 256-1024",
        n_reference=1000,
        n_calibration=1000,
    ),
    "lung-seg": ReferenceDomain(
        bounds={
            "modalities": ["CT"],
            "body_parts": ["CHEST", "THORAX"],
            "pixel_spacing_mm": {"min": 0.6, "max": 1.9},
            "matrix": {"min": 256, "max": 512},
            "field_of_view_mm": {"min": 300, "max": 490},
        },
        # The HU distribution within the model's window (-1000..400 HU, what its graph sees). Not the
        # histogram shape the chest model uses: the real TCIA CT, which the model segments well (Dice
        # 0.95), lies outside the phantoms' spread of it (3.9 against a threshold of 3.3).
        features=["intensity_p50", "intensity_p75", "intensity_p95"],
        intensity_range=[-1000.0, 400.0],
        volumes=lung_seg_volumes,
        phantoms="ct_phantom.py chest CT phantoms",
        n_reference=120,
        n_calibration=120,
        tiny=(4, 3),
    ),
    "breast-density": ReferenceDomain(
        bounds={
            "modalities": ["MG"],
            "body_parts": ["BREAST"],
            "view_positions": ["CC", "MLO"],
            "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
            "matrix": {"min": 256, "max": 512},
        },
        # The SVM's own input: its eight features (pipelines.svm).
        features=list(BREAST_DENSITY_FEATURES),
        volumes=breast_density_volumes,
        phantoms="mammo_phantom.py mammogram phantoms, matrix 256-512",
        n_reference=600,
        n_calibration=600,
    ),
}


def _round(values: np.ndarray) -> list:
    """Six significant digits: what model.yaml stores, and so what the threshold is calibrated with."""
    return np.vectorize(lambda v: float(f"{v:.6g}"))(values).tolist()


def measure(manifest: ModelManifest, spec: ReferenceDomain, seed: int, n: int) -> np.ndarray:
    """The profile's features of ``n`` phantoms from ``seed`` (rows), through the node's preprocessing."""
    rows = []
    for volume in spec.volumes(seed, n):
        vector = input_features(manifest, volume, spec.features, spec.intensity_range)
        assert vector is not None  # one image per phantom radiograph, a volume per CT phantom
        rows.append(vector)
    return np.asarray(rows, dtype=np.float64)


def fit_profile(
    reference: np.ndarray, calibration: np.ndarray, spec: ReferenceDomain, calibration_text: str
) -> dict[str, Any]:
    """Mean and shrunk inverse covariance from ``reference``, threshold from the ``calibration`` distances."""
    from sklearn.covariance import ledoit_wolf

    mean = _round(reference.mean(axis=0))
    covariance, _ = ledoit_wolf(reference)
    precision = _round(np.linalg.inv(covariance))
    d = calibration - np.asarray(mean)
    distances = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, np.asarray(precision), d), 0.0))
    threshold = float(f"{MARGIN * distances.max():.4g}")
    profile: dict[str, Any] = {"features": list(spec.features)}
    if spec.intensity_range is not None:
        profile["intensity_range"] = list(spec.intensity_range)
    profile |= {"mean": mean, "precision": precision, "threshold": threshold, "calibration": calibration_text}
    return profile


def domain_section(name: str, manifest: dict[str, Any], seed: int = TRAINING_SEED, tiny: bool = False) -> dict:
    """The ``domain`` of reference model ``name`` whose manifest (without domain) is ``manifest``."""
    spec = DOMAINS[name]
    parsed = parse_manifest({**manifest, "domain": None, "sha256": "0" * 64}, f"{name} manifest")
    n_ref, n_cal = spec.tiny if tiny else (spec.n_reference, spec.n_calibration)
    t0 = time.monotonic()
    reference = measure(parsed, spec, seed + REFERENCE_SEED_OFFSET, n_ref)
    calibration = measure(parsed, spec, seed + CALIBRATION_SEED_OFFSET, n_cal)
    text = (
        f"threshold = {MARGIN:g} x the largest distance over {n_cal} held-out {spec.phantoms} "
        f"(seed {seed + CALIBRATION_SEED_OFFSET}); mean and covariance from {n_ref} others "
        f"(seed {seed + REFERENCE_SEED_OFFSET})"
    )
    print(f"{name}: domain profile from {n_ref} + {n_cal} phantoms in {time.monotonic() - t0:.0f} s", flush=True)
    return {**spec.bounds, "profile": fit_profile(reference, calibration, spec, text)}


def write_domain(folder: Path, domain: dict[str, Any]) -> None:
    """Replace the ``domain`` of ``folder``/model.yaml, leaving every other field (the SHA-256 too) as it is."""
    path = Path(folder) / MANIFEST_FILE
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.pop("domain", None)
    sha = data.pop("sha256")
    data |= {"domain": domain, "sha256": sha}
    with open(path, "w", encoding="utf-8") as f:
        f.write(HEADER)
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=[*DOMAINS, "all"])
    parser.add_argument("--out", help="model folder (default: onnx_models/<model>)")
    parser.add_argument("--seed", type=int, default=TRAINING_SEED)
    parser.add_argument("--tiny", action="store_true", help="a few phantoms only (seconds; for tests)")
    args = parser.parse_args()
    names = list(DOMAINS) if args.model == "all" else [args.model]
    for name in names:
        folder = Path(args.out) if args.out and len(names) == 1 else MODELS_DIR / name
        data = yaml.safe_load((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        data.pop("domain", None)
        write_domain(folder, domain_section(name, data, args.seed, args.tiny))


if __name__ == "__main__":
    main()
