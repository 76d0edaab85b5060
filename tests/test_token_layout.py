"""The Emu3.5 token protocol (docs/design.md §3): building image ids, the stream parser and parse()."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.token_layout import (
    End,
    GlobalCotSegment,
    ImageCotSegment,
    ImageDone,
    ImageRows,
    ImageSegment,
    ImageStarted,
    IncompleteImageSegment,
    SegmentDone,
    StreamParser,
    TextDelta,
    TextSegment,
    TokenLayoutError,
    image_header_ids,
    image_ids,
    parse,
)
from service.tokenizer import Emu35Tokenizer

HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NUM_CODES = 131_072
# letters, digits, '*', markup that looks like control tokens, and characters split across BPE tokens
TEXT_ALPHABET = "abcXYZ 0159*.,!?\n\t中文é🫠🦩🙂<|>_"


@pytest.fixture(scope="session")
def tok(any_tokenizer) -> Emu35Tokenizer:
    return any_tokenizer


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, allow_special=False)


def random_codes(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, NUM_CODES, size=(h, w), dtype=np.int64)


def feed_all(tok, ids, chunks=None, as_array=False):
    """Events from feeding ``ids`` (split at ``chunks`` boundaries) and finishing.

    Short lists of ints take the parser's per-token path, numpy arrays and long lists the vectorised one;
    ``as_array`` feeds numpy arrays to force the latter."""
    p = StreamParser(tok)
    events = []
    wrap = (lambda x: np.array(x, dtype=np.int64)) if as_array else (lambda x: x)
    if chunks is None:
        events += p.feed(wrap(ids))
    else:
        bounds = [0, *sorted(set(c for c in chunks if 0 < c < len(ids))), len(ids)]
        for a, b in zip(bounds, bounds[1:]):
            events += p.feed(wrap(ids[a:b]))
    if not p.ended:
        events += p.finish()
    return events


def normalise(events):
    """Merge consecutive text deltas of a channel and consecutive row batches of an image."""
    out = []
    for e in events:
        if out and isinstance(e, TextDelta) and isinstance(out[-1], TextDelta) and out[-1].channel == e.channel:
            out[-1] = TextDelta(e.channel, out[-1].text + e.text)
        elif out and isinstance(e, ImageRows) and isinstance(out[-1], ImageRows) and out[-1].index == e.index:
            out[-1] = ImageRows(e.index, e.rows_done, np.concatenate([out[-1].new_rows, e.new_rows]))
        else:
            out.append(e)
    return out


# ---- building ---------------------------------------------------------------------------------------


def test_image_header_ids(tok):
    ids = tok.ids
    assert image_header_ids(tok, 55, 73) == [ids.boi, 20, 20, 9, 22, 18, ids.img]
    assert image_header_ids(tok, 128, 5) == [ids.boi, 16, 17, 23, 9, 20, ids.img]
    for bad in [(0, 5), (5, 0), (-1, 3)]:
        with pytest.raises(ValueError):
            image_header_ids(tok, *bad)
    with pytest.raises(TypeError):
        image_header_ids(tok, 5.0, 3)


def test_image_ids_small(tok):
    ids = tok.ids
    fv = ids.first_visual
    out = image_ids(tok, np.array([[0, 1, 2], [3, 4, 5]]))
    assert out == [ids.boi, 17, 9, 18, ids.img, fv, fv + 1, fv + 2, ids.eol, fv + 3, fv + 4, fv + 5, ids.eoi]
    assert all(type(i) is int for i in out)
    assert image_ids(tok, np.array([[7]])) == [ids.boi, 16, 9, 16, ids.img, fv + 7, ids.eoi]


def test_image_ids_validation(tok):
    for bad in [np.zeros(3, dtype=int), np.zeros((0, 3), dtype=int), np.zeros((2, 2)), np.array([[NUM_CODES]]),
                np.array([[-1]])]:
        with pytest.raises(ValueError):
            image_ids(tok, bad)


@HYP
@given(h=st.integers(1, 128), w=st.integers(1, 128), seed=st.integers(0, 2**32 - 1))
def test_image_round_trip(tok, h, w, seed):
    codes = random_codes(seed, h, w)
    ids = image_ids(tok, codes)
    header = image_header_ids(tok, h, w)
    assert ids[: len(header)] == header
    body = np.array(ids[len(header) :])
    assert len(body) == h * (w + 1) and body[-1] == tok.ids.eoi
    grid = body.reshape(h, w + 1)  # each row and its terminator: EOL, or EOI for the last row
    assert (grid[:-1, w] == tok.ids.eol).all() and grid[-1, w] == tok.ids.eoi
    assert np.array_equal(grid[:, :w] - tok.ids.first_visual, codes)
    segments = parse(tok, ids)
    assert segments == [ImageSegment(codes)]
    assert (segments[0].height, segments[0].width) == (h, w)


# ---- interleaved answers ----------------------------------------------------------------------------

_text = st.text(alphabet=TEXT_ALPHABET, max_size=24)
_part = st.one_of(
    st.tuples(st.just("text"), _text),
    st.tuples(st.just("global_cot"), _text),
    st.tuples(st.just("image_cot"), _text),
    st.tuples(st.just("image"), st.integers(1, 7), st.integers(1, 7), st.integers(0, 2**32 - 1)),
)
answers = st.tuples(st.lists(_part, max_size=8), st.booleans())


def build_answer(tok, parts, eos: bool):
    """Ids of an answer and the segments parse() must give (adjacent texts merge, empty text vanishes)."""
    ids_ = tok.ids
    ids: list[int] = []
    expected = []
    pending_text = ""

    def flush():
        nonlocal pending_text
        if pending_text:
            expected.append(TextSegment(pending_text))
        pending_text = ""

    for part in parts:
        kind = part[0]
        if kind == "text":
            ids += enc(tok, part[1])
            pending_text += part[1]
            continue
        flush()
        if kind == "global_cot":
            ids += [ids_.bog, *enc(tok, part[1]), ids_.eog]
            expected.append(GlobalCotSegment(part[1]))
        elif kind == "image_cot":
            ids += [ids_.boc, *enc(tok, part[1]), ids_.eoc]
            expected.append(ImageCotSegment(part[1]))
        else:
            codes = random_codes(part[3], part[1], part[2])
            ids += image_ids(tok, codes)
            expected.append(ImageSegment(codes))
    flush()
    if eos:
        ids.append(ids_.eos)
    return ids, expected


@HYP
@given(answer=answers)
def test_interleaved_round_trip(tok, answer):
    parts, eos = answer
    ids, expected = build_answer(tok, parts, eos)
    assert parse(tok, ids) == expected
    events = feed_all(tok, ids)
    assert events[-1] == End("eos" if eos else "finished")
    assert [e.segment for e in events if isinstance(e, SegmentDone)] == expected
    n_images = sum(isinstance(s, ImageSegment) for s in expected)
    assert [e.index for e in events if isinstance(e, ImageStarted)] == list(range(n_images))
    assert [e.index for e in events if isinstance(e, ImageDone)] == list(range(n_images))


@HYP
@given(answer=answers, cuts=st.lists(st.integers(0, 400), max_size=30), as_array=st.booleans())
def test_chunking_does_not_change_events(tok, answer, cuts, as_array):
    ids, expected = build_answer(tok, *answer)
    whole = feed_all(tok, ids)
    chunked = feed_all(tok, ids, cuts, as_array)
    assert normalise(chunked) == normalise(whole)
    assert normalise(feed_all(tok, ids, range(len(ids)))) == normalise(whole)  # token by token
    # the deltas of each text-like segment add up to its text, and never carry half a character
    deltas = [e for e in chunked if isinstance(e, TextDelta)]
    assert all("\ufffd" not in d.text for d in deltas)
    got = {"text": "", "global_cot": "", "image_cot": ""}
    for d in deltas:
        got[d.channel] += d.text
    assert got["text"] == "".join(s.text for s in expected if isinstance(s, TextSegment))
    assert got["global_cot"] == "".join(s.text for s in expected if isinstance(s, GlobalCotSegment))
    assert got["image_cot"] == "".join(s.text for s in expected if isinstance(s, ImageCotSegment))


def test_token_by_token_events(tok):
    ids_ = tok.ids
    codes = np.arange(12).reshape(3, 4)
    ids = [ids_.bog, *enc(tok, "plan"), ids_.eog, *enc(tok, "Step 1"), ids_.boc, *enc(tok, "a red"),
           ids_.eoc, *image_ids(tok, codes), *enc(tok, "done"), ids_.eos]
    p = StreamParser(tok)
    events = []
    for i in ids:
        events += p.feed([i])
    assert p.ended and p.finish() == []
    assert normalise(events) == normalise(feed_all(tok, ids, as_array=True))
    got = normalise(events)
    assert got == [
        TextDelta("global_cot", "plan"),
        SegmentDone(GlobalCotSegment("plan")),
        TextDelta("text", "Step 1"),
        SegmentDone(TextSegment("Step 1")),
        TextDelta("image_cot", "a red"),
        SegmentDone(ImageCotSegment("a red")),
        ImageStarted(0, 3, 4),
        ImageRows(0, 3, codes),
        ImageDone(0, codes),
        SegmentDone(ImageSegment(codes)),
        TextDelta("text", "done"),
        SegmentDone(TextSegment("done")),
        End("eos"),
    ]
    # one row per event when fed token by token, each as soon as its W-th code arrived
    rows = [e for e in events if isinstance(e, ImageRows)]
    assert [r.rows_done for r in rows] == [1, 2, 3]
    assert all(np.array_equal(r.new_rows, codes[i : i + 1]) for i, r in enumerate(rows))
    first_row_end = ids.index(ids_.img) + 4  # position of the 4th visual token of row 0
    p2 = StreamParser(tok)
    assert not any(isinstance(e, ImageRows) for e in p2.feed(ids[:first_row_end]))
    assert isinstance(p2.feed(ids[first_row_end : first_row_end + 1])[-1], ImageRows)


def test_utf8_holdback(real_tokenizer):
    tok = real_tokenizer
    ids = enc(tok, "🫠")
    assert len(ids) == 3
    p = StreamParser(tok)
    assert p.feed(ids[:1]) == [] and p.feed(ids[1:2]) == []
    assert p.feed(ids[2:]) == [TextDelta("text", "🫠")]
    # a character cut off by the end of the stream becomes U+FFFD rather than vanishing
    p = StreamParser(tok)
    assert p.feed(enc(tok, "x") + ids[:2]) == [TextDelta("text", "x")]
    assert p.finish() == [TextDelta("text", "\ufffd"), SegmentDone(TextSegment("x\ufffd")), End("finished")]


def test_structural_tokens_are_skipped(tok):
    ids_ = tok.ids
    ids = [ids_.bos, *enc(tok, "a"), ids_.pad, ids_.tms, *enc(tok, "b"), ids_.eof, ids_.bss, ids_.bog, ids_.pad,
           *enc(tok, "c"), ids_.eog, ids_.ess, *enc(tok, "d")]
    assert parse(tok, ids) == [TextSegment("ab"), GlobalCotSegment("c"), TextSegment("d")]


def test_empty_and_whitespace_segments(tok):
    ids_ = tok.ids
    a, b = np.array([[1]]), np.array([[2, 3]])
    ids = [*image_ids(tok, a), *image_ids(tok, b), *enc(tok, " \n"), *image_ids(tok, a), ids_.boc, ids_.eoc]
    assert parse(tok, ids) == [ImageSegment(a), ImageSegment(b), TextSegment(" \n"), ImageSegment(a),
                               ImageCotSegment("")]
    assert parse(tok, []) == []
    assert parse(tok, [ids_.eos]) == []


def test_each_header_is_read(tok):
    """Later images of an answer normally repeat the first header; the parser reads each one anyway."""
    a, b = random_codes(1, 2, 3), random_codes(2, 4, 1)
    events = feed_all(tok, image_ids(tok, a) + enc(tok, "x") + image_ids(tok, b))
    assert [e for e in events if isinstance(e, ImageStarted)] == [ImageStarted(0, 2, 3), ImageStarted(1, 4, 1)]


def test_segments_are_immutable(tok):
    seg = parse(tok, image_ids(tok, np.array([[1, 2]])))[0]
    with pytest.raises(ValueError):
        seg.codes[0, 0] = 5
    codes = np.array([[1, 2]])
    own = ImageSegment(codes)
    codes[0, 0] = 9
    assert own.codes[0, 0] == 1
    assert ImageSegment(np.array([[1, 2]])) != ImageSegment(np.array([[1], [2]]))
    with pytest.raises(ValueError):
        ImageSegment(np.zeros((0, 2), dtype=int))


# ---- truncated answers ------------------------------------------------------------------------------


@HYP
@given(h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_trailing_incomplete_image(tok, h, w, seed, data):
    codes = random_codes(seed, h, w)
    prefix = enc(tok, "hi")
    img = image_ids(tok, codes)
    header_len = len(image_header_ids(tok, h, w))
    k = data.draw(st.integers(0, h * (w + 1) - 1), label="tokens after IMG")
    segs = parse(tok, prefix + img[: header_len + k])
    assert segs[0] == TextSegment("hi")
    rows_done = (k - k // (w + 1)) // w  # visual tokens seen (EOLs excluded), in whole rows
    assert segs[1:] == [IncompleteImageSegment(h, w, codes[:rows_done], k)]
    assert segs[1].rows_done == rows_done
    events = feed_all(tok, prefix + img[: header_len + k])
    assert events[-1] == End("finished") and not any(isinstance(e, ImageDone) for e in events)


def test_incomplete_inside_header(tok):
    ids_ = tok.ids
    empty = np.empty((0, 0), dtype=np.int64)
    assert parse(tok, [ids_.boi]) == [IncompleteImageSegment(None, None, empty, 0)]
    assert parse(tok, [ids_.boi, 17, 18]) == [IncompleteImageSegment(None, None, empty, 0)]
    assert parse(tok, [ids_.boi, 17, 18, 9, 19]) == [IncompleteImageSegment(23, None, empty, 0)]
    assert parse(tok, [ids_.boi, 17, 9, 18, ids_.img]) == [
        IncompleteImageSegment(2, 3, np.empty((0, 3), dtype=np.int64), 0)
    ]


def test_incomplete_cot_is_closed(tok):
    assert parse(tok, [tok.ids.bog, *enc(tok, "thinking")]) == [GlobalCotSegment("thinking")]


# ---- malformed input --------------------------------------------------------------------------------


def _malformed_cases(tok):
    i = tok.ids
    fv = i.first_visual
    v = [fv + c for c in range(10)]
    hdr23 = [i.boi, 17, 9, 18, i.img]  # 2*3
    pre = enc(tok, "ok")
    n = len(pre)
    return {
        # name: (ids, position, reason substring)
        "row too short": (hdr23 + [v[0], v[1], i.eol], 7, "wrong row length"),
        "row too long": (hdr23 + [v[0], v[1], v[2], v[3]], 8, "wrong row length"),
        "last row too long": (hdr23 + [v[0], v[1], v[2], i.eol, v[3], v[4], v[5], v[6]], 12, "where EOI is due"),
        "EOL instead of EOI": (hdr23 + [v[0], v[1], v[2], i.eol, v[3], v[4], v[5], i.eol], 12, "missing EOI"),
        "text instead of EOI": (hdr23 + [v[0], v[1], v[2], i.eol, v[3], v[4], v[5], 15], 12, "missing EOI"),
        "EOI after first row": (hdr23 + [v[0], v[1], v[2], i.eoi], 8, "EOI before the last row"),
        "EOI mid row": (hdr23 + [v[0], i.eoi], 6, "EOI before the image is complete"),
        "EOS in image": (hdr23 + [v[0], i.eos], 6, "inside an image body"),
        "BOI in image": (hdr23 + [v[0], i.boi], 6, "BOI inside an image"),
        "text in image": (hdr23 + [v[0], 15], 6, "inside an image body"),
        "no digits": ([i.boi, 9, 18, i.img], 1, "no digits for the height"),
        "empty header": ([i.boi, i.img], 1, "no digits before IMG"),
        "leading zero": ([i.boi, 15, 18, 9, 18, i.img], 1, "leading zero"),
        "zero height": ([i.boi, 15, 9, 18, i.img], 1, "leading zero"),
        "zero width": ([i.boi, 17, 9, 15, i.img], 3, "leading zero"),
        "missing star": ([i.boi, 17, 18, i.img], 3, "missing '*'"),
        "no width digits": ([i.boi, 17, 9, i.img], 3, "no digits for the width"),
        "second star": ([i.boi, 17, 9, 18, 9], 4, "second '*'"),
        "non-digit in header": ([i.boi, 17, *enc(tok, "a"), 9, 18, i.img], 2, "non-digit"),
        "BOS in header": ([i.boi, 17, i.bos], 2, "non-digit"),
        "BOI in header": ([i.boi, 17, i.boi], 2, "BOI inside an image header"),
        "visual in text": (pre + [v[3]], n, "visual token"),
        "visual in cot": ([i.bog, v[3]], 1, "visual token"),
        "token after EOS": (pre + [i.eos, i.pad], n + 1, "after EOS"),
        "id beyond vocabulary": (pre + [tok.vocab_size], n, "outside the vocabulary"),
        "negative id": (pre + [-1], n, "outside the vocabulary"),
        "id beyond vocabulary in image": (hdr23 + [v[0], tok.vocab_size], 6, "outside the vocabulary"),
    }


def test_malformed_cases(tok):
    for name, (ids, position, reason) in _malformed_cases(tok).items():
        # all at once and token by token, through the per-token and the vectorised paths
        for chunks, as_array in ((None, False), (range(len(ids)), False), (None, True), ([3, 7], True)):
            with pytest.raises(TokenLayoutError) as info:
                feed_all(tok, ids, chunks, as_array)
            err = info.value
            assert (err.position, reason in err.reason) == (position, True), (name, err)
            assert str(position) in str(err) and err.reason in str(err)
            assert isinstance(err, ValueError)


def test_whatever_the_text_sampler_writes_stays_text(tok):
    """Unused control tokens and IMG/EOL/EOI outside an image are literal text, as in the release."""
    i = tok.ids
    extra5 = tok.token_id("<|extra_5|>")
    ids = enc(tok, "Hello") + [extra5] + enc(tok, " world")
    for chunks, as_array in ((None, False), (range(len(ids)), False), (None, True)):
        assert [e.segment for e in feed_all(tok, ids, chunks, as_array) if isinstance(e, SegmentDone)] == [
            TextSegment("Hello<|extra_5|> world")
        ]
    stray = [i.img, i.eol, i.eoi, i.eog, i.eoc, tok.token_id("<|im_start|>")]
    names = "".join(tok.decode([t]) for t in stray)
    assert parse(tok, enc(tok, "a") + stray + enc(tok, "b")) == [TextSegment("a" + names + "b")]
    # a stray IMG does not open an image: the visual-free text after it is still text
    assert parse(tok, [i.img, *enc(tok, "x"), i.eos]) == [TextSegment("<|image token|>x")]


def test_chain_of_thought_edges_parse(tok):
    """Marks the text mask allows inside a chain of thought: nested openers and the other closer are
    text, BOI closes it and opens an image, EOS closes it and ends the answer."""
    i = tok.ids
    hdr11 = [i.boi, 16, 9, 16, i.img, i.first_visual, i.eoi]
    assert parse(tok, [i.boc, i.bog, *enc(tok, "t"), i.eog, i.eoc]) == [
        ImageCotSegment("<|extra_60|>t<|extra_61|>")
    ]
    assert parse(tok, [i.bog, *enc(tok, "t"), *hdr11, *enc(tok, "u")]) == [
        GlobalCotSegment("t"), ImageSegment(np.zeros((1, 1), dtype=np.int64)), TextSegment("u")
    ]
    assert parse(tok, [i.boc, *enc(tok, "t"), i.eos]) == [ImageCotSegment("t")]


def test_position_counts_across_feeds_and_parser_stays_failed(tok):
    i = tok.ids
    p = StreamParser(tok)
    events = p.feed(enc(tok, "abc") + [i.boi, 17])
    assert events == [TextDelta("text", "abc"), SegmentDone(TextSegment("abc"))]
    start = p.position
    with pytest.raises(TokenLayoutError) as info:
        p.feed([9, 18, i.img, i.first_visual, i.eol])
    assert info.value.position == start + 4
    assert info.value.events == [ImageStarted(0, 2, 3)]  # what the failing call produced before the error
    with pytest.raises(TokenLayoutError) as again:
        p.feed([i.eos])
    assert again.value is info.value
    with pytest.raises(TokenLayoutError):
        p.finish()


def test_usage_errors(tok):
    p = StreamParser(tok)
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed([15])
    with pytest.raises(RuntimeError):
        p.finish()
    with pytest.raises(TypeError):
        StreamParser(tok).feed([1.5])
    assert StreamParser(tok).feed([]) == []
    assert StreamParser(tok).feed(np.array(enc(tok, "hi"), dtype=np.uint32)) == [TextDelta("text", "hi")]
    assert StreamParser(tok).feed(np.int64(i) for i in enc(tok, "hi")) == [TextDelta("text", "hi")]
    with pytest.raises(TypeError):
        StreamParser(tok).feed([True])


@HYP
@given(h=st.integers(1, 8), w=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_corrupted_body_token_is_located(tok, h, w, seed, data):
    """Replacing any body token by a token of the wrong kind is reported exactly there."""
    i = tok.ids
    prefix = enc(tok, "x") + [i.bog, *enc(tok, "y"), i.eog]
    ids = prefix + image_ids(tok, random_codes(seed, h, w))
    body_start = len(prefix) + len(image_header_ids(tok, h, w))
    j = data.draw(st.integers(0, h * (w + 1) - 1), label="body index")
    k = j + 1
    if k == h * (w + 1):
        choices = [i.eol, i.first_visual, i.boi, i.eos, 15]
    elif k % (w + 1) == 0:
        choices = [i.first_visual + 5, i.eoi, i.boi, i.bos, 15]
    else:
        choices = [i.eol, i.eoi, i.boi, i.img, 15, tok.vocab_size]
    ids[body_start + j] = data.draw(st.sampled_from(choices), label="replacement")
    with pytest.raises(TokenLayoutError) as info:
        parse(tok, ids)
    assert info.value.position == body_start + j
