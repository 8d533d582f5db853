"""The radiologist's view: what OHIF v3 shows of the node's DICOM-SEG and TID 1500 SR, in headless Chromium.

The real CT (TCIA Lung-PET-CT-Dx A0002, series 3) goes through the bundled lung-seg model and the node's
result writers, exactly as the node would send them; the CT, the SEG and the SR are stored in Orthanc, whose
DICOMweb plugin feeds OHIF (npm ``@ohif/app``, prebuilt, served by :mod:`tests.support.viewer.ohif` from the same
origin as a ``/dicom-web`` proxy). Python Playwright drives Debian's chromium.

What a radiologist should see, checked on the page's text and on screenshot pixels:

- the CT, the SEG and the SR series in the study browser;
- the SEG over the CT: both segments named in the segmentation panel, filled in the colours the SEG recommends
  (those the Secondary Capture burns in), the left lung on the image's right (radiological convention); OHIF's
  own segment statistics (volume, mean HU) agree with the volume and mean attenuation our SR states for it;
- the SR: each lung's outline (TID 1410 planar group) on the slice it references, labelled with its area, its
  side ("Right lung", from the Finding Site) and, joined by Tracking UID, the volume of its TID 1411 group; the
  label next to its own outline, not nearer the other lung;
- a chest radiograph phantom through the chest-xray model: the SR's hot-spot box, labelled once with the probability.

Screenshots go to the test's tmp dir; the segmentation view is also copied to ``tests/.cache/viewer-screenshot.png``
(the SR outline view to ``tests/.cache/viewer-screenshot-sr.png``, the radiograph to
``viewer-screenshot-radiograph.png``).
Install the viewer with ``bash tests/support/viewer/install.sh`` (``tests/run.sh`` does).
"""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pipelines.dicom.colours import segment_colour
from tests.support import REPO
from tests.support.viewer.ohif import CHROMIUM, CHROMIUM_ARGS, OhifServer, ohif_dist, ohif_version

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

    from pipelines.results import SegmentationResult

pytestmark = [pytest.mark.viewer, pytest.mark.orthanc, pytest.mark.filterwarnings("ignore::UserWarning")]

CACHE = REPO / "tests" / ".cache"
CT_SERIES = "series-3-B40f"
TIMEOUT_MS = 90_000  # per step; the machine is slow and shares its 2 cores
#: OHIF 3.13's SR loader dies on a measurement group without SCOORD/SCOORD3D (see check_sr_outlines).
OHIF_SR_CRASH = "reading 'ReferencedSOPSequence'"


# -- the study -----------------------------------------------------------------------------------
@dataclass
class Planar:
    """What OHIF should draw for one TID 1410 group of the SR."""

    tracking_id: str
    side: str  # the finding site's laterality: "Left" or "Right"
    label: str  # OHIF's rendering of the group's NUM: "Area: 10860.60 mm2"
    #: The volume of the same tracked structure (TID 1411 group with the same Tracking UID), as OHIF shows it.
    volume_label: str
    image_index: int  # 1-based index of the referenced CT image in the series, by Instance Number
    tracking_uid: str  # OHIF's annotation UID: its label is the SVG group with data-annotation-uid = this
    outline_cr: np.ndarray  # the SCOORD's (column, row) points
    sop_instance_uid: str  # the image the outline is on


@dataclass
class Volumetric:
    """One TID 1411 group of the SR (per SEG segment)."""

    tracking_id: str
    segment_number: int
    volume_ml: float
    mean_hu: float | None


@dataclass
class LungStudy:
    study_uid: str
    seg: Dataset
    sr: Dataset
    segment_labels: list[str]
    planar: list[Planar]
    volumetric: list[Volumetric]
    #: The segmentation the SEG and SR were written from: where each lung is on the outlines' slices.
    result: SegmentationResult


def _code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def _groups(sr: Dataset) -> list[Dataset]:
    measurements = next(i for i in sr.ContentSequence if _code(i) == "Imaging Measurements")
    return list(measurements.ContentSequence)


def _text(group: Dataset, meaning: str) -> str:
    return str(next(i.TextValue for i in group.ContentSequence if _code(i) == meaning))


