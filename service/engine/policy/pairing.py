"""How an Emu3.5 request travels through vLLM: per-row settings in ``SamplingParams.extra_args``.

A guided generation is two vLLM requests, ``<id>`` (cond) and ``<id>#uncond``, that share a pair id.
In the ``reference`` uncond mode (design.md §5.2) the cond request runs alone between images and each
image gets an uncond request of its own, ``<id>#uncond<n>``, whose prompt is the uncond prompt and the
image spans so far. The logits processor reads the settings below from each row's
``extra_args["emu35"]``; the pair-aware scheduler reads the pair id to admit both halves together. This module has no vLLM import, so the
engine front end, the processor and the scheduler (which live in different processes) share it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from service.engine.policy.spans import ModeIds, SpanTokens, image_body_tokens
from service.types import UNCOND_MODES, GenerationRequest, SamplingSettings

EXTRA_KEY = "emu35"
UNCOND_SUFFIX = "#uncond"
COND, UNCOND, SOLO = "cond", "uncond", "solo"
#: Written into ``extra_args`` by the pair scheduler on every Emu3.5 request it admits, so the workers
#: can tell which scheduler admitted a row (the start-up self-check reads it back).
ADMITTED_KEY = "emu35_admitted_by"
ADMITTED_BY = "Emu35Scheduler"
#: A start-up probe: ``extra_args[PROBE_KEY] = [answer_if_admitted_by_the_pair_scheduler, answer_otherwise]``.
#: The logits processor forces one of the two tokens, so one generated token proves that both the
#: processor (in every worker) and the scheduler (in the engine core) are the ones vLLM really runs.
PROBE_KEY = "emu35_probe"


def probe_extra(admitted_answer: int, other_answer: int) -> dict[str, Any]:
    """``extra_args`` of a self-check probe request."""
    return {PROBE_KEY: [int(admitted_answer), int(other_answer)]}


def probe_answer(extra: Mapping[str, Any] | None) -> int | None:
    """The token a probe row must produce, or None when the row is not a probe."""
    if not extra or PROBE_KEY not in extra:
        return None
    admitted, other = (int(t) for t in extra[PROBE_KEY])
    return admitted if extra.get(ADMITTED_KEY) == ADMITTED_BY else other


def is_emu35_request(extra: Mapping[str, Any] | None) -> bool:
    """True for the rows the pair scheduler admits and stamps: generations and probes."""
    return bool(extra) and (EXTRA_KEY in extra or PROBE_KEY in extra)  # type: ignore[operator]


@dataclass(frozen=True)
class RowSpec:
    """What the processor needs to know about one row."""

    pair_id: str
    role: str
    cfg_scale: float
    text: SamplingSettings
    image: SamplingSettings
    target_grid: tuple[int, int] | None
    seed: int | None
    #: ``reference``: the pair's uncond rows see only image spans and exist only while an image is drawn
    uncond_mode: str = "lockstep"
    #: a reference-mode cond row: the worst-case length (tokens) of any of its uncond requests, which the
    #: scheduler keeps reserved while none runs, so an image can always start
    uncond_reserve: int = 0
    #: a reference-mode cond row: (BOI, IMG, EOI), so the scheduler can follow the row into an image
    switch_ids: ModeIds | None = None

    @property
    def image_only(self) -> bool:
        """A row of a pair whose uncond branch sees only image spans."""
        return self.uncond_mode == "reference" and self.role in (COND, UNCOND)

    def to_extra(self) -> dict[str, Any]:
        return {
            EXTRA_KEY: {
                "pair": self.pair_id,
                "role": self.role,
                "cfg": self.cfg_scale,
                "text": [self.text.top_k, self.text.top_p, self.text.temperature],
                "image": [self.image.top_k, self.image.top_p, self.image.temperature],
                "target": list(self.target_grid) if self.target_grid else None,
                "seed": self.seed,
                "uncond": self.uncond_mode,
                "reserve": self.uncond_reserve,
                "switch": list(self.switch_ids) if self.switch_ids else None,
            }
        }

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> "RowSpec | None":
        """The row's spec, or None for a request that is not an Emu3.5 generation."""
        if not extra or EXTRA_KEY not in extra:
            return None
        d = extra[EXTRA_KEY]
        target = d.get("target")
        switch = d.get("switch")
        mode = str(d.get("uncond", "lockstep"))
        if mode not in UNCOND_MODES:
            raise ValueError(f"unknown uncond mode {mode!r}")
        return cls(
            pair_id=str(d["pair"]),
            role=str(d["role"]),
            cfg_scale=float(d["cfg"]),
            text=SamplingSettings(int(d["text"][0]), float(d["text"][1]), float(d["text"][2])),
            image=SamplingSettings(int(d["image"][0]), float(d["image"][1]), float(d["image"][2])),
            target_grid=(int(target[0]), int(target[1])) if target else None,
            seed=None if d.get("seed") is None else int(d["seed"]),
            uncond_mode=mode,
            uncond_reserve=int(d.get("reserve", 0)),
            switch_ids=ModeIds(int(switch[0]), int(switch[1]), int(switch[2])) if switch else None,
        )


def row_specs(req: GenerationRequest, ids: SpanTokens) -> list[tuple[str, list[int], RowSpec]]:
    """The vLLM requests a generation starts with: ``(request_id, prompt_ids, spec)`` for cond (and
    uncond in lockstep mode; in reference mode each image's uncond request comes from
    :func:`image_uncond`)."""
    base = _row_spec(req, COND if req.guided else SOLO)
    if req.image_only_uncond:
        reserve = len(req.uncond_prompt or []) + req.max_new_tokens
        base = replace(base, uncond_reserve=reserve, switch_ids=ModeIds(ids.boi, ids.img, ids.eoi))
    rows = [(req.request_id, list(req.cond_prompt), base)]
    if req.guided and not req.image_only_uncond:
        rows.append((req.request_id + UNCOND_SUFFIX, list(req.uncond_prompt or []), _row_spec(req, UNCOND)))
    return rows


def _row_spec(req: GenerationRequest, role: str) -> RowSpec:
    """A row of ``req`` in ``role``. An uncond row has no seed (it never samples: it takes the cond's
    token); an unguided request has no uncond branch, so its mode stays the default."""
    return RowSpec(req.request_id, role, req.cfg_scale, req.text_sampling, req.image_sampling, req.target_grid,
                   None if role == UNCOND else req.seed, uncond_mode=req.uncond_mode if req.guided else "lockstep")


@dataclass(frozen=True)
class ImageUncond:
    """The uncond request of one image in the reference mode."""

    request_id: str
    prompt: list[int]
    spec: RowSpec
    max_tokens: int


def image_uncond(req: GenerationRequest, number: int, spans: list[int], grid: tuple[int, int],
                 generated: int) -> ImageUncond:
    """The uncond request for image ``number`` (1-based) of a reference-mode generation, started when the
    cond row has written ``generated`` tokens, the last being the IMG that closed the header of a
    ``grid`` image. Its prompt is the uncond prompt plus every image span so far (this header included),
    so prefix caching reuses the earlier images' blocks; it runs until the image's EOI (or the cond
    row's token limit) and always receives the cond row's token."""
    max_tokens = min(image_body_tokens(grid), req.max_new_tokens - generated)
    return ImageUncond(f"{req.request_id}{UNCOND_SUFFIX}{number}", list(req.uncond_prompt or []) + list(spans),
                       _row_spec(req, UNCOND), max_tokens)
