"""The node's configuration: one YAML file, validated once at start, overridable by environment.

Every key may be overridden by ``AINODE_<SECTION>__<KEY>`` (double underscores between
levels), e.g. ``AINODE_NODE__PORT=11113`` or ``AINODE_PEERS__PACS__PORT=4243``; values are
read as YAML scalars, so ``AINODE_NODE__ALLOWED_CALLERS='[CT1, PACS@10.0.0.5]'`` gives a list.
A bad config is one :class:`ConfigError` naming each bad key and what is wrong with it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydicom.datadict import keyword_for_tag, tag_for_keyword

from pipelines.enums import ResultKind

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")
ENV_PREFIX = "AINODE_"
#: Where a command looks when neither --config nor AINODE_CONFIG names a file, in this order.
CONFIG_SEARCH_PATHS = (Path("ainode.yaml"), Path("/etc/ainode/ainode.yaml"))
#: A study is complete after this many quiet seconds, unless its route says otherwise (and for
#: a study no route matched, which waits as long before it is called unrouted).
DEFAULT_STABLE_AFTER_S = 5.0


class ConfigSource(NamedTuple):
    """Which file a config was read from, and why that one."""

    path: Path
    #: "--config", "AINODE_CONFIG", "default path" or "embedded defaults".
    how: str

    def __str__(self) -> str:
        if self.how == "embedded defaults":
            return "embedded defaults (no --config, AINODE_CONFIG, ./ainode.yaml or /etc/ainode/ainode.yaml)"
        return f"{self.path} ({self.how})"


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the message shown to the administrator."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: AE is at most 16 characters of the default repertoire, no backslash or
    # control characters, and leading/trailing spaces are not significant.
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title cannot be empty or all spaces")
    if len(stripped) > 16:
        raise ValueError(f"an AE title has at most 16 characters ({stripped!r} has {len(stripped)})")
    if "\\" in stripped or any(ord(c) < 32 or ord(c) > 126 for c in stripped):
        raise ValueError(f"{stripped!r}: AE titles cannot contain backslashes or control/non-ASCII characters")
    return stripped


AETitle = Annotated[str, Field(description="DICOM AE title")]
Port = Annotated[int, Field(ge=1, le=65535)]


class TLSSettings(_Strict):
    """DICOM TLS (PS3.15 B.9): the node's certificate, and the site CA that senders and peers are verified against.

    Relative paths are relative to the working folder, as ``spool_dir``. The files are read at start
    (and by ``ainode config check``) and again on SIGHUP.
    """

    #: The TLS listener, beside the plain ``node.port``; None: certificates for outgoing associations only.
    port: Port | None = 2762
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    #: Senders must show a certificate of ``ca_file`` (mutual authentication).
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _ca(self) -> TLSSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs the senders' certificates)")
        return self


class NodeSettings(_Strict):
    ae_title: AETitle = "AINODE"
    host: str = "0.0.0.0"
    #: The plain DICOM port; None: none (a node that receives over TLS only).
    port: Port | None = 11112
    tls: TLSSettings | None = None
    spool_dir: Path = Path("./var/spool")
    database_url: str = "sqlite:///./var/ainode.db"
    #: Empty: any caller. Else AE titles, optionally tied to a host: "CT1" or "PACS@10.0.0.5".
    allowed_callers: list[str] = []
    workers: int = Field(2, ge=1, le=64)
    role: Literal["all", "receiver", "worker"] = "all"
    #: Role all only: run the jobs in this many child processes (role worker, ``workers`` threads each) that the
    #: node starts, restarts and stops; this process receives. 0: jobs in this process's threads. auto: the
    #: ``workers`` jobs in as many processes of one thread each on 2 cores or more with 2 GiB each, CPU inference
    #: (node/operate/supervise.py, ``plan``); else 0.
    worker_processes: Literal["auto"] | Annotated[int, Field(ge=0, le=32)] = "auto"
    models_dirs: list[Path] = []
    #: DICOM UID of this node as a device; None: derived from the AE title and host name.
    device_uid: str | None = None
    station_name: str | None = None
    institution_name: str | None = None
    late_instances: Literal["new-version", "ignore"] = "new-version"
    #: A SOP Instance UID received again with changed content: keep the stored instance, or replace it.
    #: Identical re-sends always succeed; a UID already kept in another study, series or patient is refused.
    duplicates: Literal["keep-first", "replace"] = "keep-first"
    #: Below this much free space on the spool's disk, C-STOREs are answered 0xA700 (out of resources)
    #: before the disk is actually full: the results of what was received still fit. 0: no watermark.
    min_free_disk_mb: int = Field(1024, ge=0)
    #: Received images are deleted this many days after their study's results were delivered; None: kept.
    retention_days: float | None = Field(None, gt=0)
    #: Maximum PDU size we receive (0 = unlimited, pynetdicom semantics).
    max_pdu: int = Field(0, ge=0)
    #: Connections served at once; of them, ``max_associations_per_host`` from one host, and the last
    #: ``reserved_for_known_peers`` only for peers and allowed callers (a flood cannot lock them out).
    max_associations: int = Field(32, ge=1, le=1000)
    max_associations_per_host: int = Field(8, ge=1, le=1000)
    reserved_for_known_peers: int = Field(8, ge=0)
    #: ARTIM (PS3.8 9.1.5): a connection has this long, from its first byte, to become an association.
    association_timeout_s: float = Field(5, gt=0)
    acse_timeout_s: float = Field(30, gt=0)
    dimse_timeout_s: float = Field(60, gt=0)
    network_timeout_s: float = Field(60, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, v: list[str]) -> list[str]:
        out = []
        for entry in v:
            ae, sep, host = entry.partition("@")
            ae = _check_ae_title(ae)
            if sep and not host.strip():
                raise ValueError(f"{entry!r}: a host must follow '@'")
            out.append(f"{ae}@{host.strip()}" if sep else ae)
        return out

    @model_validator(mode="after")
    def _listeners(self) -> NodeSettings:
        tls_port = self.tls.port if self.tls is not None else None
        if self.port is None and tls_port is None and self.role != "worker":
            raise ValueError("port is null and there is no tls.port: the node would receive nothing")
        if tls_port is not None and tls_port == self.port:
            raise ValueError(f"tls.port ({tls_port}) must differ from port: one port speaks TLS, the other not")
        return self

    @model_validator(mode="after")
    def _supervised(self) -> NodeSettings:
        if self.worker_processes not in (0, "auto") and self.role != "all":
            raise ValueError(
                f"worker_processes ({self.worker_processes}) needs role all: a node of role {self.role} runs as one "
                "process (start worker processes of their own for role worker)"
            )
        return self

    @model_validator(mode="after")
    def _slots(self) -> NodeSettings:
        if self.reserved_for_known_peers >= self.max_associations:
            raise ValueError(
                f"reserved_for_known_peers ({self.reserved_for_known_peers}) must be less than"
                f" max_associations ({self.max_associations}): unknown senders would get no slot"
            )
        return self

    @field_validator("device_uid")
    @classmethod
    def _uid(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9]+(\.[0-9]+)*", v) or (v and len(v) > 64):
            raise ValueError(f"{v!r} is not a DICOM UID (digits and dots, at most 64 characters)")
        return v


class RuntimeSettings(_Strict):
    #: "auto": TensorRT / CUDA when onnxruntime-gpu and a GPU are present, else CPU.
    providers: Literal["auto"] | list[str] = "auto"
    intra_op_threads: int | None = Field(None, ge=1)
    inter_op_threads: int | None = Field(None, ge=1)
    #: Model batches run at once in this process, across workers and models (each with the session's
    #: threads); null: as many as there are workers running jobs.
    inference_lanes: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    #: Largest volume a job loads (its pixels as float32): a larger series is not analysed
    #: ("volume-too-large") instead of exhausting the machine's memory.
    max_volume_mb: int = Field(4096, ge=1)
    #: Run per-slice models (2D segmentation) on slices as they are stored, while the worker is idle, so that
    #: a complete study has only its whole-volume steps left. The results are the same either way.
    stream_inference: bool = True


class ResultSettings(_Strict):
    #: Leave DICOM-SEG frames without any segment pixel out. Off by default: OHIF misplaces segments then.
    omit_empty_seg_frames: bool = False


class ExportSettings(_Strict):
    """``ainode export``: the site secret that keys the pseudonymous patient key (HMAC-SHA256 of issuer + ID).

    The secret is read from ``pseudonym_key_file`` when set (relative to the working folder), else from the
    environment variable ``pseudonym_key_env``. Without one the export refuses to run: an unkeyed hash of a
    patient ID is reversed by hashing every ID of the hospital's range.
    """

    pseudonym_key_env: str = Field("AINODE_PSEUDONYM_KEY", min_length=1)
    pseudonym_key_file: Path | None = None


class DicomWebAuth(_Strict):
    """How the node proves itself to a DICOMweb server: a bearer token, or a user name and password (HTTP basic).

    Secrets never stand in the config: each is named by an environment variable (``*_env``) or a
    file (``*_file``, e.g. a Kubernetes Secret mounted as a volume), read again at each attempt.
    """

    bearer_token_env: str | None = Field(None, min_length=1)
    bearer_token_file: Path | None = None
    username: str | None = Field(None, min_length=1)
    password_env: str | None = Field(None, min_length=1)
    password_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_secret_in_clear(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, instead in (("password", "password"), ("token", "bearer_token"), ("bearer_token", "bearer_token")):
                if key in data:
                    raise ValueError(
                        f"{key}: secrets are not written in the config; name an environment variable"
                        f" ({instead}_env) or a file ({instead}_file)"
                    )
        return data

    @model_validator(mode="after")
    def _one_method(self) -> DicomWebAuth:
        token = [k for k in ("bearer_token_env", "bearer_token_file") if getattr(self, k) is not None]
        password = [k for k in ("password_env", "password_file") if getattr(self, k) is not None]
        if len(token) > 1 or len(password) > 1:
            raise ValueError(f"{' and '.join(token if len(token) > 1 else password)}: give one of them")
        if token and (self.username is not None or password):
            raise ValueError("a bearer token or username with password_env/password_file, not both")
        if not token and (self.username is None or not password):
            raise ValueError("needs bearer_token_env (or _file), or username with password_env (or password_file)")
        for key in ("bearer_token_file", "password_file"):
            path = getattr(self, key)
            if path is not None and not path.is_file():
                raise ValueError(f"{key}: {path.absolute()}: no such file")
        return self

    @model_validator(mode="after")
    def _secret_set(self, info: ValidationInfo) -> DicomWebAuth:
        # load_config passes the environment it reads: a missing secret stops the start, not the first send.
        env = (info.context or {}).get("env")
        for key in ("bearer_token_env", "password_env"):
            name = getattr(self, key)
            if env is not None and name is not None and not env.get(name):
                raise ValueError(f"{key}: the environment variable {name} is not set")
        return self


class DicomWebTarget(_Strict):
    """A DICOMweb server that stores results by STOW-RS (PS3.18 10.5), e.g. Orthanc's ``/dicom-web``.

    Relative paths are relative to the working folder, as ``spool_dir``.
    """

    #: The service's root, e.g. ``https://pacs.example.org/dicom-web``: results are posted to ``<url>/studies``.
    url: str
    #: None: the server takes anonymous stores.
    auth: DicomWebAuth | None = None
    #: https: the CA the server's certificate must chain to; None: REQUESTS_CA_BUNDLE's, else certifi's CAs.
    ca_file: Path | None = None
    #: false: the server's certificate is not checked (a test server only; anyone on the path can read results).
    verify_tls: bool = True
    #: Connecting, and then each wait for the server's answer, within this.
    timeout_s: float = Field(30, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parsed = urlsplit(v.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{v!r} is not an http:// or https:// URL with a host")
        if parsed.username is not None or parsed.password is not None:
            raise ValueError("credentials do not go in the URL: use auth (secrets from the environment or a file)")
        if parsed.query or parsed.fragment:
            raise ValueError(f"{v!r}: the service's root URL takes no ?query or #fragment")
        try:
            _ = parsed.port  # raises for a port out of range or not a number
        except ValueError as exc:
            raise ValueError(f"{v!r}: {exc}") from None
        return v.strip().rstrip("/")

    @model_validator(mode="after")
    def _tls(self) -> DicomWebTarget:
        https = self.url.startswith("https://")
        if not https and (self.ca_file is not None or not self.verify_tls):
            raise ValueError("ca_file and verify_tls are for an https:// url")
        if self.ca_file is not None and not self.verify_tls:
            raise ValueError("ca_file is not used with verify_tls: false")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file: {self.ca_file.absolute()}: no such file")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parsed = urlsplit(self.url)
        return parsed.port or (443 if parsed.scheme == "https" else 80)


class Peer(_Strict):
    """A DICOM peer (``ae_title``, ``host``, ``port``: C-STORE), or a DICOMweb server (``dicomweb``: STOW-RS).

    A DICOMweb peer may keep ``ae_title`` (and ``host``): the AE it sends studies from, so that
    results for "sender" go back to it by STOW-RS.
    """

    ae_title: AETitle | None = None
    host: str | None = None
    port: Port | None = None
    #: The peer sends one whole study per association ("send to AI"): process it at release.
    complete_on_release: bool = False
    #: Results go out over DICOM TLS, the peer verified against node.tls.ca_file.
    tls: bool = False
    #: Results go out by STOW-RS to this server instead of by C-STORE.
    dicomweb: DicomWebTarget | None = None
    #: Which result objects this destination gets ("seg", "sr", "sc" in the file; ResultKind once validated).
    outputs: set[ResultKind] = {ResultKind.SEG, ResultKind.SR}

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae_title(v)

    @model_validator(mode="after")
    def _kind(self) -> Peer:
        if self.dicomweb is not None:
            dicom_only = [k for k in ("port", "tls") if k in self.model_fields_set]
            if dicom_only:
                raise ValueError(f"{' and '.join(dicom_only)}: for C-STORE peers; this peer is reached at dicomweb.url")
            return self
        missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} missing: a DICOM peer needs ae_title, host and port"
                " (or dicomweb: {url: ...} for a DICOMweb server)"
            )
        return self

    def describe(self) -> str:
        """Where results go, for an operator: ``PACS@10.0.0.5:104 (TLS)`` or ``STOW-RS https://pacs/dicom-web``."""
        if self.dicomweb is not None:
            return f"STOW-RS {self.dicomweb.url}"
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


