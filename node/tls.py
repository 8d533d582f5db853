"""DICOM TLS (PS3.15 B.9, BCP 195): the node's TLS contexts, built once from ``node.tls`` and swapped on SIGHUP.

One context serves the TLS listener, one the outgoing associations to peers with ``tls: true``
(it verifies the peer against ``ca_file`` and presents the node's certificate). Both follow the
BCP 195 profiles of PS3.15 B.9: TLS 1.2 or later, forward-secret AEAD cipher suites only.
A context is never changed once made: a reload makes new ones for new connections, and a
connection keeps the context it was made with.
"""

from __future__ import annotations

import selectors
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from node.config import ApiSettings, Config, ConfigError, TLSSettings

#: TLS 1.2 suites of BCP 195 (RFC 9325 4.2): ephemeral key exchange and AEAD only. TLS 1.3 suites are
#: all of that kind. The exclusions keep weak suites out whatever a future OpenSSL adds to the groups.
BCP195_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!EXPORT:!DES:!RC4:!MD5:!3DES:!PSK:!SRP"
)


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    # Compression (CRIME) and renegotiation (a client-driven CPU drain) are off, as BCP 195 advises.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def _readable(key: str, path: Path, where: str) -> str:
    """The file's text, or ConfigError naming the key (``node.tls.cert_file``) and the file."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"{where}: {key}: {path.absolute()}: no such file") from None
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
        raise ConfigError(f"{where}: {key}: cannot read {path.absolute()}: {why}") from None


def _load_certificate(context: ssl.SSLContext, cert_file: Path, key_file: Path, where: str, section: str) -> None:
    """The certificate chain and its key into ``context``; ConfigError naming ``section``'s key and the file."""
    cert_text = _readable(f"{section}.cert_file", cert_file, where)
    key_text = _readable(f"{section}.key_file", key_file, where)
    if "BEGIN CERTIFICATE" not in cert_text:
        raise ConfigError(f"{where}: {section}.cert_file: {cert_file.absolute()} holds no PEM certificate")
    if "ENCRYPTED" in key_text:
        # OpenSSL would prompt on the terminal for the password: a service has none to give.
        raise ConfigError(
            f"{where}: {section}.key_file: {key_file.absolute()} is password-protected; "
            "the node reads unencrypted keys (protect the file by its permissions)"
        )
    try:
        context.load_cert_chain(cert_file, key_file, password=b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            why = f"{key_file.absolute()} is not the key of {cert_file.absolute()}"
        elif "PRIVATE KEY" not in key_text:
            why = f"{key_file.absolute()} holds no PEM private key"
        else:
            why = f"{cert_file.absolute()} or {key_file.absolute()} cannot be loaded: {exc.reason or exc}"
        raise ConfigError(f"{where}: {section}.key_file: {why}") from None


def _load_files(context: ssl.SSLContext, tls: TLSSettings, where: str) -> None:
    _load_certificate(context, tls.cert_file, tls.key_file, where, "node.tls")
    if tls.ca_file is not None:
        ca_text = _readable("node.tls.ca_file", tls.ca_file, where)
        try:
            if "BEGIN CERTIFICATE" not in ca_text:
                raise ssl.SSLError("no PEM certificate")
            context.load_verify_locations(cafile=tls.ca_file)
        except ssl.SSLError:
            raise ConfigError(f"{where}: node.tls.ca_file: {tls.ca_file.absolute()} holds no PEM certificate") from None


def server_context(tls: TLSSettings, where: str) -> ssl.SSLContext:
    """The listener's context: our certificate, and the site CA that senders' certificates must chain to."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_files(context, tls, where)
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def https_context(api: ApiSettings, where: str) -> ssl.SSLContext | None:
    """The HTTP API's HTTPS context (BCP 195 like DICOM TLS), or None when ``api`` has no certificate."""
    if api.cert_file is None or api.key_file is None:
        return None
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_certificate(context, api.cert_file, api.key_file, where, "api")
    return context


def client_context(tls: TLSSettings, where: str) -> ssl.SSLContext:
    """Outgoing associations: the peer verified against the site CA (and its host name); our certificate shown."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED, host name checked
    _load_files(context, tls, where)
    return context


@dataclass(frozen=True)
class TLSContexts:
    server: ssl.SSLContext
    client: ssl.SSLContext


class NodeTLS:
    """The node's TLS contexts from ``node.tls``; :meth:`reload` reads the files again for new connections.

    Raises
    ------
    ConfigError
        A file is missing, unreadable or not what its key says: one line naming the key and the file.
    """

    def __init__(self, config: Config) -> None:
        tls = config.node.tls
        if tls is None:
            raise ValueError("NodeTLS needs node.tls in the configuration")
        self.settings = tls
        self.where = f"config error in {config.source.path}"
        self.contexts = self._build()

    def _build(self) -> TLSContexts:
        return TLSContexts(server_context(self.settings, self.where), client_context(self.settings, self.where))

    def reload(self) -> TLSContexts:
        """New contexts from the files as they are now; the old ones stay in force when one fails (ConfigError)."""
        self.contexts = self._build()  # one assignment: a reader sees the old pair or the new one
        return self.contexts


def handshake(sock: ssl.SSLSocket, timeout_s: float) -> None:
    """The server side of a TLS handshake, done within ``timeout_s`` in all (not per read).

    A per-read timeout would let a client that sends one byte at a time hold the connection for
    ever; the ARTIM timer (PS3.8 9.1.5) bounds the whole time from connection to association.
    """
    deadline = time.monotonic() + timeout_s
    sock.setblocking(False)
    with selectors.DefaultSelector() as selector:
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                events = selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                events = selectors.EVENT_WRITE
            left_s = deadline - time.monotonic()
            selector.register(sock, events)
            ready = selector.select(left_s) if left_s > 0 else []
            selector.unregister(sock)
            if not ready:
                raise TimeoutError(f"no TLS handshake within {timeout_s:g} s")
    sock.settimeout(timeout_s)


#: OpenSSL's reasons for a handshake that failed, as an administrator reads them.
_REASONS = {
    "WRONG_VERSION_NUMBER": "not TLS (a plain DICOM connection on a TLS port?)",
    "HTTP_REQUEST": "not TLS (an HTTP request)",
    "RECORD_LAYER_FAILURE": "not TLS (a plain DICOM connection on a TLS port?)",
    "PACKET_LENGTH_TOO_LONG": "not TLS (a plain DICOM connection on a TLS port?)",
    "UNSUPPORTED_PROTOCOL": "the other side offers only TLS versions below 1.2 (BCP 195 requires 1.2 or later)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the other side refused the TLS version (1.2 or later on both sides?)",
    "NO_SHARED_CIPHER": "no cipher suite in common (BCP 195 allows ECDHE/DHE with AES-GCM or ChaCha20 only)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the other side found no cipher suite or certificate it accepts",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate sent (node.tls.require_client_cert)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the other side requires a certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the other side does not trust the node's certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the other side refused the node's certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the other side refused the node's certificate as expired",
}


def describe_tls_error(exc: OSError) -> str:
    """One line for a failed TLS handshake: what went wrong, in the administrator's terms."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        return _REASONS.get(reason, f"TLS handshake failed: {reason.replace('_', ' ').lower() or exc}")
    if isinstance(exc, TimeoutError):
        return str(exc) or "no TLS handshake in time"
    return f"connection closed during the TLS handshake ({exc.strerror or type(exc).__name__})"
