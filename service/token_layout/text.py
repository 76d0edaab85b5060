"""The text state: answer text, the global chain of thought (``BOG … EOG``) or a per-image one
(``BOC … EOC``), and what a non-BPE id does there.

Only the structural ids act (``EOS`` ends the answer, ``BOI`` opens an image, ``BOG``/``BOC`` open and
``EOG``/``EOC`` close a chain of thought, a few are skipped); every other id the text sampler may write
stays literal text, as the release's decode keeps it. Text deltas hold back the bytes of a UTF-8
character split across tokens until it is complete.
"""

from __future__ import annotations

import codecs
from typing import Union

from service.token_layout.body import BodyReader
from service.token_layout.events import (
    Channel,
    End,
    Event,
    GlobalCotSegment,
    ImageCotSegment,
    SegmentDone,
    TextDelta,
    TextSegment,
)
from service.token_layout.header import HeaderReader
from service.token_layout.reading import Reading, fail

_SEGMENT_OF_CHANNEL = {"text": TextSegment, "global_cot": GlobalCotSegment, "image_cot": ImageCotSegment}


class Ended:
    """The answer ended (EOS, or :meth:`StreamParser.finish`): any further token is an error."""


#: What reads the next id: the text of a channel, an image's header, its rows, or nothing (the end).
State = Union["TextReader", HeaderReader, BodyReader, Ended]


class TextReader:
    """The text of one channel, from its opening to the token that closes it."""

    def __init__(self, reading: Reading, channel: Channel = "text") -> None:
        self.reading = reading
        self.channel = channel
        self._parts: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def text_ids(self, ids: list[int], events: list[Event]) -> None:
        """Plain BPE ids of this channel."""
        self._emit(events, self._decoder.decode(self.reading.tok.decode_bytes(ids)))

    def close(self, events: list[Event]) -> None:
        """End the segment: left-over bytes of a split character become U+FFFD; an empty answer-text
        segment is not reported, a chain of thought always is (its delimiters are model output)."""
        self._emit(events, self._decoder.decode(b"", final=True))
        text = "".join(self._parts)
        if text or self.channel != "text":
            events.append(SegmentDone(_SEGMENT_OF_CHANNEL[self.channel](text)))
        self._parts = []

    def control(self, t: int, pos: int, events: list[Event]) -> State:
        """A non-BPE id in this channel; the state that reads the next id."""
        r = self.reading
        ids = r.ids
        if t in r.skip:
            return self
        if r.tok.is_visual(t):  # the text mask forbids these: a visual token here is an engine bug
            fail(pos, f"visual token (code {t - ids.first_visual}) outside an image")
        if t == ids.eos:
            self.close(events)  # a chain of thought cut off by EOS keeps the text it has
            events.append(End("eos"))
            return Ended()
        if t == ids.boi:  # the decoding rules open an image on BOI whatever channel the text is in
            self.close(events)
            return HeaderReader(r, r.next_image())
        if self.channel == "text" and t in (ids.bog, ids.boc):
            self.close(events)
            return TextReader(r, "global_cot" if t == ids.bog else "image_cot")
        if (self.channel, t) in (("global_cot", ids.eog), ("image_cot", ids.eoc)):
            self.close(events)
            return TextReader(r)
        # IMG/EOL/EOI outside an image, unused controls, stray or nested CoT marks: literal text
        self.text_ids([t], events)
        return self

    def _emit(self, events: list[Event], text: str) -> None:
        """Append text, merged into the last delta when that one is of the same channel (one per feed)."""
        if not text:
            return
        self._parts.append(text)
        if events and isinstance(events[-1], TextDelta) and events[-1].channel == self.channel:
            events[-1] = TextDelta(self.channel, events[-1].text + text)
        else:
            events.append(TextDelta(self.channel, text))
