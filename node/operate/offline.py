"""``ainode run``: route, run and write results without a network, as the node would send them.

For AI engineers checking a model on a study, and for operators reproducing a result. The analysis
is the node's own (:class:`pipelines.study.OnnxStudyRunner`, built as ``serve`` builds it); this module
only reads the files, routes each study as the router would, and writes what comes back to a folder.

Exit codes (for scripts): 0 results written and nothing failed; 1 a file could not be read or a
pipeline failed; 3 nothing failed but no result was written (every series unrouted, or every study
not analysed: each reason is printed).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread

from node.assemble.router import Router
from node.config import Config
from node.identity import MANUFACTURER, device_uid
from node.models import study_runner_from_config
from node.receive.spool import valid_uid
from pipelines.study import ResultKind, StudyRunner

EXIT_FAILED = 1
EXIT_NO_RESULT = 3


def _studies(files: list[Path]) -> tuple[dict[str, dict[str, list[Path]]], int]:
    """The files by study and series UID, and how many could not be read (each named on stderr)."""
    studies: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    unreadable = 0
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except Exception as exc:
            print(f"{f}: not a readable DICOM file ({type(exc).__name__})", file=sys.stderr)
            unreadable += 1
            continue
        # The study UID names the output folder: the spool's UID rule keeps "../../x" from leaving --out.
        if not (valid_uid(study_uid) and valid_uid(series_uid)):
            print(f"{f}: Study or Series Instance UID is not a valid DICOM UID; file skipped", file=sys.stderr)
            unreadable += 1
            continue
        studies[study_uid][series_uid].append(f)
    return studies, unreadable


def _plan(router: Router, study_uid: str, series: dict[str, list[Path]], pipeline: str | None) -> dict[str, str]:
    """The pipelines to run on one study, each with why: ``--pipeline``, or the route of its series."""
    if pipeline:
        return {pipeline: "--pipeline"}
    plan: dict[str, str] = {}
    for paths in series.values():
        decision = router.route(dcmread(paths[0], stop_before_pixels=True))
        if decision.route is not None:
            plan.setdefault(decision.route.pipeline, f"route {decision.route.name}")
        else:
            print(f"study {study_uid}: series not routed: {decision.reason}")
    return plan


def run_offline(
    config: Config,
    files: list[Path],
    out_dir: Path,
    pipeline: str | None,
    outputs: Iterable[ResultKind | str] | None = None,
) -> int:
    studies, failures = _studies(files)
    router = Router(config.routes, own_device_uid=device_uid(config), own_manufacturer=MANUFACTURER)
    runner: StudyRunner = study_runner_from_config(config)
    wanted = set(outputs or ResultKind)  # the values (--outputs seg,sr) become ResultKind in the runner
    written = 0
    for study_uid, series in studies.items():
        for name, why in _plan(router, study_uid, series, pipeline).items():
            try:
                outcome = runner.run(name, {uid: sorted(p) for uid, p in series.items()}, wanted)
            except Exception as exc:
                print(f"study {study_uid}: pipeline {name} ({why}) FAILED: {type(exc).__name__}: {exc}")
                failures += 1
                continue
            if outcome.not_analysed:
                print(f"study {study_uid}: pipeline {name} ({why}): not analysed: {outcome.not_analysed}")
                continue
            target = out_dir / study_uid
            target.mkdir(parents=True, exist_ok=True)
            for ds in outcome.datasets:
                path = target / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
                ds.save_as(path, enforce_file_format=True)
                written += 1
                print(f"study {study_uid}: pipeline {name} ({why}): wrote {path} ({ds.get('SeriesDescription', '')})")
            for kind, reason in outcome.failed_outputs.items():
                print(f"study {study_uid}: pipeline {name} ({why}): {kind} not built: {reason}")
                failures += 1
    if failures:
        return EXIT_FAILED
    if not written:
        print("no result written: nothing was routed or analysed (reasons above)", file=sys.stderr)
        return EXIT_NO_RESULT
    return 0