def _num(group: Dataset, meaning: str) -> tuple[float, str] | None:
    for item in group.ContentSequence:
        if item.ValueType == "NUM" and _code(item) == meaning:
            value = item.MeasuredValueSequence[0]
            return float(value.NumericValue), str(value.MeasurementUnitsCodeSequence[0].CodeValue)
    return None


def _laterality(group: Dataset) -> str:
    site = next(i for i in group.ContentSequence if _code(i) == "Finding Site")
    laterality = next(i for i in site.ContentSequence if _code(i) == "Laterality")
    return str(laterality.ConceptCodeSequence[0].CodeMeaning)


def _tracking_uid(group: Dataset) -> str:
    return str(next(i.UID for i in group.ContentSequence if _code(i) == "Tracking Unique Identifier"))


def describe_report(sr: Dataset, ct: list[Dataset]) -> tuple[list[Planar], list[Volumetric]]:
    order = [str(d.SOPInstanceUID) for d in sorted(ct, key=lambda d: int(d.InstanceNumber))]
    planar, volumetric = [], []
    volumes = {
        _tracking_uid(g): _num(g, "Volume")
        for g in _groups(sr)
        if not any(i.ValueType == "SCOORD" for i in g.ContentSequence)
    }
    for group in _groups(sr):
        scoords = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        if scoords:
            area = _num(group, "Area")
            assert area is not None, "a planar lung group without an Area"
            source = scoords[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            planar.append(
                Planar(
                    tracking_id=_text(group, "Tracking Identifier"),
                    side=_laterality(group),
                    label=f"Area: {area[0]:.2f} {area[1]}",  # OHIF: `${Number(v).toFixed(2)} ${unit CodeValue}`
                    volume_label="Volume: {:.2f} {}".format(*volumes[_tracking_uid(group)]),
                    image_index=order.index(str(source)) + 1,
                    tracking_uid=_tracking_uid(group),
                    outline_cr=np.asarray(scoords[0].GraphicData, float).reshape(-1, 2),
                    sop_instance_uid=str(source),
                )
            )
        else:
            segment = next(i for i in group.ContentSequence if _code(i) == "Referenced Segment")
            volume = _num(group, "Volume")
            mean = _num(group, "Attenuation Coefficient")
            assert volume is not None and volume[1] == "ml"
            volumetric.append(
                Volumetric(
                    tracking_id=_text(group, "Tracking Identifier"),
                    segment_number=int(segment.ReferencedSOPSequence[0].ReferencedSegmentNumber),
                    volume_ml=volume[0],
                    mean_hu=mean[0] if mean else None,
                )
            )
    return planar, volumetric


@pytest.fixture(scope="module")
def viewer_installed() -> None:
    """Skip (before starting anything) when the viewer cannot run here."""
    pytest.importorskip("playwright.sync_api", reason="Python playwright missing (pip install -e '.[test]')")
    if ohif_dist() is None:
        pytest.skip(
            "OHIF viewer not installed: run `bash tests/support/viewer/install.sh` (needs npm and the npm registry)"
        )
    if not CHROMIUM.is_file():
        pytest.skip(f"chromium missing at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def lung_study(viewer_installed: None, orthanc, ct_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LungStudy:
    """The CT series, its SEG and SR as the node makes them, in Orthanc."""
    from pipelines.dicom import Equipment, write_results
    from pipelines.runtime import ModelRegistry, bundled_models_dir
    from pipelines.study import run_pipeline
    from pipelines.volume import load_volume

    files = sorted((ct_dir / CT_SERIES).glob("*.dcm"))
    datasets = [pydicom.dcmread(p) for p in files]
    from pipelines.results import SegmentationResult

    result = run_pipeline(ModelRegistry(bundled_models_dir()).get("lung-seg"), load_volume(datasets))
    assert isinstance(result, SegmentationResult), result
    equipment = Equipment(
        manufacturer="dicom-ai-node",
        model_name="dicom-ai-node",
        software_versions="0.1.0",
        device_uid="1.2.826.0.1.3680043.8.498.77",
        station_name="AINODE",
    )
    seg, sr = write_results(result, datasets, equipment, ["seg", "sr"])
    out = tmp_path_factory.mktemp("viewer-objects")
    orthanc.clear()
    for path in files:
        orthanc.upload(path)
    for name, ds in (("seg", seg), ("sr", sr)):
        ds.save_as(out / f"{name}.dcm")
        orthanc.upload(out / f"{name}.dcm")
    planar, volumetric = describe_report(sr, datasets)
    return LungStudy(
        study_uid=str(datasets[0].StudyInstanceUID),
        seg=seg,
        sr=sr,
        segment_labels=[str(s.SegmentLabel) for s in seg.SegmentSequence],
        planar=planar,
        volumetric=volumetric,
        result=result,
    )


@pytest.fixture(scope="module")
def viewer(orthanc, lung_study: LungStudy) -> Iterator[OhifServer]:
    with OhifServer(orthanc.http_port) as server:
        yield server


@pytest.fixture(scope="module")
def browser(lung_study: LungStudy) -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Playwright gives each launch a fresh temporary profile (user-data-dir).
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@dataclass
class Viewer:
    """One browser page on the viewer, with what it logged."""

    page: Page
    logs: list[str]
    shots: Path

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def viewport_pixels(self) -> np.ndarray:
        """The viewport as RGB pixels (H, W, 3)."""
        from PIL import Image

        png = self.page.locator('[data-cy="viewport-pane"]').first.screenshot()
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)

    def viewport_text(self) -> str:
        return str(self.page.locator('[data-cy="viewport-pane"]').first.inner_text())

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.logs)


