"""Slices analysed while the study arrives give the results the whole study gives (issue 15, goal 2).

The real lung-seg model on the real CT (TCIA Lung-PET-CT-Dx A0002: two series of 30 slices, the
pipeline takes the softer B40f). A study analysed with slice rows taken from the slice cache must give
the SEG and SR it gives without: same pixels and frame order, same measured values, same UIDs. And the
cache must never hand out rows that do not belong: slices arriving out of order, a duplicate with other
pixels, a series the pipeline does not choose, a new version of the study, a study never completed.
"""

from __future__ import annotations

import copy
import io
import random
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from sqlalchemy import update

from db.models import Instance, StudyState
from node.config import Config
from node.models import study_runner_from_config
from node.receive.ingest import ReceivedInstance
from node.receive.spool import INFERENCE_DIR, Spool
from node.work.prefetch import LEASE_S, MAX_AGE, Prefetcher
from node.work.slicestore import SliceStore
from pipelines.headercache import HeaderCache
from pipelines.segmentation import infer_labelmap
from pipelines.slicecache import CountingCache
from pipelines.streaming import prefetch_slices, streams
from pipelines.study import OnnxStudyRunner, RunOutcome
from pipelines.volume import load_volume
from tests.support.node_parts import PACS, Clock, build_node, make_config
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import StoreSCP, storescu
from tests.support.runners import onnx_study_runner
from tests.support.waiting import wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHOSEN, OTHER = "series-3-B40f", "series-2-B70f"
OUTPUTS = {"seg", "sr"}


class DictCache:
    """A slice cache in memory, for the pipeline-level tests."""

    def __init__(self) -> None:
        self.rows: dict[str, np.ndarray] = {}

    def get(self, key: str) -> np.ndarray | None:
        return self.rows.get(key)

    def put(self, key: str, rows: np.ndarray) -> None:
        self.rows[key] = rows.copy()

    def __contains__(self, key: object) -> bool:
        return key in self.rows


@pytest.fixture(scope="module")
def batch_runner() -> OnnxStudyRunner:
    runner = onnx_study_runner()
    assert isinstance(runner, OnnxStudyRunner)
    return runner


@pytest.fixture(scope="module")
def model(batch_runner: OnnxStudyRunner):
    return batch_runner.registry.get("lung-seg")


@pytest.fixture(scope="module")
def study_files(ct_dir: Path) -> dict[str, list[Path]]:
    return {
        str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID): files
        for files in (sorted((ct_dir / name).glob("*.dcm")) for name in (OTHER, CHOSEN))
    }


@pytest.fixture(scope="module")
def batch_outcome(batch_runner: OnnxStudyRunner, study_files: dict[str, list[Path]]) -> RunOutcome:
    """The study analysed as a whole, without any slice cache: the reference."""
    outcome = batch_runner.run("lung-seg", study_files, OUTPUTS)
    assert outcome.slices_reused is None and len(outcome.datasets) == 2
    return outcome


def with_cache(batch_runner: OnnxStudyRunner, cache) -> OnnxStudyRunner:
    return OnnxStudyRunner(batch_runner.registry, batch_runner.equipment, slice_cache=lambda _study_uid: cache)


def _as_stored(ds: Dataset) -> Dataset:
    """``ds`` written to a file and read back, as a PACS keeps it (writing settles ambiguous VRs such as OB/OW)."""
    buffer = io.BytesIO()
    copy.deepcopy(ds).save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _without_times(ds: Dataset) -> dict:
    """Every attribute at every level (DICOM JSON, pixel data inline) but dates and times (when it was made)."""

    def strip(d: dict) -> dict:
        out = {}
        for tag, element in d.items():
            if element["vr"] in ("DA", "TM", "DT"):
                continue
            if element["vr"] == "SQ":
                element = {**element, "Value": [strip(item) for item in element.get("Value", [])]}
            out[tag] = element
        return out

    return strip(ds.to_json_dict(bulk_data_threshold=2**62))


def _measurements(ds: Dataset) -> Iterator[tuple[str, str]]:
    for item in ds.get("ContentSequence", []):
        for value in item.get("MeasuredValueSequence", []):
            yield str(item.ConceptNameCodeSequence[0].CodeMeaning), str(value.NumericValue)
        yield from _measurements(item)


