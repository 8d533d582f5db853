"""The model input-domain guard: is this input within what the model was validated on?

A manifest's optional ``domain`` section (:class:`~pipelines.manifest.Domain`) declares the header values
(modality, body part, view position, photometric interpretation), the geometry (pixel spacing, matrix,
field of view) and a statistical profile of the preprocessed model input that the training script
recorded. :func:`check_domain` measures one input against each declared bound and refuses the first it
falls outside with ``NotAnalysedReason.OUTSIDE_VALIDATED_DOMAIN`` ("<what> <measured value> outside
<bound>"): a confident finding on an image the model never saw the like of is worse than no finding.

The profile is taken of the *preprocessed* input — the tensor :func:`~pipelines.modelinput.model_input`
makes, or for task svm the feature vector :func:`~pipelines.svm.compute_features` makes — so that it
describes what the network sees, and the training scripts compute it through the very same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from scipy import ndimage as ndi

from pipelines.enums import Task
from pipelines.manifest import Bounds, Domain, InputProfile, ModelManifest
from pipelines.modelinput import check_modality, model_input
from pipelines.notanalysed import NotAnalysable, NotAnalysedReason
from pipelines.volume import Volume

#: Slices of a volume the profile is taken from (evenly spaced): enough for its histogram, cheap on 600 slices.
PROFILE_SLICES = 12
#: Smoothing (pixels of the model input) before the histogram-shape and gradient statistics: they should
#: describe the picture, not its noise.
SMOOTHING_PX = 1.5
HISTOGRAM_BINS = 64
#: Smoothed gradient (of the 0..1 input, per pixel) under which a pixel counts as flat.
FLAT_GRADIENT = 0.004


def _percentile(q: float) -> Callable[[np.ndarray, np.ndarray, np.ndarray], float]:
    return lambda x, smooth, grad: float(np.percentile(x, q))


def _histogram(smooth: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(smooth, HISTOGRAM_BINS, (0.0, 1.0))
    return counts / max(int(counts.sum()), 1)


def _entropy_bits(x: np.ndarray, smooth: np.ndarray, grad: np.ndarray) -> float:
    h = _histogram(smooth)
    h = h[h > 0]
    return float(-(h * np.log2(h)).sum())


def _top8_fraction(x: np.ndarray, smooth: np.ndarray, grad: np.ndarray) -> float:
    return float(np.sort(_histogram(smooth))[-8:].sum())


_INTENSITY_PERCENTILES = {"intensity_p05": 5, "intensity_p25": 25, "intensity_p50": 50, "intensity_p75": 75,
                          "intensity_p95": 95}  # fmt: skip
_GRADIENT_LOG_PERCENTILES = {"gradient_p50_log": 50, "gradient_p90_log": 90}

#: Statistics of the preprocessed input (mapped to 0..1) a profile may name, computed over the sampled slices.
#: Phantoms and real images differ most in the *shape* of the intensity histogram (a few flat tissue
#: classes vs. continuous shading) and in how much of the picture is flat.
IMAGE_STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "intensity_p05": _percentile(5),
    "intensity_p25": _percentile(25),
    "intensity_p50": _percentile(50),
    "intensity_p75": _percentile(75),
    "intensity_p95": _percentile(95),
    #: Entropy (bits) of the 64-bin histogram of the smoothed input: low for a few flat tissue classes.
    "histogram_entropy_bits": _entropy_bits,
    #: Fraction of pixels in the 8 fullest of the 64 bins: high for a few flat tissue classes.
    "histogram_top8_fraction": _top8_fraction,
    #: Fraction of pixels whose smoothed gradient is under FLAT_GRADIENT per pixel.
    "flat_fraction": lambda x, smooth, grad: float((grad < FLAT_GRADIENT).mean()),
    #: Natural logarithm of the median and 90th percentile of the smoothed gradient magnitude.
    "gradient_p50_log": lambda x, smooth, grad: float(np.log(np.percentile(grad, 50) + 1e-5)),
    "gradient_p90_log": lambda x, smooth, grad: float(np.log(np.percentile(grad, 90) + 1e-5)),
}


def image_statistics(x01: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The named :data:`IMAGE_STATISTICS` of model-input slices (B, H, W) already mapped to 0..1."""
    unknown = [n for n in names if n not in IMAGE_STATISTICS]
    if unknown:
        raise ValueError(f"unknown profile statistics {unknown}; known: {sorted(IMAGE_STATISTICS)}")
    x = np.clip(np.asarray(x01, np.float64), 0.0, 1.0)
    smooth = grad = None
    if any(n not in _INTENSITY_PERCENTILES for n in names):
        # Percentiles of the input alone (the bundled lung model's profile) need neither the smoothing nor
        # the gradient, most of this function's time.
        smooth = ndi.gaussian_filter(x, (0, SMOOTHING_PX, SMOOTHING_PX))
        grad = np.hypot(np.gradient(smooth, axis=1), np.gradient(smooth, axis=2))
    batched = _batched(names, x, grad)
    return np.array([batched[n] if n in batched else IMAGE_STATISTICS[n](x, smooth, grad) for n in names],  # type: ignore[arg-type]
                    dtype=np.float64)  # fmt: skip