@contextmanager
def open_study(browser: Browser, url: str, shots: Path) -> Iterator[Viewer]:
    """A fresh page on the viewer at ``url``, once the first image is on screen; its console kept."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    logs: list[str] = []
    page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
    view = Viewer(page=page, logs=logs, shots=shots)
    try:
        page.goto(url)
        # The image is on screen when the viewport's overlay shows its index ("I:1 (1/30)", or "1/1").
        page.locator('[data-cy="viewport-pane"]').get_by_text(re.compile(r"\d+/\d+")).first.wait_for()
        yield view
    finally:
        page.screenshot(path=str(shots / "last.png"))  # how the page looked when the test ended, pass or fail
        (shots / "console.log").write_text("\n".join(logs))
        context.close()


@pytest.fixture
def ohif(browser: Browser, viewer: OhifServer, lung_study: LungStudy, tmp_path: Path) -> Iterator[Viewer]:
    with open_study(browser, viewer.study_url(lung_study.study_uid), tmp_path) as view:
        yield view


# -- helpers -------------------------------------------------------------------------------------
def series_thumbnail(view: Viewer, series_number: int) -> Locator:
    return view.page.locator(f'[data-cy="study-browser-thumbnail-no-image"][data-series="{series_number}"]')


def wait_until(check: Callable[[], bool], timeout_s: float = TIMEOUT_MS / 1000, step_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step_s)
    return check()


def colour_mask(pixels: np.ndarray, rgb: tuple[int, int, int], min_chroma: int = 30) -> np.ndarray:
    """Pixels tinted with ``rgb``: a colour blended with alpha over grey CT keeps the direction of (rgb - min(rgb))."""
    target = np.asarray(rgb, dtype=float) - min(rgb)
    target /= np.linalg.norm(target)
    chroma = pixels - pixels.min(axis=-1, keepdims=True)
    norm = np.linalg.norm(chroma, axis=-1)
    cosine = (chroma * target).sum(axis=-1) / np.maximum(norm, 1e-6)
    return (norm > min_chroma) & (cosine > 0.95)


def annotation_mask(pixels: np.ndarray) -> np.ndarray:
    """Saturated green/yellow/red pixels: cornerstone's annotation colours (the CT itself is grey)."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    return (np.maximum(r, g) > 180) & (b < 110) & (chroma > 120)


