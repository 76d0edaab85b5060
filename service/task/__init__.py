"""The task layer: plan a generation, run it on the engine and the VQ worker, describe the result.

The HTTP layer imports this package (and the runtime) only; everything it needs about a generation is
named here. ``planner`` resolves the task defaults once and checks every limit; ``runner`` drives a
generation and yields ``events``; ``resources`` builds the engine and the VQ worker.
"""

from service.engine.protocol import AsyncEngine, EngineError, EngineUnavailableError
from service.engine.vllm_logs import LOG_FORMAT, quiet_engine_logs
from service.task.events import (
    AnswerPart,
    Finished,
    ImageProgress,
    ImageReady,
    ImageStart,
    Outcome,
    RunEvent,
    TextOut,
    Usage,
)
from service.task.planner import (
    DecodingChoice,
    GenerationOptions,
    Plan,
    PlanError,
    build_request,
    plan_request,
    resolve,
    resolve_decoding,
)
from service.task.previews import PreviewSchedule
from service.task.resources import (
    CheckpointError,
    EngineKind,
    SettingError,
    build_engine,
    check_model,
    cpu_default_dtype,
    engine_name,
    load_tokenizer,
    model_kind,
    serving_engine,
    start_vq_worker,
)
from service.task.runner import AnswerBuilder, GenerationInput, GenerationRunner, ImageCodecAsync, Prepared
from service.tokenizer import Emu35Tokenizer
from service.types import EngineStats, SamplingOverride, SamplingSettings

__all__ = [
    "AnswerBuilder",
    "AnswerPart",
    "AsyncEngine",
    "CheckpointError",
    "DecodingChoice",
    "Emu35Tokenizer",
    "EngineError",
    "EngineKind",
    "EngineUnavailableError",
    "EngineStats",
    "Finished",
    "GenerationInput",
    "GenerationOptions",
    "GenerationRunner",
    "ImageCodecAsync",
    "ImageProgress",
    "ImageReady",
    "ImageStart",
    "LOG_FORMAT",
    "Outcome",
    "Plan",
    "PlanError",
    "Prepared",
    "PreviewSchedule",
    "RunEvent",
    "SamplingOverride",
    "SamplingSettings",
    "SettingError",
    "TextOut",
    "Usage",
    "build_engine",
    "build_request",
    "check_model",
    "cpu_default_dtype",
    "engine_name",
    "load_tokenizer",
    "model_kind",
    "plan_request",
    "quiet_engine_logs",
    "resolve",
    "resolve_decoding",
    "serving_engine",
    "start_vq_worker",
]
