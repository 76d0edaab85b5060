"""Webhooks: when a job ends, POST it to the URL its client gave, signed as Standard Webhooks specifies
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature``; the ``standardwebhooks`` package signs).

A webhook is a request this server makes on a client's behalf, so it must not become a way into the
network the server sits in (server-side request forgery):

- at submit, the whole URL is checked (:func:`check_webhook_url`): http(s), a host on
  ``--webhook-allow-hosts``, a port the pattern allows (80 and 443 unless the pattern names one), no
  credentials, nothing httpx would refuse at send time (a bad port, a control character, a bad IDNA
  label, an over-long URL). A refused URL is a 400 then, never a delivery that cannot be made;
- at delivery (hours later, after a restart, and on each retry) the host is resolved again and every
  address that is not public (loopback, RFC 1918, link-local such as 169.254.169.254, CGNAT, multicast,
  reserved, and IPv6 forms that embed one of those) is refused unless ``--webhook-allow-private``;
- the request is then made to the address that was checked, with the URL's host in ``Host`` and as the
  TLS server name (httpx's ``sni_hostname`` extension), so the name cannot be re-resolved to somewhere
  else between the check and the connection (DNS rebinding).

A failed delivery is retried with exponential backoff; whatever goes wrong during a try (a refused
address, an exception of any kind) is a failed try, so a webhook always ends ``delivered`` or ``failed``.
Logs name the endpoint, never the URL's path or query, which often hold a token.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from service.jobs.redact import redact_url

logger = logging.getLogger(__name__)

#: The longest webhook URL accepted (the body field's limit too).
MAX_WEBHOOK_URL = 2048
#: Ports a host pattern without one allows.
DEFAULT_PORTS = frozenset({80, 443})
#: One ASCII host-name label (letters, digits, hyphens inside; underscores are seen in the wild).
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
#: IPv6 prefixes that carry an IPv4 address a gateway would reach (NAT64, 6to4).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookRefused(ValueError):
    """The URL is not one this server may call."""


# ---- the URL, at submit ---------------------------------------------------------------------------------
def _check_host_name(host: str) -> None:
    """A host name httpx can send to: ASCII labels (an IDNA name, or an ``xn--`` label, is left to
    ``httpx.URL``, whose ``host`` refuses one that does not encode or decode, such as ``xn--zz``)."""
    if len(host) > 253:
        raise WebhookRefused("the webhook host name is longer than 253 characters")
    name = host[:-1] if host.endswith(".") else host
    if not name.isascii() or any(label.startswith("xn--") for label in name.split(".")):
        return
    bad = [label for label in name.split(".") if not _LABEL.match(label)]
    if bad:
        raise WebhookRefused(f"the webhook host has an invalid label {bad[0]!r}")


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _pattern_allows(pattern: str, host: str, port: int) -> bool:
    """``pattern`` is ``host`` or ``host:port`` (``fnmatch`` wildcards in either; IPv6 as ``[::1]:8080``):
    without a port only 80 and 443 are allowed."""
    pattern = pattern.strip().lower()
    if pattern.startswith("["):
        host_pat, _, rest = pattern[1:].partition("]")
        port_pat = rest[1:] if rest.startswith(":") else None
    elif pattern.count(":") == 1:
        host_pat, port_pat = pattern.split(":")
    else:
        host_pat, port_pat = pattern, None
    if not fnmatch.fnmatchcase(host, host_pat):
        return False
    return port in DEFAULT_PORTS if port_pat is None else fnmatch.fnmatchcase(str(port), port_pat)


def check_webhook_url(url: str, allow_hosts: Sequence[str], allow_private: bool = False) -> str:
    """``url`` if this server may POST to it: an absolute http(s) URL httpx accepts, to a host and port on
    ``allow_hosts`` (``fnmatch`` patterns such as ``*.example.com`` or ``127.0.0.1:*``), with no
    credentials, and (unless ``allow_private``) not an IP literal outside the public internet. Else
    :class:`WebhookRefused` with the reason. The name is not resolved here: that happens at delivery."""
    if not allow_hosts:
        raise WebhookRefused("webhooks are disabled on this server (no --webhook-allow-hosts)")
    if len(url) > MAX_WEBHOOK_URL:
        raise WebhookRefused(f"the webhook URL is longer than {MAX_WEBHOOK_URL} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise WebhookRefused("the webhook URL contains a space or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port that is not a number, or not in 0-65535
        raise WebhookRefused(f"the webhook URL is malformed ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("the webhook must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("the webhook URL may not carry credentials")
    if port == 0:
        raise WebhookRefused("the webhook URL's port must be 1-65535")
    host = parts.hostname.lower()
    ip = _ip_literal(host)
    if ip is None:
        _check_host_name(host)
    elif not allow_private and not is_public(ip):
        raise WebhookRefused(f"the webhook address {host} is not a public address")
    try:
        httpx.URL(url).host  # noqa: B018 - decoding the host is what fails at send time for a bad IDNA label
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise WebhookRefused(f"the webhook URL is malformed ({exc})") from None
    port = port if port is not None else (443 if parts.scheme == "https" else 80)
    if not any(_pattern_allows(p, host, port) for p in allow_hosts):
        raise WebhookRefused(f"the webhook host {host!r} on port {port} is not in --webhook-allow-hosts "
                             "(a pattern without a port allows 80 and 443)")
    return url


# ---- the address, at delivery ----------------------------------------------------------------------------
def is_public(ip: IPAddress) -> bool:
    """Whether ``ip`` is on the public internet: not loopback, private, link-local, CGNAT, reserved,
    unspecified or multicast, and not an IPv6 form (mapped, NAT64, 6to4) of such an IPv4 address."""
    if ip.is_multicast or not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
    return True


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses as the system resolves them (getaddrinfo, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """Where one try goes: the URL with the vetted address in place of the name, and the name for
    ``Host`` and TLS."""

    url: httpx.URL
    host_header: str
    sni_hostname: str | None


async def vet_target(url: str, resolve: Resolver, allow_private: bool) -> Target:
    """Resolve ``url``'s host now and pick an address it may reach; :class:`WebhookRefused` when none."""
    parsed = httpx.URL(url)
    host = parsed.raw_host.decode("ascii")  # the IDNA (xn--) form: what DNS, Host and TLS use
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    literal = _ip_literal(host)
    addresses = [host] if literal is not None else await resolve(host, port)
    allowed = [a for a in addresses if allow_private or is_public(ipaddress.ip_address(a.split("%")[0]))]
    if not allowed:
        raise WebhookRefused(f"the webhook host resolves to no public address ({', '.join(addresses) or 'none'})")
    host_header = host if parsed.port is None else f"{host}:{parsed.port}"
    if ":" in host and literal is not None:
        host_header = f"[{host}]" if parsed.port is None else f"[{host}]:{parsed.port}"
    sni = host if parsed.scheme == "https" and literal is None else None
    return Target(parsed.copy_with(host=allowed[0]), host_header, sni)


