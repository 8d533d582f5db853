"""Compressed input loads to the same pixels as its uncompressed twin (pipelines/volume.py).

Compressed twins come from pydicom's bundled test files, from DCMTK's encoders (called by full path,
because pynetdicom installs scripts with similar names), from pydicom's own encoders and, for
High-Throughput JPEG 2000 (which neither DCMTK 3.6.7 nor pydicom can write), from OpenJPH's
``ojph_compress`` (Debian ``openjph-tools``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pipelines.volume import load_volume
from tests.support.data import real_series
from tests.support.peers import dcmtk, htj2k_encode
from tests.support.series import (
    SIZE,
    assert_same_volume,
    ct_series,
    enhanced_ct,
    noise,
    save,
)

#: JPEG Lossless, Non-Hierarchical (Process 14), any selection value: DCMTK's ``+el``.
JPEG_LOSSLESS_P14 = UID("1.2.840.10008.1.2.4.57")


def _with_pydicom_encoder(syntax: UID, **options: object) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        ds = dcmread(src)
        ds.compress(syntax, **options)  # type: ignore[arg-type]
        save(ds, dst)

    return encode


def _with_dcmtk(tool: str, *args: str) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        dcmtk(tool, *args, src, dst)

    return encode


def _with_openjph(syntax: UID, *options: str) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        htj2k_encode(src, dst, syntax, *options)

    return encode


#: Lossless encodings: (encoder, the transfer syntax it must produce). Each must decode to identical pixels.
LOSSLESS: dict[str, tuple[Callable[[Path, Path], None], UID]] = {
    "implicit-vr-little-endian": (_with_dcmtk("dcmconv", "+ti"), ImplicitVRLittleEndian),
    "explicit-vr-big-endian": (_with_dcmtk("dcmconv", "+tb"), ExplicitVRBigEndian),
    "deflated": (_with_dcmtk("dcmconv", "+td"), DeflatedExplicitVRLittleEndian),
    "rle-dcmtk": (_with_dcmtk("dcmcrle"), RLELossless),
    "rle-pydicom": (_with_pydicom_encoder(RLELossless), RLELossless),
    "jpeg-lossless-sv1": (_with_dcmtk("dcmcjpeg", "+e1"), JPEGLosslessSV1),
    "jpeg-lossless-process14-sv6": (_with_dcmtk("dcmcjpeg", "+el"), JPEG_LOSSLESS_P14),
    "jpeg-ls-lossless-dcmtk": (_with_dcmtk("dcmcjpls", "+el"), JPEGLSLossless),
    "jpeg-ls-lossless-pyjpegls": (_with_pydicom_encoder(JPEGLSLossless), JPEGLSLossless),
    "jpeg-2000-lossless": (_with_pydicom_encoder(JPEG2000Lossless), JPEG2000Lossless),
    "htj2k-lossless-openjph": (_with_openjph(HTJ2KLossless, "-reversible", "true"), HTJ2KLossless),
}


# -- compressed inputs load to the same pixels as their uncompressed twins -------------------------
#: pydicom's test files: (uncompressed reference, twin). Lossless: pixels must be identical.
BUNDLED_TWINS = [
    ("MR_small.dcm", "MR_small_RLE.dcm"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
    ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ("MR_small.dcm", "MR_small_expb.dcm"),
    ("MR_small.dcm", "MR_small_implicit.dcm"),
    ("MR_small.dcm", "MR_small_padded.dcm"),
    ("rtdose.dcm", "rtdose_rle.dcm"),  # multi-frame
    ("rtdose.dcm", "rtdose_expb.dcm"),
    ("rtdose_1frame.dcm", "rtdose_rle_1frame.dcm"),
    ("rtdose_1frame.dcm", "rtdose_expb_1frame.dcm"),
    ("liver_1frame.dcm", "liver_expb_1frame.dcm"),  # enhanced (functional groups), 1 frame
]


def _testdata(name: str) -> str:
    """A test file bundled with pydicom (the ones it would download are out of reach offline)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} should be bundled with pydicom"
    return path


@pytest.mark.parametrize(("reference", "twin"), BUNDLED_TWINS, ids=[t.removesuffix(".dcm") for _, t in BUNDLED_TWINS])
def test_pydicom_test_files_load_to_the_same_pixels_as_their_uncompressed_twins(reference: str, twin: str) -> None:
    expected = load_volume([_testdata(reference)])
    actual = load_volume([_testdata(twin)])

    assert_same_volume(actual, expected)


