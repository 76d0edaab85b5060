"""The OpenAPI document tells the truth: every reference resolves, errors are documented as the service
answers them (400 not 422; 401 only with a key; 408/413 where a body is read), /metrics is text.

Built in-process from ``create_app`` (no server): the served document is the same object
(``tests/test_server_openapi_fuzz.py`` checks the live answers against it).
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from service.server.app import create_app
from service.settings import Settings

METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def document(api_key: str | None) -> dict[str, Any]:
    return create_app(Settings(demo=True, api_key=api_key)).openapi()


def refs(node: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    """Every ``$ref`` in ``node`` with the JSON pointer of where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            else:
                yield from refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from refs(value, f"{where}/{i}")


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """A local reference (``#/a/b~1c``) resolved in ``doc``, as RFC 6901 reads it; KeyError when it cannot."""
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


@pytest.fixture(scope="module", params=[None, "k"], ids=["no-key", "key"])
def doc(request) -> dict[str, Any]:
    return document(request.param)


def test_every_reference_resolves(doc):
    found = list(refs(doc))
    assert len(found) > 20  # the walk sees the document's references
    unresolved = []
    for where, ref in found:
        try:
            resolve(doc, ref)
        except (KeyError, IndexError, ValueError, AssertionError):
            unresolved.append(f"{where}: {ref}")
    assert not unresolved, unresolved


def test_the_walk_finds_a_broken_reference():
    doc = document(None)
    doc["paths"]["/v1/x2i"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"][
        "text_sampling"] = {"$ref": "#/$defs/SamplingOverrides"}
    with pytest.raises(KeyError):
        for _, ref in refs(doc):
            resolve(doc, ref)


def test_no_route_documents_422_and_input_errors_are_400(doc):
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, method, op in operations(doc):
        assert "422" not in op["responses"], (path, method)
        if op.get("requestBody") or op.get("parameters"):
            assert "400" in op["responses"], (path, method)


def test_401_and_security_follow_the_api_key():
    with_key, without = document("k"), document(None)
    secured = [(p, m) for p, m, op in operations(with_key) if op.get("security")]
    assert {("/metrics", "get"), ("/v1/models", "get"), ("/v1/t2i", "post"), ("/v1/images/edits", "post")} <= set(secured)
    for path, method, op in operations(with_key):
        if (path, method) in secured:
            assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"], path
        else:  # open routes never answer 401
            assert "401" not in op["responses"], path
    assert ("/health", "get") not in secured and ("/ready", "get") not in secured
    for path, method, op in operations(without):
        assert "security" not in op and "401" not in op["responses"], (path, method)
    assert "securitySchemes" not in without.get("components", {})


def test_errors_that_can_happen_are_documented(doc):
    ops = {(p, m): op["responses"] for p, m, op in operations(doc)}
    for path in ("/v1/t2i", "/v1/x2i", "/v1/guidance", "/v1/narrative", "/v1/generate", "/v1/images/generations",
                 "/v1/images/edits"):
        responses = ops[(path, "post")]
        assert {"400", "408", "413", "415", "429", "503"} <= set(responses), path
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
        assert responses["429"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "404" in ops[("/v1/images/generations", "post")] and "404" in ops[("/v1/records/{record_id}", "get")]
    for (path, method), responses in ops.items():
        for status, answer in responses.items():
            assert "X-Request-Id" in answer.get("headers", {}), (path, method, status)


def test_metrics_are_text_and_records_protobuf(doc):
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    records = doc["paths"]["/v1/records/{record_id}"]["get"]["responses"]["200"]["content"]
    assert set(records) == {"application/x-protobuf"}
    for path in ("/health", "/ready"):
        answers = doc["paths"][path]["get"]["responses"]
        assert answers["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ServiceStatus"}
        assert answers["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ServiceStatus"}


def test_streams_document_every_event_and_its_data(doc):
    def events(path: str) -> dict[str, dict]:
        schema = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        return {e["properties"]["event"]["const"]: e["properties"]["data"]["contentSchema"] for e in schema["oneOf"]}

    emu = events("/v1/narrative")
    assert set(emu) == {"text", "global_cot", "image_cot", "image_start", "image_progress", "image", "done", "error"}
    assert set(emu["done"]["required"]) >= {"id", "task", "usage", "record_id"}
    assert set(events("/v1/images/edits")) == {"image_edit.partial_image", "image_edit.completed", "error"}
    assert "image_generation.completed" in events("/v1/images/generations")


def test_multipart_bodies_are_self_contained(doc):
    for path in ("/v1/x2i", "/v1/images/edits"):
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert not list(refs(schema)), path  # no "#/$defs/..." left: nothing for a reader to resolve
        assert schema["properties"]["text_sampling"]["anyOf"][0]["properties"]["top_k"]
