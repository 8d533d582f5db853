"""What a result inherits from its source, made valid whatever the source carries.

highdicom copies the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial
Study modules (and Specimen, for a SEG) from the first source dataset as they are, and turns the
source's General Equipment into a Contributing Equipment item. Modalities and archives put broken
values there (an anonymiser's Referenced Study Sequence item without its SOP Class, ISO dates,
over-long IDs, six-component names), and our objects must still be valid. So a header copy is cleaned
before a writer sees it, by the attribute types of PS3.3 and the value rules of PS3.5 6.2:

- an element the module does not define at that place (private ones included) is dropped;
- an invalid Type 3 attribute is dropped, an invalid Type 2 one emptied, a missing Type 2 one added empty;
- a sequence item that lacks a Type 1 attribute, or has an invalid Type 1 or 1C one, is dropped;
- an optional module whose Type 1 attribute is missing or invalid is dropped whole;
- an invalid Type 1 attribute of a mandatory module (Study Instance UID) cannot be repaired without inventing
  an identifier: it raises :class:`ValueError`;
- the text keeps a Specific Character Set that the writers accept and that matches its bytes.

Each repair is a :class:`Repair` that names the attribute and why, never its value: values identify
the patient.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cache

from highdicom._standard_utils import get_module_attribute_map
from highdicom.valuerep import _check_specific_character_set
from pydicom import config
from pydicom.charset import convert_encodings, decode_bytes, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DA, DT, IS, MAX_VALUE_LEN, TEXT_VR_DELIMS, TM, PersonName, validate_value

Element = DataElement | RawDataElement


class AttributeType(str, Enum):
    """PS3.5 7.4: whether an attribute must be present, and whether it may be empty."""

    REQUIRED = "1"
    CONDITIONALLY_REQUIRED = "1C"
    REQUIRED_EMPTY_IF_UNKNOWN = "2"
    CONDITIONALLY_REQUIRED_EMPTY_IF_UNKNOWN = "2C"
    OPTIONAL = "3"

    @property
    def needs_value(self) -> bool:
        return self in (AttributeType.REQUIRED, AttributeType.CONDITIONALLY_REQUIRED)

    @property
    def may_be_empty(self) -> bool:
        return self in (AttributeType.REQUIRED_EMPTY_IF_UNKNOWN, AttributeType.CONDITIONALLY_REQUIRED_EMPTY_IF_UNKNOWN)


class RepairAction(str, Enum):
    DROPPED = "dropped"
    EMPTIED = "emptied"
    ITEM_DROPPED = "item dropped"
    MODULE_DROPPED = "module dropped"
    NORMALISED = "normalised"
    RE_ENCODED = "re-encoded"


@dataclass(frozen=True)
class Repair:
    """One change to what a result inherits: the attribute (keywords, 1-based item numbers), what and why.

    ``path`` and ``reason`` never hold a value of the source.
    """

    path: str
    action: RepairAction
    reason: str

    def __str__(self) -> str:
        return f"{self.path} {self.action.value}: {self.reason}"


@dataclass(frozen=True)
class Attribute:
    """An attribute as a module defines it at one place: its type, and for a sequence what its items hold."""

    keyword: str
    tag: BaseTag
    type: AttributeType
    items: Mapping[BaseTag, Attribute]


@dataclass(frozen=True)
class Module:
    key: str
    mandatory: bool
    attributes: Mapping[BaseTag, Attribute]


#: The modules a result inherits, with their usage in the SEG, Comprehensive 3D SR and SC IODs (PS3.3 A.51,
#: A.35.13, A.8.1): those of the Patient and Study entities, the Specimen module (highdicom's SEG copies it)
#: and General Equipment (the source's equipment becomes the result's Contributing Equipment item).
INHERITED_MODULES: tuple[tuple[str, bool], ...] = (
    ("patient", True),
    ("clinical-trial-subject", False),
    ("general-study", True),
    ("patient-study", False),
    ("clinical-trial-study", False),
    ("general-equipment", True),
    ("specimen", False),
)

#: Enumerated Values (PS3.3) of the inherited attributes; dciodvfy and highdicom (Patient's Sex) refuse others.
ENUMERATED_VALUES: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),  # C.7.1.1
    "QualityControlSubject": frozenset({"YES", "NO"}),  # C.7.1.1
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),  # C.7.1.1
    "TypeOfPatientID": frozenset({"TEXT", "RFID", "BARCODE"}),  # C.7.1.1
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),  # C.7.2.2
    "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),  # C.7.2.2
    "PregnancyStatus": frozenset({"1", "2", "3", "4"}),  # C.7.2.2 (US 0001H-0004H)
    "ConsentForDistributionFlag": frozenset({"YES", "NO", "WITHDRAWN"}),  # C.7.2.3
    "DistributionType": frozenset({"NAMED_PROTOCOL", "RESTRICTED_REUSE", "PUBLIC_RELEASE"}),  # C.7.2.3
    "UniversalEntityIDType": frozenset({"DNS", "EUI64", "ISO", "URI", "UUID", "X400", "X500"}),  # Table 10-17
    "ContextGroupExtensionFlag": frozenset({"Y", "N"}),  # Table 8.8-1a
}

#: PS3.5 6.1.2.3: the VRs whose text is encoded in the Specific Character Set (the others are ASCII).
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_STRING_VRS = CHARSET_VRS | {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}
#: VRs whose value is one string, backslash included (PS3.5 6.2).
_SINGLE_VALUED_VRS = frozenset({"LT", "ST", "UT", "UR"})
_BINARY_SIZES = {"AT": 4, "FL": 4, "FD": 8, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8, "US or SS": 2}
#: PS3.5 6.1.3: control characters a value may hold: ESC (ISO 2022) everywhere, and in text VRs TAB, LF, FF, CR.
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
#: A DT value may hold "-" only as the sign of its UTC offset; elsewhere it makes a range (query only, PS3.4 C.2.2.2.5).
_DT_SINGLE = re.compile(r"[^-]*([+-]\d{4})?")
#: PS3.3 C.12.1.1.2: the character set a result declares when the source's own cannot be kept.
UTF8 = "ISO_IR 192"
_DEFAULT_REPERTOIRE = ({"ISO_IR 6"}, {"ISO 2022 IR 6"})


_EMPTY = "is empty"


class _Unreadable(ValueError):
    """The bytes of an element cannot be read as its VR."""


@cache
def inherited_modules() -> tuple[Module, ...]:
    """The :data:`INHERITED_MODULES` as attribute trees, from the tables of the standard that highdicom copies by."""
    tables = get_module_attribute_map()
    modules = []
    for key, mandatory in INHERITED_MODULES:
        root: dict[str, dict] = {}
        for row in tables[key]:
            level = root
            for keyword in row["path"]:
                level = level[keyword]["items"]
            level[row["keyword"]] = {"type": row["type"], "items": {}}
        modules.append(Module(key, mandatory, _freeze(root)))
    return tuple(modules)


def _freeze(level: dict[str, dict]) -> dict[BaseTag, Attribute]:
    out = {}
    for keyword, row in level.items():
        tag = tag_for_keyword(keyword)
        if tag is not None:  # an attribute newer than pydicom's dictionary cannot be in a dataset it read
            out[Tag(tag)] = Attribute(keyword, Tag(tag), AttributeType(row["type"]), _freeze(row["items"]))
    return out


# -- values ------------------------------------------------------------------------------------------------
def _vr(elem: Element) -> str:
    """The VR an element's value is to be read as: its own, or the dictionary's for implicit VR and UN."""
    own = str(elem.VR) if elem.VR else ""
    return own if own not in ("", "UN") else _dictionary_vr_or(elem.tag, "UN")


def _strings(raw: bytes, vr: str, encodings: list[str]) -> list[str]:
    text = decode_bytes(raw, encodings, TEXT_VR_DELIMS) if vr in CHARSET_VRS else raw.decode("latin-1")
    if vr in _SINGLE_VALUED_VRS:
        return [text.rstrip(" \x00")] if text.rstrip(" \x00") else []
    values = [v.rstrip(" \x00") for v in text.split("\\")]
    return [] if values == [""] else values


def _values_of(elem: Element, encodings: list[str]) -> list[object]:
    """The values of ``elem`` as PS3.5 sees them: decoded strings for string VRs, without converting ``elem``.

    Raises
    ------
    ValueError
        The bytes of a binary element do not make whole values.
    """
    vr = _vr(elem)
    value = elem.value
    if isinstance(elem, RawDataElement):
        data = value or b""
        if vr in _STRING_VRS:
            return list(_strings(data, vr, encodings))
        if vr in _BINARY_SIZES:
            if len(data) % _BINARY_SIZES[vr]:
                raise _Unreadable(f"its length is not a multiple of {_BINARY_SIZES[vr]} bytes")
            try:
                value = convert_raw_data_element(elem, encoding=encodings).value  # numbers: nothing to log
            except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
                raise _Unreadable(f"its bytes do not make {vr} values") from exc
        else:
            return [data] if data else []
    if value is None or value == "" or value == b"":
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if vr not in _STRING_VRS:
        return items
    return [_text(v) for v in items]


def _text(value: object) -> str:
    if isinstance(value, PersonName):
        return str(value)
    original = getattr(value, "original_string", None)  # DS, IS, DA, TM, DT keep the string they were read from
    return original if isinstance(original, str) else str(value)


def value_problem(vr: str, value: object) -> str | None:
    """Why ``value`` is not a valid ``vr`` value (PS3.5 6.2), or None; the answer never quotes the value."""
    if value is None:
        return None
    if isinstance(value, str) and vr in MAX_VALUE_LEN and len(value) > MAX_VALUE_LEN[vr]:
        return f"longer than the {MAX_VALUE_LEN[vr]} characters of {vr}"
    try:
        validate_value(vr, value, config.RAISE)  # type, length, pydicom's repertoire expressions
    except ValueError:
        return f"not a valid {vr} value"
    if not isinstance(value, str):
        return None
    return _STRING_CHECKS[vr](value) if vr in _STRING_CHECKS else None


def _single_date_time(vr: str, value: str) -> str | None:
    # The expressions allow ranges (a query form); a stored value must be one date or time that exists.
    kind = {"DA": DA, "TM": TM, "DT": DT}[vr]
    try:
        kind(value, validation_mode=config.IGNORE)
    except (ValueError, OverflowError):
        return f"not a {'date' if vr == 'DA' else 'time' if vr == 'TM' else 'date and time'} that exists"
    if "-" in value and (vr != "DT" or not _DT_SINGLE.fullmatch(value)):
        return "a range, not a value"
    return None


def _integer(value: str) -> str | None:
    return None if abs(int(IS(value, validation_mode=config.IGNORE))) <= 2**31 - 1 else "outside the range of IS"


def _person_name(value: str) -> str | None:
    if _CONTROL.search(value):
        return "holds a control character"
    if any(group.count("^") > 4 for group in value.split("=")):
        return "more than 5 components in a component group"
    return None


def _short_text(value: str) -> str | None:
    return "holds a control character" if _CONTROL.search(value) else None


def _long_text(value: str) -> str | None:
    return "holds a control character" if _TEXT_CONTROL.search(value) else None


_STRING_CHECKS = {
    "DA": lambda v: _single_date_time("DA", v),
    "TM": lambda v: _single_date_time("TM", v),
    "DT": lambda v: _single_date_time("DT", v),
    "IS": _integer,
    "PN": _person_name,
    "LO": _short_text,
    "SH": _short_text,
    "UC": _short_text,
    "LT": _long_text,
    "ST": _long_text,
    "UT": _long_text,
}


def _multiplicity_allows(vm: str, count: int) -> bool:
    """Whether ``count`` values fit a dictionary VM such as "1", "2", "1-3", "1-n", "2-2n"."""
    low, _, high = vm.partition("-")
    try:
        if not high:
            return count == int(low)
        if high.endswith("n"):
            step = int(high[:-1] or 1)
            return count >= int(low) and count % step == 0
        return int(low) <= count <= int(high)
    except ValueError:
        return True  # a VM this reading does not know ("1-n or 1"): pydicom's dictionary is the judge elsewhere


def _element_problem(elem: Element, encodings: list[str], context: _Context | None = None) -> str | None:
    """Why a non-sequence element is not valid for its tag: its VR, multiplicity, values, enumerated values."""
    vr = _vr(elem)
    known = _dictionary_vr_or(elem.tag, vr)
    if vr != known and known != "UN" and vr not in known.split(" or "):
        return f"has VR {vr} where the standard has {known}"
    try:
        values = _values_of(elem, encodings)
    except (ValueError, UnicodeError) as exc:
        return f"cannot be read as {vr}" + (f": {exc}" if isinstance(exc, _Unreadable) else "")
    if values and not _multiplicity_allows(_dictionary_vm_or(elem.tag, "1-n"), len(values)):
        return f"has {len(values)} values where the standard allows {_dictionary_vm_or(elem.tag, '1-n')}"
    for number, value in enumerate(values, 1):
        problem = value_problem(vr, value)
        if problem:
            return f"value {number} {problem}" if len(values) > 1 else problem
    allowed = ENUMERATED_VALUES.get(keyword_for_tag(elem.tag))
    if allowed is not None and any(str(v) not in allowed for v in values if v is not None):
        return "not one of its enumerated values"
    if context is not None and vr in CHARSET_VRS and any(isinstance(v, str) and not v.isascii() for v in values):
        context.non_ascii = True  # kept text that the default repertoire cannot hold
    return None


def _dictionary_vr_or(tag: BaseTag | int, default: str) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return default


def _dictionary_vm_or(tag: BaseTag | int, default: str) -> str:
    try:
        return str(dictionary_VM(tag))
    except KeyError:
        return default


# -- elements and items ----------------------------------------------------------------------------------------
@dataclass
class _Context:
    """What cleaning one dataset needs to know and learns: its text encodings, and whether its text is ASCII."""

    encodings: list[str]
    non_ascii: bool = False


def _empty(tag: BaseTag, vr: str) -> DataElement:
    vr = vr.split(" or ")[0]  # an empty value reads the same in either of an ambiguous VR's choices
    if vr == "SQ":
        return DataElement(tag, "SQ", Sequence())
    return DataElement(tag, vr, "" if vr in _STRING_VRS else None, validation_mode=config.IGNORE)


def _converted(elem: Element, context: _Context) -> DataElement:
    """A valid element as a DataElement, its text decoded with the source's encodings.

    The cleaned sequence items are new datasets without the source's character set: raw text in them would
    later be read with the wrong one.
    """
    if isinstance(elem, DataElement):
        return elem
    return convert_raw_data_element(elem, encoding=context.encodings)


def _sequence_items(elem: Element, context: _Context) -> list[Dataset]:
    sequence = elem.value if isinstance(elem, DataElement) else _converted(elem, context).value
    return list(sequence or [])


def _clean_sequence(
    elem: Element, attribute: Attribute, context: _Context, path: str
) -> tuple[DataElement, str | None, list[Repair]]:
    """A new sequence element of the valid items of ``elem``, why it is unusable (None if usable) and the repairs."""
    repairs: list[Repair] = []
    kept: list[Dataset] = []
    items = _sequence_items(elem, context)
    for number, item in enumerate(items, 1):
        cleaned, problem, inner = _clean_item(item, attribute.items, context, f"{path}[{number}]")
        if cleaned is None:
            repairs.append(Repair(f"{path}[{number}]", RepairAction.ITEM_DROPPED, str(problem)))
        else:
            kept.append(cleaned)
            repairs += inner
    new = DataElement(elem.tag, "SQ", Sequence(kept))
    if not kept and (items or attribute.type.needs_value):
        return new, "no valid item" if items else "has no item", repairs
    return new, None, repairs


def _clean_item(
    item: Dataset, tree: Mapping[BaseTag, Attribute], context: _Context, path: str
) -> tuple[Dataset | None, str | None, list[Repair]]:
    """A new item with what ``tree`` defines, valid; or None and why the item cannot be kept."""
    new = Dataset()
    repairs: list[Repair] = []
    for elem in item.elements():
        attribute = tree.get(elem.tag)
        if attribute is None:
            private = Tag(elem.tag).is_private
            name = (not private and keyword_for_tag(elem.tag)) or str(Tag(elem.tag))
            repairs.append(Repair(f"{path}.{name}", RepairAction.DROPPED, "private" if private else "not defined here"))
            continue
        where = f"{path}.{attribute.keyword}"
        cleaned, problem, inner = _clean_element(elem, attribute, context, where)
        repairs += inner
        if problem is None:
            new[attribute.tag] = cleaned
        elif attribute.type is AttributeType.CONDITIONALLY_REQUIRED and problem == _EMPTY:
            # Absent is right where the condition does not hold; present and empty is wrong either way.
            repairs.append(Repair(where, RepairAction.DROPPED, "Type 1C, is empty"))
        elif attribute.type.needs_value:
            return None, f"{attribute.keyword} (Type {attribute.type.value}) {problem}", []
        elif attribute.type.may_be_empty:
            new[attribute.tag] = _empty(attribute.tag, _vr(elem))
            repairs.append(Repair(where, RepairAction.EMPTIED, f"Type {attribute.type.value}, {problem}"))
        else:
            repairs.append(Repair(where, RepairAction.DROPPED, f"Type 3, {problem}"))
    kept = new.keys()
    for attribute in tree.values():
        if attribute.tag in kept:
            continue
        if attribute.type is AttributeType.REQUIRED:
            return None, f"{attribute.keyword} (Type 1) is missing", []
        if attribute.type is AttributeType.REQUIRED_EMPTY_IF_UNKNOWN:
            new[attribute.tag] = _empty(attribute.tag, _dictionary_vr_or(attribute.tag, "UN"))
    problem = _macro_problem(new, tree)
    if problem:
        return None, problem, []
    return new, None, repairs


_CODE_ITEM = frozenset(Tag(k) for k in ("CodeValue", "LongCodeValue", "URNCodeValue", "CodeMeaning"))
_ISSUER_ITEM = frozenset(Tag(k) for k in ("LocalNamespaceEntityID", "UniversalEntityID", "UniversalEntityIDType"))


def _macro_problem(item: Dataset, tree: Mapping[BaseTag, Attribute]) -> str | None:
    """The conditions of the macros these modules use, which the tables only mark "1C"."""
    if _CODE_ITEM <= tree.keys():
        # PS3.3 Table 8.8-1a: exactly one of the three code values; a scheme unless it is a URN.
        present = [k for k in ("CodeValue", "LongCodeValue", "URNCodeValue") if k in item]
        if len(present) != 1:
            return "a code item needs exactly one of Code Value, Long Code Value and URN Code Value"
        if "URNCodeValue" not in item and "CodingSchemeDesignator" not in item:
            return "CodingSchemeDesignator (Type 1C) is missing"
    if _ISSUER_ITEM <= tree.keys():
        # PS3.3 Table 10-17 (HL7v2 Hierarchic Designator): a local or a universal ID, the latter with its type.
        if "LocalNamespaceEntityID" not in item and "UniversalEntityID" not in item:
            return "an issuer needs a Local Namespace Entity ID or a Universal Entity ID"
        if ("UniversalEntityID" in item) != ("UniversalEntityIDType" in item):
            return "UniversalEntityIDType (Type 1C) goes with UniversalEntityID"
    return None


def _clean_element(
    elem: Element, attribute: Attribute, context: _Context, path: str
) -> tuple[DataElement, str | None, list[Repair]]:
    """The element to keep, why it is not valid as it is (None when valid), and the repairs made inside it."""
    if _vr(elem) == "SQ":
        return _clean_sequence(elem, attribute, context, path)
    problem = _element_problem(elem, context.encodings, context)
    if problem is None and attribute.type.needs_value and not _values_of(elem, context.encodings):
        problem = _EMPTY
    return (_converted(elem, context) if problem is None else _empty(attribute.tag, _vr(elem))), problem, []


# -- the dataset -------------------------------------------------------------------------------------------------
def clean_inherited(ds: Dataset) -> list[Repair]:
    """Make what a result inherits from ``ds`` valid, in place, and say what was changed.

    ``ds`` is a header copy that shares its elements with a source dataset: elements are replaced, never
    modified, so the source and its sequence items stay as they were. Private elements go too: no result
    module defines one.

    Raises
    ------
    ValueError
        The Study Instance UID is missing or invalid: a result inherits it, and none can be made up.
    """
    context = _Context(_source_encodings(ds))
    repairs = drop_private(ds)
    for module in inherited_modules():
        repairs += _clean_module(ds, module, context)
    repairs += _settle_character_set(ds, context)
    return repairs


def drop_private(ds: Dataset) -> list[Repair]:
    """Remove the private elements of ``ds`` (no result module defines one), saying how many."""
    private = [tag for tag in ds.keys() if tag.is_private]
    for tag in private:
        del ds[tag]
    if not private:
        return []
    return [Repair(f"{len(private)} private elements", RepairAction.DROPPED, "no module defines them")]


def _present(ds: Dataset, module: Module) -> list[Attribute]:
    present = ds.keys()  # a view of the tags: no conversion per lookup
    return [attribute for tag, attribute in module.attributes.items() if tag in present]


def _clean_module(ds: Dataset, module: Module, context: _Context) -> list[Repair]:
    repairs: list[Repair] = []
    present = _present(ds, module)
    if not present and not module.mandatory:
        return []
    broken: list[str] = []  # why the module cannot be kept, for an optional one
    for attribute in present:
        tag, keyword = attribute.tag, attribute.keyword
        elem = ds.get_item(tag)
        cleaned, problem, inner = _clean_element(elem, attribute, context, keyword)
        repairs += inner
        if problem is None:
            ds[tag] = cleaned
        elif attribute.type is AttributeType.REQUIRED and module.mandatory:
            # Study Instance UID: the writers would put the result in a study of that invalid UID (highdicom does
            # not refuse it), and a new one would put it in no study of the patient's.
            raise ValueError(
                f"source {keyword} (Type 1 of the {module.key} module) {problem}: a result inherits it as it is, "
                "and no valid value can be made up for it"
            )
        elif attribute.type is AttributeType.REQUIRED:
            broken.append(f"{keyword} (Type 1) {problem}")
        elif attribute.type.may_be_empty:
            ds[tag] = _empty(tag, _vr(elem))
            repairs.append(Repair(keyword, RepairAction.EMPTIED, f"Type {attribute.type.value}, {problem}"))
        else:
            del ds[tag]
            repairs.append(Repair(keyword, RepairAction.DROPPED, f"Type {attribute.type.value}, {problem}"))
    tags = ds.keys()
    for attribute in module.attributes.values():
        if attribute.tag in tags:
            continue
        if attribute.type is AttributeType.REQUIRED and not module.mandatory:
            broken.append(f"{attribute.keyword} (Type 1) is missing")
        elif attribute.type is AttributeType.REQUIRED_EMPTY_IF_UNKNOWN:
            ds[attribute.tag] = _empty(attribute.tag, _dictionary_vr_or(attribute.tag, "UN"))
    if broken:
        for attribute in _present(ds, module):
            del ds[attribute.tag]
        repairs = [Repair(module.key, RepairAction.MODULE_DROPPED, "; ".join(broken))]
    return repairs


# -- character set -----------------------------------------------------------------------------------------------
def _source_terms(ds: Dataset) -> list[str]:
    if "SpecificCharacterSet" not in ds:
        return []
    return [str(v).strip() for v in _values_of(ds.get_item(Tag("SpecificCharacterSet")), [])]


def _source_encodings(ds: Dataset) -> list[str]:
    """The Python codecs pydicom reads the source's text with (its spelling fixes and fallbacks included)."""
    terms = _source_terms(ds)
    return convert_encodings(terms if len(terms) > 1 else (terms[0] if terms else None))


