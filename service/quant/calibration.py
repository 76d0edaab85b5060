"""Calibration samples for W8A8: whole Emu3.5 sequences in the model's own prompt templates.

The guide calibrated with a generic text set, which leaves the activation ranges of image decoding
(long runs of visual tokens, EOL/EOI, image headers) unseen. Each sample here is a prompt built by
:func:`service.prompts.build_prompts` followed by an answer in Emu3.5's output layout
(:func:`service.token_layout.image_ids`): T2I (prompt → image), X2I (reference image in the prompt →
image) and visual narrative (global chain-of-thought, text, image chain-of-thought, image, text, EOS).
Visual codes have the blocky structure of real code grids (runs of repeated codes, a few hundred
distinct codes per image) rather than uniform noise.

Samples are written as text with token *names* (``tokenizer.decode``), because msModelSlim reads a
JSON list of strings; :class:`~service.quant.calib_tokenizer.CalibrationTokenizer` encodes them back to
the same ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.prompts import Task, build_prompts
from service.token_layout import image_ids
from service.tokenizer import Emu35Tokenizer

_QUESTIONS = (
    "a red fox standing in fresh snow at sunrise, photorealistic",
    "an old wooden boat on a calm lake surrounded by mountains",
    "a cozy kitchen with copper pans and a bowl of lemons",
    "a futuristic city street at night with neon signs and rain",
    "a watercolor painting of a lighthouse on a rocky coast",
    "a close-up portrait of an elderly man with a gentle smile",
)
_EDITS = ("make it winter", "turn the sky into a sunset", "add a small cat in the corner",
          "change the style to an oil painting")
_STORIES = ("a little robot who learns to paint", "a girl and her kite on a windy day",
            "how a seed becomes a tree")
_GLOBAL_COT = "The story follows one character through three scenes with consistent colours and style."
_IMAGE_COT = "A wide shot, warm light, the main character in the centre."
_SENTENCES = ("Once upon a time, in a small town by the sea, something unusual happened.",
              "The next morning everything looked different, and nobody knew why.")


@dataclass(frozen=True)
class CalibrationPlan:
    """How many samples of each kind, and the image grid (tokens per side) they use."""

    t2i: int = 4
    x2i: int = 2
    narrative: int = 2
    grid: int = 32
    seed: int = 0


def code_grid(rng: np.random.Generator, side: int, num_codes: int) -> np.ndarray:
    """A ``side × side`` grid of codes with runs of repeated codes (as flat image regions give)."""
    palette = rng.integers(0, num_codes, size=max(8, side * side // 6))
    blocks = rng.integers(0, len(palette), size=(side // 2 + 1, side // 2 + 1))
    grid = palette[np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)[:side, :side]]
    noise = rng.random((side, side)) < 0.2
    grid[noise] = rng.integers(0, num_codes, size=int(noise.sum()))
    return grid.astype(np.int64)


def t2i_sample(tok: Emu35Tokenizer, question: str, grid: np.ndarray) -> list[int]:
    return build_prompts(tok, Task.T2I, question).cond + image_ids(tok, grid)


def x2i_sample(tok: Emu35Tokenizer, edit: str, reference: np.ndarray, grid: np.ndarray) -> list[int]:
    return build_prompts(tok, Task.X2I, edit, [reference]).cond + image_ids(tok, grid)


def narrative_sample(tok: Emu35Tokenizer, story: str, grid: np.ndarray) -> list[int]:
    i = tok.ids
    text = lambda s: tok.encode(s, allow_special=False)  # noqa: E731 - a local shorthand
    answer = [i.bog, *text(_GLOBAL_COT), i.eog, *text(_SENTENCES[0]), i.boc, *text(_IMAGE_COT), i.eoc,
              *image_ids(tok, grid), *text(" " + _SENTENCES[1]), i.eos]
    return build_prompts(tok, Task.STORY, story).cond + answer


def calibration_ids(tok: Emu35Tokenizer, plan: CalibrationPlan = CalibrationPlan()) -> list[list[int]]:
    """The samples as token ids: T2I first, then X2I, then narrative."""
    rng = np.random.default_rng(plan.seed)
    n = tok.ids.num_visual

    def grid() -> np.ndarray:
        return code_grid(rng, plan.grid, n)

    samples = [t2i_sample(tok, _QUESTIONS[k % len(_QUESTIONS)], grid()) for k in range(plan.t2i)]
    samples += [x2i_sample(tok, _EDITS[k % len(_EDITS)], grid(), grid()) for k in range(plan.x2i)]
    samples += [narrative_sample(tok, _STORIES[k % len(_STORIES)], grid()) for k in range(plan.narrative)]
    return samples


def write_calibration(tok: Emu35Tokenizer, path: Path, plan: CalibrationPlan = CalibrationPlan()) -> int:
    """Write the samples as msModelSlim's dataset format (a JSON list of strings); returns the count."""
    texts = [tok.decode(ids) for ids in calibration_ids(tok, plan)]
    path.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    return len(texts)
