"""From what a client asked to what the engine runs: task defaults resolved once, limits checked once.

:func:`resolve` is the only place that reads the task defaults table: it turns a task, the model
variant and the client's overrides into a :class:`Plan` with every setting filled in. :func:`plan_request`
then builds the prompts and the engine request from a plan and the encoded reference images. Nothing
here runs a model; the runner encodes images and calls the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from service.limits import MAX_REFERENCE_IMAGES, MIN_IMAGE_AREA
from service.prompts import (
    ExplicitGrid,
    ModelVariant,
    SizeSpec,
    Task,
    build_prompts,
    defaults_for,
    fit_grid_to_area,
    grid_for_pixels,
    is_pixel_size,
    parse_size,
    parse_size_spec,
    resolve_target_grid,
)
from service.tokenizer import Emu35Tokenizer
from service.types import (
    DECODING_MODES,
    Decoding,
    GenerationRequest,
    SamplingOverride,
    SamplingSettings,
    UncondMode,
)
from service.vq.resize import reference_image_size


class PlanError(ValueError):
    """The request cannot be run as asked (a client error); the message says why and ``param`` which
    field it is about, when one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class DecodingChoice:
    """A client's ``decoding`` object: a missing mode is the server's default (``--decoding``), a missing
    ``draft_len`` / ``window`` the server's for that mode, else the engine's."""

    mode: str | None = None
    draft_len: int | None = None
    window: int | None = None


def resolve_decoding(choice: DecodingChoice | None, default: Decoding | None, schedules: tuple[str, ...],
                     engine: str = "serving") -> Decoding:
    """The schedule a request's images are drawn with, or a :class:`PlanError` naming the field.

    ``default`` is the server's (``--decoding``; None: the engine's first schedule, ``ar``), ``schedules``
    what the engine offers. An engine that offers none (FlashAR: its own anti-diagonal order) refuses a
    request that names a schedule and ignores the ``ar`` it is given otherwise."""
    if not schedules:
        if choice is not None:
            raise PlanError(f"the {engine} engine draws with its own schedule; a request cannot choose one",
                            "decoding")
        return Decoding()
    base = default if default is not None else Decoding(schedules[0])  # type: ignore[arg-type]
    mode = base.mode if choice is None or choice.mode is None else choice.mode
    if mode not in DECODING_MODES:
        raise PlanError(f"decoding.mode must be one of {', '.join(DECODING_MODES)}, got {mode!r}", "decoding.mode")
    if mode not in schedules:
        raise PlanError(f"decoding.mode {mode!r} is not offered by the {engine} engine, which offers "
                        f"{', '.join(schedules)}", "decoding.mode")
    inherit = mode == base.mode  # the server's draft_len / window belong to its own mode
    draft_len = choice.draft_len if choice is not None and choice.draft_len is not None else \
        (base.draft_len if inherit else None)
    window = choice.window if choice is not None and choice.window is not None else (base.window if inherit else None)
    try:
        return Decoding(mode, draft_len, window)  # type: ignore[arg-type]
    except ValueError as exc:  # the message starts with the field it is about: decoding.draft_len, …
        field_name = str(exc).split()[0]
        raise PlanError(str(exc), field_name if field_name.startswith("decoding.") else "decoding") from None


@dataclass(frozen=True)
class GenerationOptions:
    """A client's overrides; None (or an empty override) takes the (task, model variant) default."""

    size: str | None = None
    cfg_scale: float | None = None
    max_new_tokens: int | None = None
    text: SamplingOverride | SamplingSettings | None = None
    image: SamplingOverride | SamplingSettings | None = None
    seed: int | None = None
    image_area: int | None = None  # pixels; reference images are resized to it, sizes scale with it
    variant: ModelVariant = ModelVariant.EMU35
    #: A fraction of the default image area (OpenAI's quality presets); ``image_area`` wins over it.
    area_scale: float = 1.0
    #: An explicit WxH larger than the image area is scaled down to the nearest grid of its aspect within
    #: the area (OpenAI's sizes), instead of being drawn as asked.
    fit_size_to_area: bool = False
    uncond_mode: UncondMode = "lockstep"  # what the guidance branch sees (design.md §5.2)
    decoding: DecodingChoice | None = None  # the schedule asked for (None: the server's default)


