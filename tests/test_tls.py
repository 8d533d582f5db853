"""DICOM TLS on both sides, with DCMTK as scanner and PACS (issue 12, item 11).

A throw-away site CA (``openssl``) signs the node's, the scanner's and the PACS's certificates;
another CA signs a stranger's. The node runs in its own process with the tests' thumbnail
pipeline, its TLS port beside its plain one; DCMTK ``storescu +tls`` sends to it and a DCMTK
``storescp +tls -rc`` (which requires the node's certificate) receives its results.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from node.receive.spool import Spool
from tests.support.cli import ainode, write_config
from tests.support.nodeproc import NodeProcess, node_section
from tests.support.peers import SiteCA, StoreSCP, dcmtk_tls, free_port, storescu
from tests.support.waiting import wait_for

pytestmark = pytest.mark.dcmtk

#: ARTIM of the test node: a connection that has not become an association by then is closed.
ARTIM_S = 2.0

Pair = tuple[Path, Path]  # (key_file, cert_file)


@dataclass
class PKI:
    ca: SiteCA
    node: Pair
    scanner: Pair
    pacs: Pair
    #: From another CA: a sender the site never vouched for.
    stranger: Pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    ca = SiteCA(folder / "site")
    other = SiteCA(folder / "other", name="other-ca")
    return PKI(ca, ca.issue("ainode"), ca.issue("ct-scanner"), ca.issue("pacs"), other.issue("stranger"))


@pytest.fixture(scope="module")
def tls_pacs(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    # -rc: the PACS verifies the node's certificate against the site CA and refuses a connection without one.
    pacs = StoreSCP(tmp_path_factory.mktemp("pacs") / "in", *dcmtk_tls(*pki.pacs, pki.ca.cert), "-rc", aet="TLSPACS")
    yield pacs
    pacs.stop()


def tls_config(folder: Path, pki: PKI, pacs_port: int, **node: Any) -> dict[str, Any]:
    """A node with a TLS port beside its plain one, its results (sc) to a PACS reached over TLS."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = shutil.copy(pki.node[0], folder / "node.key"), shutil.copy(pki.node[1], folder / "node.crt")
    tls = {"port": free_port(), "cert_file": str(cert), "key_file": str(key), "ca_file": str(pki.ca.cert),
           "require_client_cert": True}  # fmt: skip
    return {
        "node": node_section(folder, tls=tls, association_timeout_s=ARTIM_S, **node),
        "peers": {
            "pacs": {"ae_title": "TLSPACS", "host": "127.0.0.1", "port": pacs_port, "tls": True, "outputs": ["sc"]}
        },
        "routes": [
            {
                "name": "ct-test",
                "match": {"Modality": "CT"},
                "pipeline": "thumbnail",
                "destinations": ["pacs"],
                "stable_after_s": 1,
            }
        ],
        "delivery": {"initial_delay_s": 0.5, "factor": 2, "max_delay_s": 2},
    }


