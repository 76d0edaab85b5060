"""The two headers the jobs API parses, as properties: ``Prefer`` (RFC 7240: respond-async anywhere in
the list, whatever its parameters and spacing; anything else ignored) and ``Last-Event-ID`` (a
non-negative integer, or a 400)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from service.server.core.errors import APIError
from service.server.core.jobs import decode_spec, encode_spec, prefers_async
from service.server.jobs.routes import last_event_id

TOKENS = st.sampled_from(["return=minimal", "return=representation", "wait=10", "handling=lenient", "foo", "x=y"])
SPACE = st.sampled_from(["", " ", "  ", "\t"])


def request_with(*headers: tuple[str, str]) -> Request:
    return Request({"type": "http", "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers]})


@given(st.lists(TOKENS, max_size=4), st.lists(TOKENS, max_size=3), SPACE, st.booleans(),
       st.sampled_from(["respond-async", "Respond-Async", "RESPOND-ASYNC"]), st.sampled_from(["", "; x=1", ";q"]))
def test_prefer_respond_async_is_found_anywhere_in_the_list(before, after, sp, split, token, params):
    prefs = [*before, token + params, *after]
    if split:  # the same preferences over two Prefer headers
        headers = [("Prefer", f",{sp}".join(prefs[:1])), ("Prefer", f",{sp}".join(prefs[1:]))]
    else:
        headers = [("Prefer", f",{sp}".join(prefs))]
    assert prefers_async(request_with(*[h for h in headers if h[1]]))


@given(st.lists(TOKENS, min_size=1, max_size=5))
def test_other_preferences_are_ignored(prefs):
    assert not prefers_async(request_with(("Prefer", ", ".join(prefs))))
    assert not prefers_async(request_with(("Prefer", "respond-asynchronously")))
    assert not prefers_async(request_with())


@given(st.integers(min_value=0, max_value=2**31 - 1))
def testlast_event_id_reads_a_non_negative_integer(n):
    assert last_event_id(request_with(("Last-Event-ID", str(n)))) == n


@given(st.integers(min_value=2**31, max_value=10**30))
def test_a_last_event_id_beyond_int4_is_a_400_not_a_broken_stream(n):
    """Event ids are PostgreSQL int4: a larger one would fail every read of the stream, in a loop."""
    with pytest.raises(APIError) as err:
        last_event_id(request_with(("Last-Event-ID", str(n))))
    assert err.value.status == 400 and err.value.param == "Last-Event-ID"


@settings(max_examples=25, deadline=None)
@example("r" * 128)
@example("r" * 129)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=200))
def test_replica_id_is_checked_at_the_edge(name):
    """A replica id over 128 characters (the store's column) made every claim fail; now the start refuses it."""
    from pydantic import ValidationError

    from service.settings import load_settings

    if len(name) <= 128:
        assert load_settings(["--demo", f"--replica-id={name}"]).replica_id == name
    else:
        with pytest.raises(ValidationError, match="replica_id"):
            load_settings(["--demo", f"--replica-id={name}"])


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False), st.text(min_size=1, max_size=80))
def test_a_list_cursor_round_trips(created_at, job_id):
    from service.server.jobs.cursor import CURSOR_PREFIX, decode_cursor, encode_cursor

    cursor = encode_cursor(created_at, job_id)
    assert cursor.startswith(CURSOR_PREFIX) and decode_cursor(cursor) == (created_at, job_id)


@given(st.text(max_size=40))
def test_anything_else_as_a_cursor_is_a_400_naming_after(junk):
    from service.server.jobs.cursor import CURSOR_PREFIX, decode_cursor

    for bad in ("", "x", "e30", "WzFd", "WyJhIiwiYiJd", "W3RydWUsImEiXQ"):  # {}, [1], ["a","b"], [true,"a"]
        with pytest.raises(APIError) as err:
            decode_cursor(CURSOR_PREFIX + bad)
        assert err.value.status == 400 and err.value.param == "after"
    try:  # whatever comes: a cursor, or a 400 naming `after`, never another exception
        at, job_id = decode_cursor(CURSOR_PREFIX + junk)
        assert isinstance(at, float) and isinstance(job_id, str)
    except APIError as exc:
        assert exc.status == 400 and exc.param == "after"


@given(st.text(min_size=1, max_size=30).filter(lambda s: not (s.isascii() and s.isdigit())))
def test_any_otherlast_event_id_is_a_400(raw):
    try:
        raw.encode("latin-1")
    except UnicodeEncodeError:
        return  # not sendable as a header
    with pytest.raises(APIError) as err:
        last_event_id(request_with(("Last-Event-ID", raw)))
    assert err.value.status == 400 and err.value.code == "invalid_last_event_id"


def test_nolast_event_id_starts_at_the_beginning():
    assert last_event_id(request_with()) == 0


@given(st.lists(st.one_of(st.binary(max_size=64), st.text(max_size=64)), max_size=3))
def test_a_stored_request_round_trips(images):
    from service.prompts import Task
    from service.schema.emu35 import T2IRequest

    params = T2IRequest(prompt="a fox", seed=3)
    stored = decode_spec(encode_spec("t2i", Task.T2I, params, images))
    assert (stored.endpoint, stored.task, stored.images) == ("t2i", Task.T2I, images)
    assert T2IRequest.model_validate(stored.params) == params
