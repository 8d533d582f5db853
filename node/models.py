"""The models a configuration can use: the registry built from it, and the routes it cannot serve.

One place builds the :class:`~pipelines.runtime.ModelRegistry` from the configuration (the
bundled models, then ``node.models_dirs``; the runtime's providers and thread counts), so that
the node, ``ainode models list`` and ``ainode studies reprocess`` see the same models, run the
same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import Config

if TYPE_CHECKING:  # onnxruntime takes half a second to import: only the commands that need it pay
    from pipelines.headercache import HeaderCache
    from pipelines.runtime import ModelRegistry
    from pipelines.slicecache import SliceCache
    from pipelines.study import StudyRunner


def registry_from_config(config: Config) -> ModelRegistry:
    """The models ``config`` makes available: bundled ones, overridden by those in ``node.models_dirs``.

    No model file is opened here: sessions are made when a model is first used (or preloaded).
    """
    from pipelines.runtime import ModelRegistry, bundled_models_dir

    rt = config.runtime
    return ModelRegistry(
        [bundled_models_dir(), *map(Path, config.node.models_dirs)],
        providers=None if rt.providers == "auto" else list(rt.providers),
        intra_op_threads=rt.intra_op_threads,
        inter_op_threads=rt.inter_op_threads,
        inference_lanes=rt.inference_lanes,
    )


def study_runner_from_config(
    config: Config, slice_cache: Callable[[str], SliceCache] | None = None, *, headers: HeaderCache | None = None
) -> StudyRunner:
    """The study analysis the node's workers and ``ainode run`` use: the configured models, written
    as this node (its identity in the result objects' equipment) with the configured result options.

    ``slice_cache``: the slice cache of a study by its UID (the node's, when ``runtime.stream_inference``);
    ``ainode run`` has none. ``headers``: the headers the analysis ahead parsed (the node's, when streaming)."""
    from node import __version__
    from node.identity import MANUFACTURER, device_uid
    from pipelines.dicom import Equipment
    from pipelines.study import OnnxStudyRunner

    equipment = Equipment(
        manufacturer=MANUFACTURER,
        model_name=MANUFACTURER,
        software_versions=__version__,
        device_uid=device_uid(config),
        institution_name=config.node.institution_name,
        station_name=config.node.station_name or config.node.ae_title,
    )
    return OnnxStudyRunner(
        registry_from_config(config),
        equipment,
        omit_empty_frames=config.results.omit_empty_seg_frames,
        batch_size=config.runtime.batch_size,
        max_volume_bytes=config.runtime.max_volume_mb * 2**20,
        slice_cache=slice_cache,
        headers=headers,
    )


def model_names(config: Config) -> list[str]:
    """Names of the models routes can use: the bundled ones and those in ``node.models_dirs``.

    Reads manifests only; no model file is opened and no ONNX session is created.
    """
    return [m.name for m in registry_from_config(config).list()]


def unknown_pipelines(config: Config, models: Collection[str]) -> list[str]:
    """One line per route whose pipeline is none of ``models``, naming the route and the known models.

    Kept apart from :class:`Config`'s own validation: which models exist is a fact of the disk,
    not of the YAML, so ``config check`` and ``serve`` ask it after the file is valid.
    """
    known = ", ".join(sorted(models)) or "none"
    lines = []
    for i, route in enumerate(config.routes):
        if route.pipeline in models:
            continue
        close = difflib.get_close_matches(route.pipeline, list(models), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        lines.append(
            f"config error in {config.source.path}: routes.{i} ({route.name}): pipeline {route.pipeline!r} "
            f"is not a model found (models: {known}){hint}"
        )
    return lines
