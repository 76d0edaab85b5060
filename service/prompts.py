"""Tasks, per-task defaults, output sizes and prompt assembly (docs/design.md §4).

Prompts are assembled as id lists: the template text is BPE-encoded, the reference images are inserted
as the id sequences of :func:`service.token_layout.image_ids` (never written out as text and
re-tokenised), and BOS / BSS are inserted as ids.

BPE boundaries. The release writes the whole prompt as one string in which each image is a run of special
tokens and lets the tokenizer split it; byte-level BPE never merges across a special token, so the text
before and after an image is encoded independently. :func:`build_prompts` does the same: the text pieces
around the images are encoded separately and concatenated, which is exactly what tokenising the release's
string gives (the tests check this on the real tokenizer). Without images the template is one text piece
and is encoded in one go.

The user question is encoded with ``allow_special=False``: a question containing ``<|extra_203|>`` or
``<|image start|>`` is plain text, so a user cannot inject control or visual tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, Mapping, Sequence, Union

import numpy as np

from .limits import MAX_REFERENCE_IMAGES
from .token_layout import image_ids
from .types import SamplingSettings

if TYPE_CHECKING:  # pragma: no cover
    from .tokenizer import Emu35Tokenizer

__all__ = [
    "Task",
    "ModelVariant",
    "SamplingSettings",
    "TaskDefaults",
    "DEFAULTS",
    "RECOMMENDED_VARIANT",
    "defaults_for",
    "ASPECT_RATIOS",
    "DEFAULT_ASPECT_RATIO",
    "ASPECT_TABLE_AREA",
    "PATCH_SIZE",
    "MAX_GRID_SIDE",
    "HEADER_MIN_SIDE",
    "HEADER_MAX_SIDE",
    "MAX_REFERENCE_IMAGES",
    "grid_for_aspect",
    "grid_for_pixels",
    "fit_grid_to_area",
    "parse_size",
    "is_pixel_size",
    "ExplicitGrid",
    "SizeMode",
    "AUTO",
    "MATCH_REFERENCE",
    "SizeSpec",
    "parse_size_spec",
    "resolve_target_grid",
    "PromptPair",
    "system_text",
    "build_prompts",
]


class Task(str, Enum):
    T2I = "t2i"
    X2I = "x2i"
    HOWTO = "howto"  # visual guidance
    STORY = "story"  # visual narrative
    EXPLORE = "explore"
    VLA = "vla"


class ModelVariant(str, Enum):
    EMU35 = "emu3.5"
    EMU35_IMAGE = "emu3.5-image"


# ---- defaults ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskDefaults:
    """Defaults of one (task, model variant); every field can be overridden per request.

    ``default_size`` is the size specification (see :func:`parse_size_spec`) used when the request has
    no reference images; ``default_size_with_images`` the one used when it has (design.md §4: match the last
    reference image by default).
    """

    cfg_scale: float
    max_new_tokens: int
    image_area: int
    text: SamplingSettings
    image: SamplingSettings
    stop: Literal["eoi", "eos"]
    default_size: str
    default_size_with_images: str = "match_reference"

    def size_spec(self, has_reference_images: bool) -> "SizeSpec":
        """The default :data:`SizeSpec` for a request with / without reference images."""
        spec = self.default_size_with_images if has_reference_images else self.default_size
        return parse_size_spec(spec, self.image_area)


_AREA_1024 = 1024 * 1024
_AREA_STORY = 518_400  # 720²

_TEXT_T2I = SamplingSettings(top_k=1024, top_p=0.9, temperature=1.0)
_IMAGE_T2I = SamplingSettings(top_k=5120, top_p=1.0, temperature=1.0)
_TEXT_HOWTO = SamplingSettings(top_k=200, top_p=0.8, temperature=0.7)
_TEXT_STORY = SamplingSettings(top_k=1024, top_p=0.9, temperature=1.0)
_IMAGE_STORY = SamplingSettings(top_k=10240, top_p=1.0, temperature=1.0)


def _single_image(cfg: float, default_size: str = "aspect:default") -> TaskDefaults:
    return TaskDefaults(
        cfg_scale=cfg,
        max_new_tokens=5120,
        image_area=_AREA_1024,
        text=_TEXT_T2I,
        image=_IMAGE_T2I,
        stop="eoi",
        default_size=default_size,
    )


def _interleaved(text: SamplingSettings) -> TaskDefaults:
    return TaskDefaults(
        cfg_scale=3.0,
        max_new_tokens=32768,
        image_area=_AREA_STORY,
        text=text,
        image=_IMAGE_STORY,
        stop="eos",
        default_size="auto",
    )


_STORY = _interleaved(_TEXT_STORY)
_HOWTO = _interleaved(_TEXT_HOWTO)

#: Defaults per (task, variant), design.md §4.
#:
#: * t2i / x2i: CFG 5.0 / 3.0 on Emu3.5-Image, 2.0 on Emu3.5 (the release's recommendation); everything
#:   else is shared. Without images t2i defaults to the ``default`` aspect ratio (55×73 at 1024²); x2i
#:   without images sets no size and the model writes the header (``auto``), as in the release.
#: * howto / story: the release's Emu3.5 settings; the model writes the (constrained) image header
#:   (``auto``) unless reference images are given.
#: * explore / vla are not in the release's table: they use the story defaults (an interleaved answer
#:   ending at EOS, 518,400-px images, text 1024 / 0.9 / 1.0) — a choice of this service, not a release
#:   fact.
#: * Interleaved tasks on Emu3.5-Image (a single-image model) get the same numbers as on Emu3.5; see
#:   :data:`RECOMMENDED_VARIANT` for the model each task is meant for.
DEFAULTS: Mapping[tuple[Task, ModelVariant], TaskDefaults] = MappingProxyType(
    {
        (Task.T2I, ModelVariant.EMU35_IMAGE): _single_image(5.0),
        (Task.T2I, ModelVariant.EMU35): _single_image(2.0),
        (Task.X2I, ModelVariant.EMU35_IMAGE): _single_image(3.0, "auto"),
        (Task.X2I, ModelVariant.EMU35): _single_image(2.0, "auto"),
        **{(Task.HOWTO, v): _HOWTO for v in ModelVariant},
        **{(t, v): _STORY for t in (Task.STORY, Task.EXPLORE, Task.VLA) for v in ModelVariant},
    }
)

#: The model each task is meant for (design.md §1 / §4).
RECOMMENDED_VARIANT: Mapping[Task, ModelVariant] = MappingProxyType(
    {
        Task.T2I: ModelVariant.EMU35_IMAGE,
        Task.X2I: ModelVariant.EMU35_IMAGE,
        Task.HOWTO: ModelVariant.EMU35,
        Task.STORY: ModelVariant.EMU35,
        Task.EXPLORE: ModelVariant.EMU35,
        Task.VLA: ModelVariant.EMU35,
    }
)


def defaults_for(task: Task | str, variant: ModelVariant | str) -> TaskDefaults:
    """Defaults of ``task`` on ``variant`` (strings are accepted: ``"t2i"``, ``"emu3.5-image"``)."""
    return DEFAULTS[(Task(task), ModelVariant(variant))]


# ---- sizes ------------------------------------------------------------------------------------------

#: Pixels per token side (the IBQ tokenizer downsamples 16×).
PATCH_SIZE = 16
#: Largest grid side accepted for an explicit / forced size: 128 tokens = 2048 px. Forced headers may
#: exceed the two-digit range a sampled header is constrained to; this bound only keeps requests sane
#: (a 128×128 image is 16,512 tokens, half the 32,768-token context).
MAX_GRID_SIDE = 128
#: A header the model samples itself (``auto``) is constrained to two digits per side (design.md §5,
#: ``[1-9][0-9]*[1-9][0-9]``): each side lies in 10..99.
HEADER_MIN_SIDE = 10
HEADER_MAX_SIDE = 99

#: Grid (H, W) in tokens per aspect ratio at :data:`ASPECT_TABLE_AREA` (design.md §4, the release's table).
ASPECT_RATIOS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "4:3": (55, 73),
        "21:9": (41, 97),
        "16:9": (47, 85),
        "3:2": (52, 78),
        "1:1": (64, 64),
        "3:4": (73, 55),
        "9:16": (85, 47),
        "2:3": (78, 52),
    }
)
DEFAULT_ASPECT_RATIO = "4:3"
#: The area (px) the aspect table is written for.
ASPECT_TABLE_AREA = _AREA_1024


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def grid_for_aspect(ratio: str, area: int) -> tuple[int, int]:
    """Grid (H, W) in tokens for an aspect ratio (``"16:9"``, or ``"default"``) and an image area in px.

    At :data:`ASPECT_TABLE_AREA` (1024²) the table is used as it is, as the release does. For another
    area both sides are scaled by ``sqrt(area / (H·W·256))`` and floored (at least 1), computed exactly in
    integers. (Applying that formula at 1024² itself would not reproduce every table entry — e.g. 16:9
    would become 47×86 — so the table wins there.)
    """
    key = DEFAULT_ASPECT_RATIO if ratio == "default" else ratio
    if key not in ASPECT_RATIOS:
        raise ValueError(f"unknown aspect ratio {ratio!r}; known: {', '.join(ASPECT_RATIOS)}, default")
    area = _positive_int("image area", area)
    h, w = ASPECT_RATIOS[key]
    if area == ASPECT_TABLE_AREA:
        return h, w
    base = h * w * PATCH_SIZE * PATCH_SIZE
    # floor(side * sqrt(area / base)) == isqrt(floor(side² * area / base)), exactly.
    return max(1, math.isqrt(h * h * area // base)), max(1, math.isqrt(w * w * area // base))


def grid_for_pixels(width: int, height: int, max_side: int | None = MAX_GRID_SIDE) -> tuple[int, int]:
    """Grid (H, W) for an explicit pixel size; both sides must be positive multiples of 16 and at most
    ``max_side * 16`` px (None: no bound, for a size about to be fitted to an area)."""
    width = _positive_int("width", width)
    height = _positive_int("height", height)
    for name, v in (("width", width), ("height", height)):
        if v % PATCH_SIZE:
            raise ValueError(f"image {name} {v} px is not a multiple of {PATCH_SIZE}")
        if max_side is not None and v // PATCH_SIZE > max_side:
            raise ValueError(f"image {name} {v} px exceeds the maximum of {max_side * PATCH_SIZE} px")
    return height // PATCH_SIZE, width // PATCH_SIZE


def fit_grid_to_area(grid: tuple[int, int], area: int) -> tuple[int, int]:
    """``grid`` (H, W) unchanged when its pixels fit ``area``; otherwise the grid of the same aspect scaled
    down into the area, each side floored (at least 1), computed exactly in integers as
    ``isqrt(side²·area // (H·W·256))``. At 1024² this gives the release's own grids for OpenAI's sizes:
    1536x1024 → 52×78 (1248x832, the 3:2 entry), 1024x1536 → 78×52 (the 2:3 entry)."""
    h, w = grid
    base = h * w * PATCH_SIZE * PATCH_SIZE
    if base <= area:
        return h, w
    return max(1, math.isqrt(h * h * area // base)), max(1, math.isqrt(w * w * area // base))


_SIZE_RE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")


def is_pixel_size(text: str) -> bool:
    """Whether ``text`` has the form ``WIDTHxHEIGHT`` (values unchecked)."""
    return isinstance(text, str) and _SIZE_RE.fullmatch(text) is not None


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WIDTHxHEIGHT"`` in pixels (``"1024x768"`` → ``(1024, 768)``). Only the form is checked;
    :func:`grid_for_pixels` checks the values."""
    m = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"image size must look like '1024x768' (width x height in pixels), got {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class ExplicitGrid:
    """A forced output grid, in tokens."""

    height: int
    width: int

    def __post_init__(self):
        for name in ("height", "width"):
            v = _positive_int(f"grid {name}", getattr(self, name))
            if v > MAX_GRID_SIDE:
                raise ValueError(f"grid {name} {v} exceeds the maximum of {MAX_GRID_SIDE} tokens")
            object.__setattr__(self, name, v)


class SizeMode(str, Enum):
    AUTO = "auto"  # the model writes the header (constrained to two digits per side)
    MATCH_REFERENCE = "match_reference"  # the grid of the last reference image


AUTO = SizeMode.AUTO
MATCH_REFERENCE = SizeMode.MATCH_REFERENCE

#: How the output size is specified: a forced grid, ``AUTO`` or ``MATCH_REFERENCE``.
SizeSpec = Union[ExplicitGrid, SizeMode]


def parse_size_spec(text: str, area: int) -> SizeSpec:
    """Parse a user size specification.

    ``"auto"``, ``"match_reference"``, an aspect ratio (``"16:9"``, ``"aspect:16:9"``, ``"default"``,
    ``"aspect:default"``; scaled to ``area``) or pixels (``"1024x768"``).
    """
    if not isinstance(text, str):
        raise ValueError(f"size must be a string, got {type(text).__name__}")
    s = text.strip()
    for mode in SizeMode:
        if s == mode.value:
            return mode
    ratio = s[len("aspect:") :] if s.startswith("aspect:") else s
    if ratio == "default" or ratio in ASPECT_RATIOS:
        return ExplicitGrid(*grid_for_aspect(ratio, area))
    if _SIZE_RE.fullmatch(s):
        return ExplicitGrid(*grid_for_pixels(*parse_size(s)))
    raise ValueError(
        f"unknown size {text!r}: use 'auto', 'match_reference', an aspect ratio "
        f"({', '.join(ASPECT_RATIOS)}, default) or WIDTHxHEIGHT in pixels"
    )


def _grid_shape(g) -> tuple[int, int]:
    if isinstance(g, np.ndarray):
        if g.ndim != 2:
            raise ValueError(f"a reference code grid must be 2-D, got shape {g.shape}")
        h, w = g.shape
    else:
        h, w = g
    return _positive_int("reference grid height", h), _positive_int("reference grid width", w)


def resolve_target_grid(spec: SizeSpec, reference_grids: Sequence[tuple[int, int]] = ()) -> tuple[int, int] | None:
    """The grid every generated image is forced to, or None when the model writes the header (``AUTO``).

    ``MATCH_REFERENCE`` takes the grid of the LAST reference image (as the release's transformers path
    does) and needs at least one; ``reference_grids`` holds ``(h, w)`` pairs (code arrays are accepted
    too: their shape is used).
    """
    if isinstance(spec, ExplicitGrid):
        return spec.height, spec.width
    if spec == SizeMode.AUTO:
        return None
    if spec == SizeMode.MATCH_REFERENCE:
        if len(reference_grids) == 0:
            raise ValueError("size 'match_reference' needs at least one reference image")
        return _grid_shape(reference_grids[-1])
    raise ValueError(f"not a size specification: {spec!r}")


# ---- prompts ----------------------------------------------------------------------------------------

_HOWTO_EXTRA = " Please generate a response with interleaved text and images."
_UNCOND_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class PromptPair:
    """Conditional prompt and the unconditional prompt used for classifier-free guidance."""

    cond: list[int]
    uncond: list[int]


def system_text(task: Task | str) -> str:
    """The conditional system sentence: ``You are a helpful assistant for {task} task.{extra}``."""
    task = Task(task)
    extra = _HOWTO_EXTRA if task is Task.HOWTO else ""
    return f"You are a helpful assistant for {task.value} task.{extra}"


def build_prompts(
    tok: "Emu35Tokenizer",
    task: Task | str,
    question: str,
    reference_grids: Sequence[np.ndarray] = (),
) -> PromptPair:
    """Conditional and unconditional prompt ids for ``task`` (design.md §4).

    ``reference_grids`` are the VQ code grids (``(H, W)`` int arrays) of up to
    :data:`MAX_REFERENCE_IMAGES` reference images, inserted in order. The unconditional prompt keeps the
    images (guidance is over the text only).
    """
    task = Task(task)
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    grids = list(reference_grids)
    if len(grids) > MAX_REFERENCE_IMAGES:
        raise ValueError(f"at most {MAX_REFERENCE_IMAGES} reference images are supported, got {len(grids)}")
    ids = tok.ids

    def text(s: str) -> list[int]:
        return tok.encode(s, allow_special=False)

    system = system_text(task)
    if not grids:
        cond = [ids.bos, *text(f"{system} USER: {question} ASSISTANT: "), ids.bss]
        uncond = [ids.bos, *text(f"{_UNCOND_SYSTEM} USER:  ASSISTANT: "), ids.bss]
        return PromptPair(cond, uncond)

    images: list[int] = []
    for g in grids:
        images += image_ids(tok, g)
    if task is Task.X2I:
        cond = [ids.bos, *text(f"{system} USER: "), *images, *text(f"{question} ASSISTANT: "), ids.bss]
    else:
        cond = [ids.bos, *text(f"{system} USER: {question}"), *images, *text(" ASSISTANT: "), ids.bss]
    uncond = [ids.bos, *text(f"{_UNCOND_SYSTEM} USER: "), *images, *text(" ASSISTANT: "), ids.bss]
    return PromptPair(cond, uncond)