def assert_same_results(streamed: RunOutcome, batch: RunOutcome) -> None:
    """Same objects: SEG pixels and frames, SR values, every UID; only the creation times may differ."""
    assert [str(ds.Modality) for ds in streamed.datasets] == [str(ds.Modality) for ds in batch.datasets]
    for ours, theirs in zip(streamed.datasets, batch.datasets, strict=True):
        uids = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
        assert [ours.get(k) for k in uids] == [theirs.get(k) for k in uids]
        if ours.Modality == "SEG":
            assert np.array_equal(ours.pixel_array, theirs.pixel_array)
            frames = [
                (f.SegmentIdentificationSequence[0].ReferencedSegmentNumber,
                 f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                for f in ours.PerFrameFunctionalGroupsSequence
            ]  # fmt: skip
            assert frames == [
                (f.SegmentIdentificationSequence[0].ReferencedSegmentNumber,
                 f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                for f in theirs.PerFrameFunctionalGroupsSequence
            ]  # fmt: skip
        else:
            values = list(_measurements(ours))
            assert values and values == list(_measurements(theirs))
        assert _without_times(_as_stored(ours)) == _without_times(_as_stored(theirs))


def _datasets(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in paths]


# -- the pipeline: the same results with rows computed ahead ------------------------------------------------
def test_study_analysed_from_slices_computed_as_they_arrived_gives_the_batch_results(
    batch_runner, model, study_files, batch_outcome, tmp_path
):
    # Empty cache: every slice computed by the job, stored, and the results unchanged.
    empty = DictCache()
    first = with_cache(batch_runner, empty).run("lung-seg", study_files, OUTPUTS)
    assert first.slices_reused == (0, 30)
    assert len(empty.rows) == 30
    assert_same_results(first, batch_outcome)

    # Filled as a sender delivers: one instance at a time, in a shuffled order, both series, by the
    # prefetch code path, into the spool's file store (compressed rows, the node's format).
    cache = SliceStore(Spool(tmp_path / "spool")).study("1.2.3")
    arrival = [f for files in study_files.values() for f in files]
    random.Random(15).shuffle(arrival)
    computed = sum(prefetch_slices(model, [path], cache) for path in arrival)
    assert computed == 60
    streamed = with_cache(batch_runner, cache).run("lung-seg", study_files, OUTPUTS)
    assert streamed.slices_reused == (30, 30)  # every slice of the chosen series taken from the cache
    assert_same_results(streamed, batch_outcome)
    # The B70f series was analysed too (it is routed), but its rows fit no slice of the chosen series.
    assert len(list((tmp_path / "spool" / INFERENCE_DIR / "1.2.3").glob("*.rows"))) == 60


def _chosen(study_files: dict[str, list[Path]]) -> list[Path]:
    return next(files for files in study_files.values() if files[0].parent.name == CHOSEN)


def _with_other_pixels(ds: Dataset, delta: int | None) -> Dataset:
    """``ds`` with ``delta`` added to its stored values (kept within Bits Stored); None: all air (its minimum)."""
    bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    stored = ds.pixel_array
    changed = np.full_like(stored, stored.min()) if delta is None else (stored.astype(np.int32) + delta).clip(low, high)
    ds.PixelData = changed.astype(stored.dtype).tobytes()
    return ds


def _volume(files: list[Path], change: dict[int, int | None] | None = None):
    """The chosen series' volume; ``change`` adds a constant to the pixels of some files (by index)."""
    datasets = [pydicom.dcmread(p) for p in files]
    for index, delta in (change or {}).items():
        _with_other_pixels(datasets[index], delta)
    return load_volume(datasets)


def test_slices_out_of_order_and_a_new_version_reuse_only_the_rows_of_their_own_pixels(model, study_files):
    files = _chosen(study_files)
    volume = _volume(files)
    reference = infer_labelmap(model, volume)

    # Version 1: 20 of the 30 slices arrived (every third one missing, out of order); then the late ones.
    cache = DictCache()
    early = [p for i, p in enumerate(files) if i % 3]
    random.Random(3).shuffle(early)
    assert prefetch_slices(model, early, cache) == 20
    counting = CountingCache(cache)
    assert np.array_equal(infer_labelmap(model, volume, cache=counting), reference)
    assert (counting.reused, counting.computed) == (20, 10)
    # The job stored what it computed: a new version of the same slices takes all of them.
    again = CountingCache(cache)
    assert np.array_equal(infer_labelmap(model, volume, cache=again), reference)
    assert (again.reused, again.computed) == (30, 0)

    # Another batch size in the job does not matter either.
    other_batch = CountingCache(DictCache())
    assert np.array_equal(infer_labelmap(model, volume, batch_size=7, cache=other_batch), reference)


def test_a_duplicate_with_other_pixels_never_takes_the_rows_of_the_first(model, study_files):
    files = _chosen(study_files)
    cache = DictCache()
    assert prefetch_slices(model, files, cache) == 30
    # Slices 10 and 20 sent again under their UIDs with other pixels (duplicates: replace).
    changed = _volume(files, {10: 300, 15: None})
    counting = CountingCache(cache)
    labels = infer_labelmap(model, changed, cache=counting)
    assert (counting.reused, counting.computed) == (28, 2)
    assert np.array_equal(labels, infer_labelmap(model, changed))
    # Decisive: the stale rows would have given other labels.
    assert not np.array_equal(labels, infer_labelmap(model, _volume(files)))


# -- the node: prefetch loop, job, clean-up ---------------------------------------------------------------
def _lung_node(tmp_path: Path, clock: Clock, **node: object):
    config = make_config(
        tmp_path,
        node={"duplicates": "replace", **node},
        peers={"pacs": {**PACS, "outputs": ["seg", "sr"]}},
        routes=[{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "lung-seg", "destinations": ["pacs"],
                 "stable_after_s": 5}],
    )  # fmt: skip
    return build_node(tmp_path, clock, config)


def _store_replaced(node, ds: Dataset, now) -> None:
    """``ds`` stored again under its UIDs with other content (the C-STORE handler with ``duplicates: replace``)."""
    inst = ReceivedInstance.from_header(ds)
    relpath = Spool.instance_relpath(inst.study_instance_uid, inst.series_instance_uid, inst.sop_instance_uid)
    size = node.spool.write_dataset(relpath, ds)
    node.index.record(inst, relpath=relpath, size_bytes=size, calling_ae="CT1", calling_host="127.0.0.1",
                      association_id=None, now=now, replaced=True)  # fmt: skip


def _spooled(node) -> dict[str, list[Path]]:
    """What the node's spool holds of the study, by series: the files a job is given."""
    spooled: dict[str, list[Path]] = {}
    for instance in node.instances():
        spooled.setdefault(instance.path.split("/")[1], []).append(node.spool.abspath(instance.path))
    return spooled


def test_node_analyses_slices_ahead_uses_them_for_the_job_and_removes_them_when_processed(
    tmp_path, batch_runner, batch_outcome, study_files
):
    clock = Clock()
    node = _lung_node(tmp_path, clock)
    store = SliceStore(node.spool)
    headers = HeaderCache()
    idle = [True]
    prefetcher = Prefetcher(sessions=node.sessions, spool=node.spool, store=store, model=batch_runner.registry.get,
                            routes={"ct": "lung-seg"}, idle=lambda: idle[0], headers=headers)  # fmt: skip
    datasets = [pydicom.dcmread(p) for files in study_files.values() for p in files]
    random.Random(7).shuffle(datasets)
    # A slice of the chosen series with lung in it is among the first to arrive (it is replaced later).
    target = str(pydicom.dcmread(_chosen(study_files)[15], stop_before_pixels=True).SOPInstanceUID)
    datasets.sort(key=lambda ds: ds.SOPInstanceUID != target)
    study_uid = str(datasets[0].StudyInstanceUID)

    # The first half arrives; the assembler routes the series (the study stays receiving).
    node.receive(datasets[:30])
    assert node.assembler.tick(now=clock.advance(1)) == []
    idle[0] = False  # a worker runs a job: nothing is analysed ahead
    assert prefetcher.step(clock.now) is False and not store.studies()
    idle[0] = True
    while prefetcher.step(clock.now):
        pass
    assert prefetcher.slices_analysed == 30
    # One slice is sent again with other pixels: it is read again, its stale rows stay unused.
    _store_replaced(node, _with_other_pixels(copy.deepcopy(datasets[0]), None), clock.advance(1))
    # The rest arrives.
    node.receive(datasets[30:])
    node.assembler.tick(now=clock.advance(1))
    while prefetcher.step(clock.now):
        pass
    assert prefetcher.slices_analysed == 61  # 60 slices, and the replaced one again
    assert store.studies() == [study_uid]

    # Complete: the job takes every slice of the chosen series from the cache.
    assert node.assembler.tick(now=clock.advance(10))
    runner = OnnxStudyRunner(batch_runner.registry, batch_runner.equipment, slice_cache=store.study, headers=headers)
    parsed_ahead = headers.misses  # 61: each instance, and the replaced one again
    outcomes: list[RunOutcome] = []

    class Recording:
        def run(self, pipeline, series_files, outputs):
            outcomes.append(runner.run(pipeline, series_files, outputs))
            return outcomes[-1]

    assert node.worker(runner=Recording()).run_once()
    (outcome,) = outcomes
    assert outcome.slices_reused == (30, 30)
    # The job parsed no file the analysis ahead had parsed: every instance came from the header cache (the
    # replaced one as stored now: its old header is another file's, by inode and time).
    assert (headers.misses, headers.hits) == (parsed_ahead, 60)
    # The replaced slice changes the result: the reference is the batch path on what the spool holds now.
    reference = batch_runner.run("lung-seg", _spooled(node), OUTPUTS)
    assert_same_results(outcome, reference)
    assert not np.array_equal(reference.datasets[0].pixel_array, batch_outcome.datasets[0].pixel_array)

    # Processed: the study's cache (the unused B70f rows and the stale ones with it) goes at the next pass.
    assert node.study(study_uid).state == StudyState.PROCESSED
    prefetcher.step(clock.advance(1))
    assert store.studies() == []
    assert not (node.spool.root / INFERENCE_DIR / study_uid).exists()
    assert len(headers) == 0


def test_the_cache_of_a_study_never_completed_is_removed_after_a_day(tmp_path, batch_runner, study_files):
    clock = Clock()
    node = _lung_node(tmp_path, clock)
    store = SliceStore(node.spool)
    prefetcher = Prefetcher(sessions=node.sessions, spool=node.spool, store=store, model=batch_runner.registry.get,
                            routes={"ct": "lung-seg"}, idle=lambda: True, max_slices_per_pass=4)  # fmt: skip
    files = next(iter(study_files.values()))[:4]
    node.receive([pydicom.dcmread(p) for p in files])
    node.assembler.tick(now=clock.advance(1))
    assert prefetcher.step(clock.now)
    (study_uid,) = store.studies()
    assert len(list((store.root / study_uid).iterdir())) == 4
    # Still receiving (the sender stopped half-way): kept while young ...
    assert node.study(study_uid).state == StudyState.RECEIVING
    prefetcher.step(clock.advance(600))
    assert store.studies() == [study_uid]
    # ... removed once older than a day (the clean-up's clock is injected; the files' times are real).
    prefetcher.step(clock.advance(MAX_AGE.total_seconds() + timedelta(minutes=11).total_seconds()))
    assert store.studies() == []


def test_retention_of_a_study_removes_its_slice_cache(tmp_path):
    spool = Spool(tmp_path / "spool")
    cache = SliceStore(spool).study("1.2.3.4")
    cache.put("ab" * 24, np.zeros((4, 4), np.uint8))
    assert "ab" * 24 in cache
    spool.remove_study("1.2.3.4")
    assert "ab" * 24 not in cache and cache.get("ab" * 24) is None


def test_a_torn_cache_file_is_a_miss(tmp_path):
    cache = SliceStore(Spool(tmp_path / "spool")).study("1.2.3.4")
    rows = np.arange(16, dtype=np.uint8).reshape(4, 4)
    cache.put("cd" * 24, rows)
    assert np.array_equal(cache.get("cd" * 24), rows)
    path = tmp_path / "spool" / INFERENCE_DIR / "1.2.3.4" / f"{'cd' * 24}.rows"
    path.write_bytes(path.read_bytes()[:-3])
    assert cache.get("cd" * 24) is None
    # Keys are hex digests: nothing else becomes a path.
    assert cache.get("../../etc") is None
    with pytest.raises(ValueError):
        cache.put("../../etc/passwd", rows)


def test_config_turns_streaming_off(tmp_path):
    config = make_config(tmp_path, runtime={"stream_inference": False})
    assert config.runtime.stream_inference is False
    assert make_config(tmp_path).runtime.stream_inference is True


# -- end to end: a real node, DCMTK storescu as the scanner, DCMTK storescp as the PACS -----------------------
@pytest.mark.dcmtk
def test_node_analyses_the_real_ct_while_it_arrives_and_sends_the_batch_results(tmp_path, ct_dir):
    pacs = StoreSCP(tmp_path / "pacs")
    config = {
        "node": node_section(tmp_path),
        "peers": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port, "outputs": ["seg", "sr"]}},
        "routes": [{"name": "ct-lungs", "match": {"Modality": "CT"}, "pipeline": "lung-seg",
                    "destinations": ["pacs"], "stable_after_s": 6}],
        "delivery": {"initial_delay_s": 0.5, "factor": 2, "max_delay_s": 2},
    }  # fmt: skip
    try:
        with NodeProcess(config, tmp_path / "n", cli=True) as node:
            # A scanner: the study is complete after 6 s quiet, by then its results are made (or being made).
            assert storescu(ct_dir, node.port, calling_ae="CTSCANNER").returncode == 0
            wait_for(lambda: len(pacs.received()) >= 2, timeout_s=240, what="SEG and SR at the PACS", node=node)
            log = node.log_text()
    finally:
        pacs.stop()
    # The job says how many slices it took from the slice cache: how many is up to the machine's pace, the
    # results are not.
    reused = re.search(r"job \d+ study [0-9.]+: (\d+) of (\d+) slices analysed while the study arrived", log)
    assert reused is not None, log[-3000:]
    assert int(reused[2]) == 30 and 0 <= int(reused[1]) <= 30
    # Made ahead while the study was quiet, and taken by its job: 6 s leave the node ample time to analyse
    # 60 slices and make the results of 30 (under 1 s each alone on 2 cores).
    assert re.search(r"study [0-9.]+: results made ahead in [0-9.]+ s", log), log[-3000:]
    assert re.search(r"job \d+ study [0-9.]+: results prepared while the study was quiet", log), log[-3000:]

    received = sorted(_datasets(pacs.received()), key=lambda ds: str(ds.Modality))
    series: dict[str, list[Path]] = {}
    for path in sorted(ct_dir.rglob("*.dcm")):
        series.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID), []).append(path)
    # The batch path of the same node (same equipment, device UID and software version), without a cache.
    batch = study_runner_from_config(Config.model_validate(config)).run("lung-seg", series, OUTPUTS)
    batch.datasets.sort(key=lambda ds: str(ds.Modality))
    assert_same_results(RunOutcome(datasets=received), batch)


