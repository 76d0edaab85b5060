"""Emu3.5's decoding rules (design.md §5) as whole-batch tensor operations.

One implementation serves both engines: the reference engine calls it on its own logits, and the vLLM
logits processor calls it on vLLM's batch. Every function works on all rows at once; nothing here loops
over the vocabulary or reads a device value back to the host, so a step costs a handful of kernels
whatever the batch holds.

Per row we keep a small state machine, advanced from the row's own sampled tokens:

* ``TEXT``: visual tokens are forbidden; text sampling settings.
* ``HEADER`` (after BOI): with a known size (the request's target, or the first image's size for
  later images of the same answer) the digits, ``*`` and IMG are forced; otherwise the first header is
  sampled but constrained to ``[1-9][0-9] * [1-9][0-9]`` then IMG.
* ``PIXELS`` (after IMG): at position k (1-based) EOI is forced when k = H·(W+1), EOL when k is a
  multiple of W+1; otherwise only visual tokens are allowed, CFG is applied, image sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from service.engine.policy.spans import HEADER, PIXELS, TEXT, next_mode

# Categories of "what may come next" (rows of VocabTables.allow / .deny). CAT_ANY: a row the rules do
# not manage (a non-Emu3.5 request sharing vLLM's batch), left untouched.
CAT_TEXT, CAT_VISUAL, CAT_NONZERO_DIGIT, CAT_DIGIT, CAT_ANY = 0, 1, 2, 3, 4

_POW10 = (1, 10, 100, 1000, 10000, 100000)


@dataclass
class VocabTables:
    """Token ids and vocabulary masks the rules need, on the engine's device."""

    vocab_size: int
    first_visual: int
    boi: int
    img: int
    eoi: int
    eol: int
    star: int
    digit_ids: torch.Tensor  # (10,) id of '0'..'9'
    digit_value: torch.Tensor  # (V,) digit a token stands for, -1 for non-digits
    allow: torch.Tensor  # (5, V) bool: text, visual, nonzero digit, digit, any
    deny: torch.Tensor  # ~allow, kept so masking is one pass
    pow10: torch.Tensor

    @classmethod
    def build(cls, *, vocab_size: int, first_visual: int, boi: int, img: int, eoi: int, eol: int,
              star: int, digit_ids: Sequence[int], never: Sequence[int] = (),
              device: torch.device | str = "cpu") -> "VocabTables":
        """``never``: ids no row may ever sample (PAD: the vLLM engine uses it to fail a broken pair)."""
        digits = torch.tensor(list(digit_ids), dtype=torch.long)
        digit_value = torch.full((vocab_size,), -1, dtype=torch.long)
        digit_value[digits] = torch.arange(10)
        allow = torch.zeros((5, vocab_size), dtype=torch.bool)
        allow[CAT_TEXT, :first_visual] = True
        allow[CAT_VISUAL, first_visual:] = True
        allow[CAT_NONZERO_DIGIT, digits[1:]] = True
        allow[CAT_DIGIT, digits] = True
        allow[:CAT_ANY, list(never)] = False
        allow[CAT_ANY] = True
        return cls(vocab_size, first_visual, boi, img, eoi, eol, star, digits.to(device),
                   digit_value.to(device), allow.to(device), (~allow).to(device), torch.tensor(_POW10, device=device))

    @classmethod
    def from_tokenizer(cls, tok, device: torch.device | str = "cpu") -> "VocabTables":
        ids = tok.ids
        return cls.build(vocab_size=tok.vocab_size, first_visual=ids.first_visual, boi=ids.boi, img=ids.img,
                         eoi=ids.eoi, eol=ids.eol, star=tok.star_id, digit_ids=tok.digit_ids,
                         never=(ids.pad,), device=device)


