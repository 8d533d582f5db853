"""Train the breast-density reference model: an SVM over NumPy features of procedural mammograms.

    python3 -m onnx_models.training.train_breast_density
    python3 -m onnx_models.training.train_breast_density --tiny --out /tmp/density

The features are pipelines.svm's (the pipeline computes the same ones at inference). The
scikit-learn pipeline (standardise -> RBF SVC with Platt probabilities) is converted with skl2onnx:
input ``features`` (N, F) float32, outputs ``label`` (N,) and ``probabilities`` (N, 4).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from onnx_models.training.common import BREAST_DENSITY_FEATURES, MODELS_DIR, seed_everything, write_model_folder
from onnx_models.training.domain_profile import domain_section
from onnx_models.training.mammo_phantom import CATEGORIES, make_mammo_phantom
from pipelines.svm import compute_features

FEATURE_NAMES = BREAST_DENSITY_FEATURES
#: SNOMED CT breast composition findings (DICOM CID 6001, BI-RADS 5th edition).
CATEGORY_CODES = {
    "A": ("129716005", "Almost entirely fat"),
    "B": ("129717001", "Scattered fibroglandular densities"),
    "C": ("129718006", "Heterogeneously dense"),
    "D": ("129719003", "Extremely dense"),
}
HELD_OUT_SEED_OFFSET = 100_000


def dataset(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y = [], []
    for _ in range(n):
        p = make_mammo_phantom(rng)
        x.append([f.value for f in compute_features(p.image, FEATURE_NAMES)])
        y.append(CATEGORIES.index(p.category))
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


def train(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    n_train, n_eval = (80, 40) if args.tiny else (args.images, 400)
    t0 = time.monotonic()
    x, y = dataset(args.seed, n_train)
    print(f"features of {n_train} training images in {time.monotonic() - t0:.0f} s", flush=True)
    pipe = make_pipeline(StandardScaler(), SVC(kernel="rbf", probability=True, random_state=args.seed))
    grid = {"svc__C": [1.0, 10.0, 100.0], "svc__gamma": ["scale", 0.05]} if not args.tiny else {"svc__C": [10.0]}
    search = GridSearchCV(pipe, grid, cv=3, n_jobs=1).fit(x, y)
    model = search.best_estimator_
    xe, ye = dataset(args.seed + HELD_OUT_SEED_OFFSET, n_eval)
    pred = model.predict_proba(xe).argmax(1)
    confusion = np.zeros((4, 4), dtype=int)
    for t, p in zip(ye, pred, strict=True):
        confusion[t, p] += 1
    metrics = {
        "accuracy": round(float((pred == ye).mean()), 4),
        "within_one_category": round(float((np.abs(pred - ye) <= 1).mean()), 4),
        "confusion_rows_true_cols_predicted": confusion.tolist(),
        "held_out_images": n_eval,
        "training_images": n_train,
        "best_params": {k: v for k, v in search.best_params_.items()},
        "train_seconds": round(time.monotonic() - t0),
    }
    print(metrics, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onx = to_onnx(
        model,
        initial_types=[("features", FloatTensorType([None, len(FEATURE_NAMES)]))],
        options={"zipmap": False},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    (out / "model.onnx").write_bytes(onx.SerializeToString())
    spec = manifest(args.tiny)
    write_model_folder(out, spec | {"domain": domain_section("breast-density", spec, args.seed, args.tiny)}, metrics)
    return metrics


def manifest(tiny: bool) -> dict:
    breast_composition = {"value": "111006", "scheme": "DCM", "meaning": "Breast composition"}
    return {
        "name": "breast-density-tiny" if tiny else "breast-density",
        "version": "1.0.0",
        "task": "svm",
        "modalities": ["MG"],
        "description": "Reference SVM: BI-RADS breast composition (A-D) from intensity and texture features of "
        "one mammogram. Trained on procedural phantoms; not for clinical use.",
        "input": {"name": "features", "layout": "NF", "shape": [-1, len(FEATURE_NAMES)], "dtype": "float32"},
        "preprocessing": {"size": [512, 512], "features": FEATURE_NAMES},
        "outputs": [
            {"name": "label", "kind": "label", "units": "1"},
            {
                "name": "probabilities",
                "kind": "probabilities",
                "units": "1",
                "labels": [
                    {
                        "number": i,
                        "name": cat,
                        "category": breast_composition,
                        "type": {"value": CATEGORY_CODES[cat][0], "scheme": "SCT", "meaning": CATEGORY_CODES[cat][1]},
                    }
                    for i, cat in enumerate(CATEGORIES)
                ],
            },
        ],
        "batch_size": 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(MODELS_DIR / "breast-density"))
    parser.add_argument("--tiny", action="store_true", help="miniature config that trains in seconds")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--images", type=int, default=1200)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
