"""The list cursor: where a page of jobs ended, as ``(created_at, id)``, so the next page starts in the
right place even once the job it names is deleted (a job id alone would have to be looked up)."""

from __future__ import annotations

import base64
import json

from service.server.core.errors import bad_request

#: Cursors start with this, so ``after`` can still take a job id (which starts ``job-``).
CURSOR_PREFIX = "cur_"


def encode_cursor(created_at: float, job_id: str) -> str:
    raw = json.dumps([created_at, job_id], separators=(",", ":")).encode()
    return CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[float, str]:
    """The ``(created_at, id)`` of a cursor; 400 naming ``after`` when it is not one of ours."""
    body = text[len(CURSOR_PREFIX):]
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not isinstance(job_id, str):
            raise ValueError(text)
    except (ValueError, TypeError):
        raise bad_request("after is not a cursor this server gave (pass the previous page's next_cursor)",
                          "invalid_cursor", "after") from None
    return float(at), job_id
