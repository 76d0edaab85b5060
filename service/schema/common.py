"""The API's shared models: prompts, sampling overrides, the error shape, the service's status and the model
list. The Emu3.5 routes' models are in :mod:`service.schema.emu35` (the batch command reads the same request);
the OpenAI family's own models are in ``service/server/openai/protocol.py``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.limits import MAX_PROMPT_CHARS, MAX_TEMPERATURE
from service.task.planner import DecodingChoice
from service.types import MAX_DRAFT_LEN, MAX_WINDOW, MIN_WINDOW, DecodingMode, SamplingOverride


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("prompt must not be empty")
    return v


#: A user prompt: non-blank text of bounded length (the document says minLength 1; a pattern saying "not
#: only spaces" would cost schema tools seconds over a 100,000-character limit).
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS, json_schema_extra={"minLength": 1}),
                   AfterValidator(_not_blank)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: A 16×16 px PNG (base64) for the documented examples: Swagger UI's "Try it out" sends them as they are.
EXAMPLE_PNG = ("iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mPUiDrBQApgYiARjGoY1TB0NAAAI7gBavYfh54AAAAA"
               "SUVORK5CYII=")


def _examples(*examples: dict) -> ConfigDict:
    """A request model's documented examples (its JSON schema's ``examples``)."""
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class SamplingOverrides(_Strict):
    """Sampling of one kind of token; a missing field keeps the task's default."""

    top_k: int | None = Field(None, ge=1, strict=True, description="keep the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, strict=True, description="nucleus mass")
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, strict=True, description="0 = greedy")


def sampling_override(over: SamplingOverrides | None) -> SamplingOverride | None:
    """The API's sampling fields as the task layer's override (None: all defaults)."""
    if over is None:
        return None
    o = SamplingOverride(over.top_k, over.top_p, over.temperature)
    return None if o.empty else o
class DecodingParams(_Strict):
    """How the images are drawn (the engine must offer the mode: ``/v1/models`` lists them); a missing field
    is the server's default (``--decoding``, ``--draft-len``, ``--window``), else the engine's."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"mode": "jacobi", "draft_len": 16}]})

    mode: DecodingMode | None = Field(
        None, description="ar: one token per forward pass; jacobi: speculative Jacobi decoding, draft_len tokens "
                          "verified per pass (lossless); zipar: row r+1 starts once row r has window tokens "
                          "(approximate, exact when window ≥ the row width), with draft_len > 1 rows drafted "
                          "with Jacobi")
    draft_len: int | None = Field(None, ge=1, le=MAX_DRAFT_LEN, strict=True,
                                  description="jacobi / zipar: draft tokens verified per pass")
    window: int | None = Field(None, ge=MIN_WINDOW, le=MAX_WINDOW, strict=True,
                               description="zipar: tokens a row needs before the next row opens")


#: The ``decoding`` field of every generation request (Emu3.5's routes, OpenAI's ``extra_body``).
DECODING_FIELD_DESCRIPTION = ("the decoding schedule of the images (native engine: ar, jacobi, zipar; vllm and "
                              "reference: ar only); missing fields are the server's defaults")


class DecodingData(BaseModel):
    """A schedule with its defaults filled in (what drew an answer's images, what a request gets by default)."""

    mode: DecodingMode
    draft_len: int | None = None
    window: int | None = None


#: The ``webhook`` extension field of every generation request (the ``Webhook`` header is the other way).
WEBHOOK_FIELD_DESCRIPTION = ("with `Prefer: respond-async`: a URL the finished job is POSTed to, signed as Standard "
                             "Webhooks specifies; its host must be in --webhook-allow-hosts")


class ServiceStatus(BaseModel):
    """``/health`` and ``/ready``: the service's state, and why it is not ready when that is known."""

    status: Literal["ok", "ready", "loading", "failed", "draining", "stopped", "dead"]
    error: str | None = Field(None, description="why the start failed or the engine died; only to a caller "
                                                "with the API key when one is set (it may name files)")
    model_kind: Literal["emu3.5", "flashar"] | None = Field(
        None, description="on /ready: the kind of checkpoint served (flashar: anti-diagonal text-to-image only)")
    job_store: Literal["ok", "unavailable", "full", "waiting"] | None = Field(
        None, description="on /ready: the job store as this replica last saw it (waiting: not open yet, see "
                          "--job-store-wait; full: new jobs are answered 507)")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "emu35-serve"
    model_kind: Literal["emu3.5", "flashar"] = Field(
        "emu3.5", description="emu3.5: every task, autoregressive; flashar: text-to-image in H+W−1 steps")
    engine: Literal["vllm", "reference", "native", "flashar"] = Field(..., description="the engine serving it")
    schedules: list[DecodingMode] = Field(
        ..., description="the decoding modes a request's `decoding.mode` may name (empty: the engine draws with "
                         "its own schedule, FlashAR's anti-diagonals)")
    decoding: DecodingData | None = Field(
        None, description="what a request that names no schedule gets (--decoding; absent when none can be chosen)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def decoding_choice(params: DecodingParams | None) -> DecodingChoice | None:
    """The API's ``decoding`` object as the task layer's choice (None: the server's default schedule)."""
    if params is None:
        return None
    return DecodingChoice(params.mode, params.draft_len, params.window)