@dataclass
class RowState:
    """State of every row, one int64 tensor entry per row. ``fixed_h/fixed_w`` = 0 means no size yet."""

    mode: torch.Tensor
    hpos: torch.Tensor  # tokens written after BOI
    h_acc: torch.Tensor  # header digits read so far
    w_acc: torch.Tensor
    star_seen: torch.Tensor
    img_h: torch.Tensor
    img_w: torch.Tensor
    k: torch.Tensor  # tokens written after IMG
    fixed_h: torch.Tensor
    fixed_w: torch.Tensor

    @classmethod
    def empty(cls, rows: int, device: torch.device | str = "cpu") -> "RowState":
        return cls(**{f.name: torch.zeros(rows, dtype=torch.long, device=device) for f in fields(cls)})

    def view(self, rows: int) -> "RowState":
        """The first ``rows`` rows, sharing storage (updates write through)."""
        return RowState(*[t[:rows] for t in self.tensors()])

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def reset_rows(self, rows: torch.Tensor | slice | int, fixed_h: int = 0, fixed_w: int = 0) -> None:
        """Start rows afresh in text mode with an optional forced image size."""
        for t in self.tensors():
            t[rows] = 0
        self.fixed_h[rows] = fixed_h
        self.fixed_w[rows] = fixed_w

    def copy_row(self, src: int, dst: int) -> None:
        for t in self.tensors():
            t[dst] = t[src]

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange two rows (with plain int indices: a list index would build a device tensor)."""
        for t in self.tensors():
            held = t[a].clone()
            t[a] = t[b]
            t[b] = held


def advance(state: RowState, tokens: torch.Tensor, tables: VocabTables, active: torch.Tensor | None = None) -> None:
    """Move every row's state past its newly sampled token (in place). Rows where ``active`` is False
    are left untouched."""
    tokens = tokens.to(state.mode.device, torch.long)
    mode = state.mode
    in_text, in_header, in_pixels = mode == TEXT, mode == HEADER, mode == PIXELS
    if active is not None:
        in_text, in_header, in_pixels = in_text & active, in_header & active, in_pixels & active

    digit = tables.digit_value[tokens.clamp(0, tables.vocab_size - 1)]
    is_digit = in_header & (digit >= 0)
    to_w = is_digit & (state.star_seen > 0)
    to_h = is_digit & (state.star_seen == 0)
    h_acc = torch.where(to_h, state.h_acc * 10 + digit, state.h_acc)
    w_acc = torch.where(to_w, state.w_acc * 10 + digit, state.w_acc)
    star_seen = torch.where(in_header & (tokens == tables.star), torch.ones_like(mode), state.star_seen)
    opens = in_text & (tokens == tables.boi)
    closes_header = in_header & (tokens == tables.img)
    closes_image = in_pixels & (tokens == tables.eoi)

    hpos = torch.where(in_header, state.hpos + 1, state.hpos)
    k = torch.where(in_pixels, state.k + 1, state.k)
    img_h = torch.where(closes_header, h_acc, state.img_h)
    img_w = torch.where(closes_header, w_acc, state.img_w)
    first = closes_header & (state.fixed_h == 0)
    fixed_h = torch.where(first, h_acc, state.fixed_h)
    fixed_w = torch.where(first, w_acc, state.fixed_w)

    zero = torch.zeros_like(mode)
    new_mode = torch.where(opens, torch.full_like(mode, HEADER), mode)
    new_mode = torch.where(closes_header, torch.full_like(mode, PIXELS), new_mode)
    new_mode = torch.where(closes_image, torch.full_like(mode, TEXT), new_mode)
    # opening a header clears the header accumulators; closing it starts the pixel counter
    state.hpos.copy_(torch.where(opens, zero, hpos))
    state.h_acc.copy_(torch.where(opens, zero, h_acc))
    state.w_acc.copy_(torch.where(opens, zero, w_acc))
    state.star_seen.copy_(torch.where(opens, zero, star_seen))
    state.k.copy_(torch.where(closes_header, zero, k))
    state.img_h.copy_(img_h)
    state.img_w.copy_(img_w)
    state.fixed_h.copy_(fixed_h)
    state.fixed_w.copy_(fixed_w)
    state.mode.copy_(new_mode)


def _num_digits(x: torch.Tensor) -> torch.Tensor:
    return 1 + (x >= 10).long() + (x >= 100).long() + (x >= 1000).long() + (x >= 10000).long()


def _digit_at(x: torch.Tensor, nd: torch.Tensor, j: torch.Tensor, tables: VocabTables) -> torch.Tensor:
    """Token id of the j-th (0-based, from the left) of the nd digits of x."""
    exp = (nd - 1 - j).clamp(0, len(_POW10) - 1)
    return tables.digit_ids[torch.div(x, tables.pow10[exp], rounding_mode="floor") % 10]


def constraints(state: RowState, tables: VocabTables) -> tuple[torch.Tensor, torch.Tensor]:
    """What each row may write next: ``(category, forced)`` where ``forced`` is a token id or -1."""
    mode, p = state.mode, state.hpos
    minus1 = torch.full_like(mode, -1)

    # header with a known size: digits(H) '*' digits(W) IMG
    fh, fw = state.fixed_h, state.fixed_w
    ndh, ndw = _num_digits(fh), _num_digits(fw)
    forced_hdr = torch.where(p < ndh, _digit_at(fh, ndh, p, tables), minus1)
    forced_hdr = torch.where(p == ndh, torch.full_like(p, tables.star), forced_hdr)
    in_w = (p > ndh) & (p < ndh + 1 + ndw)
    forced_hdr = torch.where(in_w, _digit_at(fw, ndw, p - ndh - 1, tables), forced_hdr)
    forced_hdr = torch.where(p >= ndh + 1 + ndw, torch.full_like(p, tables.img), forced_hdr)

    # header without a size: [1-9][0-9] '*' [1-9][0-9] IMG
    free_cat = torch.where((p == 0) | (p == 3), torch.full_like(p, CAT_NONZERO_DIGIT), torch.full_like(p, CAT_DIGIT))
    free_forced = torch.where(p == 2, torch.full_like(p, tables.star), minus1)
    free_forced = torch.where(p >= 5, torch.full_like(p, tables.img), free_forced)

    # pixels: position k+1 after IMG
    pos = state.k + 1
    row_len = state.img_w + 1
    total = state.img_h * row_len
    forced_px = torch.where(pos % row_len == 0, torch.full_like(pos, tables.eol), minus1)
    forced_px = torch.where(pos >= total, torch.full_like(pos, tables.eoi), forced_px)

    known = fh > 0
    category = torch.full_like(mode, CAT_TEXT)
    category = torch.where((mode == HEADER) & ~known, free_cat, category)
    category = torch.where(mode == PIXELS, torch.full_like(mode, CAT_VISUAL), category)
    forced = minus1
    forced = torch.where((mode == HEADER) & known, forced_hdr, forced)
    forced = torch.where((mode == HEADER) & ~known, free_forced, forced)
    forced = torch.where(mode == PIXELS, forced_px, forced)
    return category, forced


@dataclass
class Guidance:
    """The cond/uncond pairs of a batch: row indices (host-built when the batch changes) and CFG scales."""

    cond_rows: torch.Tensor  # (P,) long
    uncond_rows: torch.Tensor  # (P,) long
    scale: torch.Tensor  # (P,) float


def guide_(logits: torch.Tensor, guidance: Guidance, visual: torch.Tensor, first_visual: int = 0) -> None:
    """Classifier-free guidance, in place, on the cond row of every pair that is drawing a pixel.

    design.md §5 writes it on log-probabilities: ``log_softmax(u) + s·(log_softmax(c) − log_softmax(u))``.
    That equals ``c + (s − 1)·(c − u)`` minus a per-row constant (the two log-normalisers), and every
    sampling step after it (temperature, top-k, top-p, softmax, argmax) ignores a per-row constant, so
    this form gives the same tokens without two vocabulary-wide log-softmaxes. Rows not drawing a pixel
    get weight 0, which leaves them bit-for-bit unchanged (logits are finite before masking).
    """
    if guidance.cond_rows.numel() == 0:
        return
    # a guided row can only take a visual token, so only the visual columns are worth computing
    view = logits[:, first_visual:]
    c = view.index_select(0, guidance.cond_rows)
    diff = c - view.index_select(0, guidance.uncond_rows)
    weight = torch.where(visual.index_select(0, guidance.cond_rows), guidance.scale - 1.0, torch.zeros_like(guidance.scale))
    view.index_copy_(0, guidance.cond_rows, torch.addcmul(c, diff, weight.to(c.dtype)[:, None]))


def mask_(logits: torch.Tensor, category: torch.Tensor, tables: VocabTables) -> None:
    """-inf, in place, everywhere a row's category forbids (forced tokens are applied after sampling)."""
    logits.masked_fill_(tables.deny[category], float("-inf"))