@dataclass(frozen=True)
class Plan:
    """Every setting of one generation, defaults filled in (what :func:`resolve` returns)."""

    task: Task
    image_area: int
    size: str | None  # a size specification (see prompts.parse_size_spec); None: the default for the inputs
    default_size: str
    default_size_with_images: str
    cfg_scale: float
    text: SamplingSettings
    image: SamplingSettings
    max_new_tokens: int
    max_new_tokens_given: bool
    stop: str  # "eoi" | "eos"
    seed: int | None
    fit_size_to_area: bool = False
    uncond_mode: UncondMode = "lockstep"
    decoding: Decoding = field(default_factory=Decoding)  # set by the runner, which knows the engine
    metadata: dict = field(default_factory=dict, compare=False)


def _sampling(over: SamplingOverride | SamplingSettings | None, default: SamplingSettings,
              param: str) -> SamplingSettings:
    if over is None:
        return default
    if isinstance(over, SamplingSettings):
        return over
    try:
        return over.over(default)
    except ValueError as exc:
        raise PlanError(str(exc), param) from None


def resolve(task: Task | str, options: GenerationOptions, service_image_area: int | None = None) -> Plan:
    """Fill in every default of ``task`` on ``options.variant``: the one function that reads them.

    ``service_image_area`` is a service-wide override of every task's default image area (the demo's
    small images); a request's own ``image_area`` still wins."""
    task = Task(task)
    d = defaults_for(task, options.variant)
    area = options.image_area or max(MIN_IMAGE_AREA, round((service_image_area or d.image_area) * options.area_scale))
    return Plan(
        task=task,
        image_area=area,
        size=options.size,
        default_size=d.default_size,
        default_size_with_images=d.default_size_with_images,
        cfg_scale=d.cfg_scale if options.cfg_scale is None else options.cfg_scale,
        text=_sampling(options.text, d.text, "text_sampling"),
        image=_sampling(options.image, d.image, "image_sampling"),
        max_new_tokens=options.max_new_tokens or d.max_new_tokens,
        max_new_tokens_given=options.max_new_tokens is not None,
        stop=d.stop,
        seed=options.seed,
        fit_size_to_area=options.fit_size_to_area,
        uncond_mode=options.uncond_mode,
    )


def check_reference_count(count: int) -> None:
    """The one check of the reference-image limit (:data:`MAX_REFERENCE_IMAGES`)."""
    if count > MAX_REFERENCE_IMAGES:
        raise PlanError(f"at most {MAX_REFERENCE_IMAGES} reference images are supported, got {count}", "images")


def image_token_count(height: int, width: int) -> int:
    """Tokens one generated image takes: BOI, the header digits, '*', IMG, then H·(W+1) (design.md §3)."""
    return 3 + len(str(height)) + len(str(width)) + height * (width + 1)