def test_only_per_slice_segmentation_on_the_cpu_is_analysed_ahead(batch_runner, model):
    from dataclasses import replace

    assert streams(model)
    assert not streams(batch_runner.registry.get("chest-xray"))  # one image, classified whole
    assert not streams(replace(model, providers_in_use=("CUDAExecutionProvider", "CPUExecutionProvider")))
    resampled = model.manifest.model_copy(
        update={"preprocessing": model.manifest.preprocessing.model_copy(update={"spacing_mm": [0.8, 0.8]})}
    )
    assert not streams(replace(model, manifest=resampled))  # padding with the batch's minimum


def test_of_two_worker_processes_sharing_the_spool_one_analyses_a_study_ahead_until_it_stops(
    tmp_path, batch_runner, study_files
):
    # Scale-out: every worker process sees the same arriving instances; each slice must be analysed once.
    clock = Clock()
    node = _lung_node(tmp_path, clock)
    store = SliceStore(node.spool)

    def prefetcher(owner: str) -> Prefetcher:
        return Prefetcher(sessions=node.sessions, spool=node.spool, store=store, model=batch_runner.registry.get,
                          routes={"ct": "lung-seg"}, idle=lambda: True, owner=owner)  # fmt: skip

    first, second = prefetcher("host-a:101"), prefetcher("host-b:202")
    files = _chosen(study_files)
    node.receive([pydicom.dcmread(p) for p in files[:10]])
    node.assembler.tick(now=clock.advance(1))
    while first.step(clock.now):
        pass
    assert first.slices_analysed == 10
    node.receive([pydicom.dcmread(p) for p in files[10:20]])
    # The other process leaves the study to the one that holds it, which goes on with what arrives.
    assert second.step(clock.now) is False and second.slices_analysed == 0
    while first.step(clock.now):
        pass
    assert first.slices_analysed == 20
    # The holder stops (it died, or its workers are busy): after the lease the other takes the study over and
    # analyses only what is not in the cache yet.
    (study_uid,) = store.studies()
    # A worker of the other process leaves this study's job to the holder for a moment (Worker.defer).
    assert store.study(study_uid).held_by_other("host-b:202", LEASE_S)
    assert not store.study(study_uid).held_by_other("host-a:101", LEASE_S)
    stale = time.time() + LEASE_S + 1
    assert not store.study(study_uid).claim("host-b:202", LEASE_S)
    assert store.study(study_uid).claim("host-b:202", LEASE_S, now=stale)
    node.receive([pydicom.dcmread(p) for p in files[20:30]])
    while second.step(clock.now):
        pass
    assert second.slices_analysed == 10
    assert first.step(clock.now) is False  # and the first one, back, leaves it to its new holder


