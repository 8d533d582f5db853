"""Result writers: plain pipeline results -> DICOM objects a PACS stores and a viewer shows.

- :mod:`~pipelines.dicom.seg`: binary DICOM-SEG, one segment per label.
- :mod:`~pipelines.dicom.sr`: TID 1500 Measurement Report in a Comprehensive 3D SR.
- :mod:`~pipelines.dicom.sc`: Secondary Capture images with the result burned in, for plain viewers.
- :mod:`~pipelines.dicom.air`: IHE AIR attributes (Contributing Equipment, device identity), in one place.

Every object stays in the source study, in a new series, with UIDs fixed here (:mod:`~pipelines.dicom.uids`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydicom.dataset import Dataset

from pipelines.dicom.air import Equipment, result_series_number, source_series_label
from pipelines.dicom.sc import make_secondary_captures
from pipelines.dicom.seg import make_segmentation
from pipelines.dicom.source import ordered_sources
from pipelines.dicom.sr import make_report
from pipelines.dicom.uids import ResultUids
from pipelines.enums import SR_CLASSES, ResultKind, result_kind
from pipelines.results import PipelineResult, SegmentationResult


def write_results(
    result: PipelineResult,
    datasets: Sequence[Dataset],
    equipment: Equipment,
    outputs: Iterable[ResultKind | str],
    *,
    omit_empty_frames: bool = False,
) -> list[Dataset]:
    """The DICOM objects of one result, in the order they should be sent (SEG before the SR that cites it).

    Parameters
    ----------
    result
        What a pipeline returned.
    datasets
        The source series the pipeline analysed (with pixel data when SC is wanted), in any order.
    outputs
        Which kinds to make (their values, "seg", are taken too). A segmentation's SR refers to its SEG, so
        asking for ``sr`` makes the SEG too.
    omit_empty_frames
        Leave SEG frames without any segment pixel out (off by default: OHIF misplaces segments then).
    """
    wanted = {ResultKind(o) for o in outputs}
    # Each result series names its source series and has a number of its own (several analysed series of one
    # study must not collide in the viewer's list).
    label = source_series_label(datasets[0]) if datasets else ""

    def number(kind: ResultKind) -> int:
        return result_series_number(datasets[0], kind.value) if datasets else 900 + {"seg": 1, "sr": 2, "sc": 3}[kind]

    uids = ResultUids.for_result(result.model, result.volume)
    sources = ordered_sources(result.volume, datasets)
    out: list[Dataset] = []
    seg = None
    if isinstance(result, SegmentationResult) and wanted & {ResultKind.SEG, ResultKind.SR}:
        seg = make_segmentation(
            result,
            sources,
            equipment,
            series_instance_uid=uids.series(ResultKind.SEG),
            sop_instance_uid=uids.instance(ResultKind.SEG),
            series_number=number(ResultKind.SEG),
            source_label=label,
            tracking_uids={s.number: uids.tracking(s.number) for s in result.segments},
            omit_empty_frames=omit_empty_frames,
        )
        out.append(seg)
    if ResultKind.SR in wanted:
        out.append(
            make_report(
                result, sources, equipment, uids, seg=seg, series_number=number(ResultKind.SR), source_label=label
            )
        )
    if ResultKind.SC in wanted:
        out += make_secondary_captures(
            result, datasets, equipment, uids, series_number=number(ResultKind.SC), source_label=label
        )
    return out


__all__ = ["Equipment", "SR_CLASSES", "ResultUids", "result_kind", "write_results"]
