"""Measurement: how many inputs of each kind the model input-domain guard refuses (issue 10, item 6).

    python3 tests/bench/domain_guard.py [--phantoms 200] [--ct-phantoms 30]

Input sets, each through the model that would be routed to it, as ``run_pipeline`` sees them (the
volume and its source headers):

- held-out phantoms of each reference model (fresh seeds, never used to fit or calibrate the profile):
  what they refuse is the guard's false-refusal rate;
- digitally reconstructed radiographs (DRRs) of the real chest CT in ../shared/data/ct-chest-tcia-A0002
  (TCIA Lung-PET-CT-Dx A0002, CC BY 4.0): HU -> linear attenuation (mu = mu_water (1 + HU/1000)),
  line integrals front to back, shown as a log image (what a radiograph's detector processing shows),
  the same with unsharp-mask "presentation" processing, and as 1 - exp(-sum mu). The CT covers only a
  240 mm slab of the chest (30 slices of 8 mm), so a DRR shows no apices, shoulders or abdomen;
- pydicom's real test images (pydicom-data): RG1, a PA chest CR with many round nodules; RG3, a CR of
  a lower leg; CT and MR slices (through the chest model: wrong modality; through lung-seg: domain);
- the real CT itself (both series) through lung-seg, which segments it well (Dice 0.95): it must pass.

For each set: n, refused (any reason), refused by the domain guard, refused by the input profile on its
own (whatever the header checks said), the profile distances against the threshold, and for the chest
model the range of the probability of "opacity" it reported, or would have reported without the guard.
Prints a Markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script

from onnx_models.training.domain_profile import (  # noqa: E402
    HELD_OUT_SEED_OFFSET,
    TRAINING_SEED,
    breast_density_volumes,
    chest_xray_volumes,
    lung_seg_volumes,
)
from pipelines.domain import DomainCheck, measure_domain  # noqa: E402
from pipelines.notanalysed import NotAnalysed, NotAnalysedReason  # noqa: E402
from pipelines.results import ClassificationResult  # noqa: E402
from pipelines.runtime import LoadedModel, ModelRegistry, bundled_models_dir  # noqa: E402
from pipelines.study import run_pipeline  # noqa: E402
from pipelines.volume import InPlaneSpacing, SourceFrame, Volume, load_volume  # noqa: E402

CT_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct-chest-tcia-A0002"
SERIES = ("series-2-B70f", "series-3-B40f")
#: Linear attenuation of water at an effective energy of about 60 keV, per mm.
MU_WATER_PER_MM = 0.02
RENDERINGS = ("log", "log-unsharp", "transmission")


def ct_volume_of(series_dir: Path) -> tuple[Volume, list[Dataset]]:
    datasets: list[Dataset] = [dcmread(p) for p in sorted(series_dir.glob("*.dcm"))]
    return load_volume(datasets), datasets


def drr_image(ct: Volume, rendering: str = "log", mu_water_per_mm: float = MU_WATER_PER_MM) -> np.ndarray:
    """A frontal radiograph-like image (rows head to feet, columns as the CT's), bright = dense.

    ``ct`` is an axial volume ordered feet to head (as the loader orders a head-first scan) with rows
    running anterior to posterior; the rays run along the rows. Rows of the result are resampled to the
    CT's column spacing, so the image has square pixels of that size.
    """
    hu = ct.pixels.astype(np.float32)[::-1]
    mu = np.clip(mu_water_per_mm * (1.0 + hu / 1000.0), 0.0, None)
    line = mu.sum(axis=1) * float(ct.spacing_mm[1])  # (slices, columns): the attenuation line integrals
    line = ndi.zoom(line, (ct.spacing_mm[0] / ct.spacing_mm[2], 1.0), order=1)
    if rendering == "log":
        return line.astype(np.float32)
    if rendering == "log-unsharp":
        # Detector "presentation" processing boosts mid-frequency detail (unsharp mask over ~25 mm).
        sigma = 25.0 / float(ct.spacing_mm[2])
        return (line + 1.5 * (line - ndi.gaussian_filter(line, sigma))).astype(np.float32)
    if rendering == "transmission":
        return (1.0 - np.exp(-line)).astype(np.float32)
    raise ValueError(f"unknown rendering {rendering!r}; known: {RENDERINGS}")


def radiograph_headers(
    modality: str = "DX", body_part: str = "CHEST", view: str = "PA", photometric: str = "MONOCHROME2"
) -> list[Dataset]:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, body_part, view
    ds.PhotometricInterpretation = photometric
    return [ds]


def radiograph_volume(image: np.ndarray, spacing_mm: float | None, modality: str = "DX", uid: str = "2.25.1") -> Volume:
    """One projection image as the loader makes it; ``spacing_mm`` None: no valid Pixel Spacing."""
    return Volume(
        pixels=image[None].astype(np.float32),
        origin_mm=np.zeros(3),
        spacing_mm=(1.0, spacing_mm or 1.0, spacing_mm or 1.0),
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 0, -1.0]),
        slice_direction=np.array([0, 1.0, 0]),
        source_frames=[SourceFrame("1.2.840.10008.5.1.4.1.1.1.1", uid)],
        study_instance_uid="2.25.2",
        series_instance_uid=uid,
        frame_of_reference_uid=None,
        modality=modality,
        in_plane_spacing=InPlaneSpacing.PATIENT if spacing_mm else InPlaneSpacing.UNKNOWN,
    )


def drr_inputs(ct_dir: Path = CT_DIR) -> Iterator[tuple[str, Volume, list[Dataset]]]:
    """Every DRR of both series of the real CT, as a DX chest PA with its headers."""
    for series in SERIES:
        ct, _ = ct_volume_of(ct_dir / series)
        for rendering in RENDERINGS:
            volume = radiograph_volume(drr_image(ct, rendering), float(ct.spacing_mm[2]), uid=f"2.25.{len(series)}")
            yield f"DRR {series} {rendering}", volume, radiograph_headers()


def pydicom_inputs(names: Iterable[str]) -> Iterator[tuple[str, Volume, list[Dataset]]]:
    from pydicom.data import get_testdata_file

    for name in names:
        path = get_testdata_file(name)
        if path is None:
            print(f"(pydicom test file {name} not installed: pip install pydicom-data)", file=sys.stderr)
            continue
        ds = dcmread(str(path))
        yield name, load_volume([ds]), [ds]


@dataclass
class SetResult:
    name: str
    model: str
    outcomes: list[str] = field(default_factory=list)
    profile_outside: list[bool] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    threshold: float | None = None

    def row(self) -> str:
        n = len(self.outcomes)
        refused = sum(o != "analysed" for o in self.outcomes)
        domain = sum(o.startswith(NotAnalysedReason.OUTSIDE_VALIDATED_DOMAIN.value) for o in self.outcomes)
        other = sorted({o.split(":")[0] for o in self.outcomes if o != "analysed" and not o.startswith("outside")})
        by_profile = f"{sum(self.profile_outside)}/{len(self.profile_outside)}" if self.profile_outside else "–"
        dist = "–"
        if self.distances:
            dist = f"{min(self.distances):.3g}–{max(self.distances):.3g} (≤ {self.threshold:.3g})"
        prob = "–"
        if self.probabilities:
            prob = f"{min(self.probabilities):.3f}–{max(self.probabilities):.3f}"
        reasons = ", ".join(other) if other else ""
        return (
            f"| {self.name} | {self.model} | {n} | {refused} ({refused / n:.1%}) | {domain} | {by_profile} | "
            f"{dist} | {prob} | {reasons} |"
        )


def measure_set(
    name: str, model: LoadedModel, inputs: Iterable[tuple[str, Volume, list[Dataset] | None]], verbose: bool
) -> SetResult:
    profile = model.manifest.domain.profile if model.manifest.domain else None
    result = SetResult(name, model.manifest.name, threshold=profile.threshold if profile else None)
    for label, volume, headers in inputs:
        checks: list[DomainCheck] = []
        if volume.modality in model.manifest.modalities:
            checks = list(measure_domain(model.manifest, volume, headers))
        prof = [c for c in checks if c.what == "input profile distance"]
        if prof:
            result.profile_outside.append(not prof[0].inside)
            result.distances.append(float(prof[0].measured))
        outcome = run_pipeline(model, volume, headers=headers)
        text = str(outcome) if isinstance(outcome, NotAnalysed) else "analysed"
        result.outcomes.append(text)
        if isinstance(outcome, ClassificationResult):
            result.probabilities.append(outcome.probability)
        elif model.manifest.name == "chest-xray" and text.startswith(NotAnalysedReason.OUTSIDE_VALIDATED_DOMAIN.value):
            # What the model would have said without the guard.
            from pipelines.classification import classify

            result.probabilities.append(classify(model, volume).probability)
        if verbose:
            print(f"  {name} / {label}: {text[:160]}", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantoms", type=int, default=200, help="held-out chest and mammogram phantoms per model")
    parser.add_argument("--ct-phantoms", type=int, default=30, help="held-out CT phantoms")
    parser.add_argument("--verbose", "-v", action="store_true", help="each input's outcome on stderr")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # pydicom's test files carry invalid values on purpose
    registry = ModelRegistry(bundled_models_dir())
    chest, lung, density = (registry.get(n) for n in ("chest-xray", "lung-seg", "breast-density"))
    seed = TRAINING_SEED + HELD_OUT_SEED_OFFSET
    chest_headers = radiograph_headers()
    mammo_headers = radiograph_headers("MG", "BREAST", "CC")
    rows = [
        measure_set(
            "held-out chest phantoms (matrix 256–1024)",
            chest,
            ((v.series_instance_uid, v, chest_headers) for v in chest_xray_volumes(seed, args.phantoms)),
            args.verbose,
        ),
        measure_set(
            "held-out mammogram phantoms",
            density,
            ((v.series_instance_uid, v, mammo_headers) for v in breast_density_volumes(seed, args.phantoms)),
            args.verbose,
        ),
        measure_set(
            "held-out CT phantoms",
            lung,
            ((v.series_instance_uid, v, None) for v in lung_seg_volumes(seed, args.ct_phantoms)),
            args.verbose,
        ),
    ]
    if CT_DIR.is_dir():
        rows.append(measure_set("DRRs of the real CT (2 series × 3 renderings)", chest, drr_inputs(), args.verbose))
        real = ((s, *ct_volume_of(CT_DIR / s)) for s in SERIES)
        rows.append(measure_set("the real CT itself (2 series)", lung, real, args.verbose))
    else:
        print(f"(real CT absent: {CT_DIR}; no DRRs)", file=sys.stderr)
    radiographs = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm"]
    rows.append(
        measure_set("pydicom real CR (RG1 chest ×2, RG3 leg ×2)", chest, pydicom_inputs(radiographs), args.verbose)
    )
    slices = ["CT_small.dcm", "693_UNCR.dcm", "bad_sequence.dcm", "explicit_VR-UN.dcm", "MR_small.dcm", "MR2_UNCR.dcm"]
    rows.append(measure_set("pydicom CT/MR slices", chest, pydicom_inputs(slices), args.verbose))
    rows.append(measure_set("pydicom CT slices", lung, pydicom_inputs(slices[:4]), args.verbose))
    print(
        "| input set | model | n | refused | by domain guard | by profile alone | profile distance (threshold) "
        "| P(opacity) reported, or that would have been | other reasons |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r.row())


if __name__ == "__main__":
    main()