def _declared_terms(terms: list[str]) -> list[str]:
    """The source's Specific Character Set in the form the writers accept, the same character set."""
    if not any(terms):
        return []
    if len(terms) > 1 and not terms[0]:
        return ["ISO 2022 IR 6", *terms[1:]]  # PS3.3 C.12.1.1.2: an empty value 1 is ISO 2022 IR 6
    if set(terms) in _DEFAULT_REPERTOIRE:
        return []  # the default repertoire, which the writers want written as no Specific Character Set
    return terms


def _writers_accept(terms: list[str]) -> bool:
    if not all(term in python_encoding for term in terms):
        return False
    try:
        _check_specific_character_set(terms[0] if len(terms) == 1 else terms)  # what the writers run on it
    except ValueError:
        return False
    return True


def _settle_character_set(ds: Dataset, context: _Context) -> list[Repair]:
    """A Specific Character Set the writers accept that matches the text's bytes; re-encode as UTF-8 if need be."""
    terms = _source_terms(ds)
    declared = _declared_terms(terms)
    # ISO 2022 code extensions (Japanese, Korean: "ISO 2022 IR 87", "ISO 2022 IR 149") are valid, but DCMTK's SR
    # tools and many viewers cannot read them: non-ASCII text in them is written as UTF-8, the same text.
    extended = context.non_ascii and any(t.startswith("ISO 2022") and t != "ISO 2022 IR 6" for t in declared)
    if not extended and ((declared and _writers_accept(declared)) or (not declared and not context.non_ascii)):
        if declared == terms:
            return []
        if declared:
            _declare(ds, declared)
        else:
            del ds.SpecificCharacterSet
        return [Repair("SpecificCharacterSet", RepairAction.NORMALISED, "written as the writers accept it")]
    # Text whose character set the writers refuse, or non-ASCII text without one: decode it as pydicom reads
    # the source and declare UTF-8, which holds any of it.
    _re_encode(ds, context, inherited=inherited_tags())
    _declare(ds, [UTF8])
    why = (
        ("uses ISO 2022 code extensions" if extended else "not one the writers accept")
        if declared
        else ("absent, and the text is not ASCII")
    )
    return [Repair("SpecificCharacterSet", RepairAction.RE_ENCODED, f"the source's is {why}; text written as {UTF8}")]