# -- results made ahead while a study is quiet (the stability wait of a scanner that sends with gaps) ---------
def _copied(study_files: dict[str, list[Path]], folder: Path) -> dict[str, list[Path]]:
    """The study's files copied where a test may replace them (as the spool does: a new file renamed over)."""
    copies: dict[str, list[Path]] = {}
    for series_uid, files in study_files.items():
        (folder / files[0].parent.name).mkdir(parents=True)
        copies[series_uid] = []
        for path in files:
            target = folder / path.parent.name / path.name
            target.write_bytes(path.read_bytes())
            copies[series_uid].append(target)
    return copies


def _replace(path: Path, ds: Dataset) -> None:
    part = path.with_suffix(".part")
    ds.save_as(part, enforce_file_format=True)
    part.replace(path)


def test_results_made_ahead_are_the_batch_results_and_are_taken_only_for_the_very_same_files(
    batch_runner, study_files, batch_outcome, tmp_path
):
    files = _copied(study_files, tmp_path / "study")
    runner = OnnxStudyRunner(batch_runner.registry, batch_runner.equipment)
    study_uid = str(batch_outcome.datasets[0].StudyInstanceUID)

    # Made ahead, then taken by the run of the same input: the batch results, same UIDs.
    assert runner.prepare(study_uid, "lung-seg", files, OUTPUTS, go_on=lambda: True)
    taken = runner.run("lung-seg", files, sorted(OUTPUTS))  # the same kinds, in any order
    assert taken.prepared and taken.steps_s  # the steps it took ahead, for the job's log
    assert_same_results(taken, batch_outcome)
    # Taken once: the next run analyses again.
    assert not runner.run("lung-seg", files, OUTPUTS).prepared

    # Another input misses: other kinds wanted, a slice replaced (here by the same bytes: a new file all the
    # same), an instance that arrived after the results were made, one that is gone since.
    assert runner.prepare(study_uid, "lung-seg", files, OUTPUTS, go_on=lambda: True)
    assert not runner.run("lung-seg", files, {"seg"}).prepared
    chosen = _chosen(files)
    _replace(chosen[3], pydicom.dcmread(chosen[3]))
    assert not runner.run("lung-seg", files, OUTPUTS).prepared
    assert runner.forget_prepared(()) == 1  # what was made for the replaced file stays unused
    fewer = {uid: paths[:-1] if paths is chosen else paths for uid, paths in files.items()}
    assert runner.prepare(study_uid, "lung-seg", fewer, OUTPUTS, go_on=lambda: True)
    assert not runner.run("lung-seg", files, OUTPUTS).prepared  # the last slice arrived since
    assert runner.forget_prepared(()) == 1
    assert runner.prepare(study_uid, "lung-seg", files, OUTPUTS, go_on=lambda: True)
    assert not runner.run("lung-seg", fewer, OUTPUTS).prepared
    assert runner.forget_prepared(()) == 1

    # Decisive: a duplicate stored again with other pixels after the results were made ahead. The stale
    # results differ from the right ones, and the run gives the right ones.
    assert runner.prepare(study_uid, "lung-seg", files, OUTPUTS, go_on=lambda: True)
    _replace(chosen[15], _with_other_pixels(pydicom.dcmread(chosen[15]), None))
    after = runner.run("lung-seg", files, OUTPUTS)
    assert not after.prepared
    assert not np.array_equal(after.datasets[0].pixel_array, batch_outcome.datasets[0].pixel_array)
    assert_same_results(after, batch_runner.run("lung-seg", files, OUTPUTS))
    # Studies no longer open lose what was made for them.
    assert runner.forget_prepared({"1.2.3.other"}) == 1


