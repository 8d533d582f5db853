"""Who the node is in the DICOM objects it writes: manufacturer and Device UID.

One small module that the router (loop prevention), the result writers' equipment and the start-up
log all read, so that none of them imports the wiring in ``node.app``.
"""

from __future__ import annotations

import socket

from pydicom.uid import generate_uid

from node.config import Config

MANUFACTURER = "dicom-ai-node"


def device_uid(config: Config) -> str:
    """The node's Device UID: configured, or derived from its AE title and host name.

    Derived deterministically so that it survives restarts (loop prevention and AIR's
    Contributing Equipment rely on it) without a state file.
    """
    if config.node.device_uid:
        return config.node.device_uid
    return generate_uid(entropy_srcs=["dicom-ai-node device", config.node.ae_title, socket.gethostname()])
