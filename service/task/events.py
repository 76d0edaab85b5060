"""What a running generation tells the HTTP layer, as it happens and when it ends.

:class:`GenerationRunner.run` yields these. They carry PIL images and PNG bytes, never tensors, and
each finished image is encoded to PNG exactly once (:class:`ImageReady`), then reused by the record,
the SSE event and the JSON answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from service.prompts import Task
from service.types import Decoding


@dataclass(frozen=True)
class RunEvent:
    """Base class of what the runner yields."""


@dataclass(frozen=True)
class TextOut(RunEvent):
    channel: Literal["text", "global_cot", "image_cot"]
    delta: str


@dataclass(frozen=True)
class ImageStart(RunEvent):
    index: int
    width: int  # pixels
    height: int


@dataclass(frozen=True)
class ImageProgress(RunEvent):
    index: int
    rows: int
    total_rows: int
    preview: Image.Image | None = None
    diagonals: int | None = None  # FlashAR: anti-diagonals drawn (the image fills in from its top-left corner)
    total_diagonals: int | None = None


@dataclass(frozen=True)
class ImageReady(RunEvent):
    """A finished image and its PNG (the one encoding of it)."""

    index: int
    image: Image.Image
    png: bytes


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int
    text_tokens: int
    prompt_visual_tokens: int = 0  # reference-image tokens in the prompt


@dataclass(frozen=True)
class AnswerPart:
    """One part of the answer, in order: its kind, its text or the index of its image."""

    type: Literal["text", "image", "global_cot", "image_cot"]
    text: str | None = None
    image_index: int | None = None


@dataclass
class Outcome:
    """A finished generation (also when it was cut short by the length limit)."""

    request_id: str
    task: Task
    images: list[Image.Image]
    pngs: list[bytes]  # images[i] as PNG, the same bytes the record holds
    parts: list[AnswerPart]
    text: str
    record: bytes  # the serialised emu3p5.story.Story
    usage: Usage
    finish_reason: str  # "stop" | "length" | "abort"
    time_to_first_token: float | None
    seconds: float
    image_seconds: list[float] = field(default_factory=list)
    #: forward passes whose logits chose this answer's tokens (AR: one per token; FlashAR: H+W−1 per image)
    decode_steps: int = 0
    #: the schedule the images were drawn with, defaults filled in (None: the engine's own, not chosen)
    decoding: Decoding | None = None

    @property
    def tokens_per_pass(self) -> float | None:
        """Completion tokens per decode step (1.0 for one token per pass), None before any step."""
        if self.decode_steps <= 0:
            return None
        return round(self.usage.completion_tokens / self.decode_steps, 3)


@dataclass(frozen=True)
class Finished(RunEvent):
    outcome: Outcome
