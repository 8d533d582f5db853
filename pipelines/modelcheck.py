"""Checks for model authors: ``ainode models check DIR`` and ``ainode models list``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.domain import IMAGE_STATISTICS, describe_domain
from pipelines.manifest import ManifestError, ModelManifest, OutputKind, Task, load_manifest
from pipelines.runtime import LoadedModel, ModelIntegrityError, ModelRegistry, load_model

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "uint8": np.uint8}
#: Batch used for the dummy run when the batch axis is dynamic (2 also proves it really is dynamic).
DUMMY_BATCH = 2


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class ModelCheckReport:
    path: Path
    checks: list[Check] = field(default_factory=list)
    #: What the manifest says the model was validated on, one line per bound (``describe_domain``).
    domain: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def add(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, passed, detail))
        return passed

    def __str__(self) -> str:
        lines = [f"{self.path}: {'OK' if self.ok else 'FAILED'}"]
        lines += [
            f"  [{'ok' if c.passed else 'FAIL'}] {c.name}" + (f": {c.detail}" if c.detail else "") for c in self.checks
        ]
        if self.domain:
            lines.append("  validated domain (other input is not analysed: outside-validated-domain):")
            lines += [f"    {line}" for line in self.domain]
        return "\n".join(lines)


def _profile_features_known(manifest: ModelManifest) -> tuple[bool, str]:
    """Whether the domain profile names features the node can compute for this task."""
    from pipelines.svm import FEATURES

    profile = manifest.domain.profile if manifest.domain else None
    if profile is None:
        return True, "no input profile"
    known = FEATURES if manifest.task is Task.SVM else IMAGE_STATISTICS
    unknown = [n for n in profile.features if n not in known]
    if unknown:
        return False, f"unknown {unknown}; known for task {manifest.task.value}: {sorted(known)}"
    return True, ", ".join(profile.features)


def _expected_shape(manifest: ModelManifest, index: int, batch: int) -> tuple[int | None, ...] | None:
    """The shape an output must have for a batch of ``batch``; None entries are not checked."""
    out = manifest.outputs[index]
    h, w = manifest.preprocessing.size
    if manifest.task is Task.SEGMENTATION and index == 0:
        if out.kind is OutputKind.LABELMAP:
            return (batch, h, w)
        return (batch, len(out.labels) + 1, h, w)
    if out.kind is OutputKind.HEATMAP:
        return (batch, 1, None, None)
    if out.kind is OutputKind.LABEL:
        return (batch,)
    if out.kind in (OutputKind.PROBABILITIES, OutputKind.LOGITS):
        if manifest.task is Task.SVM:
            return (batch, len(out.labels))
        return (batch, None)
    return None


def _shape_matches(actual: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    if len(actual) == len(expected) + 1 and actual[1] == 1:
        actual = (actual[0], *actual[2:])  # (N, 1, H, W) labelmaps are fine too
    return len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected, strict=True))


def check_model_dir(path: Path, providers: list[str] | None = None) -> ModelCheckReport:
    """Validate a model folder: manifest, checksum, session, declared I/O, a dummy run and its output shapes."""
    report = ModelCheckReport(Path(path))
    try:
        manifest = load_manifest(Path(path))
    except ManifestError as exc:
        report.add("manifest valid", False, str(exc))
        return report
    report.add("manifest valid", True, f"{manifest.name} {manifest.version} ({manifest.task.value})")
    report.domain = describe_domain(manifest.domain)
    if not report.add("domain profile features", *_profile_features_known(manifest)):
        return report
    try:
        model: LoadedModel = load_model(Path(path), providers)
    except ModelIntegrityError as exc:
        report.add("checksum matches", False, str(exc))
        return report
    except Exception as exc:  # an ONNX file onnxruntime cannot load is the author's problem to see
        report.add("checksum matches", True)
        report.add("onnxruntime loads the model", False, f"{type(exc).__name__}: {exc}")
        return report
    report.add("checksum matches", True, manifest.sha256[:16] + "...")
    report.add("onnxruntime loads the model", True, ", ".join(model.providers_in_use))

    inputs = {i.name: i for i in model.session.get_inputs()}
    outputs = {o.name for o in model.session.get_outputs()}
    spec = manifest.input
    if not report.add("input name", spec.name in inputs, f"{spec.name!r}; the model has {sorted(inputs)}"):
        return report
    declared = [o.name for o in manifest.outputs]
    missing = [n for n in declared if n not in outputs]
    if not report.add(
        "output names", not missing, f"missing {missing}; model has {sorted(outputs)}" if missing else ""
    ):
        return report
    if len(spec.layout) == 4 and spec.layout == "NCHW":
        c, h, w = spec.shape[1:]
        pre = manifest.preprocessing
        agree = (c in (None, -1, pre.channels)) and (h in (None, -1, pre.size[0])) and (w in (None, -1, pre.size[1]))
        report.add(
            "input shape agrees with preprocessing",
            agree,
            f"input {spec.shape}, size {pre.size}, channels {pre.channels}",
        )

    batch = DUMMY_BATCH if spec.shape[0] in (None, -1) else int(spec.shape[0])
    dims = [batch] + [1 if d in (None, -1) else int(d) for d in spec.shape[1:]]
    dummy = np.random.default_rng(0).random(dims).astype(_DTYPES[spec.dtype])
    try:
        results = model.run(dummy)
    except Exception as exc:
        report.add("dummy input runs", False, f"input {dims}: {type(exc).__name__}: {exc}")
        return report
    report.add("dummy input runs", True, f"input {dims}")
    for i, (out, value) in enumerate(zip(manifest.outputs, results, strict=True)):
        expected = _expected_shape(manifest, i, batch)
        actual = tuple(np.asarray(value).shape)
        if expected is not None:
            shown = "x".join("?" if e is None else str(e) for e in expected)
            report.add(f"output {out.name} shape", _shape_matches(actual, expected), f"{actual}, declared {shown}")
        if out.kind in (OutputKind.PROBABILITIES, OutputKind.HEATMAP):
            v = np.asarray(value, dtype=np.float64)
            report.add(
                f"output {out.name} in 0..1",
                bool(v.min() >= -1e-4 and v.max() <= 1 + 1e-4),
                f"range {v.min():.3g}..{v.max():.3g}",
            )
    return report


def models_list_rows(registry: ModelRegistry) -> list[dict[str, Any]]:
    """Rows for ``ainode models list``: name, version, task, modalities and the provider in use."""
    rows = []
    for manifest in registry.list():
        try:
            provider = registry.get(manifest.name).providers_in_use[0]
        except (ManifestError, ModelIntegrityError) as exc:
            provider = f"REFUSED ({exc})"
        rows.append(
            {
                "name": manifest.name,
                "version": manifest.version,
                "task": manifest.task.value,
                "modalities": list(manifest.modalities),
                "provider": provider,
            }
        )
    return rows
