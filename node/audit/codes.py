"""The coded values and enumerations of DICOM audit messages (PS3.15 A.5.1, PS3.16 CID 400-405).

Codes are written once here and used by name (``EventID.INSTANCES_TRANSFERRED``), as pydicom names
its UIDs; the schema's enumerated attribute values are enums.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    """A coded value of the audit schema (``CodedValueType``): csd-code, codeSystemName and originalText.

    originalText is the code's meaning (DICOM "Code Meaning"); the schema requires all three.
    """

    code: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("code", "scheme", "meaning"):
            if not getattr(self, name):
                raise ValueError(f"a coded value needs a non-empty {name}")


class EventID:
    """EventID (CID 400 Audit Event ID): what kind of event a message records."""

    APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
    INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
    SECURITY_ALERT = Code("110113", "DCM", "Security Alert")


class EventType:
    """EventTypeCode: DCM codes (CID 401-404), and this node's own ones (coding scheme "99AINODE")."""

    NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
    APPLICATION_START = Code("110120", "DCM", "Application Start")
    APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
    #: Operator actions that make the node read a study again or send its results again.
    JOB_RETRY = Code("JOB-RETRY", "99AINODE", "Analysis run again by an operator")
    STUDY_REPROCESS = Code("STUDY-REPROCESS", "99AINODE", "Study analysed again by an operator")
    RESULTS_RESEND = Code("RESULTS-RESEND", "99AINODE", "Results sent again by an operator")


class RoleID:
    """RoleIDCode of an active participant (CID 402)."""

    APPLICATION = Code("110150", "DCM", "Application")
    APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
    DESTINATION = Code("110152", "DCM", "Destination Role ID")
    SOURCE = Code("110153", "DCM", "Source Role ID")


class ObjectIDType:
    """ParticipantObjectIDTypeCode: what a participant object's ID is (A.5.1.2.4, CID 404)."""

    PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
    STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
    NODE_ID = Code("110182", "DCM", "Node ID")


#: AuditSourceTypeCode 4, "Application Server process tier in a multi-tier system" (A.5.1.2.1).
APPLICATION_SERVER_PROCESS = "4"


class EventAction(str, enum.Enum):
    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class EventOutcome(str, enum.Enum):
    SUCCESS = "0"
    #: Action restarted, e.g. some instances of an association refused.
    MINOR_FAILURE = "4"
    #: Action terminated, e.g. a result not delivered.
    SERIOUS_FAILURE = "8"
    MAJOR_FAILURE = "12"


class NetworkAccessPointType(str, enum.Enum):
    MACHINE_NAME = "1"
    IP_ADDRESS = "2"


class ObjectType(str, enum.Enum):
    PERSON = "1"
    SYSTEM_OBJECT = "2"


class ObjectRole(str, enum.Enum):
    """ParticipantObjectTypeCodeRole (A.5.1.2.2): a study is a "Report", its patient a "Patient"."""

    PATIENT = "1"
    REPORT = "3"
    SECURITY_RESOURCE = "13"