def _batched(names: Sequence[str], x: np.ndarray, grad: np.ndarray | None) -> dict[str, float]:
    """The percentile statistics among ``names``, each array's in one call: one partition instead of one per
    percentile (a third of the time), the same values as :data:`IMAGE_STATISTICS` gives one by one.

    ``grad`` may be None when ``names`` has no gradient statistic."""
    out: dict[str, float] = {}
    for array, wanted in ((x, _INTENSITY_PERCENTILES), (grad, _GRADIENT_LOG_PERCENTILES)):
        chosen = [n for n in names if n in wanted]
        if chosen:
            assert array is not None, "a gradient statistic needs the gradient"
            for name, value in zip(chosen, np.percentile(array, [wanted[n] for n in chosen]), strict=True):
                out[name] = float(np.log(value + 1e-5)) if wanted is _GRADIENT_LOG_PERCENTILES else float(value)
    return out


def profile_slices(n_slices: int) -> np.ndarray:
    """Indices of the slices a volume's profile is taken from."""
    return np.unique(np.linspace(0, n_slices - 1, min(n_slices, PROFILE_SLICES)).round().astype(int))


def to_unit_range(x: np.ndarray, intensity_range: Sequence[float] | None) -> np.ndarray:
    """Model-input values mapped linearly so that ``intensity_range`` becomes 0..1 (unchanged for None)."""
    if intensity_range is None:
        return x
    low, high = intensity_range
    return (np.asarray(x, np.float64) - low) / (high - low)


def input_features(
    manifest: ModelManifest, volume: Volume, features: Sequence[str], intensity_range: Sequence[float] | None = None
) -> np.ndarray | None:
    """The named features of ``volume``'s preprocessed input, as a profile measures them.

    For task svm the features are the SVM's own (:data:`pipelines.svm.FEATURES` of the image); otherwise
    :data:`IMAGE_STATISTICS` of :func:`~pipelines.modelinput.model_input` of up to :data:`PROFILE_SLICES`
    slices. None for a one-image task (classification, svm) given several images: its pipeline refuses
    that input with its own reason. The training scripts call this very function to record the profile.
    """
    if manifest.task is not Task.SEGMENTATION and volume.pixels.shape[0] != 1:
        return None
    if manifest.task is Task.SVM:
        from pipelines.svm import compute_features

        return np.array([f.value for f in compute_features(volume.pixels[0], list(features))], dtype=np.float64)
    spacing_rc = (float(volume.spacing_mm[1]), float(volume.spacing_mm[2]))
    pixels = volume.pixels[profile_slices(volume.pixels.shape[0])]
    x = model_input(manifest, pixels, spacing_rc)[:, 0]
    return image_statistics(to_unit_range(x, intensity_range), features)


def profile_features(manifest: ModelManifest, volume: Volume) -> np.ndarray | None:
    """The feature vector of ``volume`` that the manifest's profile is of; None without a profile."""
    profile = manifest.domain.profile if manifest.domain else None
    if profile is None:
        return None
    return input_features(manifest, volume, profile.features, profile.intensity_range)


def mahalanobis(vector: np.ndarray, profile: InputProfile) -> float:
    d = np.asarray(vector, np.float64) - np.asarray(profile.mean, np.float64)
    return float(np.sqrt(max(float(d @ np.asarray(profile.precision, np.float64) @ d), 0.0)))


@dataclass(frozen=True)
class DomainCheck:
    """One declared bound and what this input measured against it."""

    what: str
    measured: str
    bound: str
    inside: bool

    def __str__(self) -> str:
        return f"{self.what} {self.measured} {'within' if self.inside else 'outside'} {self.bound}"


def _header_values(headers: Sequence[Dataset] | None, keyword: str) -> list[str]:
    """Distinct non-empty values of a Code String attribute over the instances, upper case."""
    values: list[str] = []
    for ds in headers or ():
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value and value not in values:
            values.append(value)
    return values


def _members(what: str, values: list[str], allowed: list[str] | None) -> Iterator[DomainCheck]:
    if allowed is None:
        return
    for value in values:
        yield DomainCheck(what, value, ", ".join(allowed), value in allowed)


