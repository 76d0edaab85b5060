"""The Emu3.5 token protocol (docs/design.md §3), at the level of token ids.

Writing an image::

    BOI, digits(H), '*', digits(W), IMG, row_0, EOL, row_1, EOL, …, row_{H-1}, EOI

``H``/``W`` are the grid size in tokens and each row holds ``W`` visual tokens; there is no EOL after the
last row, so exactly ``H*(W+1)`` tokens follow IMG, the last one being EOI. :func:`image_header_ids` and
:func:`image_ids` build these id lists (vectorised with numpy; nothing is ever re-tokenised as text).

Reading a generated answer: :class:`StreamParser` is an incremental parser fed with the ids as they are
generated; it emits :class:`Event` objects (text deltas, image progress, finished segments) for the
streaming HTTP layer. :func:`parse` is the one-shot form and is built on the stream parser, so there is a
single implementation of the grammar.

The package, one idea a module: :mod:`.build` writes images as ids; :mod:`.events` holds the segments,
events and the error; the parser (:mod:`.parser`) hands each id to the state that reads it, each state
its own module: :mod:`.text` (answer text and chains of thought), :mod:`.header` (an image's size) and
:mod:`.body` (its rows); :mod:`.reading` is the context they share.

Grammar (what the parser accepts)
---------------------------------
* **Text mode** (the start state). Byte-level BPE ids are text of the current channel. ``BOS``, ``BSS``,
  ``ESS``, ``PAD``, ``EOF`` and ``TMS`` are structural and skipped wherever text is legal (so a whole
  prompt, ``BOS … BSS``, parses too). ``BOG … EOG`` holds the global chain-of-thought (channel
  ``global_cot``), ``BOC … EOC`` a per-image chain-of-thought (channel ``image_cot``). ``BOI`` starts an
  image, also inside a chain of thought (which it closes: the decoding rules open an image on any BOI).
  ``EOS`` ends the answer (closing an open chain of thought); any token after it is an error.
* **Every other non-visual id in text is literal text**: IMG, EOL or EOI outside an image, a stray
  EOG/EOC, a BOG/BOC inside a chain of thought, ``<|im_start|>``, an unused ``<|extra_N|>``. The text
  mask lets the sampler write these (as the release's does), and the release keeps them as text
  (``'Hello<|extra_5|> world'``), so the parser does too: whatever the text sampler may emit parses.
* **Image header**: non-empty decimal digits without a leading zero (so no zero size), ``'*'``, the same
  for the width, then ``IMG``. Nothing else is legal there (not even a skipped structural token). Each
  image's header is read on its own: design.md §5 has later images repeat the first header, which is the
  sampler's business, not the grammar's.
* **Image body**: only visual tokens, ``EOL`` and ``EOI``, at exactly the positions of §3.
* Errors (:class:`TokenLayoutError`, naming the position — index in the fed id stream — and the reason):
  a visual token outside an image body (the text mask forbids it), a header or body that breaks §3, a
  token after EOS, an id outside the vocabulary. The decoding rules force headers and bodies, so none
  of these can come from a sampler that follows them.

Segments
--------
* Text segments keep their text exactly (whitespace included); an *empty* text segment (e.g. between two
  adjacent images) is not emitted. Whitespace-only text between images is emitted as it is — a consumer
  that builds records may skip ``text.strip() == ""``.
* Chain-of-thought segments are emitted whenever their opening token was seen, even when empty: the
  delimiters are explicit model output.
* A row of an image counts as complete when its ``W``-th visual token arrived (its EOL/EOI terminator is
  checked when it arrives). A trailing image cut off by :meth:`StreamParser.finish` (max tokens, abort)
  becomes an :class:`IncompleteImageSegment` holding the complete rows — it is reported, never dropped.
  A chain-of-thought cut off the same way is closed with the text it has.
* Text deltas hold back the bytes of a UTF-8 character split across tokens until it is complete; at the
  end of a segment, left-over bytes of an incomplete character are decoded as U+FFFD.
* Within one ``feed`` call, consecutive text of a channel is merged into one :class:`TextDelta` and the
  rows an image completes into one :class:`ImageRows`; how the stream is chunked changes only that
  grouping, never the text, the rows or the other events.

Cost: a feed of a few Python ints (one decoding step) is handled token by token (~3 µs per image token,
~6 µs per text token); numpy arrays and longer feeds are vectorised (a 64×64 image parses in ~0.5 ms).
"""


from service.token_layout.build import image_header_ids, image_ids
from service.token_layout.events import (
    End,
    Event,
    GlobalCotSegment,
    ImageCotSegment,
    ImageDone,
    ImageRows,
    ImageSegment,
    ImageStarted,
    IncompleteImageSegment,
    Segment,
    SegmentDone,
    TextDelta,
    TextSegment,
    TokenLayoutError,
)
from service.token_layout.parser import StreamParser, parse

__all__ = [
    "TokenLayoutError",
    "image_header_ids",
    "image_ids",
    "Segment",
    "TextSegment",
    "GlobalCotSegment",
    "ImageCotSegment",
    "ImageSegment",
    "IncompleteImageSegment",
    "Event",
    "TextDelta",
    "ImageStarted",
    "ImageRows",
    "ImageDone",
    "SegmentDone",
    "End",
    "StreamParser",
    "parse",
]
