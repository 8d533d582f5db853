"""The study runner (select -> load -> run -> write) on the bundled lung model, with synthetic series.

Unsuitable input becomes "not analysed" with its reason; a localizer that shares the axial series
is left out of the volume. The runner comes from tests/support/runners.py.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.runners import onnx_study_runner
from tests.support.series import ct_series, localizer_slice, save


def test_study_runner_reports_unsuitable_input_as_not_analysed(tmp_path: Path) -> None:
    runner = onnx_study_runner()
    gap = ct_series(20)
    del gap[10]  # selection reads headers only; the gap shows when the volume is loaded
    files = [save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(gap)]

    outcome = runner.run("lung-seg", {str(gap[0].SeriesInstanceUID): files}, {"seg"})

    assert outcome.datasets == []
    assert outcome.not_analysed is not None and outcome.not_analysed.startswith("uneven-spacing: ")

    short = [save(ds, tmp_path / f"short-{k}.dcm") for k, ds in enumerate(ct_series(4))]
    outcome = runner.run("lung-seg", {"1.2.3.4": short}, {"seg"})

    assert outcome.not_analysed is not None and outcome.not_analysed.startswith("no-suitable-series: ")
    assert "4 slices, at least 16 needed" in outcome.not_analysed


def test_study_runner_leaves_a_localizer_that_shares_the_series_out_of_the_volume(tmp_path: Path) -> None:
    runner = onnx_study_runner(domain=False)  # a 32 x 32 synthetic CT is outside lung-seg's validated domain
    slices = ct_series(20)
    localizer = localizer_slice(slices[0].SeriesInstanceUID)
    files = [save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate([localizer, *slices])]

    outcome = runner.run("lung-seg", {str(slices[0].SeriesInstanceUID): files}, {"seg"})

    # Analysed (a tiny synthetic series, so the model may find no lung; what matters is that it ran).
    assert outcome.not_analysed is None and outcome.model_s is not None
    (seg,) = outcome.datasets
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in slices}
