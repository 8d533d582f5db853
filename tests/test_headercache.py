"""The header cache between the analysis ahead and the job: each reader its own copy, a replaced file re-read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement

from pipelines.headercache import HeaderCache


def _stored(folder: Path, name: str, source: str = "CT_small.dcm", **values: object) -> Path:
    ds = pydicom.dcmread(get_testdata_file(source))
    # 256 x 256: Pixel Data over the size that is deferred (a CT slice's 512 kB is).
    ds.Rows = ds.Columns = 256
    ds.PixelData = np.random.default_rng(len(name)).integers(0, 1000, (256, 256), dtype=np.uint16).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = folder / name
    ds.save_as(path)
    return path


def test_each_reader_gets_a_copy_of_its_own_and_the_pixel_data_stays_in_the_file(tmp_path: Path):
    path = _stored(tmp_path, "a.dcm")
    cache = HeaderCache()
    first = cache.read(path)
    first_pixels = first.pixel_array.copy()  # loads the deferred Pixel Data into this copy only
    first.PatientName = "Changed^Here"
    del first.StudyDate
    second = cache.read(path)
    assert (cache.misses, cache.hits) == (1, 1)
    assert str(second.PatientName) != "Changed^Here" and "StudyDate" in second
    # The kept header still defers its pixel data: the next reader reads it from the file, equal.
    deferred = second.get_item(0x7FE00010, keep_deferred=True)
    assert isinstance(deferred, RawDataElement) and deferred.value is None
    assert np.array_equal(second.pixel_array, first_pixels)


def test_a_file_replaced_under_the_same_path_is_parsed_again(tmp_path: Path):
    path = _stored(tmp_path, "a.dcm", PatientID="FIRST")
    cache = HeaderCache()
    assert cache.read(path).PatientID == "FIRST"
    # A duplicate stored with node.duplicates: replace is written aside and renamed over the path.
    other = _stored(tmp_path, "b.dcm", "MR_small.dcm", PatientID="SECOND")
    os.replace(other, path)
    again = cache.read(path)
    assert again.PatientID == "SECOND" and again.Modality == "MR"
    assert np.array_equal(again.pixel_array, pydicom.dcmread(path).pixel_array)
    assert cache.misses == 2


def test_the_cache_keeps_a_bounded_number_of_headers_and_forgets_those_not_wanted(tmp_path: Path):
    paths = [_stored(tmp_path, f"{k}.dcm") for k in range(5)]
    cache = HeaderCache(max_entries=3)
    for path in paths:
        cache.read(path)
    assert len(cache) == 3
    cache.read(paths[0])  # the oldest went first
    assert cache.misses == 6
    assert cache.forget({str(paths[0])}) == 2 and len(cache) == 1
    cache.read(paths[0])
    assert cache.hits == 1