def segment_statistics(page: Page, title: str, reopen: Callable[[], object] | None = None) -> str:
    """Click a segment in the segmentation panel (the viewport jumps to it) and read its statistics card.

    The card shows on hover once OHIF has computed the statistics (in the background after loading), so hover
    again until it is there. On this machine's software rendering OHIF now and then never computes them (in 2 of
    6 runs on 2026-11-30; its console said an image of the series was not found): halfway to the
    deadline ``reopen`` reloads the viewer and opens the segmentation again, as a radiologist would, once.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    row = page.locator('[data-cy="data-row-title"]', has_text=re.compile(f"^{re.escape(title)}$"))
    page.mouse.move(5, 995)
    page.get_by_text("Voxel Count").wait_for(state="hidden")
    row.click()
    start = time.monotonic()
    deadline = start + TIMEOUT_MS / 1000
    while True:
        try:
            page.get_by_text("Voxel Count").wait_for(timeout=5000)
            break
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise
            if reopen is not None and time.monotonic() > start + TIMEOUT_MS / 2000:
                reopen()
                reopen = None
                row.click()
            page.mouse.move(5, 995)
            row.hover()
    body = page.inner_text("body")
    card = body.rfind(title, 0, body.find("Voxel Count"))
    return body[card : card + 600]


@dataclass
class Label:
    """An SR annotation as OHIF drew it, in viewport-pane pixels: its text box and the polylines on screen."""

    lines: list[str]
    box: tuple[float, float, float, float]  # left, top, right, bottom
    polylines: list[np.ndarray]  # every polyline of the pane's SVG layer, (x, y) points


def annotation_label(view: Viewer, annotation_uid: str) -> Label | None:
    """The text box of one SR annotation (cornerstone's ``g[data-annotation-uid]``), None while not drawn."""
    found = view.page.evaluate(
        """([uid]) => {
            const pane = document.querySelector('[data-cy="viewport-pane"]');
            const origin = pane.getBoundingClientRect();
            const group = [...pane.querySelectorAll('g[data-annotation-uid]')]
                .find(g => g.getAttribute('data-annotation-uid') === uid);
            if (!group) return null;
            const r = (group.querySelector('text') || group).getBoundingClientRect();
            const polylines = [...pane.querySelectorAll('svg polyline')].map(line => {
                const svg = line.ownerSVGElement.getBoundingClientRect();
                return {dx: svg.left - origin.left, dy: svg.top - origin.top, points: line.getAttribute('points')};
            });
            return {
                lines: [...group.querySelectorAll('tspan')].map(t => t.textContent),
                box: [r.left - origin.left, r.top - origin.top, r.right - origin.left, r.bottom - origin.top],
                polylines,
            };
        }""",
        [annotation_uid],
    )
    if found is None:
        return None
    polylines = []
    for line in found["polylines"]:
        numbers = [float(v) for v in re.findall(r"-?[\d.]+(?:e-?\d+)?", line["points"])]
        polylines.append(np.asarray(numbers).reshape(-1, 2) + [line["dx"], line["dy"]])
    return Label(lines=list(found["lines"]), box=tuple(found["box"]), polylines=polylines)


def image_to_pane(outline_cr: np.ndarray, drawn_xy: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Image (column, row) -> viewport-pane pixels, from an outline's points and the same points on screen.

    The axial CT is shown unrotated: x and y are each a scale and a shift of column and row (least squares).
    """
    fits = [np.polyfit(outline_cr[:, axis], drawn_xy[:, axis], 1) for axis in (0, 1)]
    return lambda cr: np.stack([np.polyval(fits[axis], np.asarray(cr, float)[:, axis]) for axis in (0, 1)], axis=1)


def distance_to(points_xy: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Shortest distance from a box to any of ``points_xy`` (0 when one lies inside it)."""
    left, top, right, bottom = box
    dx = np.maximum(np.maximum(left - points_xy[:, 0], points_xy[:, 0] - right), 0)
    dy = np.maximum(np.maximum(top - points_xy[:, 1], points_xy[:, 1] - bottom), 0)
    return float(np.hypot(dx, dy).min())


def parse_rgb(style: str) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in re.findall(r"\d+", style)[:3])
    return r, g, b


def keep(path: Path, name: str) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, CACHE / name)


# -- the tests -----------------------------------------------------------------------------------
def test_ohif_lists_the_ct_seg_and_sr_series_of_the_study(ohif: Viewer, viewer: OhifServer, lung_study: LungStudy):
    for ds in (lung_study.seg, lung_study.sr):
        thumbnail = series_thumbnail(ohif, int(ds.SeriesNumber))
        thumbnail.wait_for()
        text = thumbnail.inner_text()
        assert ds.Modality in text.split() and str(ds.SeriesDescription) in text, text
    browser_text = ohif.page.locator('[data-cy="studyBrowser-panel"]').inner_text()
    assert "CT" in browser_text.split() and "30" in browser_text.split(), browser_text
    drawn = wait_until(lambda: (ohif.viewport_pixels().max(axis=-1) > 40).mean() > 0.1)
    assert drawn, f"the CT image is not drawn in the viewport: see {ohif.shot('ct')}"
    failed = [r for r in viewer.requests if r[2] >= 400]
    assert viewer.requests and not failed, failed


