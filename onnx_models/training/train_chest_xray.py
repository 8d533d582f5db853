"""Train the chest-xray reference model: a small CNN for "focal opacity present", with a CAM output.

    python3 -m onnx_models.training.train_chest_xray
    python3 -m onnx_models.training.train_chest_xray --tiny --out /tmp/cxr

Writes model.onnx (outputs ``probability`` (N, 1) and ``cam`` (N, 1, 16, 16)), model.yaml (with the
validated input domain, onnx_models/training/domain_profile.py), metrics.json (held-out accuracy, AUC,
hot-spot hit rate) and model.pt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F

from onnx_models.training.common import MODELS_DIR, export_torch, seed_everything, write_model_folder
from onnx_models.training.domain_profile import domain_section
from onnx_models.training.nets import OpacityCNN
from onnx_models.training.xray_phantom import make_xray_phantom
from pipelines.preprocess import normalise_intensity, resize_slices

SIZE = 256


class Normalisation(TypedDict):
    """The keyword arguments of ``normalise_intensity``, as written to model.yaml."""

    method: str
    low_percentile: float
    high_percentile: float


NORMALISATION: Normalisation = {"method": "percentile", "low_percentile": 1.0, "high_percentile": 99.0}
THRESHOLD = 0.5
HELD_OUT_SEED_OFFSET = 100_000


def prepare(image: np.ndarray) -> np.ndarray:
    """What the classification pipeline does to an image (percentile normalisation, resize)."""
    norm = normalise_intensity(image, **NORMALISATION)
    return resize_slices(norm[None], (SIZE, SIZE))[0]


def dataset(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, list]:
    rng = np.random.default_rng(seed)
    phantoms = [make_xray_phantom(rng, SIZE) for _ in range(n)]
    x = np.stack([prepare(p.image) for p in phantoms])[:, None]
    y = np.array([p.has_opacity for p in phantoms], dtype=np.float32)
    return x, y, [p.opacity_center for p in phantoms]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def evaluate(model: OpacityCNN, seed: int, n: int) -> dict[str, float]:
    x, y, centres = dataset(seed, n)
    model.eval()
    with torch.no_grad():
        prob, cam = model(torch.from_numpy(x))
    p = prob[:, 0].numpy()
    # Hot spot hit: the CAM's maximum lies within 1/8 of the image of the true opacity centre.
    hits = []
    for i in np.flatnonzero(y == 1):
        r, c = np.unravel_index(int(cam[i, 0].argmax()), cam.shape[2:])
        scale = SIZE / cam.shape[2]
        dist = np.hypot((c + 0.5) * scale - centres[i][0], (r + 0.5) * scale - centres[i][1])
        hits.append(dist <= SIZE / 8)
    return {
        "accuracy": round(float(((p >= THRESHOLD) == (y == 1)).mean()), 4),
        "auc": round(auc(p, y), 4),
        "cam_hotspot_hit_rate": round(float(np.mean(hits)), 4),
        "held_out_images": n,
    }


def train(args: argparse.Namespace) -> dict[str, float]:
    seed_everything(args.seed, args.threads)
    n_train, n_eval, epochs, base = (64, 32, 1, 4) if args.tiny else (args.images, 400, args.epochs, 8)
    t0 = time.monotonic()
    x_all, y_all, _ = dataset(args.seed, n_train)
    print(f"{n_train} training images in {time.monotonic() - t0:.0f} s", flush=True)
    model = OpacityCNN(base=base)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * int(np.ceil(n_train / args.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = np.random.default_rng(args.seed + 1)
    for epoch in range(epochs):
        model.train()
        order = gen.permutation(n_train)
        total = 0.0
        for i in range(0, n_train, args.batch):
            idx = order[i : i + args.batch]
            x, y = torch.from_numpy(x_all[idx].copy()), torch.from_numpy(y_all[idx])
            if gen.random() < 0.5:
                x = x.flip(-1)
            logit, _ = model.logit_and_map(x)
            loss = F.binary_cross_entropy_with_logits(logit[:, 0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs} loss {total / n_train:.4f} ({time.monotonic() - t0:.0f} s)", flush=True)
    metrics = evaluate(model, args.seed + HELD_OUT_SEED_OFFSET, n_eval)
    metrics |= {"training_images": n_train, "epochs": epochs, "train_seconds": round(time.monotonic() - t0)}
    print(metrics, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save({"base": base, "state_dict": model.state_dict()}, out / "model.pt")
    export_torch(model, torch.zeros(1, 1, SIZE, SIZE), out / "model.onnx", "image", ["probability", "cam"])
    spec = manifest(args.tiny)
    write_model_folder(out, spec | {"domain": domain_section("chest-xray", spec, args.seed, args.tiny)}, metrics)
    return metrics


def manifest(tiny: bool) -> dict:
    return {
        "name": "chest-xray-tiny" if tiny else "chest-xray",
        "version": "1.0.0",
        "task": "classification",
        "modalities": ["CR", "DX"],
        "description": "Reference CNN: probability of a focal lung opacity on a frontal chest radiograph, with a "
        "class-activation map. Trained on procedural phantoms; not for clinical use.",
        "input": {"name": "image", "layout": "NCHW", "shape": [-1, 1, SIZE, SIZE], "dtype": "float32"},
        "preprocessing": {"normalisation": NORMALISATION, "size": [SIZE, SIZE]},
        "outputs": [
            {
                "name": "probability",
                "kind": "probabilities",
                "units": "1",
                "labels": [
                    {
                        "number": 1,
                        "name": "Focal opacity",
                        "category": {"value": "404684003", "scheme": "SCT", "meaning": "Clinical finding"},
                        "type": {"value": "112001", "scheme": "DCM", "meaning": "Opacity"},
                        "threshold": THRESHOLD,
                    }
                ],
            },
            {"name": "cam", "kind": "heatmap", "units": "1"},
        ],
        "batch_size": 8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(MODELS_DIR / "chest-xray"))
    parser.add_argument("--tiny", action="store_true", help="miniature config that trains in seconds")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