# ---- delivery ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    first_delay: float = 1.0  # seconds; doubled after each failure
    max_delay: float = 60.0
    timeout: float = 10.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.first_delay * 2 ** (failures - 1))


class WebhookSender:
    """Signs and delivers; one instance per process (it holds the HTTP client's connection pool).

    ``allow_hosts`` is checked again at delivery (the server may have been restarted with a shorter
    list); ``resolve`` and ``transport`` are the system's resolver and httpx's network by default (tests
    give stand-ins, so no traffic leaves loopback)."""

    def __init__(self, secret: str | None, policy: RetryPolicy = RetryPolicy(), *,
                 allow_hosts: Sequence[str] = ("*",), allow_private: bool = False,
                 resolve: Resolver = system_resolver, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._signer = Webhook(secret) if secret else None
        self.policy = policy
        self.allow_hosts, self.allow_private, self._resolve = list(allow_hosts), allow_private, resolve
        # an HTTP(S)_PROXY from the environment is still used: the URL it is given holds the vetted address
        self._client = httpx.AsyncClient(timeout=policy.timeout, follow_redirects=False, transport=transport)

    def headers(self, msg_id: str, body: bytes, when: datetime | None = None) -> dict[str, str]:
        when = when or datetime.now(timezone.utc)
        headers = {"content-type": "application/json", "webhook-id": msg_id,
                   "webhook-timestamp": str(int(when.timestamp()))}
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.sign(msg_id, when, body)
        return headers

    async def _try(self, url: str, msg_id: str, body: bytes) -> str | None:
        """One try: None when delivered, else why not."""
        target = await vet_target(url, self._resolve, self.allow_private)
        headers = {**self.headers(msg_id, body), "host": target.host_header}
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else None
        r = await self._client.post(target.url, content=body, headers=headers, extensions=extensions)
        return None if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"

    async def deliver(self, url: str, msg_id: str, body: bytes) -> bool:
        """POST until a 2xx answer or the retries are spent; True when delivered. The same ``msg_id``
        on every try lets the receiver drop duplicates. Never raises (but for cancellation)."""
        shown = redact_url(url)
        try:
            check_webhook_url(url, self.allow_hosts, self.allow_private)
        except WebhookRefused as exc:  # stored before a restart that narrowed the rules, or by an old version
            logger.error("webhook %s to %s refused (%s); not sent", msg_id, shown, exc)
            return False
        for attempt in range(1, self.policy.attempts + 1):
            try:
                why = await self._try(url, msg_id, body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever a try hits is a failed try
                why = f"{type(exc).__name__}: {_scrub(str(exc), url)}"
            if why is None:
                return True
            if attempt < self.policy.attempts:
                delay = self.policy.delay(attempt)
                logger.warning("webhook %s to %s failed (%s); retrying in %.1f s", msg_id, shown, why, delay)
                await asyncio.sleep(delay)
            else:
                logger.error("webhook %s to %s failed (%s); giving up after %d tries", msg_id, shown, why, attempt)
        return False

    async def close(self) -> None:
        await self._client.aclose()


def _scrub(message: str, url: str) -> str:
    """An exception's text without the URL's path and query (some name the URL they failed on)."""
    parts = urlsplit(url)
    for secret in (url, parts.path, parts.query):
        if secret and secret != "/":
            message = message.replace(secret, "/***")
    return message
