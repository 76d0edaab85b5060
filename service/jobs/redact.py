"""What of a URL may be written to a log: enough to tell which endpoint was meant, never a secret in it.

A webhook URL often carries its token in the path or the query (``/hooks/T0KEN``, ``?token=…``), and a
job store URL its password; logs are read by more people than the configuration is, so both are masked
before they are written.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

#: What replaces a hidden part.
MASK = "***"
#: Query keys of a database URL that hold a secret (libpq's ``password``, ``sslpassword``, …).
SECRET_QUERY_WORDS = ("password", "secret", "token", "key")


def redact_url(url: str) -> str:
    """``scheme://host[:port]/***``: the endpoint without user info, path, query or fragment (any of which
    may hold a token); a string that is not a URL at all is replaced whole."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return MASK
    if not parts.scheme or not host:
        return MASK
    shown = f"[{host}]" if ":" in host else host
    if port is not None:
        shown += f":{port}"
    hidden = parts.path not in ("", "/") or parts.query or parts.fragment
    return f"{parts.scheme}://{shown}/{MASK if hidden else ''}"


def redact_store_url(url: str | None) -> str | None:
    """``--job-store`` with its password (and any secret query parameter) masked; the rest (driver, user,
    host, database) is kept, since that is what an operator needs to see in a start-up log."""
    if not url:
        return url
    try:
        parsed = make_url(url)
    except ArgumentError:
        return MASK
    secret_keys = [k for k in parsed.query if any(w in k.lower() for w in SECRET_QUERY_WORDS)]
    if secret_keys:
        parsed = parsed.update_query_dict({k: MASK for k in secret_keys})
    return parsed.render_as_string(hide_password=True).replace(quote(MASK, safe=""), MASK)