class RetryPolicy(_Strict):
    initial_delay_s: float = Field(10, gt=0)
    factor: float = Field(2, ge=1)
    max_delay_s: float = Field(3600, gt=0)
    #: Default: keep retrying for 24 h.
    give_up_after_s: float = Field(86400, gt=0)


class NotificationEvent(str, Enum):
    """What a webhook can be told about (``webhooks[].events``)."""

    JOB_DONE = "job.done"
    JOB_FAILED = "job.failed"
    JOB_NOT_ANALYSED = "job.not_analysed"
    #: A delivery failed for good: its retry window ran out, or its peer does not take its kind.
    DELIVERY_FAILED = "delivery.failed"


_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


class Webhook(_Strict):
    """An HTTP endpoint told about jobs and deliveries (a RIS, a chat bridge): a JSON POST per event.

    The body carries UIDs, pipeline, route, reason and counts, never a patient value. Secrets are
    named by environment variable, not written in the file.
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    url: str
    events: list[NotificationEvent] = Field(min_length=1)
    #: The variable holding the key of an HMAC-SHA256 of the body (header X-AINode-Signature: sha256=<hex>).
    secret_env: str | None = Field(None, pattern=f"^{_ENV_NAME}$")
    #: The variable holding a token sent as ``Authorization: Bearer <token>``.
    bearer_token_env: str | None = Field(None, pattern=f"^{_ENV_NAME}$")
    #: Connecting and the receiver's answer each within this.
    timeout_s: float = Field(5, gt=0, le=120)
    retry: RetryPolicy = Field(
        default_factory=lambda: RetryPolicy(initial_delay_s=5, factor=2, max_delay_s=600, give_up_after_s=86400)
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a webhook URL is http:// or https:// with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("no credentials in the URL (it is logged): use bearer_token_env")
        return v

    @field_validator("events")
    @classmethod
    def _once(cls, v: list[NotificationEvent]) -> list[NotificationEvent]:
        return list(dict.fromkeys(v))


def _unique_webhook_names(hooks: list[Webhook]) -> list[Webhook]:
    names = [h.name for h in hooks]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ValueError(f"webhook names must be unique ({', '.join(doubled)} given twice)")
    return hooks


class SyslogTarget(_Strict):
    """The site's audit repository (IHE ATNA Audit Record Repository): syslog over TCP (RFC 6587), or TLS (RFC 5425).

    Relative paths are relative to the working folder, as ``spool_dir``.
    """

    host: str = Field(min_length=1)
    #: None: 6514 with TLS (RFC 5425), 601 without (RFC 6587).
    port: Port | None = None
    #: PS3.15 A.6 requires TLS; plain TCP is for a collector on the same host or network segment.
    tls: bool = True
    #: The CA the repository's certificate must chain to; None: the system's CAs.
    ca_file: Path | None = None
    #: The node's own certificate and key, for a repository that authenticates its senders (IHE ATNA).
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Connecting, sending and the repository's closing of the connection each within this.
    timeout_s: float = Field(10, gt=0)

    @model_validator(mode="after")
    def _files(self) -> SyslogTarget:
        if not self.tls and any(f is not None for f in (self.ca_file, self.cert_file, self.key_file)):
            raise ValueError("ca_file, cert_file and key_file are for tls: true")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is not None and not path.is_file():
                raise ValueError(f"{key}: {path.absolute()}: no such file")
        return self

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (6514 if self.tls else 601)


class AuditSettings(_Strict):
    """The audit trail as DICOM audit messages (PS3.15 A.5) to the site's audit repository."""

    #: None: the trail stays in the database (``audit_events``) only.
    syslog: SyslogTarget | None = None
    #: AuditSourceID of the messages; None: the node's AE title.
    source_id: str | None = Field(None, min_length=1, max_length=128)
    #: AuditEnterpriseSiteID (the hospital, as the repository knows it); None: left out.
    enterprise_site_id: str | None = Field(None, min_length=1, max_length=128)
    #: While the repository cannot be reached: wait this long before trying again, doubled up to max_delay_s.
    initial_delay_s: float = Field(2, gt=0)
    max_delay_s: float = Field(300, gt=0)
    #: Events sent on one connection.
    batch_size: int = Field(200, ge=1, le=10000)


