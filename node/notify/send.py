"""POST the due webhook rows, with exponential backoff, until delivered or given up.

Like the outbox: rows are leased first (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE``
on SQLite), so two node processes never send the same row at once; a 2xx answer marks the row
delivered; anything else (another status, a refused connection, a timeout) schedules the next
attempt by the hook's ``retry`` policy, until its window is used up and the row fails with the last
error. The row id is the event's id (body ``id`` and header ``X-AINode-Event-Id``): a receiver that
answered too late for us sees the same id again and can drop the copy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import is_postgres
from db.models import AuditEvent, WebhookEvent, WebhookState, utcnow
from db.states import set_webhook_state
from node import __version__
from node.config import ConfigError, Webhook
from node.deliver.outbox import Backoff
from node.loops import Loop
from node.reasons import one_line_reason

log = logging.getLogger("ainode.webhooks")


class WebhookError(Exception):
    """An attempt that did not reach a 2xx answer; ``status`` is the receiver's HTTP status, if it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


#: POST ``body`` to ``url`` with ``headers`` within ``timeout_s``; returns the 2xx status or raises WebhookError.
PostFn = Callable[[str, bytes, Mapping[str, str], float], int]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # urllib turns a redirected POST into a GET without its body: a redirect is an error to fix in the URL.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
    """One POST with the standard library; any answer but 2xx is a :class:`WebhookError`."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with _opener.open(request, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        raise WebhookError(f"HTTP {exc.code} {exc.reason}".strip(), exc.code) from None
    except urllib.error.URLError as exc:
        raise WebhookError(f"cannot reach {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed answer
        raise WebhookError(f"{url}: {one_line_reason(exc)}") from None
    if not 200 <= status < 300:
        raise WebhookError(f"HTTP {status}", status)
    return status


@dataclass(frozen=True)
class _Hook:
    """A configured webhook with its secrets read from the environment."""

    settings: Webhook
    backoff: Backoff
    secret: bytes | None
    bearer_token: str | None


@dataclass
class WebhookPass:
    """What one pass over the due rows did."""

    delivered: int = 0
    retrying: int = 0
    failed: int = 0


class WebhookSender:
    """Sends the due ``webhook_events`` rows of the configured hooks.

    Parameters
    ----------
    sessions
        The node's database.
    hooks
        The configured webhooks (``Config.webhooks``).
    owner
        Who holds a lease (``host:pid``).
    env
        Where ``secret_env`` and ``bearer_token_env`` are read, once, here.
    post
        The HTTP POST (tests pass their own).
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        hooks: Sequence[Webhook],
        owner: str,
        env: Mapping[str, str],
        post: PostFn = post_json,
        batch: int = 20,
    ) -> None:
        self.sessions = sessions
        self.owner = owner
        self.post = post
        self.batch = batch
        self.hooks = {h.name: _read_hook(i, h, env) for i, h in enumerate(hooks)}
        # Long enough for a whole batch of timeouts: a lease never runs out while its row is being sent.
        self.lease_s = 60.0 + batch * max((h.timeout_s for h in hooks), default=5.0)

    def run_once(self, now: datetime | None = None) -> int:
        """Send everything due; returns how many rows were delivered."""
        return self.run_pass(now).delivered

    def run_pass(self, now: datetime | None = None) -> WebhookPass:
        """Lease the due rows no other sender holds and try each once. ``now`` fixes the clock (tests)."""
        clock: Callable[[], datetime] = (lambda: now) if now is not None else utcnow
        summary = WebhookPass()
        for row_id, hook_name, event, payload in self._lease(clock()):
            hook = self.hooks.get(hook_name)
            if hook is None:
                self._record(row_id, clock(), summary, None, None, f"webhook {hook_name} is no longer configured")
                continue
            body = json.dumps({"event": event, "id": row_id, **payload}, separators=(",", ":")).encode()
            try:
                status: int | None = self.post(hook.settings.url, body, self._headers(hook, event, row_id, body),
                                               hook.settings.timeout_s)  # fmt: skip
                error = None
            except WebhookError as exc:
                status, error = exc.status, str(exc)
            except Exception as exc:  # a receiver's odd answer must not stop the loop
                status, error = None, one_line_reason(exc)
            self._record(row_id, clock(), summary, hook, status, error)
        return summary

    def _lease(self, now: datetime) -> list[tuple[int, str, str, dict[str, Any]]]:
        with self.sessions() as session, session.begin():
            stmt = (
                select(WebhookEvent)
                .where(
                    WebhookEvent.state == WebhookState.PENDING,
                    WebhookEvent.next_attempt_at <= now,
                    or_(WebhookEvent.leased_until.is_(None), WebhookEvent.leased_until < now),
                )
                .order_by(WebhookEvent.next_attempt_at, WebhookEvent.id)
                .limit(self.batch)
            )
            if is_postgres(session.get_bind()):
                stmt = stmt.with_for_update(skip_locked=True)
            rows = list(session.scalars(stmt))
            for row in rows:
                row.leased_until = now + timedelta(seconds=self.lease_s)
                row.leased_by = self.owner
            return [(row.id, row.hook, row.event, dict(row.payload)) for row in rows]

    @staticmethod
    def _headers(hook: _Hook, event: str, row_id: int, body: bytes) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"dicom-ai-node/{__version__}",
            "X-AINode-Event": event,
            "X-AINode-Event-Id": str(row_id),
        }
        if hook.secret is not None:
            headers["X-AINode-Signature"] = "sha256=" + hmac.new(hook.secret, body, hashlib.sha256).hexdigest()
        if hook.bearer_token is not None:
            headers["Authorization"] = f"Bearer {hook.bearer_token}"
        return headers

    def _record(
        self,
        row_id: int,
        now: datetime,
        summary: WebhookPass,
        hook: _Hook | None,
        status: int | None,
        error: str | None,
    ) -> None:
        with self.sessions() as session, session.begin():
            row = session.get(WebhookEvent, row_id, with_for_update=True)
            if row is None or row.state != WebhookState.PENDING or row.leased_by != self.owner:
                return  # another sender took it over after our lease ran out: its outcome stands
            row.leased_until = row.leased_by = None
            row.last_status = status
            if hook is not None:
                row.attempts += 1
            if hook is not None and error is None:
                set_webhook_state(row, WebhookState.DELIVERED, None, now)
                summary.delivered += 1
                log.info("webhook %s: %s %d delivered (HTTP %s)", row.hook, row.event, row.id, status)
                return
            error = (error or "")[:2000]
            if hook is None or hook.backoff.gives_up(row.attempts):
                set_webhook_state(row, WebhookState.FAILED, error, now)
                summary.failed += 1
                log.error("webhook %s: %s %d given up after %d attempts: %s", row.hook, row.event, row.id,
                          row.attempts, error)  # fmt: skip
                detail = f"gave up {row.event} {row.id} ({row.subject}) after {row.attempts} attempts: {error}"
                session.add(AuditEvent(kind="webhook", actor=self.owner, subject=row.hook, detail=detail[:2000]))
                return
            row.last_error = error  # pending still: why the last attempt failed
            delay_s = hook.backoff.delay_s(row.attempts)
            row.next_attempt_at = now + timedelta(seconds=delay_s)
            summary.retrying += 1
            log.warning("webhook %s: %s %d failed (attempt %d), retry in %.1f s: %s", row.hook, row.event, row.id,
                        row.attempts, delay_s, error)  # fmt: skip


def _read_hook(index: int, hook: Webhook, env: Mapping[str, str]) -> _Hook:
    """The hook with its secrets; a named variable that is unset is a :class:`ConfigError` naming the key."""

    def secret(key: str) -> str | None:
        var = getattr(hook, key)
        if var is None:
            return None
        value = env.get(var)
        if not value:
            raise ConfigError(f"config error: webhooks.{index}.{key}: environment variable {var} is not set")
        return value

    retry = hook.retry
    secret_text = secret("secret_env")
    return _Hook(
        settings=hook,
        backoff=Backoff(retry.initial_delay_s, retry.factor, retry.max_delay_s, retry.give_up_after_s),
        secret=secret_text.encode() if secret_text is not None else None,
        bearer_token=secret("bearer_token_env"),
    )


def webhook_loop(sender: WebhookSender, poll_s: float = 1.0) -> Loop:
    """The webhooks in the background: a pass over the due rows every ``poll_s``, at once again after a busy one."""
    return Loop("webhooks", lambda: sender.run_pass().delivered, poll_s, log=log)