def open_segmentation(ohif: Viewer, lung_study: LungStudy) -> None:
    """Open the SEG on the CT as a radiologist does: double-click its thumbnail, say yes, show the panel."""
    page = ohif.page
    series_thumbnail(ohif, int(lung_study.seg.SeriesNumber)).dblclick()
    page.get_by_text("Do you want to open this Segmentation?").wait_for()
    page.get_by_role("button", name="Yes").click()
    if not page.locator('[data-cy="data-row"]').first.is_visible():
        page.locator('[data-cy="panelSegmentation-btn"]').click()
    page.locator('[data-cy="data-row"]').nth(len(lung_study.segment_labels) - 1).wait_for()


def test_ohif_overlays_both_lung_segments_named_and_coloured_with_the_sr_volumes(ohif: Viewer, lung_study: LungStudy):
    page = ohif.page
    open_segmentation(ohif, lung_study)
    rows = page.locator('[data-cy="data-row"]')
    titles = [t.strip() for t in rows.locator('[data-cy="data-row-title"]').all_inner_texts()]
    assert titles == lung_study.segment_labels == ["Left lung", "Right lung"]
    colours = {
        title: parse_rgb(rows.nth(i).locator('[data-cy="data-row-colorhex"]').get_attribute("style") or "")
        for i, title in enumerate(titles)
    }
    # The SEG's Recommended Display CIELab Value is the SC's colour: OHIF shows each lung as the SC does.
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in lung_study.seg.SegmentSequence}
    for title, colour in colours.items():
        expected = segment_colour(numbers[title])
        assert max(abs(a - b) for a, b in zip(colour, expected, strict=True)) <= 1, (title, colour, expected)

    # Clicking a segment jumps to it; hovering it shows OHIF's statistics of it, which must match our TID 1411 group.
    for number, title in enumerate(titles, start=1):
        stats = segment_statistics(page, title, reopen=lambda: (page.reload(), open_segmentation(ohif, lung_study)))
        volume = re.search(r"Volume\s+([\d.]+)\s*mm", stats)
        mean = re.search(r"Mean Value\s+(-?[\d.]+)\s*HU", stats)
        assert volume and mean, stats
        reported = next(v for v in lung_study.volumetric if v.segment_number == number)
        assert reported.tracking_id == title
        assert float(volume.group(1)) / 1000 == pytest.approx(reported.volume_ml, rel=0.005), stats
        assert reported.mean_hu is not None and abs(float(mean.group(1)) - reported.mean_hu) <= 1.5, stats
    page.mouse.move(5, 995)  # close the statistics card, keep the slice the last segment jumped to
    page.get_by_text("Voxel Count").wait_for(state="hidden")
    page.wait_for_timeout(1500)

    path = ohif.shot("segmentation")
    keep(path, "viewer-screenshot.png")
    pixels = ohif.viewport_pixels()
    area = pixels.shape[0] * pixels.shape[1]
    masks = {title: colour_mask(pixels, colour) for title, colour in colours.items()}
    for title, mask in masks.items():
        assert mask.sum() > 0.01 * area, f"{title} ({colours[title]}) hardly drawn: {mask.sum()} px; see {path}"
    # Radiological convention (OHIF puts the "R" marker on the left): the patient's left lung is on the right.
    centre_x = {title: float(np.nonzero(mask)[1].mean()) for title, mask in masks.items()}
    assert centre_x["Left lung"] > pixels.shape[1] / 2 > centre_x["Right lung"], (centre_x, path)