class ApiToken(_Strict):
    """One client of the HTTP API: it sends ``Authorization: Bearer <token>``; only the token's hash is kept."""

    #: Who the client is, in the audit trail (e.g. "pacs-admin").
    name: str = Field(min_length=1, max_length=64)
    #: viewer: read endpoints; admin: also actions (retry a job).
    role: Literal["admin", "viewer"]
    #: SHA-256 of the token, 64 hex digits (``printf %s TOKEN | sha256sum``).
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("a SHA-256 is 64 hex digits (printf %s TOKEN | sha256sum)")
        return v.lower()


class ApiSettings(_Strict):
    """The HTTP API: /healthz, /readyz and /metrics for anyone who reaches it, /api/v1 with a token."""

    host: str = "127.0.0.1"
    port: Port = 8081
    tokens: list[ApiToken] = []
    #: HTTPS: the server's certificate chain and its unencrypted key (PEM); both or neither.
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _https_pair(self) -> ApiSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (HTTPS needs both)")
        return self

    @field_validator("tokens")
    @classmethod
    def _unique(cls, v: list[ApiToken]) -> list[ApiToken]:
        for key in ("name", "sha256"):
            seen = [getattr(t, key) for t in v]
            doubled = sorted({value for value in seen if seen.count(value) > 1})
            if doubled:
                raise ValueError(f"{key} must be unique ({', '.join(doubled)} given twice)")
        return v