@pytest.fixture(scope="module")
def node(pki: PKI, tls_pacs: StoreSCP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("node")
    with NodeProcess(tls_config(folder, pki, tls_pacs.port), folder) as proc:
        yield proc


def tls_port(node: NodeProcess) -> int:
    return int(node.config["node"]["tls"]["port"])


def new_study(folder: Path) -> tuple[Path, pydicom.Dataset]:
    """pydicom's CT_small.dcm as a study of its own (new study, series and instance UIDs)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def stored(node: NodeProcess, ds: pydicom.Dataset) -> bool:
    spool = Spool(Path(node.config["node"]["spool_dir"]))
    return spool.abspath(Spool.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)).is_file()


def client_context(pair: Pair, ca: Path) -> ssl.SSLContext:
    """A sender's TLS context: its certificate shown, the node verified against ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.load_cert_chain(pair[1], pair[0])
    return context


def node_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate (DER) the node shows to a new TLS connection on ``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def logged(node: NodeProcess, *lines: str) -> None:
    """The node logs a refusal in the connection's thread, which may finish after the client has seen it."""
    wait_for(lambda: all(line in node.log_text() for line in lines), 10, f"the log lines {lines}", node)


# -- receiving -------------------------------------------------------------------------------


def test_storescu_over_tls_with_a_site_certificate_has_its_study_stored(node, pki, tmp_path):
    path, ds = new_study(tmp_path)
    sent = storescu(path, tls_port(node), calling_ae="CTSCANNER", extra_args=dcmtk_tls(*pki.scanner, pki.ca.cert))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert stored(node, ds)
    wait_for(lambda: "from CTSCANNER@127.0.0.1 released: 1 stored" in node.log_text(), 10, "association logged")


def test_plain_tcp_on_the_tls_port_is_refused_at_once_and_blocks_no_tls_sender(node, pki, tmp_path):
    path, ds = new_study(tmp_path)
    port = tls_port(node)
    # A client that connects and says nothing: the handshake waits in its own thread, not in the accept loop.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
        started = time.monotonic()
        plain = storescu(path, port, calling_ae="PLAINSCU")
        assert plain.returncode != 0
        assert time.monotonic() - started < ARTIM_S / 2, "a plain A-ASSOCIATE-RQ is refused at once, not timed out"
        assert not stored(node, ds)

        started = time.monotonic()
        sent = storescu(path, port, calling_ae="CTSCANNER", extra_args=dcmtk_tls(*pki.scanner, pki.ca.cert))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert time.monotonic() - started < ARTIM_S / 2, "the TLS sender waited behind the stalled client"
        assert stored(node, ds)

        # ARTIM (PS3.8 9.1.5) holds for the handshake too: the silent connection is closed.
        assert stalled.recv(16) == b""
        assert time.monotonic() - started < ARTIM_S + 2
    logged(node, "TLS connection from 127.0.0.1 refused: not TLS", f"no TLS handshake within {ARTIM_S:g} s")


def test_certificate_of_another_ca_and_no_certificate_are_refused(node, pki, tmp_path):
    path, ds = new_study(tmp_path)
    stranger = storescu(path, tls_port(node), calling_ae="STRANGER", extra_args=dcmtk_tls(*pki.stranger, pki.ca.cert))
    assert stranger.returncode != 0
    anonymous = storescu(path, tls_port(node), calling_ae="ANONYMOUS", extra_args=["+tla", "+cf", str(pki.ca.cert)])
    assert anonymous.returncode != 0
    assert not stored(node, ds)
    logged(node, "refused: certificate not accepted: unable to get local issuer certificate",
           "refused: no client certificate sent")  # fmt: skip


def test_client_offering_only_tls_1_1_is_refused(node, pki):
    port = tls_port(node)
    old = client_context(pki.scanner, pki.ca.cert)
    with warnings.catch_warnings():  # Python deprecates naming the old versions; this test must name them
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS 1.1 only at security level 0
    try:
        node_certificate(port, old)
    except ssl.SSLError as exc:
        if exc.reason in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE", "UNSUPPORTED_PROTOCOL"):
            pytest.skip(f"this machine's OpenSSL cannot make a TLS 1.1 client ({exc.reason})")
        assert exc.reason == "TLSV1_ALERT_PROTOCOL_VERSION", exc  # the node's answer, not a local failure
    else:
        pytest.fail("the node completed a TLS 1.1 handshake")
    assert node_certificate(port, client_context(pki.scanner, pki.ca.cert))  # the same client at TLS 1.2 is let in
    logged(node, "refused: the other side offers only TLS versions below 1.2")


# -- sending ---------------------------------------------------------------------------------
def test_results_reach_a_tls_pacs_that_requires_the_node_certificate(node, tls_pacs, pki, tmp_path):
    path, ds = new_study(tmp_path)
    sent = storescu(path, tls_port(node), calling_ae="CTSCANNER", extra_args=dcmtk_tls(*pki.scanner, pki.ca.cert))
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def results() -> list[pydicom.Dataset]:
        found = [pydicom.dcmread(p, stop_before_pixels=True) for p in tls_pacs.received()]
        return [r for r in found if r.StudyInstanceUID == ds.StudyInstanceUID and r.Manufacturer == "dicom-ai-node"]

    (result,) = wait_for(results, 60, "the thumbnail in the TLS PACS", node=node)
    assert result.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    # The operator's C-ECHO goes the same way: TLS, the node's certificate, the PACS verified.
    echo = ainode("echo", "pacs", "--config", str(node.config_path), env=node.env)
    assert echo.returncode == 0, echo.stderr
    assert "status 0x0000" in echo.stdout


# -- certificates renewed --------------------------------------------------------------------
def test_sighup_serves_new_certificates_to_new_connections_while_an_open_association_goes_on(node, pki, tmp_path):
    port = tls_port(node)
    ae = AE(ae_title="CTSCANNER")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE",
                         tls_args=(client_context(pki.scanner, pki.ca.cert), "127.0.0.1"))  # fmt: skip
    assert assoc.is_established
    try:
        assert assoc.dul.socket.socket.getpeercert(binary_form=True) == der_of(pki.node[1])
        renewed_key, renewed_cert = pki.ca.issue("ainode-renewed", tmp_path)
        tls = node.config["node"]["tls"]
        for source, target in ((renewed_key, tls["key_file"]), (renewed_cert, tls["cert_file"])):
            shutil.copy(source, f"{target}.new")
            Path(f"{target}.new").replace(target)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "TLS certificates reloaded" in node.log_text(), 10, "the reload", node=node)

        assert node_certificate(port, client_context(pki.scanner, pki.ca.cert)) == der_of(renewed_cert)
        path, ds = new_study(tmp_path)
        assert int(assoc.send_c_store(pydicom.dcmread(path)).Status) == 0x0000  # the old one goes on
        assert int(assoc.send_c_echo().Status) == 0x0000
        assert stored(node, ds)
    finally:
        assoc.release()
    assert node.proc.poll() is None


