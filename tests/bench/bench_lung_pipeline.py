"""Benchmark: the lung pipeline on a 300-slice 512 x 512 CT on this CPU (not part of the test suite).

    python3 tests/bench/bench_lung_pipeline.py [--slices 300] [--threads 2] [--runs 3]

The CT is the real TCIA A0002 series (B40f) interpolated from 30 slices of 8 mm to 300 slices
(0.8 mm) and written as uncompressed DICOM files to a temporary folder; without the real data a
phantom is used. Reports seconds for load + decode, preprocessing, inference and post-processing
of the first study after start (cold: first inference, fresh memory) and the median of the warm runs
that follow (a node serves study after study), peak memory (resident set high-water mark, Linux),
and ONNX Runtime against the same U-Net in PyTorch eager mode on the same preprocessed batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from onnx_models.training.ct_phantom import make_ct_phantom  # noqa: E402
from pipelines.modelinput import model_input  # noqa: E402
from pipelines.runtime import ModelRegistry, bundled_models_dir  # noqa: E402
from pipelines.segmentation import segment  # noqa: E402
from pipelines.study import DEFER_BYTES  # noqa: E402
from pipelines.volume import Volume, load_volume  # noqa: E402
from tests.support import REPO  # noqa: E402

CT_DIR = Path(os.environ.get("AINODE_TEST_CT_DIR", REPO.parent / "shared/data/ct-chest-tcia-A0002"))


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def write_series(out: Path, n_slices: int) -> None:
    """A 300-slice CT series as DICOM files, from the real CT (interpolated) or a phantom."""
    series = CT_DIR / "series-3-B40f"
    if series.is_dir():
        datasets = sorted(
            (pydicom.dcmread(f) for f in series.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2])
        )
        raw = np.stack([d.pixel_array.astype(np.float32) for d in datasets])
        z0, z1 = float(datasets[0].ImagePositionPatient[2]), float(datasets[-1].ImagePositionPatient[2])
        template = datasets[0]
    else:
        print(f"(real CT {series} missing: using a phantom)")
        p = make_ct_phantom(np.random.default_rng(5), size=512, n_slices=30)
        raw = p.hu + 1024.0
        z0, z1 = 0.0, 29 * p.slice_mm
        template = None
    pos = np.linspace(0, len(raw) - 1, n_slices)
    series_uid, study_uid = generate_uid(), generate_uid()
    for i, t in enumerate(pos):
        lo = int(np.floor(t))
        hi = min(lo + 1, len(raw) - 1)
        pixels = np.clip((raw[lo] * (1 - (t - lo)) + raw[hi] * (t - lo)).round(), 0, 4095).astype(np.uint16)
        ds = _dataset(template, pixels, study_uid, series_uid, i, z0 + (z1 - z0) * i / (n_slices - 1))
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)


def _dataset(template, pixels, study_uid, series_uid, index, z) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = getattr(template, "FrameOfReferenceUID", None) or "1.2.3.4"
    ds.Modality, ds.InstanceNumber = "CT", index + 1
    ds.ImagePositionPatient = [-165.0, -165.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(template.PixelSpacing) if template is not None else [0.65, 0.65]
    ds.SliceThickness = 0.8
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0  # as the scanner wrote
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = pixels.tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return ds


def load(files: list[Path]) -> Volume:
    # As the node's runner reads a series: headers parsed once, pixel data read when the volume is built.
    return load_volume([pydicom.dcmread(f, defer_size=DEFER_BYTES) for f in files])


def torch_eager_seconds(model_dir: Path, batches: list[np.ndarray], threads: int) -> tuple[float, float]:
    import torch

    from onnx_models.training.nets import SegmentationGraph, UNet2D
    from onnx_models.training.train_lung_seg import GRAPH_SIZE, SIZE, WINDOW

    torch.set_num_threads(threads)
    state = torch.load(model_dir / "model.pt", weights_only=True)
    unet = UNet2D(base=state["base"])
    unet.load_state_dict(state["state_dict"])
    # The very graph model.onnx was exported from: window, pooling, U-Net, upsampling, argmax.
    net = SegmentationGraph(unet.eval(), WINDOW["center"], WINDOW["width"], GRAPH_SIZE // SIZE).eval()
    outputs = []
    with torch.inference_mode():
        net(torch.from_numpy(batches[0][:1]))  # warm-up, as ORT's session creation warms up
        t0 = time.perf_counter()
        for b in batches:
            outputs.append(net(torch.from_numpy(b)).numpy())
        return time.perf_counter() - t0, 0.0 if not outputs else float(outputs[0].max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)

    parser.add_argument("--runs", type=int, default=3, help="warm runs after the first (cold) one")
    args = parser.parse_args()

    registry = ModelRegistry(bundled_models_dir(), intra_op_threads=args.threads, inter_op_threads=1)
    model = registry.get("lung-seg")
    model_mib = (model.path / "model.onnx").stat().st_size / 2**20
    runs: list[dict[str, float]] = []  # the first is cold: the node's first study after it started
    with tempfile.TemporaryDirectory() as tmp:
        write_series(Path(tmp), args.slices)
        os.sync()  # the node fsyncs each instance when it receives it: no write-back left for the run to share
        files = sorted(Path(tmp).glob("*.dcm"))
        base_rss = _rss_mib("VmRSS")
        for _ in range(1 + args.runs):
            volume = result = None  # the previous run's arrays go before the next run's peak is measured
            _reset_peak()
            t0 = time.perf_counter()
            volume = load(files)
            timings: dict[str, float] = {"load_s": time.perf_counter() - t0}
            result = segment(model, volume, timings=timings)
            timings["total_s"] = time.perf_counter() - t0
            timings["peak_mib"] = _rss_mib("VmHWM") - base_rss
            runs.append(timings)
    assert volume is not None and result is not None
    int16_mib = volume.pixels.size * 2 / 2**20

    # The same network on the same inputs: ONNX Runtime vs PyTorch eager.
    batch = model.manifest.batch_size or 16
    batches = [
        model_input(model.manifest, volume.pixels[i : i + batch], volume.spacing_mm[1:])
        for i in range(0, len(volume.pixels), batch)
    ]
    t0 = time.perf_counter()
    for b in batches:
        model.run(b)
    ort_s = time.perf_counter() - t0
    torch_s, _ = torch_eager_seconds(model.path, batches, args.threads)

    print(
        f"lung pipeline, {volume.pixels.shape[0]} x {volume.pixels.shape[1]} x {volume.pixels.shape[2]} CT "
        f"(int16 volume), {args.threads} threads, providers {', '.join(model.providers_in_use)}"
    )
    warm = sorted(runs[1:], key=lambda r: r["total_s"])
    columns = [("first study", runs[0])] + ([("warm, median", warm[len(warm) // 2])] if warm else [])
    print(f"  {'':20}" + "".join(f"{name:>16}" for name, _ in columns))
    steps = {"load_s": "load + decode", "preprocess_s": "preprocessing", "inference_s": "inference (ORT)",
             "postprocess_s": "postprocessing", "total_s": "total"}  # fmt: skip
    for key, name in steps.items():
        print(f"  {name:20}" + "".join(f"{run[key]:14.2f} s" for _, run in columns))
    print(f"  {'peak memory (MiB)':20}" + "".join(f"{run['peak_mib']:16.0f}" for _, run in columns))
    print(
        f"  {'not the model':20}"
        + "".join(f"{100 * (run['total_s'] - run['inference_s']) / run['total_s']:14.0f} %" for _, run in columns)
    )
    if warm:
        shares = [100 * (r["total_s"] - r["inference_s"]) / r["total_s"] for r in runs[1:]]
        print(f"  not the model in each warm run: {', '.join(f'{v:.0f} %' for v in shares)}")
    peak = max(run["peak_mib"] for run in runs)
    print(
        f"  peak memory, all runs: {peak:.0f} MiB above the {base_rss:.0f} MiB baseline "
        f"(int16 volume {int16_mib:.0f} MiB, x4 + model = {4 * int16_mib + model_mib:.0f} MiB)"
    )
    print(
        f"  network only: ONNX Runtime {ort_s:.2f} s, PyTorch eager {torch_s:.2f} s, "
        f"ratio eager/ORT = {torch_s / ort_s:.2f}"
    )
    lungs_ml = sum(st.volume_ml for st in result.statistics)
    print(f"  lungs {lungs_ml:.0f} ml ({', '.join(f'{s.number}: {s.volume_ml:.0f} ml' for s in result.statistics)})")


if __name__ == "__main__":
    main()
