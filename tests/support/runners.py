"""Pipeline runners for the node's own tests (issue 2), and the one place tests get the study runner from.

``ThumbnailRunner`` makes real DICOM objects (a highdicom Secondary Capture in the source study)
without a model, so the receive -> assemble -> job -> outbox -> PACS path can be tested on its own.
Like the real pipelines (ARCHITECTURE.md invariant 3), it fixes its result UIDs from its input: the
same instances through the same pipeline make the same UIDs again; other instances make new ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipelines.study import RunOutcome, StudyRunner


def result_uid_key(pipeline: str, series_files: Mapping[str, Sequence[Path]]) -> list[str]:
    """What a result is *of*: the pipeline and each series with its SOP Instance UIDs, in a fixed order."""
    key = ["tests thumbnail", pipeline]
    for series_uid in sorted(series_files):
        sops = sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series_files[series_uid])
        key += [series_uid, *sops]
    return key


def models_without_domain(folder: Path) -> Path:
    """Copies of the bundled models in ``folder`` whose manifests declare no validated ``domain``.

    For tests of the node's path (writers, jobs, series selection) on small synthetic series, which lie
    outside what the reference models were validated on (a 32 x 32 CT is no chest CT): as an AI
    engineer's model without a ``domain`` is, they are analysed. Listed after the bundled folder
    (``models_dirs``), they replace the bundled models of the same name. The ONNX files are linked.
    """
    import yaml

    from pipelines.runtime import bundled_models_dir

    for manifest_path in sorted(bundled_models_dir().glob("*/model.yaml")):
        target = folder / manifest_path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        manifest = yaml.safe_load(manifest_path.read_text())
        manifest.pop("domain", None)
        (target / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        for other in manifest_path.parent.iterdir():
            if other.name != "model.yaml" and not (target / other.name).exists():
                (target / other.name).symlink_to(other.resolve())
    return folder


def onnx_study_runner(*, domain: bool = True, **options: object) -> StudyRunner:
    """The node's own study runner on the bundled models (select -> load -> run -> write), for tests.

    ``domain`` False: the models without their validated domain (:func:`models_without_domain`).
    Imported here only, so that a move of the runner changes one line of the tests.
    """
    import tempfile

    from pipelines.dicom import Equipment
    from pipelines.runtime import ModelRegistry, bundled_models_dir
    from pipelines.study import OnnxStudyRunner

    equipment = Equipment(
        manufacturer="dicom-ai-node",
        model_name="test",
        software_versions="0",
        device_uid=generate_uid(entropy_srcs=["tests device"]),
    )
    dirs = [bundled_models_dir()]
    if not domain:
        dirs.append(models_without_domain(Path(tempfile.mkdtemp(prefix="models-without-domain-"))))
    return OnnxStudyRunner(ModelRegistry(dirs), equipment, **options)  # type: ignore[arg-type]


class ThumbnailRunner:
    """Makes one Secondary Capture: the middle image of the largest series, 8-bit, in the source study.

    ``AINODE_TEST_RUNNER_DELAY_S`` makes it sleep first, so a test can kill the node mid-job.
    ``AINODE_TEST_RUNNER_FAIL`` (a pipeline name) makes that pipeline raise.
    """

    def run(self, pipeline: str, series_files: Mapping[str, Sequence[Path]], outputs: set[str]) -> RunOutcome:
        if pipeline == os.environ.get("AINODE_TEST_RUNNER_FAIL"):
            raise RuntimeError(f"pipeline {pipeline} crashed on purpose")
        delay = float(os.environ.get("AINODE_TEST_RUNNER_DELAY_S", "0"))
        if delay:
            time.sleep(delay)
        key = result_uid_key(pipeline, series_files)
        series_uid = max(series_files, key=lambda uid: len(series_files[uid]))
        files = sorted(series_files[series_uid])
        source = dcmread(files[len(files) // 2])
        if "PixelData" not in source:
            return RunOutcome(not_analysed="missing-pixel-data: the chosen image has no pixels")
        t0 = time.monotonic()
        pixels = source.pixel_array.astype(np.float32)
        if pixels.ndim == 3 and source.get("SamplesPerPixel", 1) == 1:
            pixels = pixels[0]
        lo, hi = float(pixels.min()), float(pixels.max())
        img = ((pixels - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)
        if img.ndim == 3:
            img = img[..., 0]
        model_s = time.monotonic() - t0
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=img,
            photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=("L", "P"),
            pixel_spacing=tuple(float(v) for v in source.get("PixelSpacing", [1, 1])),
            series_instance_uid=generate_uid(entropy_srcs=[*key, "series"]),
            sop_instance_uid=generate_uid(entropy_srcs=[*key, "instance", "1"]),
            series_number=990,
            instance_number=1,
            manufacturer="dicom-ai-node",
            series_description=f"test pipeline {pipeline}",
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        return RunOutcome(datasets=[sc], model_s=model_s)