@dataclass
class SamplingColumns:
    """Per-row sampling settings for one kind of token (text or image)."""

    top_k: torch.Tensor
    top_p: torch.Tensor
    temperature: torch.Tensor


def _policy_logits(logits: torch.Tensor, state: RowState, tables: VocabTables, guidance: Guidance | None,
                   text: SamplingColumns, image: SamplingColumns, managed: torch.Tensor | None,
                   columns: slice | None) -> tuple[torch.Tensor, int, SamplingColumns, torch.Tensor]:
    """CFG and the masks of design.md §5, in place on ``logits``; returns the logits to sample from
    (narrowed to ``columns``), the id of their first column, each row's sampling settings and its
    forced token (-1 where none)."""
    category, forced = constraints(state, tables)
    visual = (category == CAT_VISUAL) & (forced < 0)
    if guidance is not None:
        guide_(logits, guidance, visual, tables.first_visual)
    if managed is not None:
        category = torch.where(managed, category, torch.full_like(category, CAT_ANY))
    if columns is not None and columns == slice(tables.first_visual, tables.vocab_size):
        pass  # every row draws a pixel (or a forced EOL/EOI): the visual columns are all allowed
    elif columns is not None and columns == slice(0, tables.first_visual):
        logits[:, columns].masked_fill_(tables.deny[category][:, columns], float("-inf"))
    else:
        mask_(logits, category, tables)
    settings = SamplingColumns(torch.where(visual, image.top_k, text.top_k), torch.where(visual, image.top_p, text.top_p),
                               torch.where(visual, image.temperature, text.temperature))
    if columns is not None and columns != slice(None):
        return logits[:, columns], columns.start or 0, settings, forced
    return logits, 0, settings, forced


