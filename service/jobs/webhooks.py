"""Webhooks: when a job ends, POST it to the URL its client gave, signed as Standard Webhooks specifies
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature``; the ``standardwebhooks`` package signs).

Only hosts on ``--webhook-allow-hosts`` may be named (checked at submit, so a refused host is a 400 and
the server cannot be pointed at its own network). A failed delivery is retried with exponential backoff;
the delivery state lives in the store, so deliveries pending at a restart are made after it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

logger = logging.getLogger(__name__)


class WebhookRefused(ValueError):
    """The URL is not one this server may call."""


def check_webhook_url(url: str, allow_hosts: Sequence[str]) -> str:
    """``url`` if it is http(s) to an allowed host (``fnmatch`` patterns such as ``*.example.com``);
    else :class:`WebhookRefused` with the reason."""
    if not allow_hosts:
        raise WebhookRefused("webhooks are disabled on this server (no --webhook-allow-hosts)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("the webhook must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise WebhookRefused("the webhook URL may not carry credentials")
    host = parts.hostname.lower()
    if not any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in allow_hosts):
        raise WebhookRefused(f"the webhook host {host!r} is not in --webhook-allow-hosts")
    return url


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    first_delay: float = 1.0  # seconds; doubled after each failure
    max_delay: float = 60.0
    timeout: float = 10.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.first_delay * 2 ** (failures - 1))


class WebhookSender:
    """Signs and delivers; one instance per process (it holds the HTTP client's connection pool)."""

    def __init__(self, secret: str | None, policy: RetryPolicy = RetryPolicy()) -> None:
        self._signer = Webhook(secret) if secret else None
        self.policy = policy
        self._client = httpx.AsyncClient(timeout=policy.timeout, follow_redirects=False)

    def headers(self, msg_id: str, body: bytes, when: datetime | None = None) -> dict[str, str]:
        when = when or datetime.now(timezone.utc)
        headers = {"content-type": "application/json", "webhook-id": msg_id,
                   "webhook-timestamp": str(int(when.timestamp()))}
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.sign(msg_id, when, body)
        return headers

    async def deliver(self, url: str, msg_id: str, body: bytes) -> bool:
        """POST until a 2xx answer or the retries are spent; True when delivered. The same ``msg_id``
        on every try lets the receiver drop duplicates."""
        for attempt in range(1, self.policy.attempts + 1):
            try:
                r = await self._client.post(url, content=body, headers=self.headers(msg_id, body))
                if 200 <= r.status_code < 300:
                    return True
                why = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if attempt < self.policy.attempts:
                delay = self.policy.delay(attempt)
                logger.warning("webhook %s to %s failed (%s); retrying in %.1f s", msg_id, url, why, delay)
                await asyncio.sleep(delay)
            else:
                logger.error("webhook %s to %s failed (%s); giving up after %d tries", msg_id, url, why, attempt)
        return False

    async def close(self) -> None:
        await self._client.aclose()