def test_a_preparation_gives_up_when_a_job_needs_the_machine_but_not_when_its_own_job_waits_for_it(
    batch_runner, study_files, batch_outcome
):
    import threading

    runner = OnnxStudyRunner(batch_runner.registry, batch_runner.equipment)
    study_uid = str(batch_outcome.datasets[0].StudyInstanceUID)
    # Told to stop at its first check: nothing is kept, the run analyses.
    assert not runner.prepare(study_uid, "lung-seg", study_files, OUTPUTS, go_on=lambda: False)
    assert not runner.run("lung-seg", study_files, OUTPUTS).prepared

    # Under way when the study's own job runs: the job waits for it, and the preparation goes on although
    # its go_on now says "a job needs the machine" (that job is the one waiting).
    checked, job_waits = threading.Event(), threading.Event()

    def go_on() -> bool:
        checked.set()
        job_waits.wait(60)
        return False

    made: list[bool] = []
    ahead = threading.Thread(
        target=lambda: made.append(runner.prepare(study_uid, "lung-seg", study_files, OUTPUTS, go_on=go_on))
    )
    ahead.start()
    assert checked.wait(60)
    outcomes: list[RunOutcome] = []
    job = threading.Thread(target=lambda: outcomes.append(runner.run("lung-seg", study_files, OUTPUTS)))
    job.start()
    wait_for(lambda: bool(runner._awaited), timeout_s=30, what="the job waiting for the preparation")
    job_waits.set()
    ahead.join(120)
    job.join(120)
    assert made == [True]
    (outcome,) = outcomes
    assert outcome.prepared
    # Made in the preparation's thread, stored from the job's, as the worker does (written, not copied).
    stored = []
    for ds in outcome.datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        stored.append(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
    assert_same_results(RunOutcome(datasets=stored), batch_outcome)


class Recording:
    """A study runner that hands each call to ``runner`` and keeps what it returned in ``outcomes``."""

    def __init__(self, runner: OnnxStudyRunner, outcomes: list[RunOutcome]) -> None:
        self.runner, self.outcomes = runner, outcomes

    def run(self, pipeline, series_files, outputs):
        self.outcomes.append(self.runner.run(pipeline, series_files, outputs))
        return self.outcomes[-1]


def _route_and_analyse(node, prefetcher: Prefetcher, clock: Clock) -> None:
    """The assembler routes what arrived (the study stays receiving), and the prefetch loop analyses all of it."""
    node.assembler.tick(now=clock.advance(0.1))
    while prefetcher.step(clock.now):
        pass


def _run_job(node, runner: OnnxStudyRunner, outcomes: list[RunOutcome]) -> None:
    """A worker of the node takes the next job and runs it with ``runner``; what the runner returned is kept."""
    assert node.worker(runner=Recording(runner, outcomes)).run_once()


def _preparing(node, batch_runner, routes: dict[str, str], route_outputs) -> tuple[OnnxStudyRunner, Prefetcher]:
    """The runner of the node's workers and its prefetch loop, which makes results ahead (always idle here)."""
    store, headers = SliceStore(node.spool), HeaderCache()
    runner = OnnxStudyRunner(batch_runner.registry, batch_runner.equipment, slice_cache=store.study, headers=headers)
    prefetcher = Prefetcher(sessions=node.sessions, spool=node.spool, store=store, model=batch_runner.registry.get,
                            routes=routes, idle=lambda: True, headers=headers, prepare=runner,
                            route_outputs=route_outputs)  # fmt: skip
    return runner, prefetcher


def test_node_makes_a_quiet_studys_results_ahead_and_its_job_takes_them_only_if_nothing_arrived_since(
    tmp_path, batch_runner, batch_outcome, study_files
):
    clock = Clock()
    node = _lung_node(tmp_path, clock)
    runner, prefetcher = _preparing(node, batch_runner, {"ct": "lung-seg"}, lambda route, ae, host: OUTPUTS)
    outcomes: list[RunOutcome] = []

    # A scanner sends the study but the last slice of the chosen series, then pauses (a gap).
    late = max(
        _chosen(study_files), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
    )
    node.receive([pydicom.dcmread(p) for files in study_files.values() for p in files if p != late])
    _route_and_analyse(node, prefetcher, clock)
    assert prefetcher.slices_analysed == 59 and prefetcher.prepared == 0  # not quiet long enough yet
    assert prefetcher.step(clock.advance(1)) is True and prefetcher.prepared == 1  # quiet: made ahead
    assert prefetcher.step(clock.now) is False  # once for the same arrivals

    # The last slice comes after the gap. The study was made ahead once already: it waits twice as long (0.6 s)
    # before it is made ahead again, and is complete before that.
    node.receive([pydicom.dcmread(late)])
    while prefetcher.step(clock.now):
        pass
    assert prefetcher.slices_analysed == 60
    assert prefetcher.step(clock.advance(0.5)) is False and prefetcher.prepared == 1
    assert node.assembler.tick(now=clock.advance(10))
    _run_job(node, runner, outcomes)
    assert not outcomes[-1].prepared  # made from 29 slices of the series: never taken for 30
    assert_same_results(outcomes[-1], batch_outcome)
    # The objects made ahead had been written into the spool (temp names); unused, they go at the next pass.
    assert len(list(node.spool.root.rglob("*.part"))) == 2
    prefetcher.step(clock.advance(0.1))
    assert list(node.spool.root.rglob("*.part")) == []

    # A slice with lung in it is sent again with other pixels: a new version of the study. Quiet long enough,
    # its results are made ahead, and its job takes them: those of the files the spool holds now.
    _store_replaced(node, _with_other_pixels(pydicom.dcmread(_chosen(study_files)[15]), None), clock.now)
    _route_and_analyse(node, prefetcher, clock)
    assert prefetcher.prepared == 1
    assert prefetcher.step(clock.advance(1)) is True and prefetcher.prepared == 2
    assert node.assembler.tick(now=clock.advance(10))
    _run_job(node, runner, outcomes)
    assert outcomes[-1].prepared and len(outcomes[-1].written_ahead) == 2
    assert_same_results(outcomes[-1], batch_runner.run("lung-seg", _spooled(node), OUTPUTS))
    # The job put the files written ahead in place: the spool's results are those objects, no temp file is left.
    assert list(node.spool.root.rglob("*.part")) == []
    results = sorted(node.spool.root.glob("_results/*/*/*.dcm"))
    assert {p.stem for p in results} == {str(ds.SOPInstanceUID) for ds in outcomes[-1].datasets}
    by_modality = {str(ds.Modality): ds for ds in outcomes[-1].datasets}
    stored = [pydicom.dcmread(p) for p in results]
    stored.sort(key=lambda ds: str(ds.Modality))
    assert_same_results(RunOutcome(datasets=stored), RunOutcome(datasets=[by_modality[m] for m in sorted(by_modality)]))
    assert not np.array_equal(outcomes[-1].datasets[0].pixel_array, batch_outcome.datasets[0].pixel_array)
    assert [job.state.value for job in node.jobs()] == ["done", "done"]


def test_results_made_ahead_are_not_used_when_the_database_says_the_study_changed_though_its_files_look_the_same(
    tmp_path, batch_runner, batch_outcome, study_files, caplog
):
    # A file system that reuses an inode within its time resolution could show a replaced file with the same
    # path, inode, time and size. The instance rows then still tell: each store sets its time of reception.
    clock = Clock()
    node = _lung_node(tmp_path, clock)
    runner, prefetcher = _preparing(node, batch_runner, {"ct": "lung-seg"}, lambda route, ae, host: OUTPUTS)
    node.receive([pydicom.dcmread(p) for files in study_files.values() for p in files])
    _route_and_analyse(node, prefetcher, clock)
    assert prefetcher.step(clock.advance(1)) is True and prefetcher.prepared == 1
    with node.sessions() as session, session.begin():  # what a replacement the files do not show would leave
        session.execute(update(Instance).where(Instance.id == 7).values(received_at=clock.now))
    outcomes: list[RunOutcome] = []

    assert node.assembler.tick(now=clock.advance(10))
    _run_job(node, runner, outcomes)
    assert [o.prepared for o in outcomes] == [True, False]  # taken by its file key, refused by the rows, made again
    assert "results made ahead not used: the study changed since" in caplog.text
    assert_same_results(outcomes[-1], batch_outcome)
    assert [job.state.value for job in node.jobs()] == ["done"]


def test_every_route_of_a_study_is_made_ahead_and_each_job_takes_its_own(
    tmp_path, batch_runner, batch_outcome, study_files
):
    # Two series routed to two routes (each makes a job), each with its own destination and outputs.
    clock = Clock()
    config = make_config(
        tmp_path,
        node={"duplicates": "replace"},
        peers={"pacs": {**PACS, "outputs": ["seg", "sr"]},
               "viewer": {**PACS, "ae_title": "VIEWER", "outputs": ["seg"]}},
        routes=[{"name": "soft", "match": {"SeriesDescription": {"regex": "B40f"}}, "pipeline": "lung-seg",
                 "destinations": ["pacs"], "stable_after_s": 5},
                {"name": "sharp", "match": {"SeriesDescription": {"regex": "B70f"}}, "pipeline": "lung-seg",
                 "destinations": ["viewer"], "stable_after_s": 5}],
    )  # fmt: skip
    node = build_node(tmp_path, clock, config)
    wanted = {"soft": {"seg", "sr"}, "sharp": {"seg"}}
    runner, prefetcher = _preparing(
        node, batch_runner, {"soft": "lung-seg", "sharp": "lung-seg"}, lambda route, ae, host: wanted[route]
    )
    node.receive([pydicom.dcmread(p) for files in study_files.values() for p in files])
    _route_and_analyse(node, prefetcher, clock)
    assert prefetcher.step(clock.advance(1)) is True
    assert len(list(node.spool.root.rglob("*.part"))) == 3  # SEG + SR of one route, SEG of the other
    outcomes: list[RunOutcome] = []

    assert len(node.assembler.tick(now=clock.advance(10))) == 2
    assert (
        node.worker(runner=Recording(runner, outcomes)).run_once()
        and node.worker(runner=Recording(runner, outcomes)).run_once()
    )
    assert [o.prepared for o in outcomes] == [True, True]
    by_kinds = {tuple(str(ds.Modality) for ds in o.datasets): o for o in outcomes}
    assert set(by_kinds) == {("SEG", "SR"), ("SEG",)}
    assert_same_results(by_kinds[("SEG", "SR")], batch_outcome)
    assert_same_results(by_kinds[("SEG",)], RunOutcome(datasets=batch_outcome.datasets[:1]))
    assert list(node.spool.root.rglob("*.part")) == []  # every file written ahead was put in place