def next_tokens(logits: torch.Tensor, state: RowState, tables: VocabTables, guidance: Guidance | None,
                text: SamplingColumns, image: SamplingColumns, k_cap: int,
                generators: Sequence[torch.Generator | None] = (), draws: Sequence[int] = (),
                fallback: torch.Generator | None = None, managed: torch.Tensor | None = None,
                columns: slice | None = None) -> torch.Tensor:
    """One decoding step of design.md §5 for every row: CFG, masks, text/image sampling, forced tokens.

    Both engines call exactly this, so they agree token for token. ``logits`` (float32) is overwritten.
    Rows where ``managed`` is False are neither guided nor masked (their token is meaningless).
    ``columns`` narrows sampling to a vocabulary range that holds every token any managed row may take
    (the caller knows it from the host-side output ids: all rows drawing pixels → the visual range);
    it changes nothing but the cost of the top-k.
    """
    view, start, s, forced = _policy_logits(logits, state, tables, guidance, text, image, managed, columns)
    sampled = sample(view, s.top_k, s.top_p, s.temperature, k_cap, generators, draws, fallback) + start
    return torch.where(forced >= 0, forced, sampled)


@dataclass
class Candidates:
    """Each row's next-token distribution after every rule: ``probs[i, j]`` is the probability of token
    ``ids[i, j]`` (0 outside the row's top-k / top-p; a greedy or forced row is one-hot in column 0).
    What :func:`next_tokens` draws from, made explicit for schedules that must evaluate it at a token
    they did not draw (speculative decoding)."""

    probs: torch.Tensor  # [N, window] float32
    ids: torch.Tensor  # [N, window] long

    def prob_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N]``: each row's probability of its token in ``tokens``."""
        return (self.probs * (self.ids == tokens[:, None])).sum(-1)

    def rows(self, index: torch.Tensor) -> "Candidates":
        return Candidates(self.probs.index_select(0, index), self.ids.index_select(0, index))


def policy_candidates(logits: torch.Tensor, state: RowState, tables: VocabTables, guidance: Guidance | None,
                      text: SamplingColumns, image: SamplingColumns, k_cap: int,
                      columns: slice | None = None) -> Candidates:
    """The distribution :func:`next_tokens` would draw each row's token from (same CFG, masks,
    top-k → temperature → top-p, forced tokens), for every row at once. ``logits`` is overwritten."""
    view, start, s, forced = _policy_logits(logits, state, tables, guidance, text, image, None, columns)
    probs, idx = candidate_probs(view, s.top_k, s.top_p, s.temperature, k_cap)
    idx = idx + start
    fixed = forced >= 0
    one_hot = torch.zeros_like(probs)
    one_hot[:, 0] = 1.0
    probs = torch.where(fixed[:, None], one_hot, probs)
    idx = torch.where(fixed[:, None] & (torch.arange(idx.shape[1], device=idx.device) == 0), forced[:, None], idx)
    return Candidates(probs, idx)


