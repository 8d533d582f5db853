"""Train the lung-seg reference model: a small 2D U-Net on procedural chest CT phantoms.

    python3 -m onnx_models.training.train_lung_seg            # full model (a few minutes on 2 cores)
    python3 -m onnx_models.training.train_lung_seg --tiny --out /tmp/lung   # seconds, proves the script works

Writes model.onnx, model.yaml (with the SHA-256 and the validated input domain), metrics.json (held-out
Dice) and model.pt (the PyTorch weights, used by the eager-mode benchmark) into the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onnx_models.training.common import (
    MODELS_DIR,
    SCT_ANATOMICAL_STRUCTURE,
    SCT_LEFT,
    SCT_LUNG,
    SCT_RIGHT,
    export_torch,
    seed_everything,
    write_model_folder,
)
from onnx_models.training.ct_phantom import LEFT_LUNG, RIGHT_LUNG, make_ct_phantom
from onnx_models.training.domain_profile import domain_section
from onnx_models.training.nets import SegmentationGraph, UNet2D
from pipelines.preprocess import apply_window, resize_slices

SIZE = 128
#: Slices the exported graph takes (512 x 512, the usual CT matrix); it pools them to SIZE itself.
GRAPH_SIZE = 4 * SIZE
WINDOW = {"center": -300.0, "width": 1400.0}
HELD_OUT_SEED_OFFSET = 100_000


def phantom_slices(seed: int, n_volumes: int) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (N, 1, 128, 128) and labels (N, 128, 128) from ``n_volumes`` phantoms."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n_volumes):
        p = make_ct_phantom(rng)
        images.append(resize_slices(apply_window(p.hu, **WINDOW), (SIZE, SIZE)))
        onehot = np.stack([p.labels == k for k in range(3)], axis=1).astype(np.float32)
        labels.append(resize_slices(onehot, (SIZE, SIZE)).argmax(axis=1).astype(np.int64))
    return np.concatenate(images)[:, None], np.concatenate(labels)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / denom) if denom else 1.0


def evaluate(model: UNet2D, seed: int, n_volumes: int) -> dict[str, float]:
    """Mean per-volume Dice (both lungs together, and each lung) on freshly generated phantoms."""
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {"dice_lungs": [], "dice_left": [], "dice_right": []}
    model.eval()
    with torch.no_grad():
        for _ in range(n_volumes):
            p = make_ct_phantom(rng)
            x = torch.from_numpy(resize_slices(apply_window(p.hu, **WINDOW), (SIZE, SIZE))[:, None])
            pred = model(x).argmax(1).numpy()
            onehot = np.stack([p.labels == k for k in range(3)], axis=1).astype(np.float32)
            truth = resize_slices(onehot, (SIZE, SIZE)).argmax(axis=1)
            scores["dice_lungs"].append(dice(pred > 0, truth > 0))
            scores["dice_left"].append(dice(pred == LEFT_LUNG, truth == LEFT_LUNG))
            scores["dice_right"].append(dice(pred == RIGHT_LUNG, truth == RIGHT_LUNG))
    return {k: round(float(np.mean(v)), 4) for k, v in scores.items()} | {"held_out_volumes": n_volumes}


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0))[1:].mean()


def train(args: argparse.Namespace) -> dict[str, float]:
    seed_everything(args.seed, args.threads)
    n_train, n_eval, epochs, base = (3, 1, 1, 4) if args.tiny else (args.volumes, 8, args.epochs, 12)
    t0 = time.monotonic()
    x_all, y_all = phantom_slices(args.seed, n_train)
    print(f"{len(x_all)} training slices from {n_train} phantoms in {time.monotonic() - t0:.0f} s", flush=True)
    model = UNet2D(base=base)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(x_all) / args.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = np.random.default_rng(args.seed + 1)
    for epoch in range(epochs):
        model.train()
        order = gen.permutation(len(x_all))
        total = 0.0
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            x, y = torch.from_numpy(x_all[idx].copy()), torch.from_numpy(y_all[idx].copy())
            if gen.random() < 0.5:  # mirror left-right and swap the lungs' labels with it
                x, y = x.flip(-1), y.flip(-1)
                y = torch.where(y == LEFT_LUNG, RIGHT_LUNG, torch.where(y == RIGHT_LUNG, LEFT_LUNG, y))
            x = x * float(gen.uniform(0.95, 1.05)) + float(gen.normal(0, 0.02))
            logits = model.logits(x)
            loss = F.cross_entropy(logits, y) + soft_dice_loss(torch.softmax(logits, 1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs} loss {total / len(x_all):.4f} ({time.monotonic() - t0:.0f} s)", flush=True)
    metrics = evaluate(model, args.seed + HELD_OUT_SEED_OFFSET, n_eval)
    metrics |= {"training_slices": int(len(x_all)), "epochs": epochs, "train_seconds": round(time.monotonic() - t0)}
    print(metrics, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save({"base": base, "state_dict": model.state_dict()}, out / "model.pt")
    export(model, out, args.tiny, metrics, args.seed)
    return metrics


def export(model: UNet2D, out: Path, tiny: bool, metrics: dict, seed: int) -> None:
    """model.onnx = window + pooling + U-Net + upsampling + argmax (:class:`SegmentationGraph`), and model.yaml."""
    graph = SegmentationGraph(model.eval(), WINDOW["center"], WINDOW["width"], GRAPH_SIZE // SIZE)
    export_torch(graph, torch.zeros(1, 1, GRAPH_SIZE, GRAPH_SIZE), out / "model.onnx", "hu", ["labels"])
    spec = manifest(tiny)
    write_model_folder(out, spec | {"domain": domain_section("lung-seg", spec, seed, tiny)}, metrics)


def manifest(tiny: bool) -> dict:
    lung_label = {"category": SCT_ANATOMICAL_STRUCTURE, "type": SCT_LUNG}
    return {
        "name": "lung-seg-tiny" if tiny else "lung-seg",
        "version": "1.0.0",
        "task": "segmentation",
        "modalities": ["CT"],
        "description": "Reference 2D U-Net: left and right lung on axial chest CT. Trained on procedural "
        "phantoms; not for clinical use.",
        # The graph windows (centre -300 HU, width 1400 HU) and pools to 128 x 128 itself: the pipeline
        # only resizes slices whose matrix is not 512 x 512.
        "input": {"name": "hu", "layout": "NCHW", "shape": [-1, 1, GRAPH_SIZE, GRAPH_SIZE], "dtype": "float32"},
        "preprocessing": {
            "size": [GRAPH_SIZE, GRAPH_SIZE],
            "channels": 1,
        },
        "outputs": [
            {
                "name": "labels",
                "kind": "labelmap",
                "units": "1",
                "labels": [
                    {"number": LEFT_LUNG, "name": "Left lung", **lung_label, "laterality": SCT_LEFT},
                    {"number": RIGHT_LUNG, "name": "Right lung", **lung_label, "laterality": SCT_RIGHT},
                ],
            }
        ],
        "postprocessing": {"largest_components": 1, "fill_holes": True},
        # 4 slices per call: as fast as 16 on a CPU, and a quarter of the memory ONNX Runtime keeps (62 vs 249 MiB).
        "batch_size": 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(MODELS_DIR / "lung-seg"))
    parser.add_argument("--tiny", action="store_true", help="miniature config that trains in seconds")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--volumes", type=int, default=60, help="training phantoms (about 25 slices each)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--export-only", action="store_true", help="re-export model.onnx from OUT/model.pt")
    args = parser.parse_args()
    if args.export_only:
        out = Path(args.out)
        state = torch.load(out / "model.pt", weights_only=True)
        model = UNet2D(base=state["base"])
        model.load_state_dict(state["state_dict"])
        export(model, out, args.tiny, json.loads((out / "metrics.json").read_text()), args.seed)
    else:
        train(args)


if __name__ == "__main__":
    main()
