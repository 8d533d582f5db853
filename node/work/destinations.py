"""Where a job's results go: a route's destination names resolved to peers of the configuration.

"sender" is the peer whose AE title sent the study; any other name is a key under ``peers``. The
outbox resolves again at each attempt, so a peer added to the configuration later takes effect.
A peer with ``dicomweb`` is a STOW-RS destination: its address is shown as DICOMWEB@host:port.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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


def resolve_destinations(
    resolve: PeerResolver, names: Iterable[str], sender_ae: str | None, sender_host: str | None
) -> tuple[list[Destination], list[tuple[str, str]]]:
    """A job's destinations resolved now, and the names that could not be, each with why."""
    resolved: list[Destination] = []
    unresolved: list[tuple[str, str]] = []
    for name in names:
        try:
            resolved.append(resolve(name, sender_ae, sender_host))
        except DestinationError as exc:
            unresolved.append((name, str(exc)))
    return resolved, unresolved


#: What a job makes when none of its destinations resolves (they wait for a peer: SEG and SR, the node's own).
NO_DESTINATION_OUTPUTS = frozenset({"seg", "sr"})


def wanted_outputs(destinations: Sequence[Destination]) -> frozenset[str]:
    """The kinds of result object a job makes: those its destinations take, or SEG and SR when none resolved."""
    if not destinations:
        return NO_DESTINATION_OUTPUTS
    return frozenset().union(*(d.outputs for d in destinations))
