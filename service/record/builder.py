"""Build the ``emu3p5.story.Story`` record of one generation (docs/design.md §7).

Input model (kept local so this module does not depend on the token-layout parser):
a sequence of items, in generation order, each one of

* :class:`RecordText` -- a text span of the answer (between images),
* :class:`RecordGlobalCot` -- the global chain of thought (BOG ... EOG),
* :class:`RecordImageCot` -- a per-image chain of thought (BOC ... EOC),
* :class:`RecordImage` -- a decoded generated image.

Mapping rules:

* ``Story.question`` = the user prompt; ``Story.story_id`` = the given id.
* ``Story.reference_images`` = the input images, each ``ImageMeta{image_id="reference_%04d",
  image=Image{width, height, format=PNG, image_data=<png bytes>}}``.
* ``Story.summary`` = the global CoT. Should a generation contain more than one global CoT
  span, the last one is kept, as the release's records do.
* Every text span opens a new ``Clip`` (``clip_id = "clip_%04d"``, numbered from 0 in order of
  creation) holding one ``Segment`` whose ``asr`` is the text, stored verbatim (no stripping;
  an empty span still opens a clip -- deciding which spans exist is the parser's job).
* Every image is appended to the ``images`` of the last clip's (last) segment as
  ``ImageMeta{image_id="image_%04d", image=Image{...PNG...}}``; image ids count all generated
  images of the story from 0 (they are unique in the story, not per clip).
* **Image before any text** (e.g. T2I/X2I answers, which start with BOI): a clip with one
  segment whose ``asr`` is empty is created to hold it. Such a clip takes the next ``clip_%04d``
  number like any other.
* A per-image CoT becomes the ``chain_of_thought`` of the image that *follows* it (several CoT
  spans before one image are joined with a newline). A CoT still pending when the record is
  read (the generation stopped before its image) is not part of the Story -- the schema has no
  place for it -- but stays available as :attr:`StoryBuilder.pending_image_cot`.

No torch here: images arrive already decoded as PIL images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence, Union

from PIL import Image as PILImage

from . import story_pb2

__all__ = [
    "RecordText",
    "RecordGlobalCot",
    "RecordImageCot",
    "RecordImage",
    "RecordItem",
    "StoryBuilder",
    "build_story",
    "encode_png",
    "image_message",
    "CLIP_ID_FORMAT",
    "IMAGE_ID_FORMAT",
    "REFERENCE_ID_FORMAT",
]

CLIP_ID_FORMAT = "clip_%04d"
IMAGE_ID_FORMAT = "image_%04d"
REFERENCE_ID_FORMAT = "reference_%04d"

# Modes PNG stores natively; anything else (CMYK, YCbCr, F, I;16 variants...) goes to RGB(A).
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I"}


@dataclass(frozen=True)
class RecordText:
    """A text span of the answer; opens a new clip."""

    text: str


@dataclass(frozen=True)
class RecordGlobalCot:
    """The global chain of thought (BOG ... EOG); becomes ``Story.summary``."""

    text: str


@dataclass(frozen=True)
class RecordImageCot:
    """A per-image chain of thought (BOC ... EOC); attaches to the next image."""

    text: str


@dataclass(frozen=True, eq=False)
class RecordImage:
    """A decoded generated image, and its PNG when the caller has encoded it already (it is then stored
    as given, so one image is encoded once per request however many places send it)."""

    image: PILImage.Image
    png: bytes | None = None


RecordItem = Union[RecordText, RecordGlobalCot, RecordImageCot, RecordImage]


def encode_png(img: PILImage.Image, compress_level: int = 6) -> bytes:
    """Encode a PIL image as PNG bytes (modes PNG cannot hold are converted to RGB/RGBA)."""
    if img.mode not in _PNG_MODES:
        has_alpha = "A" in img.getbands() or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def image_message(img: PILImage.Image, image_id: str = "", png: bytes | None = None) -> story_pb2.ImageMeta:
    """``ImageMeta{image_id, image=Image{width, height, format=PNG, image_data}}`` for ``img`` (``png``:
    its encoding, when already made)."""
    width, height = img.size
    return story_pb2.ImageMeta(
        image_id=image_id,
        image=story_pb2.Image(
            width=width,
            height=height,
            format=story_pb2.PNG,
            image_data=encode_png(img) if png is None else png,
        ),
    )


def _join(old: str, new: str) -> str:
    return new if not old else old + "\n" + new


class StoryBuilder:
    """Incrementally builds a ``Story``; feed items in generation order.

    ``.story`` is the live message (not a copy): it is valid at every step, so a streaming
    server can serialise it at any point. Do not mutate it behind the builder's back.
    """

    def __init__(
        self,
        question: str = "",
        reference_images: Sequence[PILImage.Image] = (),
        story_id: str = "",
    ) -> None:
        self._story = story_pb2.Story(story_id=story_id, question=question)
        self._pending_image_cot = ""
        self._n_images = 0
        for img in reference_images:
            self.add_reference_image(img)

    # -- inputs ----------------------------------------------------------------------------
    def add_reference_image(self, image: PILImage.Image) -> story_pb2.ImageMeta:
        """Append an input image to ``reference_images`` (PNG)."""
        meta = image_message(image, REFERENCE_ID_FORMAT % len(self._story.reference_images))
        self._story.reference_images.append(meta)
        return self._story.reference_images[-1]

    def add_text(self, text: str) -> story_pb2.Clip:
        """Open a new clip whose single segment's ``asr`` is ``text``; returns the clip."""
        self._new_clip(text)
        return self._story.clips[-1]

    def add_global_cot(self, text: str) -> None:
        """Set ``summary``; a later global CoT replaces an earlier one (the release keeps the last)."""
        self._story.summary = text

    def add_image_cot(self, text: str) -> None:
        """Remember a per-image CoT for the next image (newline-joined if several)."""
        self._pending_image_cot = _join(self._pending_image_cot, text)

    def add_image(self, image: PILImage.Image, png: bytes | None = None) -> story_pb2.ImageMeta:
        """Append a generated image to the last clip's segment; returns its ImageMeta."""
        if not self._story.clips:
            self._new_clip("")  # image-first answer (T2I / X2I): clip with empty asr
        segment = self._story.clips[-1].segments[-1]
        meta = image_message(image, IMAGE_ID_FORMAT % self._n_images, png)
        if self._pending_image_cot:
            meta.chain_of_thought = self._pending_image_cot
            self._pending_image_cot = ""
        self._n_images += 1
        segment.images.append(meta)
        return segment.images[-1]

    def add(self, item: RecordItem) -> None:
        """Dispatch one input item."""
        if isinstance(item, RecordText):
            self.add_text(item.text)
        elif isinstance(item, RecordImage):
            self.add_image(item.image, item.png)
        elif isinstance(item, RecordImageCot):
            self.add_image_cot(item.text)
        elif isinstance(item, RecordGlobalCot):
            self.add_global_cot(item.text)
        else:
            raise TypeError(f"not a record item: {type(item).__name__}")

    def extend(self, items: Sequence[RecordItem]) -> None:
        for item in items:
            self.add(item)

    # -- outputs ---------------------------------------------------------------------------
    @property
    def story(self) -> story_pb2.Story:
        return self._story

    @property
    def pending_image_cot(self) -> str:
        """A per-image CoT that no image has followed yet ('' if none)."""
        return self._pending_image_cot

    @property
    def num_images(self) -> int:
        """Generated images added so far (reference images not counted)."""
        return self._n_images

    def _new_clip(self, asr: str) -> None:
        clip = self._story.clips.add(clip_id=CLIP_ID_FORMAT % len(self._story.clips))
        clip.segments.add(asr=asr)


def build_story(
    question: str,
    reference_images: Sequence[PILImage.Image],
    items: Sequence[RecordItem],
    story_id: str,
) -> story_pb2.Story:
    """Build the Story of one finished generation (see the module docstring for the rules)."""
    builder = StoryBuilder(question=question, reference_images=reference_images, story_id=story_id)
    builder.extend(items)
    return builder.story