def host_mode(mode: int, token: int, tables: VocabTables) -> int:
    """One row's mode after ``token``, on the host: the transitions of :func:`advance`, nothing more.

    Engines keep this per row to pick the sampling columns without reading the device state back.
    It must follow :func:`advance` exactly: image mode is entered only through BOI → header → IMG, so
    an IMG (or EOL, EOI) sampled in text mode leaves the row in text mode, as the release does.
    """
    return next_mode(mode, token, tables)


def sampling_columns(in_image: Sequence[bool], tables: VocabTables) -> slice:
    """The vocabulary range the next tokens can come from, given which rows are inside an image body
    (after IMG, before EOI: visual tokens, EOL, EOI — forced ones are applied after sampling)."""
    if in_image and all(in_image):
        return slice(tables.first_visual, tables.vocab_size)
    if not any(in_image):
        return slice(0, tables.first_visual)
    return slice(None)


#: Candidates a step looks at beyond the largest top-k of the batch, so that logits tied with a row's
#: k-th value survive top-k as they do in the release (whose top-k keeps every logit >= the k-th).
#: A run of more than this many ties just past the k-th value is cut; ties inside it are exact.
TIE_MARGIN = 64


def effective_top_k(top_k: int, vocab: int) -> int:
    """How many candidates a top-k setting keeps (0 or less: the whole vocabulary)."""
    return vocab if top_k <= 0 else min(top_k, vocab)


def candidate_probs(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, temperature: torch.Tensor,
                    k_cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k → temperature → top-p per row: ``(probs, ids)`` over each row's ``k_cap + TIE_MARGIN`` best
    candidates (sorted, best first). A greedy row is one-hot on its best candidate."""
    vocab = logits.shape[1]
    window = max(1, min(int(k_cap) + TIE_MARGIN, vocab))
    vals, idx = torch.topk(logits.float(), window, dim=-1)
    eff_k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k).clamp(1, window)
    kth = vals.gather(1, (eff_k - 1)[:, None])
    vals = vals.masked_fill(vals < kth, float("-inf"))  # ties with the k-th value are kept
    greedy = (temperature <= 0) | (top_k == 1)
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    probs = torch.softmax(vals / temp[:, None], dim=-1)
    cum = probs.cumsum(dim=-1)
    probs = probs.masked_fill((cum - probs) > top_p.float()[:, None], 0.0)
    first = torch.zeros_like(probs)
    first[:, 0] = 1.0
    return torch.where(greedy[:, None], first, probs), idx


def sample(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, temperature: torch.Tensor,
           k_cap: int, generators: Sequence[torch.Generator | None] = (), draws: Sequence[int] = (),
           fallback: torch.Generator | None = None) -> torch.Tensor:
    """top-k → temperature → top-p → draw, per row with its own settings, for the whole batch at once.

    ``k_cap`` (a host-side int: the largest top-k any row may use) bounds the one ``topk`` call, which
    takes ``TIE_MARGIN`` more candidates so that every logit equal to a row's k-th value survives, as in
    the release (more than k candidates may remain). Draws use the exponential-race form (argmax p/q,
    q ~ Exp(1)), which equals sampling from p. A row with its own generator consumes exactly
    ``draws[i] + TIE_MARGIN`` numbers per step (at most the window), a constant of its request, so a
    seeded request reproduces its tokens whatever else shares the batch.
    """
    probs, idx = candidate_probs(logits, top_k, top_p, temperature, k_cap)
    rows, window = probs.shape
    seeded = [i for i, gen in enumerate(generators) if gen is not None]
    if len(seeded) == rows:
        q = torch.ones_like(probs)
    else:  # unseeded rows draw from the shared generator (built without any host-to-device copy)
        q = torch.empty_like(probs).exponential_(generator=fallback)
    for i in seeded:
        n = min(int(draws[i]) + TIE_MARGIN, window) if i < len(draws) else window
        q[i, n:] = 1.0
        q[i, :n].exponential_(generator=generators[i])
    choice = torch.argmax(probs / q, dim=-1)
    greedy = (temperature <= 0) | (top_k == 1)
    choice = torch.where(greedy, torch.zeros_like(choice), choice)
    return idx.gather(1, choice[:, None]).squeeze(1)
