"""The model contract: ``model.yaml`` beside ``model.onnx`` in a model folder.

A manifest says what the network expects (input tensor, preprocessing), what it returns
(outputs, with coded labels for DICOM-SEG / TID 1500) and which file it is (SHA-256). A folder
that follows it can be routed to without code. See docs/models.md for a worked example.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.sr.coding import Code

from pipelines.enums import Task

MANIFEST_FILE = "model.yaml"
MODEL_FILE = "model.onnx"


class ManifestError(ValueError):
    """A model.yaml that cannot be used; the message names the file, the field path and the problem."""


class OutputKind(str, Enum):
    #: Per-class probabilities: (N, classes, H, W) for segmentation, (N, 1) or (N, classes) otherwise.
    PROBABILITIES = "probabilities"
    #: Like probabilities but before softmax / sigmoid.
    LOGITS = "logits"
    #: Integer label per pixel (N, H, W) or (N, 1, H, W).
    LABELMAP = "labelmap"
    #: Class-activation map (N, 1, h, w), 0..1, at any resolution; resampled to the image grid.
    HEATMAP = "heatmap"
    #: One integer class per input (N,), e.g. an sklearn classifier's ``label`` output.
    LABEL = "label"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeTriple(_Strict):
    """A coded concept as DICOM writes it: Code Value, Coding Scheme Designator, Code Meaning."""

    value: Annotated[str, Field(min_length=1, max_length=64)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]

    @field_validator("value", mode="before")
    @classmethod
    def _code_as_text(cls, v: object) -> object:
        # YAML reads an unquoted SNOMED code such as 39607008 as an int; a code value is text.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    def to_code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class Label(_Strict):
    """One output class: a segment of a segmentation, the finding of a classifier, a category of an SVM."""

    #: Value in the label map / class index of the probability output (0 is background for segmentation).
    number: Annotated[int, Field(ge=0, le=65535)]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    #: Segmented Property Category (CID 7150) for segments; finding category otherwise.
    category: CodeTriple
    #: Segmented Property Type (CID 7151) for segments; the finding / category concept otherwise.
    type: CodeTriple
    laterality: CodeTriple | None = None
    #: Probability at or above which a classifier reports the finding as present.
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class TensorSpec(_Strict):
    name: Annotated[str, Field(min_length=1)]
    #: Axis letters, e.g. NCHW for images, NF for a feature vector.
    layout: Annotated[str, Field(pattern=r"^[NCHWDF]+$")] = "NCHW"
    #: Dimensions; -1 (or null in YAML) for a dynamic one such as the batch.
    shape: list[int | None]
    dtype: Literal["float32", "float16", "int64", "uint8"] = "float32"

    @model_validator(mode="after")
    def _layout_matches_shape(self) -> TensorSpec:
        if len(self.layout) != len(self.shape):
            raise ValueError(f"layout {self.layout!r} has {len(self.layout)} axes but shape has {len(self.shape)}")
        return self


class HuWindow(_Strict):
    """CT window mapped linearly to 0..1 (DICOM Window Center / Width semantics, in HU)."""

    center: float
    width: Annotated[float, Field(gt=0)]


class IntensityNormalisation(_Strict):
    """For images without physical units (CR, DX, MG)."""

    method: Literal["zscore", "minmax", "percentile"]
    low_percentile: Annotated[float, Field(ge=0, le=100)] = 1.0
    high_percentile: Annotated[float, Field(ge=0, le=100)] = 99.0


class Preprocessing(_Strict):
    hu_window: HuWindow | None = None
    normalisation: IntensityNormalisation | None = None
    #: Resample to this in-plane pixel spacing (row, column) in mm, then crop/pad to ``size``.
    spacing_mm: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)] | None = None
    #: Input rows, columns; without ``spacing_mm`` the whole image is resized to it.
    size: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=2, max_length=2)]
    #: Channels the network takes; a grey image is repeated into each.
    channels: Annotated[int, Field(ge=1, le=4)] = 1
    #: For task svm: names of the NumPy features (pipelines.svm.FEATURES) in the order of the input vector.
    features: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _retired_invert_monochrome1(cls, data: object) -> object:
        # Manifests written for 0.1 may carry invert_monochrome1: true, which is what the loader always
        # does (MONOCHROME1 shown as MONOCHROME2, bright = dense): accepted and dropped. false never worked.
        if isinstance(data, dict) and "invert_monochrome1" in data:
            data = dict(data)
            if data.pop("invert_monochrome1") is not True:
                raise ValueError(
                    "invert_monochrome1: only true is possible (the loader always shows MONOCHROME1 images "
                    "as MONOCHROME2, bright = dense); remove the key"
                )
        return data

    @model_validator(mode="after")
    def _one_intensity_mapping(self) -> Preprocessing:
        if self.hu_window is not None and self.normalisation is not None:
            raise ValueError("give either hu_window or normalisation, not both")
        return self


class Output(_Strict):
    name: Annotated[str, Field(min_length=1)]
    kind: OutputKind
    labels: list[Label] = []
    #: UCUM unit of the output values ("1" for probabilities).
    units: str = "1"

    @field_validator("labels")
    @classmethod
    def _unique_numbers(cls, labels: list[Label]) -> list[Label]:
        numbers = [label.number for label in labels]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"label numbers must be unique, got {numbers}")
        return labels


class Postprocessing(_Strict):
    #: Keep this many largest 3D connected components per segment (0 = keep all).
    largest_components: Annotated[int, Field(ge=0)] = 0
    #: Fill holes slice by slice (vessels inside a lung belong to the lung).
    fill_holes: bool = False


class Bounds(_Strict):
    """A closed interval ``min``..``max`` of a measured quantity (its unit is in the field's name)."""

    min: Annotated[float, Field(ge=0)]
    max: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self

    def __contains__(self, value: float) -> bool:
        return self.min <= value <= self.max

    def __str__(self) -> str:
        return f"{self.min:g}..{self.max:g}"


class InputProfile(_Strict):
    """The statistical profile of the preprocessed model input, as the training script measured it.

    Each input is reduced to the named ``features`` (:data:`pipelines.domain.IMAGE_STATISTICS` of the
    network input, or for task svm the :data:`pipelines.svm.FEATURES` the SVM takes); its Mahalanobis
    distance to the training distribution (``mean``, ``precision`` = inverse covariance) must not exceed
    ``threshold``, which the training script calibrated on held-out training-distribution inputs.
    """

    features: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    #: Model-input values mapped to 0..1 before the image statistics (e.g. a HU window); None: already 0..1.
    intensity_range: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    mean: list[float]
    precision: list[list[float]]
    threshold: Annotated[float, Field(gt=0)]
    #: How the threshold was set (data, sample counts, quantile): shown by ``ainode models check``.
    calibration: str = ""

    @model_validator(mode="after")
    def _shapes_agree(self) -> InputProfile:
        n = len(self.features)
        if len(set(self.features)) != n:
            raise ValueError(f"features must be unique, got {self.features}")
        if len(self.mean) != n:
            raise ValueError(f"mean has {len(self.mean)} values for {n} features")
        if len(self.precision) != n or any(len(row) != n for row in self.precision):
            raise ValueError(f"precision must be a {n} x {n} matrix (one row and column per feature)")
        if self.intensity_range is not None and not self.intensity_range[0] < self.intensity_range[1]:
            raise ValueError(f"intensity_range {self.intensity_range} must be increasing")
        return self


class Domain(_Strict):
    """What the model was validated on; input outside any declared bound is "not analysed".

    Every field is optional: only what is declared is checked. Header values are compared in upper
    case (DICOM Code Strings); an attribute the source does not carry is not checked (nothing was
    measured), nor is a spacing the loader could not establish.
    """

    #: DICOM Modality values; must be among the manifest's ``modalities``.
    modalities: list[Annotated[str, Field(pattern=r"^[A-Z]{2,4}$")]] | None = None
    #: Body Part Examined (0018,0015) values, e.g. CHEST.
    body_parts: list[Annotated[str, Field(min_length=1, max_length=16)]] | None = None
    #: View Position (0018,5101) values, e.g. PA, AP, CC, MLO.
    view_positions: list[Annotated[str, Field(min_length=1, max_length=16)]] | None = None
    #: Photometric Interpretation (0028,0004) values of the stored pixels.
    photometric_interpretations: list[Annotated[str, Field(min_length=1, max_length=16)]] | None = None
    #: In-plane pixel spacing (row and column), mm.
    pixel_spacing_mm: Bounds | None = None
    #: Rows and columns of the image, pixels.
    matrix: Bounds | None = None
    #: Rows x row spacing and columns x column spacing, mm.
    field_of_view_mm: Bounds | None = None
    profile: InputProfile | None = None

    @field_validator("modalities", "body_parts", "view_positions", "photometric_interpretations")
    @classmethod
    def _upper_case(cls, values: list[str] | None) -> list[str] | None:
        return None if values is None else [v.strip().upper() for v in values]


class ModelManifest(_Strict):
    """Everything the node needs to know about a model folder."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    version: Annotated[str, Field(min_length=1, max_length=16)]
    task: Task
    #: DICOM Modality values the model accepts (e.g. CT; CR, DX; MG).
    modalities: Annotated[list[Annotated[str, Field(pattern=r"^[A-Z]{2,4}$")]], Field(min_length=1)]
    description: str = ""
    input: TensorSpec
    preprocessing: Preprocessing
    outputs: Annotated[list[Output], Field(min_length=1)]
    postprocessing: Postprocessing = Postprocessing()
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    #: Slices (or images) per inference call; None lets the pipeline choose.
    batch_size: Annotated[int, Field(ge=1, le=1024)] | None = None
    #: What the model was validated on (pipelines.domain); a manifest without it is not checked, as before.
    domain: Domain | None = None

    @model_validator(mode="after")
    def _domain_within_modalities(self) -> ModelManifest:
        if self.domain is not None and self.domain.modalities is not None:
            extra = [m for m in self.domain.modalities if m not in self.modalities]
            if extra:
                raise ValueError(f"domain.modalities {extra} are not among the model's modalities {self.modalities}")
        return self

    @model_validator(mode="after")
    def _task_needs(self) -> ModelManifest:
        kinds = [o.kind for o in self.outputs]
        if self.task is Task.SEGMENTATION:
            if kinds[0] not in (OutputKind.PROBABILITIES, OutputKind.LOGITS, OutputKind.LABELMAP):
                raise ValueError("a segmentation model's first output must be probabilities, logits or labelmap")
            if not self.outputs[0].labels or any(label.number == 0 for label in self.outputs[0].labels):
                raise ValueError("a segmentation output needs labels numbered from 1 (0 is background)")
        elif self.task is Task.CLASSIFICATION:
            if kinds[0] not in (OutputKind.PROBABILITIES, OutputKind.LOGITS) or not self.outputs[0].labels:
                raise ValueError("a classification model's first output must be probabilities with labels")
        elif self.task is Task.SVM:
            if not self.preprocessing.features:
                raise ValueError("an svm model needs preprocessing.features")
            if not any(o.labels for o in self.outputs):
                raise ValueError("an svm model needs an output with the category labels")
        return self

    @property
    def segment_labels(self) -> list[Label]:
        return list(self.outputs[0].labels)


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.startswith("function-") or item in ("int", "float", "str", "list[...]", "constrained-int"):
            continue  # pydantic's union-branch markers say nothing to a model author
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"


def parse_manifest(data: object, source: str = MANIFEST_FILE) -> ModelManifest:
    """Validate an already-parsed manifest; errors name ``source`` and the field path."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a mapping of manifest fields, got {type(data).__name__}")
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = _field_path(tuple(err["loc"]))
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{source}: {path}: {message}")
        raise ManifestError("\n".join(dict.fromkeys(problems))) from None


def load_manifest(model_dir: Path) -> ModelManifest:
    """Read and validate ``model_dir/model.yaml``.

    Raises
    ------
    ManifestError
        When the file is missing, is not YAML, or a field is missing or wrong; the message reads
        ``<dir>/model.yaml: preprocessing.hu_window.center: Input should be a valid number``.
    """
    path = Path(model_dir) / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    return parse_manifest(data, str(path))
