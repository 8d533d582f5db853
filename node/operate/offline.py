"""``ainode run``: route, run and write results without a network, as the node would send them.

For AI engineers checking a model on a study, and for operators reproducing a result.

Exit codes (for scripts): 0 results written and nothing failed; 1 a file could not be read or a
pipeline failed; 3 nothing failed but no result was written (every series unrouted, or every study
not analysed: each reason is printed).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from pydicom import dcmread

from node.app import NodeApp
from node.assemble.router import Router
from node.config import Config
from node.identity import MANUFACTURER, device_uid

EXIT_FAILED = 1
EXIT_NO_RESULT = 3


def run_offline(
    config: Config, files: list[Path], out_dir: Path, pipeline: str | None, outputs: set[str] | None = None
) -> int:
    studies: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    unreadable = 0
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
            studies[str(ds.StudyInstanceUID)][str(ds.SeriesInstanceUID)].append(f)
        except Exception as exc:
            print(f"{f}: not a readable DICOM file ({type(exc).__name__})", file=sys.stderr)
            unreadable += 1
    router = Router(config.routes, own_device_uid=device_uid(config), own_manufacturer=MANUFACTURER)
    runner = NodeApp.make_runner_for(config)
    failures = unreadable
    written = 0
    for study_uid, series in studies.items():
        if pipeline:
            plan = {pipeline: "--pipeline"}
        else:
            plan = {}
            for paths in series.values():
                decision = router.route(dcmread(paths[0], stop_before_pixels=True))
                if decision.route is not None:
                    plan.setdefault(decision.route.pipeline, f"route {decision.route.name}")
                else:
                    print(f"study {study_uid}: series not routed: {decision.reason}")
        for name, why in plan.items():
            wanted = outputs or {"seg", "sr", "sc"}
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
    if failures:
        return EXIT_FAILED
    if not written:
        print("no result written: nothing was routed or analysed (reasons above)", file=sys.stderr)
        return EXIT_NO_RESULT
    return 0