# -- configuration ---------------------------------------------------------------------------
def test_certificate_problems_are_one_config_error_line_naming_the_file(pki, tmp_path):
    config = {**tls_config(tmp_path / "node", pki, pacs_port=free_port()), "routes": []}  # no test pipeline here
    tls = config["node"]["tls"]
    missing = tmp_path / "nowhere" / "node.crt"
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    other_key = pki.scanner[0]
    cases = [
        ({"cert_file": str(missing)}, f"node.tls.cert_file: {missing}: no such file"),
        ({"key_file": str(garbage)}, f"node.tls.key_file: {garbage} holds no PEM private key"),
        ({"key_file": str(other_key)}, f"node.tls.key_file: {other_key} is not the key of {tls['cert_file']}"),
        ({"ca_file": str(garbage)}, f"node.tls.ca_file: {garbage} holds no PEM certificate"),
    ]
    for change, message in cases:
        path = write_config(tmp_path, {**config, "node": {**config["node"], "tls": {**tls, **change}}})
        for command in (["config", "check", str(path)], ["serve", "--config", str(path)]):
            result = ainode(*command)
            assert result.returncode == 2, (command, result.stdout, result.stderr)
            assert result.stderr.strip() == f"config error in {path}: {message}", command


def test_node_with_its_plain_port_off_receives_over_tls_only(pki, tls_pacs, tmp_path):
    config = tls_config(tmp_path / "node", pki, tls_pacs.port)
    plain_port, port = config["node"]["port"], config["node"]["tls"]["port"]
    off = {"AINODE_NODE__PORT": "null"}
    checked = ainode("config", "check", str(write_config(tmp_path, {**config, "routes": []})), env=off)
    assert checked.returncode == 0, checked.stderr
    assert f"listening on 127.0.0.1:{port} (TLS)," in checked.stdout
    path, ds = new_study(tmp_path / "study")
    proc = NodeProcess(config, tmp_path / "node", env=off).start(wait=False)  # it waits for C-ECHO on node.port
    try:
        scanner = dcmtk_tls(*pki.scanner, pki.ca.cert)
        wait_for(lambda: storescu(path, port, extra_args=scanner).returncode == 0, 60, "a TLS store", node=proc)
        assert stored(proc, ds)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", plain_port), timeout=5).close()
    finally:
        proc.stop()


def test_the_http_api_over_https_with_the_site_certificate(pki, tmp_path):
    """api.cert_file / key_file: the API speaks HTTPS only (BCP 195, as DICOM TLS), verified against the site CA."""
    import requests

    api_port = free_port()
    config = {
        "node": node_section(tmp_path / "node"),
        "api": {"host": "127.0.0.1", "port": api_port, "cert_file": str(pki.node[1]), "key_file": str(pki.node[0])},
    }
    checked = ainode("config", "check", str(write_config(tmp_path, config)))
    assert checked.returncode == 0, checked.stderr
    with NodeProcess(config, tmp_path / "node") as node:
        url = f"https://127.0.0.1:{api_port}/healthz"
        answer = wait_for(lambda: requests.get(url, verify=str(pki.ca.cert), timeout=5), 30, "the HTTPS API")
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}
        with pytest.raises(requests.exceptions.SSLError):  # a client that trusts another CA refuses the node
            requests.get(url, verify=str(pki.stranger[1]), timeout=5)
        with pytest.raises(requests.exceptions.ConnectionError):  # no plain HTTP on the HTTPS port
            requests.get(f"http://127.0.0.1:{api_port}/healthz", timeout=5)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(pki.ca.cert)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                node_certificate(api_port, context)  # TLS 1.1 refused, as BCP 195 requires
        # systemd's ExecReload sends SIGHUP: a node without node.tls says so and goes on (it used to die silently).
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: nothing to reload" in node.log_text(), 10, "the SIGHUP line", node=node)
        assert node.proc.poll() is None
        assert requests.get(url, verify=str(pki.ca.cert), timeout=5).status_code == 200
    # Files that are not what their key says: one line naming the key, before anything starts.
    broken = {**config, "api": {**config["api"], "key_file": str(pki.scanner[0])}}
    path = write_config(tmp_path, broken)
    for command in (["config", "check", str(path)], ["serve", "--config", str(path)]):
        result = ainode(*command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert result.stderr.strip() == (
            f"config error in {path}: api.key_file: {pki.scanner[0]} is not the key of {pki.node[1]}"
        ), command
    half = {**config, "api": {"host": "127.0.0.1", "port": api_port, "cert_file": str(pki.node[1])}}
    result = ainode("config", "check", str(write_config(tmp_path, half)))
    assert result.returncode == 2 and "cert_file and key_file go together" in result.stderr, result.stderr