def _pair(what: str, values: tuple[float, float], unit: str, bounds: Bounds | None) -> Iterator[DomainCheck]:
    if bounds is None:
        return
    shown = f"{values[0]:.4g} x {values[1]:.4g}{unit}"
    yield DomainCheck(what, shown, f"{bounds}{unit}", all(v in bounds for v in values))


def _profile_bound(profile: InputProfile) -> str:
    detail = f"Mahalanobis over {', '.join(profile.features)}"
    if profile.calibration:
        detail += f"; {profile.calibration}"
    return f"0..{profile.threshold:.4g} ({detail})"


def measure_domain(
    manifest: ModelManifest, volume: Volume, headers: Sequence[Dataset] | None = None
) -> Iterator[DomainCheck]:
    """Each declared bound of the manifest's domain against ``volume`` (and its source ``headers``), in order.

    Header bounds are measured only when ``headers`` are given and carry the attribute; geometry only where
    the loader established a pixel spacing; the profile last (it is the one that costs time).
    """
    domain: Domain | None = manifest.domain
    if domain is None:
        return
    yield from _members("modality", [volume.modality.upper()], domain.modalities)
    yield from _members("body part", _header_values(headers, "BodyPartExamined"), domain.body_parts)
    yield from _members("view position", _header_values(headers, "ViewPosition"), domain.view_positions)
    yield from _members(
        "photometric interpretation",
        _header_values(headers, "PhotometricInterpretation"),
        domain.photometric_interpretations,
    )
    rows, cols = (int(n) for n in volume.pixels.shape[1:])
    yield from _pair("matrix", (rows, cols), " pixels", domain.matrix)
    if volume.in_plane_spacing.known:
        spacing = (float(volume.spacing_mm[1]), float(volume.spacing_mm[2]))
        yield from _pair("pixel spacing", spacing, " mm", domain.pixel_spacing_mm)
        yield from _pair("field of view", (rows * spacing[0], cols * spacing[1]), " mm", domain.field_of_view_mm)
    if domain.profile is not None:
        vector = profile_features(manifest, volume)
        if vector is not None:
            distance = mahalanobis(vector, domain.profile)
            inside = bool(np.isfinite(distance) and distance <= domain.profile.threshold)
            yield DomainCheck("input profile distance", f"{distance:.3g}", _profile_bound(domain.profile), inside)


def _pipeline_refuses(manifest: ModelManifest, volume: Volume) -> bool:
    """Whether the task's pipeline refuses ``volume`` as unusable whatever its domain (so its reason stands).

    Raises the pipeline's own NotAnalysable for slices that are not axial (segmentation).
    """
    if manifest.task is not Task.SEGMENTATION:
        return volume.pixels.shape[0] != 1  # one-image pipelines refuse a series of several
    from pipelines.segmentation import standard_flips

    standard_flips(volume)
    return not volume.in_plane_spacing.known  # segmentation measures in millimetres


def check_domain(manifest: ModelManifest, volume: Volume, headers: Sequence[Dataset] | None = None) -> None:
    """Refuse input outside the manifest's validated domain; nothing happens without a ``domain``.

    Input that the task's pipeline refuses whatever its domain (wrong modality, no pixels, several images
    for a one-image model, slices not axial, no pixel spacing where it measures in mm) keeps that reason.

    Raises
    ------
    NotAnalysable
        The pipeline's own reasons first, then OUTSIDE_VALIDATED_DOMAIN naming the first bound the input is
        outside, its measured value and the bound.
    """
    if manifest.domain is None:
        return
    check_modality(manifest, volume)
    if _pipeline_refuses(manifest, volume):
        return  # its own reason says more than "outside the domain"
    for check in measure_domain(manifest, volume, headers):
        if not check.inside:
            raise NotAnalysable(
                NotAnalysedReason.OUTSIDE_VALIDATED_DOMAIN, f"{check} (model {manifest.name} {manifest.version})"
            )


def describe_domain(domain: Domain | None) -> list[str]:
    """One line per declared bound, for ``ainode models check``."""
    if domain is None:
        return ["not declared: every input of the model's modalities is analysed"]
    lines = []
    for label, values in (
        ("modalities", domain.modalities),
        ("body parts", domain.body_parts),
        ("view positions", domain.view_positions),
        ("photometric interpretations", domain.photometric_interpretations),
    ):
        if values is not None:
            lines.append(f"{label}: {', '.join(values)}")
    for label, bounds, unit in (
        ("pixel spacing", domain.pixel_spacing_mm, " mm"),
        ("matrix", domain.matrix, " pixels"),
        ("field of view", domain.field_of_view_mm, " mm"),
    ):
        if bounds is not None:
            lines.append(f"{label}: {bounds}{unit}")
    if domain.profile is not None:
        lines.append(f"input profile: distance {_profile_bound(domain.profile)}")
    return lines
