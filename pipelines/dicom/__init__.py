"""Result writers: plain pipeline results -> DICOM objects a PACS stores and a viewer shows.

- :mod:`~pipelines.dicom.seg`: binary DICOM-SEG, one segment per label.
- :mod:`~pipelines.dicom.sr`: TID 1500 Measurement Report in a Comprehensive 3D SR.
- :mod:`~pipelines.dicom.sc`: Secondary Capture images with the result burned in, for plain viewers.
- :mod:`~pipelines.dicom.air`: IHE AIR attributes (Contributing Equipment, device identity), in one place.

Every object stays in the source study, in a new series, with UIDs fixed here (:mod:`~pipelines.dicom.uids`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from pipelines.dicom.air import Equipment, result_series_number, source_series_label
from pipelines.dicom.sc import make_secondary_captures
from pipelines.dicom.seg import make_segmentation
from pipelines.dicom.source import ordered_sources
from pipelines.dicom.sr import make_report
from pipelines.dicom.uids import ResultUids
from pipelines.enums import SR_CLASSES, ResultKind, result_kind
from pipelines.results import PipelineResult, SegmentationResult


@dataclass
class WrittenResults:
    """The objects of one result that could be built, and why each other kind could not."""

    #: Complete objects in the order they should be sent (SEG before the SR that cites it).
    datasets: list[Dataset] = field(default_factory=list)
    #: Each output kind that could not be built, with the exception that stopped it.
    failed: dict[ResultKind, Exception] = field(default_factory=dict)


def write_each(
    result: PipelineResult,
    datasets: Sequence[Dataset],
    equipment: Equipment,
    outputs: Iterable[ResultKind | str],
    *,
    omit_empty_frames: bool = False,
) -> WrittenResults:
    """Build each wanted kind of result object on its own: one kind's failure does not lose the others.

    A radiograph whose Secondary Capture cannot be built still gets its SR. Only a segmentation's SR
    depends on another object (it cites the SEG): when the SEG fails, so does that SR, saying why.

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
    written = WrittenResults()
    seg = None
    segmentation = isinstance(result, SegmentationResult)
    if isinstance(result, SegmentationResult) and wanted & {ResultKind.SEG, ResultKind.SR}:
        try:
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
            written.datasets.append(seg)
        except Exception as exc:  # recorded with the job; the other kinds are still built
            written.failed[ResultKind.SEG] = exc
    if ResultKind.SR in wanted:
        try:
            if segmentation and seg is None:
                cause = written.failed[ResultKind.SEG]
                first_line = (str(cause).splitlines() or [""])[0]
                raise ValueError(
                    f"the SR cites the SEG, which could not be built ({type(cause).__name__}: {first_line})"
                )
            written.datasets.append(
                make_report(
                    result, sources, equipment, uids, seg=seg, series_number=number(ResultKind.SR), source_label=label
                )
            )
        except Exception as exc:
            written.failed[ResultKind.SR] = exc
    if ResultKind.SC in wanted:
        try:
            written.datasets += make_secondary_captures(
                result, datasets, equipment, uids, series_number=number(ResultKind.SC), source_label=label
            )
        except Exception as exc:
            written.failed[ResultKind.SC] = exc
    if ResultKind.SEG in written.failed and ResultKind.SEG not in wanted and ResultKind.SR in written.failed:
        # The SEG was made only for the SR to cite: its failure is the SR's, reported once.
        del written.failed[ResultKind.SEG]
    return written


def write_results(
    result: PipelineResult,
    datasets: Sequence[Dataset],
    equipment: Equipment,
    outputs: Iterable[ResultKind | str],
    *,
    omit_empty_frames: bool = False,
) -> list[Dataset]:
    """Like :func:`write_each`, but all or nothing: the first kind that cannot be built raises its exception."""
    written = write_each(result, datasets, equipment, outputs, omit_empty_frames=omit_empty_frames)
    for exc in written.failed.values():
        raise exc
    return written.datasets


__all__ = ["Equipment", "SR_CLASSES", "ResultUids", "WrittenResults", "result_kind", "write_each", "write_results"]
