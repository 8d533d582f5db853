"""Where a job's results go: a route's destination names resolved to peers of the configuration.

"sender" is the peer whose AE title sent the study; any other name is a key under ``peers``. The
outbox resolves again at each attempt, so a peer added to the configuration later takes effect.
A peer with ``dicomweb`` is a STOW-RS destination: its address is shown as DICOMWEB@host:port.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from node.config import Config, DicomWebTarget, Peer

#: The AE title shown for a DICOMweb destination in a delivery's address (ae_title, host, port).
DICOMWEB_AE_TITLE = "DICOMWEB"


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    outputs: frozenset[str]
    #: Results go by STOW-RS to this server (``ae_title``, ``host``, ``port`` only show where); None: C-STORE.
    dicomweb: DicomWebTarget | None = field(default=None, compare=False)


class DestinationError(ValueError):
    pass


PeerResolver = Callable[[str, str | None, str | None], Destination]


def make_resolver(config: Config) -> Callable[[str, str | None, str | None], Destination]:
    def resolve(name: str, sender_ae: str | None, sender_host: str | None) -> Destination:
        peer: Peer | None
        if name == "sender":
            found = config.peer_for_caller(sender_ae or "", sender_host) if sender_ae else None
            if found is None:
                raise DestinationError(
                    f"the sender {sender_ae or '?'}@{sender_host or '?'} has no entry under peers "
                    "(add its AE title, host and port to send results back)"
                )
            peer_name, peer = found
        else:
            peer = config.peers.get(name)
            if peer is None:
                raise DestinationError(f"no peer named {name!r}")
            peer_name = name
        outputs = frozenset(peer.outputs)
        if peer.dicomweb is not None:
            web = peer.dicomweb
            return Destination(peer_name, DICOMWEB_AE_TITLE, web.host, web.port, outputs, dicomweb=web)
        if peer.ae_title is None or peer.host is None or peer.port is None:  # Peer's validator refuses this
            raise DestinationError(f"peer {peer_name!r} has no DICOM address")
        return Destination(peer_name, peer.ae_title, peer.host, peer.port, outputs)

    return resolve