class Condition(_Strict):
    """One condition on a tag: exactly one of equals, one_of, regex, range."""

    equals: str | float | None = None
    one_of: list[str | float] | None = None
    regex: str | None = None
    range: tuple[float | None, float | None] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Condition:
        given = [k for k in ("equals", "one_of", "regex", "range") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a condition needs exactly one of equals, one_of, regex, range (got {given or 'none'})")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regex {self.regex!r}: {exc}") from exc
        return self


def tag_of(key: str) -> int:
    """A route key as a DICOM tag: a keyword ("Modality") or "(0018,0050)" / "00180050"."""
    m = re.fullmatch(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?", key.strip())
    if m:
        return int(m.group(1) + m.group(2), 16)
    tag = tag_for_keyword(key)
    if tag is None:
        raise ValueError(f"{key!r} is not a DICOM keyword or tag")
    return tag


class Route(_Strict):
    name: str = Field(min_length=1, max_length=64)
    #: Keyword (or tag) -> condition; a bare value means "equals", a list means "one of".
    match: dict[str, Condition] = {}
    pipeline: str = Field(min_length=1)
    destinations: list[str] = ["sender"]
    stable_after_s: float = Field(DEFAULT_STABLE_AFTER_S, gt=0)
    #: Workers claim the queued job of highest priority first (then the oldest): 0 routine, e.g. 10 for STAT.
    #: A job keeps the priority its route had when it was made, also when it is queued again.
    priority: int = Field(0, ge=-1000, le=1000)

    @field_validator("match", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for key, cond in v.items():
            tag_of(str(key))
            if isinstance(cond, list):
                cond = {"one_of": cond}
            elif not isinstance(cond, dict):
                cond = {"equals": cond}
            out[str(key)] = cond
        return out

    def conditions(self) -> list[tuple[str, int, Condition]]:
        """(name for messages, tag, condition) in the order written."""
        return [(keyword_for_tag(tag_of(k)) or k, tag_of(k), c) for k, c in self.match.items()]


class Config(_Strict):
    node: NodeSettings = NodeSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    results: ResultSettings = ResultSettings()
    peers: dict[str, Peer] = {}
    routes: list[Route] = []
    delivery: RetryPolicy = RetryPolicy()
    audit: AuditSettings = AuditSettings()
    #: None: no HTTP server.
    api: ApiSettings | None = None
    #: HTTP endpoints told about jobs and deliveries (node/notify/); empty: no notifications.
    webhooks: Annotated[list[Webhook], AfterValidator(_unique_webhook_names)] = []
    #: ``ainode export`` (research export): where the pseudonym key comes from.
    export: ExportSettings = ExportSettings()
    _source: ConfigSource = PrivateAttr(default=ConfigSource(DEFAULT_CONFIG, "embedded defaults"))

    @property
    def source(self) -> ConfigSource:
        """The file this config was read from (set by :func:`load_config`)."""
        return self._source

    @model_validator(mode="after")
    def _references(self) -> Config:
        names = set()
        for i, route in enumerate(self.routes):
            if route.name in names:
                raise ValueError(f"routes.{i}: duplicate route name {route.name!r}")
            names.add(route.name)
            for dest in route.destinations:
                if dest != "sender" and dest not in self.peers:
                    known = ", ".join(sorted(self.peers)) or "none"
                    raise ValueError(
                        f"routes.{i} ({route.name}): destination {dest!r} is neither 'sender' nor a peer "
                        f"(peers: {known})"
                    )
        if self.api is not None:
            dicom_ports = {self.node.port, self.node.tls.port if self.node.tls is not None else None}
            if self.api.port in dicom_ports:
                raise ValueError(f"api.port ({self.api.port}) is a DICOM port of this node; choose another")
        if "sender" in self.peers:
            raise ValueError("peers: 'sender' is reserved for the calling peer; choose another name")
        tls = self.node.tls
        for name, peer in self.peers.items():
            if peer.tls and (tls is None or tls.ca_file is None):
                raise ValueError(
                    f"peers.{name}.tls: needs node.tls with cert_file, key_file and ca_file (to verify the peer)"
                )
        return self

    def peer_for_caller(self, ae_title: str, host: str | None) -> tuple[str, Peer] | None:
        """The peer whose AE title called us ("sender"), preferring one whose host matches."""
        ae_title = ae_title.strip()
        matches = [(n, p) for n, p in self.peers.items() if p.ae_title == ae_title]
        for name, peer in matches:
            if host is not None and peer.host == host:
                return name, peer
        return matches[0] if matches else None


# -- loading -----------------------------------------------------------------------------------
def _env_overrides(env: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    out = []
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var == "AINODE_CONFIG" or "__" not in var:
            continue
        path = [part.lower() for part in var[len(ENV_PREFIX) :].split("__")]
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((path, value, var))
    return out


def _apply(data: dict[str, Any], path: list[str], value: Any, var: str) -> tuple[str, ...]:
    """Set ``path`` to ``value``; returns the part of the config the variable owns.

    That is the first section the variable had to create (a peer defined only by variables), or
    else the key it set: a validation error inside it is the variable's, not the file's.
    """
    node: Any = data
    owned: tuple[str, ...] | None = None
    for i, key in enumerate(path[:-1]):
        nxt = node.get(key) if isinstance(node, dict) else None
        if nxt is None:
            nxt = {}
            node[key] = nxt
            owned = owned or tuple(path[: i + 1])
        if not isinstance(nxt, dict):
            raise ConfigError(f"config error in environment variable {var}: {'.'.join(path[: i + 1])} is not a section")
        node = nxt
    node[path[-1]] = value
    return owned or tuple(path)


def _blame(loc: tuple[str, ...], owners: list[tuple[tuple[str, ...], str]], file_where: str) -> str:
    """Who to name for an error at ``loc``: the variable owning that part of the config, else the file."""
    found = [(len(owned), var) for owned, var in owners if loc[: len(owned)] == owned]
    return f"config error in environment variable {max(found)[1]}" if found else file_where


def find_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> ConfigSource:
    """The config file a command reads: ``--config``, then AINODE_CONFIG, then the default paths.

    The same rule for ``serve`` and for the commands that read what a running node wrote, so
    that ``ainode status`` run beside the node reads the node's database.
    """
    env = os.environ if env is None else env
    if path is not None:
        return ConfigSource(Path(path).absolute(), "--config")
    if env.get("AINODE_CONFIG"):
        return ConfigSource(Path(env["AINODE_CONFIG"]).absolute(), "AINODE_CONFIG")
    for candidate in CONFIG_SEARCH_PATHS:
        if candidate.is_file():
            return ConfigSource(candidate.absolute(), "default path")
    return ConfigSource(DEFAULT_CONFIG, "embedded defaults")


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith(("function-", "tagged-"))))


def default_routes() -> list[dict[str, Any]]:
    """The embedded default routes (CT, CR/DX, MG to the bundled models, results back to the sender)."""
    return list(yaml.safe_load(DEFAULT_CONFIG.read_text())["routes"])


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment and validate the config that :func:`find_config` finds."""
    env = os.environ if env is None else env
    found = find_config(path, env)
    source = Path(path) if path is not None else found.path
    where = f"config error in {source}"
    try:
        text = source.read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the file: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (node, peers, routes, ...)")
    if "routes" not in data:
        # A file without a routes section keeps the default routes; a routes list (even []) replaces them.
        data["routes"] = default_routes()
    owners = [(_apply(data, key_path, value, var), var) for key_path, value, var in _env_overrides(env)]
    try:
        config = Config.model_validate(data, context={"env": env})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = _location(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check its spelling)"
            got = err.get("input")
            shown = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
            blamed = _blame(tuple(loc.split(".")) if loc else (), owners, where)
            lines.append(f"{blamed}: {loc + ': ' if loc else ''}{msg}{shown}")
        raise ConfigError("\n".join(lines)) from None
    config._source = found
    return config


def sqlite_path(url: str) -> Path | None:
    """The absolute path of a SQLite database file (relative to the current folder), else None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).absolute()


def display_database_url(url: str) -> str:
    """A database URL fit for a log or a terminal: password replaced by ``***``, SQLite path absolute."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return url.split("@")[-1]
    path = sqlite_path(url)
    if path is not None:
        parsed = parsed.set(database=str(path))
    return parsed.render_as_string(hide_password=True)


def delivery_warnings(config: Config) -> list[str]:
    """One line per route whose results cannot reach anyone as configured (quick start: no peers)."""
    if config.peers:
        return []
    return [
        f"route {r.name} sends results to the sender, but no peers are configured: "
        "results will wait until the sender is added under peers"
        for r in config.routes
        if "sender" in r.destinations
    ]