def _encoded_series(
    tmp_path: Path, planes: list[np.ndarray], encode: Callable[[Path, Path], None], syntax: UID, name: str
) -> tuple[list[Path], list[Path]]:
    """A series with these pixels saved uncompressed, and its twin encoded (checked to be in ``syntax``)."""
    slices = ct_series(len(planes))
    for ds, plane in zip(slices, planes, strict=True):
        ds.PixelData = plane.tobytes()
    originals = [save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(slices)]
    twins = [tmp_path / f"{k}-{name}.dcm" for k in range(len(slices))]
    for src, dst in zip(originals, twins, strict=True):
        encode(src, dst)
    assert dcmread(twins[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return originals, twins


@pytest.mark.parametrize("encoding", list(LOSSLESS))
def test_series_in_every_lossless_transfer_syntax_loads_to_identical_pixels(tmp_path: Path, encoding: str) -> None:
    encode, syntax = LOSSLESS[encoding]
    originals, twins = _encoded_series(tmp_path, [noise(k) for k in range(4)], encode, syntax, encoding)

    assert_same_volume(load_volume(twins[::-1]), load_volume(originals))


@pytest.mark.parametrize("encoding", list(LOSSLESS))
def test_enhanced_multiframe_in_every_lossless_transfer_syntax_loads_to_identical_pixels(
    tmp_path: Path, encoding: str
) -> None:
    encode, syntax = LOSSLESS[encoding]
    original = save(enhanced_ct([7.5, 0.0, 5.0, 2.5], noise(3, 4)), tmp_path / "enhanced.dcm")
    twin = tmp_path / f"enhanced-{encoding}.dcm"
    encode(original, twin)
    assert dcmread(twin, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax

    volume = load_volume([twin])

    assert_same_volume(volume, load_volume([original]))
    assert [f.frame_number for f in volume.source_frames] == [2, 4, 3, 1]


def _smooth_slice(k: int) -> np.ndarray:
    """A body-like smooth image (air, soft tissue, a dense disc) with mild noise, 12-bit stored values."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    image = np.where(r < 14, 1064.0, 24.0) + np.where(r < 4, 800.0 + 20 * k, 0.0)
    return (image + np.random.default_rng(k).normal(0, 2, image.shape)).clip(0, 4095).astype(np.uint16)


#: Lossy encodings: (encoder, transfer syntax, largest mean |error| in HU, largest single |error| in HU or None).
#: Honest bounds, not codec benchmarks: the right image must come back in modality units, with air, soft
#: tissue and the dense disc still where they were; only JPEG-LS near-lossless promises a per-pixel bound.
LOSSY: dict[str, tuple[Callable[[Path, Path], None], UID, float, float | None]] = {
    # ISO 14495-1 near-lossless: |error| <= NEAR in stored units; Rescale Slope is 1 here.
    "jpeg-ls-near-lossless-2": (_with_dcmtk("dcmcjpls", "+en", "+md", "2"), JPEGLSNearLossless, 2.0, 2.0),
    # DCMTK maps 12 bits into 8 for baseline and rewrites Rescale Slope/Intercept to match (slope ~8 here).
    "jpeg-baseline-8bit": (_with_dcmtk("dcmcjpeg", "+eb"), JPEGBaseline8Bit, 40.0, None),
    "jpeg-extended-12bit": (_with_dcmtk("dcmcjpeg", "+ee"), JPEGExtended12Bit, 10.0, None),
    "jpeg-2000-lossy-3to1": (_with_pydicom_encoder(JPEG2000, j2k_cr=[3]), JPEG2000, 30.0, None),
    # Irreversible 9/7 wavelet. Two decomposition levels suit 32 x 32 test images (OpenJPH 0.9 mis-encodes
    # them at its default five, whichever decoder reads them; 256 x 256 images come back right at five).
    "htj2k-lossy": (_with_openjph(HTJ2K, "-qstep", "0.005", "-num_decomps", "2"), HTJ2K, 30.0, None),
}


@pytest.mark.parametrize("encoding", list(LOSSY))
def test_lossy_transfer_syntaxes_load_close_to_the_original_hounsfield_units(tmp_path: Path, encoding: str) -> None:
    encode, syntax, mean_hu, max_hu = LOSSY[encoding]
    originals, twins = _encoded_series(tmp_path, [_smooth_slice(k) for k in range(3)], encode, syntax, encoding)

    expected, actual = load_volume(originals), load_volume(twins)

    error = np.abs(actual.pixels - expected.pixels)
    assert float(error.mean()) <= mean_hu, float(error.mean())
    if max_hu is not None:
        assert float(error.max()) <= max_hu
    for threshold_hu in (-500, 300):  # body outline, dense disc
        np.testing.assert_array_equal(actual.pixels > threshold_hu, expected.pixels > threshold_hu)
    np.testing.assert_allclose(actual.affine(), expected.affine())


# -- the real chest CT -------------------------------------------------------------------------
def test_real_ct_slices_load_identically_from_every_lossless_transfer_syntax(ct_dir: Path, tmp_path: Path) -> None:
    originals = real_series(ct_dir, "series-3-B40f")[12:15]
    expected = load_volume(originals)
    for encoding, (encode, syntax) in LOSSLESS.items():
        twins = [tmp_path / f"{p.stem}-{encoding}.dcm" for p in originals]
        for src, dst in zip(originals, twins, strict=True):
            encode(src, dst)
        assert dcmread(twins[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax, encoding

        actual = load_volume(twins)

        np.testing.assert_array_equal(actual.pixels, expected.pixels, err_msg=encoding)
        np.testing.assert_allclose(actual.affine(), expected.affine(), err_msg=encoding)
