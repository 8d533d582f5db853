"""ONNX Runtime sessions for the models in one or more model directories.

One :class:`onnxruntime.InferenceSession` per model, created on first use and shared by every
worker thread (``InferenceSession.run`` is thread-safe). The file's SHA-256 is checked against
the manifest before a session is created, so a tampered or half-copied ``model.onnx`` is never run.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipelines.manifest import MANIFEST_FILE, MODEL_FILE, ManifestError, ModelManifest, load_manifest

log = logging.getLogger(__name__)

#: Preferred order when providers are chosen automatically: fastest first, CPU always last.
AUTO_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class ModelIntegrityError(RuntimeError):
    """model.onnx does not match the SHA-256 its manifest declares."""


class UnknownModelError(KeyError):
    """No model of that name in the configured model directories."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0])


def bundled_models_dir() -> Path:
    """The ``onnx_models`` folder installed with this package (the three reference models)."""
    import onnx_models

    return Path(onnx_models.__file__).resolve().parent


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Execution providers to ask ONNX Runtime for.

    ``None`` (config ``providers: auto``) picks TensorRT / CUDA when this onnxruntime build has
    them (onnxruntime-gpu), else CPU. An explicit list is used as given, minus providers this
    build lacks (logged), with CPU appended as the fallback for unsupported operators.
    """
    available = ort.get_available_providers()
    if requested is None:
        chosen = [p for p in AUTO_PROVIDER_ORDER if p in available]
    else:
        missing = [p for p in requested if p not in available]
        if missing:
            log.warning("execution providers %s not available in this onnxruntime build (%s)", missing, available)
        chosen = [p for p in requested if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


@dataclass(frozen=True)
class LoadedModel:
    """A verified model with its (shared) inference session."""

    manifest: ModelManifest
    session: ort.InferenceSession
    #: The model folder.
    path: Path
    #: Providers the session actually uses, in priority order.
    providers_in_use: tuple[str, ...]
    #: Inference lanes shared by the models of one registry: at most that many batches run at once, each
    #: with the session's threads, instead of several sessions each sized for the whole machine contending
    #: for its cores. None: no limit.
    lanes: threading.Semaphore | None = field(default=None, compare=False)

    def run(self, inputs: np.ndarray) -> list[np.ndarray]:
        """Run the network on one batch shaped as the manifest's input; outputs in manifest order."""
        names = [o.name for o in self.manifest.outputs]
        if self.lanes is None:
            return self.session.run(names, {self.manifest.input.name: inputs})
        with self.lanes:
            return self.session.run(names, {self.manifest.input.name: inputs})


def load_model(
    model_dir: Path,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    lanes: threading.Semaphore | None = None,
) -> LoadedModel:
    """Validate the manifest, verify the checksum, then create the session.

    Raises
    ------
    ManifestError
        model.yaml is missing or invalid.
    ModelIntegrityError
        model.onnx is missing or its SHA-256 differs from ``sha256`` in model.yaml.
    """
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    onnx_path = model_dir / MODEL_FILE
    if not onnx_path.is_file():
        raise ModelIntegrityError(f"{onnx_path}: model file missing")
    actual = sha256_of(onnx_path)
    if actual != manifest.sha256:
        raise ModelIntegrityError(
            f"{onnx_path}: SHA-256 {actual} does not match {manifest.sha256} declared in {MANIFEST_FILE}; "
            "the file was changed or damaged after the manifest was written — refusing to load it"
        )
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Without ONNX Runtime's CPU memory arena a process gives a job's tensors back instead of keeping its
    # peak for good: 35-60 MB less per process after a 300-slice CT, at the same speed (measured).
    options.enable_cpu_mem_arena = False
    # Pass the bytes we hashed, not the path, so the file cannot change between check and load.
    session = ort.InferenceSession(onnx_path.read_bytes(), sess_options=options, providers=choose_providers(providers))
    return LoadedModel(manifest, session, model_dir, tuple(session.get_providers()), lanes)


class ModelRegistry:
    """The models in one or more directories (each holding model folders), by manifest name.

    Later directories override earlier ones with the same model name, so a site's models
    directory can replace a bundled model.
    """

    def __init__(
        self,
        models_dir: Path | Sequence[Path],
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        inference_lanes: int | None = None,
    ) -> None:
        self.models_dirs = [Path(models_dir)] if isinstance(models_dir, str | Path) else [Path(d) for d in models_dir]
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        #: One semaphore for every model of this registry: they all share the machine's cores.
        self.lanes = threading.Semaphore(inference_lanes) if inference_lanes else None
        self._lock = threading.Lock()
        self._loaded: dict[str, LoadedModel] = {}

    def _folders(self) -> dict[str, tuple[Path, ModelManifest]]:
        found: dict[str, tuple[Path, ModelManifest]] = {}
        for root in self.models_dirs:
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file()):
                try:
                    manifest = load_manifest(folder)
                except ManifestError as exc:
                    log.warning("skipping model folder: %s", exc)
                    continue
                found[manifest.name] = (folder, manifest)
        return found

    def list(self) -> list[ModelManifest]:
        """Manifests of every valid model folder (invalid ones are logged and skipped)."""
        return [manifest for _, manifest in self._folders().values()]

    def get(self, name: str) -> LoadedModel:
        """The loaded model called ``name``; the session is created once and then shared.

        Raises
        ------
        UnknownModelError, ManifestError, ModelIntegrityError
        """
        with self._lock:
            # Holding the lock while loading means two workers never build the same session twice.
            if name in self._loaded:
                return self._loaded[name]
            folders = self._folders()
            if name not in folders:
                raise UnknownModelError(
                    f"no model named {name!r} in {', '.join(map(str, self.models_dirs))} "
                    f"(found: {', '.join(sorted(folders)) or 'none'})"
                )
            model = load_model(
                folders[name][0], self.providers, self.intra_op_threads, self.inter_op_threads, self.lanes
            )
            self._loaded[name] = model
            return model