def _declare(ds: Dataset, terms: list[str]) -> None:
    # A new element: setting the attribute would change the element the copy shares with its source.
    tag = Tag("SpecificCharacterSet")
    ds[tag] = DataElement(tag, "CS", terms if len(terms) > 1 else terms[0])


@cache
def inherited_tags() -> frozenset[BaseTag]:
    """The tags of every inherited module's top-level attributes."""
    return frozenset(tag for module in inherited_modules() for tag in module.attributes)


def _element_key(elem: Element) -> tuple[object, ...]:
    if isinstance(elem, RawDataElement):
        if elem.value is None and elem.length:  # read later from the file (a deferred read): equal to nothing
            return (elem.tag, object())
        return (elem.tag, elem.VR, elem.value, elem.is_little_endian, elem.is_implicit_VR)
    if elem.VR == "SQ":
        return (elem.tag, "SQ", tuple(tuple(_element_key(i.get_item(t)) for t in i.keys()) for i in elem.value or []))
    return (elem.tag, elem.VR, repr(elem.value))


def inherited_key(ds: Dataset) -> tuple[object, ...]:
    """Everything :func:`clean_inherited` reads from ``ds`` but the private elements it drops, as a hashable value.

    Two datasets with equal keys are cleaned alike, except when the text is re-encoded (RE_ENCODED), which also
    rewrites the other text elements: a caller that reuses one cleaning for others must not reuse that one.
    """
    present = ds.keys()
    return tuple(_element_key(ds.get_item(t)) for t in key_tags() if t in present)


@cache
def key_tags() -> tuple[BaseTag, ...]:
    """The tags :func:`inherited_key` reads, in order: the inherited ones and Specific Character Set."""
    return tuple(sorted({*inherited_tags(), Tag("SpecificCharacterSet")}))


def _re_encode(ds: Dataset, context: _Context, inherited: frozenset[BaseTag] | None) -> None:
    """Replace every text element by one holding its decoded text, encoded again in the result's character set.

    Person names read from a file keep their original bytes, which a writer copying the name would write
    again under the new character set. Only the items of inherited sequences are ours to change (``inherited``
    None: all of them); the others are the source's.
    """
    for elem in list(ds.elements()):
        vr = _vr(elem)
        if vr in CHARSET_VRS:
            values = _values_of(elem, context.encodings)
            value: object = values if len(values) > 1 else (values[0] if values else "")
            ds[elem.tag] = DataElement(elem.tag, vr, value, validation_mode=config.IGNORE)
        elif vr == "SQ" and isinstance(elem, DataElement) and (inherited is None or elem.tag in inherited):
            for item in elem.value or []:
                _re_encode(item, context, None)
