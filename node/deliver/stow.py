"""Outgoing DICOMweb: STOW-RS (PS3.18 10.5) of result files, one instance per request (dicomweb-client).

Each result is posted alone, so its outcome is its own: what the server says about that SOP
Instance UID decides whether the delivery is done, retried or failed for good. The outcome is a
:class:`~node.deliver.scu.StoreOutcome` like a C-STORE's, its ``status`` the DIMSE status the
server reports for the instance (PS3.18 Table 10.5.3-1): 0x0000 stored; its WarningReason when
stored with a warning (0xB000 when a 202 Accepted names none); its FailureReason when refused;
None when no status for it came back.

- 200 OK, or 202 Accepted without the instance in FailedSOPSequence: delivered (a warning recorded).
- 408, 429, 5xx, a FailureReason of lacking resources, no connection, no answer in time: retried
  by the outbox with its backoff.
- Any other 4xx (401 wrong credentials, 403, 404 wrong URL, 409 conflict with its FailureReason,
  413, 415): failed for good, with the reason; no retry storm against a server that said no.

Re-sending after a crash stores the same SOP Instance UID again (fixed when the result was made):
the server keeps one instance. The credentials are read from the environment or a file at each
attempt and go only into the request's Authorization header, never into a log line or a reason.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.web import DICOMwebClient
from pydicom import Dataset, dcmread

from node.config import DicomWebAuth, DicomWebTarget
from node.deliver.scu import StoreOutcome, status_text
from node.tls import describe_tls_error
from node.work.destinations import DICOMWEB_AE_TITLE

log = logging.getLogger("ainode.stow")

#: FailureReasons a later attempt may not meet: out of resources (PS3.4 B.2.3), processing failure,
#: resource limitation (PS3.7 C.4). Any other FailureReason is about the instance itself.
_TRANSIENT_FAILURES = {0x0110, 0x0213, *range(0xA700, 0xA800)}
#: WarningReasons of PS3.18 Table 10.5.3-1: coercion, elements discarded, data set does not match SOP class.
_WARNINGS = {0xB000, 0xB006, 0xB007}
#: HTTP answers that say "not now" rather than "no" (RFC 9110 15.5.9, RFC 6585 4).
_RETRY_HTTP = {HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS}


@dataclass(frozen=True)
class StowTarget:
    """A DICOMweb destination as the outbox groups and displays it (``DICOMWEB@host:port`` in a delivery row)."""

    #: The peer's name under ``peers``.
    name: str
    url: str
    settings: DicomWebTarget = field(compare=False, repr=False)

    @classmethod
    def of(cls, name: str, settings: DicomWebTarget) -> StowTarget:
        return cls(name, settings.url, settings)

    @property
    def ae_title(self) -> str:
        return DICOMWEB_AE_TITLE

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        return self.settings.port

    def __str__(self) -> str:
        # The URL was validated to carry no credentials: fit for a log line. An audit event's
        # actor column holds 128 characters.
        return self.url if len(self.url) <= 128 else self.url[:125] + "..."


class SecretUnavailable(RuntimeError):
    """The token or password cannot be read now; the message names where it should be, never its value."""


def _secret(env_key: str | None, path: Path | None, env: Mapping[str, str]) -> str:
    if env_key is not None:
        value = env.get(env_key)
        if not value:
            raise SecretUnavailable(f"the environment variable {env_key} is not set")
        return value
    assert path is not None  # DicomWebAuth's validator requires one of the two
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SecretUnavailable(f"cannot read {path.absolute()}: {exc.strerror or exc}") from None


class _PeerSession(requests.Session):
    """A session whose configured certificate check wins over REQUESTS_CA_BUNDLE (requests issue #3829)."""

    pinned_verify: str | bool | None = None

    def merge_environment_settings(self, *args: Any, **kwargs: Any) -> Any:
        settings = super().merge_environment_settings(*args, **kwargs)
        if self.pinned_verify is not None:
            settings["verify"] = self.pinned_verify
        return settings


def _session(settings: DicomWebTarget, env: Mapping[str, str]) -> requests.Session:
    session = _PeerSession()
    # Ask for the JSON form of the store response: FailedSOPSequence and its FailureReason are read from it.
    session.headers["Accept"] = "application/dicom+json"
    if settings.ca_file is not None:
        session.pinned_verify = str(settings.ca_file)
    elif not settings.verify_tls:
        session.pinned_verify = False
    auth: DicomWebAuth | None = settings.auth
    if auth is not None and auth.username is not None:
        session.auth = (auth.username, _secret(auth.password_env, auth.password_file, env))
    elif auth is not None:
        token = _secret(auth.bearer_token_env, auth.bearer_token_file, env)
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def _response_dataset(response: requests.Response) -> Dataset:
    """The store response's dataset (PS3.18 10.5.3), or an empty one when it has none in JSON."""
    if not response.content or "json" not in response.headers.get("Content-Type", ""):
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except Exception:  # a body that is not DICOM JSON: the HTTP status is all there is to go by
        return Dataset()


def _item_for(sequence: Any, sop_uid: str) -> Dataset | None:
    items = list(sequence or [])
    for item in items:
        if item.get("ReferencedSOPInstanceUID") == sop_uid:
            return item
    # One instance per request: an item that names no UID is about ours.
    return items[0] if len(items) == 1 and "ReferencedSOPInstanceUID" not in items[0] else None


def _reason(code: int) -> str:
    return f"0x{code:04X} ({status_text(code)})"


def _http(response: requests.Response) -> str:
    try:
        phrase = HTTPStatus(response.status_code).phrase
    except ValueError:
        phrase = response.reason or ""
    return f"HTTP {response.status_code} {phrase}".rstrip()


def _answered(response: requests.Response, sop_uid: str, url: str) -> StoreOutcome:
    """The outcome of a request the server answered, 2xx or not."""
    answer = _response_dataset(response)
    failed = _item_for(answer.get("FailedSOPSequence"), sop_uid)
    code = response.status_code
    if failed is not None:
        reason = failed.get("FailureReason")
        status = int(reason) if reason is not None else None
        text = f"{_http(response)}: refused with FailureReason {_reason(status)}" if status is not None else None
        transient = code >= 500 or code in _RETRY_HTTP or (status in _TRANSIENT_FAILURES and code < 400)
        return StoreOutcome(status, text or f"{_http(response)}: refused", permanent=not transient)
    if code < 300:
        stored = _item_for(answer.get("ReferencedSOPSequence"), sop_uid)
        warning = stored.get("WarningReason") if stored is not None else None
        if warning is not None:
            status = int(warning) if int(warning) in _WARNINGS else 0xB000
            return StoreOutcome(status, f"{_http(response)}: stored with warning {_reason(int(warning))}")
        if code == HTTPStatus.ACCEPTED:
            return StoreOutcome(0xB000, f"{_http(response)}: stored with warnings the server did not detail")
        return StoreOutcome(0x0000)
    if code >= 500 or code in _RETRY_HTTP:
        return StoreOutcome(None, f"{_http(response)} from {url}")
    hints: dict[int, str] = {
        HTTPStatus.UNAUTHORIZED: "the server refused the credentials (check dicomweb.auth and its secret)",
        HTTPStatus.FORBIDDEN: "the credentials may not store on this server",
        HTTPStatus.NOT_FOUND: f"no STOW-RS service at {url}/studies (check dicomweb.url)",
        HTTPStatus.METHOD_NOT_ALLOWED: f"{url}/studies does not take STOW-RS (check dicomweb.url)",
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "the server takes no request this large",
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "the server does not take application/dicom",
    }
    hint = hints.get(code)
    return StoreOutcome(None, f"{_http(response)}: {hint}" if hint else _http(response), permanent=True)


def _unreachable(exc: requests.RequestException, settings: DicomWebTarget) -> str:
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, requests.exceptions.SSLError):
        ssl_error = _ssl_cause(exc)
        return f"TLS with {where}: {describe_tls_error(ssl_error) if ssl_error else _innermost(exc)}"
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.ReadTimeout):
        return f"no answer from {where} within {settings.timeout_s:g} s"
    cause = _innermost(exc)
    if "refused" in cause.lower():
        return f"connection refused (nothing listens on {where})"
    if "name or service not known" in cause.lower() or "nodename nor servname" in cause.lower():
        return f"host name {settings.host!r} not found"
    return f"cannot reach {where}: {cause}"


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ssl module's own error under requests' and urllib3's wrappers, for its verify message."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        nested = [a for a in seen.args if isinstance(a, BaseException)]
        seen = seen.__cause__ or getattr(seen, "reason", None) or (nested[0] if nested else None)
        if not isinstance(seen, BaseException):
            return None
    return None