def check_reference_tokens(sizes: Sequence[tuple[int, int]], plan: Plan, downsample: int,
                           max_model_len: int | None) -> None:
    """Refuse reference images whose tokens alone would not fit the model's context, before any is encoded.

    Each image is resized to the plan's image area before encoding, and encoding costs memory in
    proportion to that area; a request's ``image_area`` may ask for up to ``MAX_IMAGE_AREA`` pixels, so
    a 16×16 px upload would otherwise be blown up and encoded at 16 megapixels only to be refused by
    the context check afterwards. ``sizes`` are the uploads' (width, height)."""
    if max_model_len is None or not sizes:
        return
    tokens = 0
    for width, height in sizes:
        w, h = reference_image_size(width, height, plan.image_area, downsample)
        tokens += image_token_count(h // downsample, w // downsample)
    if tokens >= max_model_len:
        raise PlanError(f"the reference images at an image area of {plan.image_area} px take {tokens} tokens, too "
                        f"many for the model's context of {max_model_len} tokens; ask for a smaller image_area",
                        "image_area")


def plan_request(tok: Emu35Tokenizer, task: Task | str, question: str, reference_grids: Sequence[np.ndarray],
                 options: GenerationOptions, request_id: str, max_model_len: int | None = None,
                 service_image_area: int | None = None) -> GenerationRequest:
    """:func:`resolve` then :func:`build_request`, for callers that have the reference grids already."""
    return build_request(tok, resolve(task, options, service_image_area), question, reference_grids, request_id,
                         max_model_len)


def _target_grid(plan: Plan, reference_grids: Sequence[np.ndarray]) -> tuple[int, int] | None:
    """The grid every image is forced to (None: the model writes the header); raises PlanError on ``size``."""
    try:
        spec: SizeSpec
        if plan.size and plan.fit_size_to_area and is_pixel_size(plan.size):
            spec = ExplicitGrid(*fit_grid_to_area(grid_for_pixels(*parse_size(plan.size), max_side=None),
                                                  plan.image_area))
        elif plan.size:
            spec = parse_size_spec(plan.size, plan.image_area)
        else:
            spec = parse_size_spec(plan.default_size_with_images if reference_grids else plan.default_size,
                                   plan.image_area)
        return resolve_target_grid(spec, [g.shape for g in reference_grids])
    except (ValueError, TypeError) as exc:
        raise PlanError(str(exc), "size") from exc


def build_request(tok: Emu35Tokenizer, plan: Plan, question: str, reference_grids: Sequence[np.ndarray],
                  request_id: str, max_model_len: int | None = None) -> GenerationRequest:
    """The engine request of ``plan``: prompts, the image size and the token budget.

    With ``max_model_len`` a default ``max_new_tokens`` is cut to what the context leaves after the
    prompt (the release's 32,768 for interleaved tasks would otherwise never fit); an explicit one is
    left for the engine to accept or refuse. Raises :class:`PlanError`."""
    check_reference_count(len(reference_grids))
    try:
        prompts = build_prompts(tok, plan.task, question, reference_grids)
    except (ValueError, TypeError) as exc:
        raise PlanError(str(exc)) from exc
    target = _target_grid(plan, reference_grids)
    need = image_token_count(*target) if plan.task in (Task.T2I, Task.X2I) and target is not None else None
    max_new = plan.max_new_tokens
    if not plan.max_new_tokens_given:
        if need is not None:  # the default budget grows to hold the forced image (e.g. 1536x1024 px)
            max_new = max(max_new, need)
        if max_model_len is not None:
            room = max_model_len - max(len(prompts.cond), len(prompts.uncond))
            if room < 1:
                raise PlanError(f"the prompt ({len(prompts.cond)} tokens) leaves no room in the model's context "
                                f"of {max_model_len} tokens")
            max_new = min(max_new, room)
    if need is not None and max_new < need:
        assert target is not None
        raise PlanError(f"max_new_tokens {max_new} cannot hold a {target[0]}×{target[1]}-token image "
                        f"({need} tokens)", "max_new_tokens" if plan.max_new_tokens_given else "size")
    # EOS ends every answer (the text sampler may write it before any image); T2I/X2I also stop at EOI
    stop = (tok.ids.eoi, tok.ids.eos) if plan.stop == "eoi" else (tok.ids.eos,)
    return GenerationRequest(
        request_id=request_id,
        cond_prompt=prompts.cond,
        uncond_prompt=prompts.uncond,
        cfg_scale=plan.cfg_scale,
        text_sampling=plan.text,
        image_sampling=plan.image,
        max_new_tokens=max_new,
        stop_token_ids=stop,
        target_grid=target,
        seed=plan.seed,
        uncond_mode=plan.uncond_mode,
        decoding=plan.decoding,
    )