def check_sr_outlines(ohif: Viewer, lung_study: LungStudy, series_number: int, name: str) -> None:
    """Load one SR series into the viewport; each planar group's outline and area on its slice, one after another."""
    page = ohif.page
    series_thumbnail(ohif, series_number).dblclick()
    first = lung_study.planar[0]
    loaded = wait_until(lambda: first.label in ohif.viewport_text() or ohif.logged(OHIF_SR_CRASH))
    # OHIF 3.13's SR loader dies on a measurement group without coordinates that no planar group shares a
    # Tracking UID with (TypeError on coords[0].ReferencedSOPSequence; the viewport goes blank).
    assert not ohif.logged(OHIF_SR_CRASH), f"OHIF {ohif_version()} could not load the SR: see {ohif.shot(name)}"
    assert loaded, f"no {first.label!r} in the viewport: {ohif.viewport_text()!r}"
    seen: dict[str, float] = {}  # laterality -> mean x of the outline's (and its label's) pixels
    for index, planar in enumerate(lung_study.planar):
        if index:
            page.mouse.move(5, 995)
            page.locator('[data-cy="viewport-action-arrows-right"]').click()
        assert wait_until(lambda p=planar: p.label in ohif.viewport_text()), ohif.viewport_text()
        # Joined by Tracking UID: the outline also carries its lung's volume from the TID 1411 group.
        assert planar.volume_label in ohif.viewport_text(), (planar.volume_label, ohif.viewport_text())
        page.wait_for_timeout(1000)
        shown = re.search(r"I:\s*(\d+)\s*\(", ohif.viewport_text())
        assert shown and int(shown.group(1)) == planar.image_index, (planar, ohif.viewport_text())
        path = ohif.shot(f"{name}-{index}")
        pixels = ohif.viewport_pixels()
        mask = annotation_mask(pixels)
        assert mask.sum() > 300, f"{planar.tracking_id}: outline hardly drawn ({mask.sum()} px), see {path}"
        seen[planar.side] = float(np.nonzero(mask)[1].mean())
        check_label(ohif, lung_study, planar, path)
        if index == 0:
            keep(path, "viewer-screenshot-sr.png")
    # The left lung's outline (and its label) is drawn right of the right lung's: radiological convention.
    assert seen["Left"] > seen["Right"], seen


def check_label(view: Viewer, study: LungStudy, planar: Planar, path: Path) -> None:
    """The outline's label names its lung with the side, and sits next to that lung, not nearer the other one."""
    label = annotation_label(view, planar.tracking_uid)
    assert label is not None, f"no label drawn for {planar.tracking_id}, see {path}"
    # OHIF 3.13 writes a Finding Site as "<its concept's code value>: <the site's Code Meaning>"; the site
    # must name the side (the lateralised SNOMED structure), not a bare "Lung".
    sites = [line for line in label.lines if line.startswith("363698007: ")]
    assert sites == [f"363698007: {planar.side} lung"], label.lines
    assert planar.label in label.lines and planar.volume_label in label.lines, label.lines

    # Where each lung is on this slice, in the viewport. OHIF 3.13 puts an SR label at the right of its outline's
    # bounding box, half-way down (cornerstone's getTextBoxCoordsCanvas over all the outline's points, plus the
    # text box's 25 px padding): neither the order nor the first point of the polyline moves it. The label must
    # start there, beside its own lung and nearer to it than to the other. (The right lung's box, wider than the
    # mediastinum on screen, still reaches over the left lung: only OHIF can change that.)
    result = study.result
    index = [f.sop_instance_uid for f in result.volume.source_frames].index(planar.sop_instance_uid)
    numbers = {s.label: s.number for s in result.segments}
    own_number = numbers[planar.tracking_id]
    # The outline is the polyline with the SCOORD's points (cornerstone draws them one for one).
    outlines = [line for line in label.polylines if len(line) == len(planar.outline_cr)]
    assert len(outlines) == 1, [len(line) for line in label.polylines]
    to_pane = image_to_pane(planar.outline_cr, outlines[0])
    lungs = {}
    for number in numbers.values():
        rows, cols = np.nonzero(result.labelmap[index] == number)
        lungs[number] = to_pane(np.stack([cols + 0.5, rows + 0.5], axis=1)) if len(rows) else np.zeros((0, 2))
    left, top, _, bottom = label.box
    start = (left, (top + bottom) / 2, left, (top + bottom) / 2)  # where the text begins
    own = distance_to(lungs[own_number], start)
    others = [distance_to(xy, start) for n, xy in lungs.items() if n != own_number and len(xy)]
    assert own <= 40 and all(own < other for other in others), (
        f"{planar.tracking_id}: label starts {own:.0f} px from its lung, {min(others, default=0):.0f} px from the "
        f"other; see {path}"
    )