def _innermost(exc: BaseException) -> str:
    while exc.__cause__ is not None or (exc.args and isinstance(exc.args[0], BaseException)):
        exc = exc.__cause__ or exc.args[0]
    reason = getattr(exc, "reason", None)
    text = str(reason if isinstance(reason, BaseException | str) else exc)
    return " ".join(text.split())[:300]


def _read(item: Dataset | Path | str) -> Dataset | StoreOutcome:
    if isinstance(item, Dataset):
        return item
    try:
        return dcmread(item)
    except Exception as exc:  # pydicom raises many kinds of error for a file that is not DICOM
        return StoreOutcome(None, f"cannot read as DICOM: {' '.join(str(exc).split())[:300]}")


def stow(
    target: StowTarget,
    items: Sequence[Dataset | Path | str],
    env: Mapping[str, str] | None = None,
) -> list[StoreOutcome]:
    """STOW-RS each item to ``target``, one request each; one outcome per item, in order.

    When the server cannot be reached (or the secret cannot be read), the items not yet tried get
    the same reason without a request of their own. ``env``: where ``*_env`` secrets are read
    (the process's environment by default).
    """
    settings = target.settings
    try:
        session = _session(settings, os.environ if env is None else env)
    except SecretUnavailable as exc:
        return [StoreOutcome(None, f"not sent: {exc}")] * len(items)
    # dicomweb-client returns the response's dataset, not its HTTP status: 200 and 202 differ in meaning.
    answers: list[requests.Response] = []

    def keep(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        answers.append(response)

    session.hooks["response"].append(keep)
    client = DICOMwebClient(settings.url, session=session, timeout=settings.timeout_s)
    client.set_http_retry_params(retry=False)  # the outbox retries, with its backoff and give-up window
    outcomes: list[StoreOutcome] = []
    unreachable: str | None = None
    with session:
        for item in items:
            if unreachable is not None:
                outcomes.append(StoreOutcome(None, f"not sent: {unreachable}"))
                continue
            ds = _read(item)
            if isinstance(ds, StoreOutcome):
                outcomes.append(ds)
                continue
            sop_uid = str(ds.get("SOPInstanceUID", ""))
            # STOW-RS carries the file as it is (application/dicom): in its own transfer syntax.
            meta = getattr(ds, "file_meta", None)
            syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
            answers.clear()
            try:
                client.store_instances([ds])
            except requests.HTTPError as exc:
                if exc.response is None:
                    raise
                outcome = _answered(exc.response, sop_uid, settings.url)
            except requests.RequestException as exc:
                unreachable = _unreachable(exc, settings)
                outcomes.append(StoreOutcome(None, unreachable))
                continue
            else:
                outcome = _answered(answers[-1], sop_uid, settings.url) if answers else StoreOutcome(0x0000)
            outcomes.append(replace(outcome, transfer_syntax=syntax))
    for item, outcome in zip(items, outcomes, strict=True):
        if outcome.error and outcome.accepted:
            log.warning("STOW-RS %s to %s: %s", _name(item), target, outcome.error)
    return outcomes


def _name(item: Dataset | Path | str) -> str:
    return str(item.get("SOPInstanceUID", "?")) if isinstance(item, Dataset) else Path(item).name
