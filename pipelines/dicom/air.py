"""IHE AI Results (AIR) attributes, in one place: who made a result object and with which algorithm.

Every object the node writes (SEG, SR, SC) carries the same Contributing Equipment item and the same
General Equipment attributes, so a PACS, a viewer and our own router (loop prevention) can tell an AI
result from an acquisition, and which device and software version produced it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.results import ModelIdentity

#: IHE AIR's Purpose of Reference for the equipment that ran the algorithm (not in highdicom's allowed list).
PROCESSING_ALGORITHM = Code("1630", "99IHE", "Processing Algorithm")
#: CID 7162 "Artificial Intelligence" (DCM 123110), the algorithm family of every model the node runs.
AI_FAMILY = codes.DCM.ArtificialIntelligence


@dataclass(frozen=True)
class Equipment:
    """The node as DICOM equipment: written to General Equipment and Contributing Equipment of each result.

    Parameters
    ----------
    manufacturer
        Manufacturer (0008,0070), e.g. "dicom-ai-node"; also how the router recognises its own results.
    model_name
        Manufacturer's Model Name (0008,1090).
    software_versions
        Software Versions (0018,1020): the node's version.
    device_uid
        Device UID (0018,1002): identifies this node installation; configured or generated once.
    device_serial_number
        Device Serial Number (0018,1000); the SEG IOD requires a value, the device UID is used when None.
    institution_name
        Institution Name (0008,0080).
    station_name
        Station Name (0008,1010): node name or AE title; also the SR's Device Observer Name.
    """

    manufacturer: str
    model_name: str
    software_versions: str
    device_uid: str
    device_serial_number: str | None = None
    institution_name: str | None = None
    station_name: str | None = None

    @property
    def serial_number(self) -> str:
        # Device Serial Number is a 64-character LO; a UID is at most 64 characters too.
        return self.device_serial_number or self.device_uid


def _set_device_identity(ds: Dataset, equipment: Equipment) -> None:
    """The equipment attributes shared by General Equipment and a Contributing Equipment item."""
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model_name
    ds.SoftwareVersions = equipment.software_versions
    ds.DeviceSerialNumber = equipment.serial_number
    ds.DeviceUID = equipment.device_uid
    if equipment.institution_name:
        ds.InstitutionName = equipment.institution_name
    if equipment.station_name:
        ds.StationName = equipment.station_name


def contributing_equipment_item(equipment: Equipment, model: ModelIdentity) -> Dataset:
    """One Contributing Equipment Sequence item as IHE AIR asks: purpose (99IHE 1630) and device identity."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)]
    _set_device_identity(item, equipment)
    item.ContributionDescription = f"AI algorithm {model.name} {model.version}"[:1024]
    return item


def add_air_attributes(ds: Dataset, equipment: Equipment, model: ModelIdentity) -> None:
    """Append our Contributing Equipment item and General Equipment attributes to a new result object."""
    existing = list(ds.get("ContributingEquipmentSequence", []))
    ds.ContributingEquipmentSequence = [*existing, contributing_equipment_item(equipment, model)]
    _set_device_identity(ds, equipment)


def algorithm_identification(model: ModelIdentity) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence of a SEG segment: name, version, family CID 7162."""
    return hd.AlgorithmIdentificationSequence(name=model.name, version=model.version, family=AI_FAMILY)


def sr_algorithm_id(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification for SR measurement groups."""
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


def series_description(what: str, model: ModelIdentity, source_label: str = "") -> str:
    """Series Description (LO, 64 chars) saying what a result series is and of which source series.

    "AI lung segmentation (lung-seg 1.0), series 3: ThoraxRoutine 8.0.0 B40f": when several series of
    one study are analysed, each result series names its own source; the source's description is what
    gives way to the 64-character limit, never the model or the series number.
    """
    text = f"AI {what} ({model.name} {model.version})"
    return (f"{text}, {source_label}" if source_label else text)[:64]


def source_series_label(source: Dataset) -> str:
    """``series 3: ThoraxRoutine 8.0.0 B40f`` for a source series (its number and description), or ""."""
    number = source.get("SeriesNumber")
    description = " ".join(str(source.get("SeriesDescription", "") or "").split())
    if number in (None, ""):
        # Neither number nor description: the end of its UID is what tells two such series apart.
        uid = str(source.get("SeriesInstanceUID", "") or "")
        return f"series {description}" if description else (f"series ...{uid[-12:]}" if uid else "")
    return f"series {number}: {description}" if description else f"series {number}"


#: Last two digits of a result series' number, by kind: series 3's results are 391 (SEG), 392 (SR), 393 (SC).
RESULT_SERIES_SUFFIX = {"seg": 91, "sr": 92, "sc": 93}


def result_series_number(source: Dataset, kind: str) -> int:
    """Series Number of a result series: distinct per source series, so that two analysed series of one
    study do not collide, and near it in a viewer's series list (series N's results are N91-N93).

    Without a usable source Series Number (absent, or beyond what IS holds) the number is made from the
    source's Series Instance UID (K91-K93 with K from 1000 to 9999), so two such series still get
    distinct result series; without that UID either, 901-903.
    """
    suffix = RESULT_SERIES_SUFFIX[kind]
    try:
        number = int(source.get("SeriesNumber"))
        if not 0 <= number < 20_000_000:
            raise ValueError(number)
    except (TypeError, ValueError):
        uid = str(source.get("SeriesInstanceUID", "") or "")
        if not uid:
            return 900 + suffix % 10
        number = 1000 + int(hashlib.sha256(uid.encode()).hexdigest(), 16) % 9000
    return number * 100 + suffix