def test_ohif_draws_each_lung_outline_of_the_sr_with_its_area_and_volume(ohif: Viewer, lung_study: LungStudy):
    assert sorted(p.side for p in lung_study.planar) == ["Left", "Right"]
    check_sr_outlines(ohif, lung_study, int(lung_study.sr.SeriesNumber), "sr")


# -- a radiograph: the classifier's report and heat-map capture ------------------------------------------
@pytest.fixture(scope="module")
def radiograph_study(orthanc, lung_study: LungStudy, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A chest radiograph phantom with an opacity, its SR and SC from the chest-xray model, in Orthanc."""
    from onnx_models.training.xray_phantom import make_xray_phantom
    from pipelines.dicom import Equipment, write_results
    from pipelines.runtime import ModelRegistry, bundled_models_dir
    from pipelines.study import run_pipeline
    from pipelines.volume import load_volume
    from tests.support.dicom import CR_IMAGE_STORAGE, radiograph_file

    out = tmp_path_factory.mktemp("radiograph")
    phantom = make_xray_phantom(np.random.default_rng(1), size=512, opacity=True)
    source = radiograph_file(out / "cr.dcm", phantom.image, "CR", CR_IMAGE_STORAGE, ViewPosition="PA",
                             BodyPartExamined="CHEST")  # fmt: skip
    result = run_pipeline(ModelRegistry(bundled_models_dir()).get("chest-xray"), load_volume([out / "cr.dcm"]))
    equipment = Equipment(manufacturer="dicom-ai-node", model_name="dicom-ai-node", software_versions="0.1.0",
                          device_uid="1.2.826.0.1.3680043.8.498.77", station_name="AINODE")  # fmt: skip
    sr, sc = write_results(result, [source], equipment, ["sr", "sc"])
    orthanc.upload(out / "cr.dcm")
    for name, ds in (("sr", sr), ("sc", sc)):
        ds.save_as(out / f"{name}.dcm")
        orthanc.upload(out / f"{name}.dcm")
    return {"study_uid": str(source.StudyInstanceUID), "sr": sr, "result": result}


def test_ohif_shows_the_classifier_report_as_a_hot_spot_box_with_its_probability(
    browser: Browser, viewer: OhifServer, radiograph_study: dict, tmp_path: Path
):
    result = radiograph_study["result"]
    with open_study(browser, viewer.study_url(radiograph_study["study_uid"]), tmp_path) as view:
        series_thumbnail(view, int(radiograph_study["sr"].SeriesNumber)).dblclick()
        label = f"Probability: {result.probability:.2f}"
        shown = lambda: label in view.viewport_text() or view.logged(OHIF_SR_CRASH)  # noqa: E731
        loaded = wait_until(shown, timeout_s=15)
        if not loaded:
            # OHIF 3.13 sometimes adds the SR's annotation (cornerstone's annotation state has it, on the right
            # image) without redrawing the viewport; its next redraw shows it. Pan the image a little (middle
            # button), as a reader would, so that it redraws; the label must then be there.
            pane = view.page.locator('[data-cy="viewport-pane"]').first.bounding_box()
            assert pane is not None
            x, y = pane["x"] + pane["width"] / 2, pane["y"] + pane["height"] * 0.8
            view.page.mouse.move(x, y)
            view.page.mouse.down(button="middle")
            view.page.mouse.move(x + 4, y, steps=4)
            view.page.mouse.up(button="middle")
            loaded = wait_until(shown)
        assert not view.logged(OHIF_SR_CRASH), f"OHIF could not load the SR: see {view.shot('crash')}"
        assert loaded, (label, view.viewport_text())
        view.page.wait_for_timeout(1000)
        path = view.shot("hot-spot")
        keep(path, "viewer-screenshot-radiograph.png")
        pixels = view.viewport_pixels()
        box = annotation_mask(pixels)
        assert box.sum() > 200, f"hot-spot box hardly drawn ({box.sum()} px), see {path}"
        assert view.viewport_text().count("Probability:") == 1, view.viewport_text()
