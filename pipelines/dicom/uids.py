"""UIDs of result objects, fixed when the result is made (ARCHITECTURE.md invariant 3).

They are derived from what the result is *of* (model name and version, the source series and
its exact instances) and what it *is* (SEG, SR, SC slice n), so making the same result again —
a job re-run after a crash between writing files and committing rows, or an operator's retry —
gives the same UIDs, and a PACS that already holds the object keeps one copy. A different source
set (late instances) or another model version gives new UIDs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.uid import generate_uid

from pipelines.enums import ResultKind
from pipelines.results import ModelIdentity
from pipelines.volume import Volume


@dataclass(frozen=True)
class ResultUids:
    """Derives every UID of one pipeline run's result objects from one key."""

    key: str

    @classmethod
    def for_result(cls, model: ModelIdentity, volume: Volume) -> ResultUids:
        instances = sorted({str(f.sop_instance_uid) for f in volume.source_frames})
        digest = hashlib.sha256("\n".join(instances).encode()).hexdigest()
        return cls(f"{model.name}|{model.version}|{volume.series_instance_uid}|{digest}")

    def uid(self, *what: object) -> str:
        return generate_uid(entropy_srcs=["dicom-ai-node result", self.key, *map(str, what)])

    # A kind enters the UID by its value ("seg"): the UIDs of results made before ResultKind existed stay.
    def series(self, kind: ResultKind) -> str:
        return self.uid(ResultKind(kind).value, "series")

    def instance(self, kind: ResultKind, number: int = 1) -> str:
        return self.uid(ResultKind(kind).value, "instance", number)

    def tracking(self, segment_number: int, purpose: str = "volume") -> str:
        return self.uid("tracking", purpose, segment_number)
