"""The native engine's decoding loop: every running request advances by one forward pass per step.

A request (a :class:`Job`) owns one cache slot per row: cond, and uncond when guided. Each step every
job says what it feeds (:class:`~service.engine.native.visibility.Entry` lists per row), all rows run in
one forward (rows with a long prompt to prefill in a second one, so short rows are not padded to it),
and each job draws from its logits:

* text, headers, and whole images under ``ar``: one token per pass, drawn by the policy's
  ``next_tokens`` exactly as the reference engine draws it (same rules, same sampler, same seeded
  random stream), batched over every such job;
* an image body under ``jacobi``/``zipar``: its open lanes (service.engine.native.schedule) feed their
  inputs and drafts; one ``policy_candidates`` call gives every query's distribution, the speculative
  rule (service.engine.native.speculative) keeps or rejects every draft at once, and the new tokens,
  refreshed drafts and tail drafts are drawn in one batch.

The host reads the device back a fixed number of times per step (drawn ids, acceptances), never per row.
Tokens stream in Emu3.5's order as soon as they are contiguous; ``cells`` name each pass's draws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from service.engine.native.network import NativeNetwork
from service.engine.native.schedule import Lane, Schedule, body_len, is_row_end, lanes_for, may_open
from service.engine.native.speculative import accept, draw, residual
from service.engine.native.visibility import Entry, pass_mask
from service.engine.policy.rules import (
    PIXELS,
    TEXT,
    TIE_MARGIN,
    Candidates,
    Guidance,
    RowState,
    SamplingColumns,
    VocabTables,
    advance,
    effective_top_k,
    host_mode,
    next_tokens,
    policy_candidates,
    sampling_columns,
)
from service.engine.policy.spans import HEADER, SpanTokens, header_grid, in_image_span
from service.types import GenerationRequest, TokenDelta

#: Rows feeding more entries than this in a step (a prompt's prefill) run in a forward of their own.
LONG_FEED = 64


@dataclass
class Row:
    """One sequence of a job: its slot, the known tokens not fed yet ``(token, position)`` and the
    position its next token takes. ``spans_only``: the reference-mode uncond row (image spans only)."""

    slot: int
    pending: list[tuple[int, int]]
    next_pos: int
    spans_only: bool = False

    def push(self, token: int) -> None:
        self.pending.append((token, self.next_pos))
        self.next_pos += 1


@dataclass
class ImageRun:
    """An image body being drawn by lanes: its grid, each row's position of offset 0, the body so far
    (row ends and EOI known from the start) and what has been streamed."""

    height: int
    width: int
    bases: list[int]
    body: list[int | None]
    lanes: list[Lane]
    prefix: list[list[tuple[int, int]]]  # per row: tokens before IMG still to feed (first pass)
    emitted: int = 0


@dataclass
class Job:
    """One request's decoding state (host side, plus a one-row policy state on the device)."""

    req: GenerationRequest
    schedule: Schedule
    rows: list[Row]
    state: RowState
    generator: torch.Generator | None
    k_cap: int
    mode: int = TEXT
    header: list[int] = field(default_factory=list)
    image: ImageRun | None = None
    emitted: int = 0
    passes: int = 0
    finish: str | None = None
    out: list[int] = field(default_factory=list)  # tokens to stream after this step
    cells: list[tuple[int, int]] = field(default_factory=list)

    @property
    def guided(self) -> bool:
        return len(self.rows) == 2


@dataclass
class _Feed:
    """Where a job's queries landed in the step's logits: per row, the flat query indices."""

    job: Job
    queries: list[list[tuple[int, int]]]
    lanes: list[tuple[Lane, int]] = field(default_factory=list)  # (lane, drafts fed) in query order


class NativeCore:
    """Network, slot cache, vocabulary tables; single-threaded (one caller at a time)."""

    def __init__(self, net: NativeNetwork, tokenizer, slots: int, fallback_seed: int | None = None) -> None:
        self.net, self.tok = net, tokenizer
        self.device = net.devices[-1]
        self.tables = VocabTables.from_tokenizer(tokenizer, self.device)
        self.span_ids = SpanTokens.from_tokenizer(tokenizer)
        self.cache = net.new_cache(slots, 256)
        self.filled = torch.zeros(slots, 256, dtype=torch.bool)
        self.free = list(range(slots))
        self.fallback = torch.Generator(self.device).manual_seed(
            fallback_seed if fallback_seed is not None else torch.seed() % (2**63))
        self.forwards = 0

    # ---- jobs ------------------------------------------------------------------------------------
    def make_job(self, req: GenerationRequest) -> Job:
        vocab = self.tok.vocab_size
        k_cap = max(effective_top_k(req.text_sampling.top_k, vocab), effective_top_k(req.image_sampling.top_k, vocab))
        prompts = [list(req.cond_prompt)] + ([list(req.uncond_prompt or [])] if req.guided else [])
        rows = [Row(-1, [(t, i) for i, t in enumerate(p)], len(p), spans_only=(n == 1 and req.image_only_uncond))
                for n, p in enumerate(prompts)]
        state = RowState.empty(1, self.device)
        fixed = req.target_grid or (0, 0)
        state.reset_rows(slice(None), fixed_h=fixed[0], fixed_w=fixed[1])
        gen = torch.Generator(self.device).manual_seed(req.seed) if req.seed is not None else None
        return Job(req, Schedule.of(req.decoding), rows, state, gen, k_cap)

    def slots_needed(self, job: Job) -> int:
        return len(job.rows)

    def admit(self, job: Job) -> bool:
        """Give ``job`` its slots (its prompt is fed by the next step); False when they are not free."""
        if len(self.free) < len(job.rows):
            return False
        for row in job.rows:
            row.slot = self.free.pop(0)
            self.filled[row.slot] = False
        return True

    def release(self, job: Job) -> None:
        for row in job.rows:
            if row.slot >= 0:
                self.free.append(row.slot)
                row.slot = -1

    # ---- one step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, jobs: list[Job]) -> list[TokenDelta]:
        """One pass for every job in ``jobs``; returns each job's delta (in order)."""
        started = time.perf_counter()
        rows: list[list[Entry]] = []
        slots: list[int] = []
        feeds: list[_Feed] = []
        for job in jobs:
            job.out, job.cells = [], []
            feed = _Feed(job, [])
            for r, entries in enumerate(self._entries(job, feed)):
                # each query as (row in the step, entry index): the key of its logits
                feed.queries.append([(len(rows), i) for i, e in enumerate(entries) if e.query])
                if entries:
                    rows.append(entries)
                    slots.append(job.rows[r].slot)
            feeds.append(feed)
        logits = self._forward(rows, slots)
        self._draw_sequential([f for f in feeds if not f.lanes and f.queries[0]], logits)
        self._draw_lanes([f for f in feeds if f.lanes], logits)
        seconds = time.perf_counter() - started
        out = []
        for job in jobs:
            job.passes += 1
            out.append(TokenDelta(job.out, job.finish, seconds, decode_steps=1, cells=tuple(job.cells)))
        return out

    def _entries(self, job: Job, feed: _Feed) -> list[list[Entry]]:
        """What each row of ``job`` feeds this pass."""
        image = job.image
        if image is None:  # one token: the last one drawn (or the prompt)
            out = []
            for row in job.rows:
                fed = not row.spans_only or job.mode == PIXELS
                entries = [Entry(t, p) for t, p in row.pending] if fed else []
                if entries:
                    entries[-1] = Entry(entries[-1].token, entries[-1].pos, query=True)
                    row.pending = []
                out.append(entries)
            return out
        opened = [ln for i, ln in enumerate(image.lanes) if not ln.retired and self._is_open(image, i, job)]
        per_row: list[list[Entry]] = [[Entry(t, p) for t, p in image.prefix[r]] for r in range(len(job.rows))]
        image.prefix = [[] for _ in job.rows]
        for ln in opened:
            token = self.tok.ids.img if ln.next == 0 else image.body[ln.next - 1]
            assert token is not None
            if ln.done:  # its last token still has to reach the cache
                for r, base in enumerate(image.bases):
                    per_row[r].append(Entry(token, base + ln.next - 1, ln.index))
                ln.retired = True
                continue
            m = min(len(ln.drafts), job.schedule.draft_len - 1, ln.end - ln.next - 1)
            for r, base in enumerate(image.bases):
                per_row[r].append(Entry(token, base + ln.next - 1, ln.index, query=True))
                per_row[r] += [Entry(d, base + ln.next + j, ln.index, draft=True, query=True)
                               for j, d in enumerate(ln.drafts[:m])]
            feed.lanes.append((ln, m))
        return per_row

    def _is_open(self, image: ImageRun, index: int, job: Job) -> bool:
        lane = image.lanes[index]
        if lane.next > lane.start or lane.done:
            return True
        return may_open(image.lanes, index, job.schedule.window)

    def _forward(self, rows: list[list[Entry]], slots: list[int]) -> dict[tuple[int, int], torch.Tensor]:
        """Run every row (long feeds in a forward of their own); the logits of every query entry."""
        if not rows:
            return {}
        top = max(e.pos for r in rows for e in r) + 1
        self._grow(top)
        out: dict[tuple[int, int], torch.Tensor] = {}
        groups = [[i for i, r in enumerate(rows) if len(r) <= LONG_FEED], [i for i, r in enumerate(rows) if len(r) > LONG_FEED]]
        for group in groups:
            if not group:
                continue
            part = [rows[i] for i in group]
            width = max(e.pos for r in part for e in r) + 1
            slot_t = torch.tensor([slots[i] for i in group])
            ids, pos, mask = pass_mask(part, self.filled[slot_t], width)
            dev = self.net.devices[0]
            hidden = self.net.hidden(ids.to(dev), pos.to(dev), mask.to(dev), self.cache, slot_t.to(dev))
            wanted = [(g, i) for g, r in zip(group, part) for i, e in enumerate(r) if e.query]
            if wanted:
                at = torch.tensor([group.index(g) * ids.shape[1] + i for g, i in wanted], device=hidden.device)
                logits = self.net.logits(hidden.reshape(-1, hidden.shape[-1]).index_select(0, at))
                for k, key in enumerate(wanted):
                    out[key] = logits[k]
            # known entries are in the cache for good; drafts only once accepted (see _draw_lanes)
            for g, r in zip(group, part):
                known = [e.pos for e in r if not e.draft]
                if known:
                    self.filled[slots[g], known] = True
        self.forwards += 1
        return out

    def _grow(self, capacity: int) -> None:
        """Widen the slot cache and its fill mask to ``capacity`` positions. Called from inside ``step``'s
        inference mode, but the new tensors are written outside it too (``admit``), so they are made as
        ordinary tensors: an inference tensor written outside inference mode raises."""
        with torch.inference_mode(False):
            self._widen(capacity)

    def _widen(self, capacity: int) -> None:
        if capacity > self.cache.capacity:
            size = max(capacity, 2 * self.cache.capacity)
            self.cache.grow(size)
            extra = torch.zeros(self.filled.shape[0], size - self.filled.shape[1], dtype=torch.bool)
            self.filled = torch.cat([self.filled, extra], dim=1)

    # ---- token by token --------------------------------------------------------------------------
    def _draw_sequential(self, feeds: list[_Feed], logits: dict) -> None:
        """One token for each job: the policy's ``next_tokens`` over all of them at once, exactly as the
        reference engine calls it for one request."""
        if not feeds:
            return
        dev = self.device
        rows: list[torch.Tensor] = []
        cond_rows, uncond_rows, owner, draws = list[int](), list[int](), list[int](), list[int]()
        scales: list[float] = []
        gens: list[torch.Generator | None] = []
        in_image: list[bool] = []
        for i, f in enumerate(feeds):
            cond = logits[f.queries[0][-1]]
            cond_rows.append(len(rows))
            rows.append(cond)
            owner.append(i)
            gens.append(f.job.generator)
            draws.append(f.job.k_cap)
            in_image.append(f.job.mode == PIXELS)
            if f.job.guided:
                q = f.queries[1]
                uncond_rows.append(len(rows))
                rows.append(logits[q[-1]] if q else cond)
                owner.append(i)
                gens.append(None)
                draws.append(f.job.k_cap)
                scales.append(float(f.job.req.cfg_scale))
        batch = torch.stack(rows).clone()
        pick = torch.tensor(owner, device=dev)
        state = RowState(*[torch.cat([f.job.state.tensors()[k] for f in feeds]).index_select(0, pick)
                           for k in range(len(feeds[0].job.state.tensors()))])
        guidance = None
        if uncond_rows:
            guidance = Guidance(torch.tensor([cond_rows[owner[u]] for u in uncond_rows], device=dev),
                                torch.tensor(uncond_rows, device=dev), torch.tensor(scales, device=dev))
        text = _columns([f.job.req.text_sampling for f in feeds], owner, dev)
        image = _columns([f.job.req.image_sampling for f in feeds], owner, dev)
        k_cap = max(f.job.k_cap for f in feeds)
        chosen = next_tokens(batch, state, self.tables, guidance, text, image, k_cap, gens, draws, self.fallback,
                             columns=sampling_columns(in_image, self.tables))
        tokens = chosen.index_select(0, torch.tensor(cond_rows, device=dev))
        cond_state = RowState(*[t.index_select(0, torch.tensor(cond_rows, device=dev)) for t in state.tensors()])
        advance(cond_state, tokens, self.tables)
        for i, (f, t) in enumerate(zip(feeds, tokens.tolist())):
            f.job.state = RowState(*[x[i:i + 1] for x in cond_state.tensors()])
            self._took(f.job, int(t))

    def _took(self, job: Job, token: int) -> None:
        """Account one sequentially drawn token: rows, host mode, header, stream; may open an image run."""
        before, job.mode = job.mode, host_mode(job.mode, token, self.tables)
        for row in job.rows:
            if not row.spans_only or in_image_span(before, job.mode):
                row.push(token)
        if before == TEXT and job.mode == HEADER:
            job.header = []
        elif before == HEADER and job.mode == HEADER:
            job.header.append(token)
        self._emit(job, [token])
        if job.finish is None and before == HEADER and job.mode == PIXELS and job.schedule.mode != "ar":
            h, w = header_grid(job.header, self.span_ids)
            if h > 0 and w > 0:
                self._open_image(job, h, w)

    def _open_image(self, job: Job, height: int, width: int) -> None:
        """Hand the body to the lanes: IMG (pending in every row) becomes lane 0's first input."""
        bases, prefix = [], []
        for row in job.rows:
            *before, (img, at) = row.pending
            bases.append(at + 1)
            prefix.append(before)
            row.pending = []
        body: list[int | None] = [None] * body_len(height, width)
        for r in range(height):
            body[r * (width + 1) + width] = self.tok.ids.eol if r < height - 1 else self.tok.ids.eoi
        job.image = ImageRun(height, width, bases, body, lanes_for(job.schedule, height, width), prefix)

    def _emit(self, job: Job, tokens: list[int]) -> None:
        """Stream ``tokens`` (Emu3.5's order), cut at a stop token or at ``max_new_tokens``."""
        stops = job.req.stop_token_ids
        for t in tokens:
            if job.finish is not None:
                return
            job.out.append(t)
            job.emitted += 1
            if t in stops:
                job.finish = "stop"
            elif job.emitted >= job.req.max_new_tokens:
                job.finish = "length"

    # ---- lanes -----------------------------------------------------------------------------------
    def _draw_lanes(self, feeds: list[_Feed], logits: dict) -> None:
        """Every lane of every job: distributions, acceptance, new tokens and drafts, in a few batched ops."""
        if not feeds:
            return
        dev = self.device
        # every lane query's cond (and uncond) logits, the policy state of the offset it predicts
        rows: list[torch.Tensor] = []
        cond_rows, uncond_rows, offsets, owner = list[int](), list[int](), list[int](), list[int]()
        scales: list[float] = []
        lane_queries: list[list[int]] = []  # per (feed, lane): indices into the cond candidates
        n_cond = 0
        for fi, f in enumerate(feeds):
            job, image = f.job, f.job.image
            assert image is not None
            qs_cond = f.queries[0]
            qs_uncond = f.queries[1] if job.guided else []
            at = 0
            for lane, m in f.lanes:
                mine = []
                for j in range(m + 1):
                    mine.append(n_cond)
                    n_cond += 1
                    cond_rows.append(len(rows))
                    rows.append(logits[qs_cond[at + j]])
                    offsets.append(lane.next + j)
                    owner.append(fi)
                    if job.guided:
                        uncond_rows.append(len(rows))
                        rows.append(logits[qs_uncond[at + j]])
                        offsets.append(lane.next + j)
                        owner.append(fi)
                        scales.append(float(job.req.cfg_scale))
                at += m + 1
                lane_queries.append(mine)
        batch = torch.stack(rows).clone()
        pick = torch.tensor(owner, device=dev)
        state = RowState(*[torch.cat([f.job.state.tensors()[k] for f in feeds]).index_select(0, pick)
                           for k in range(len(feeds[0].job.state.tensors()))])
        state.k.copy_(torch.tensor(offsets, device=dev))
        guidance = None
        if uncond_rows:
            guidance = Guidance(torch.tensor([u - 1 for u in uncond_rows], device=dev),
                                torch.tensor(uncond_rows, device=dev), torch.tensor(scales, device=dev))
        text = _columns([f.job.req.text_sampling for f in feeds], owner, dev)
        image_s = _columns([f.job.req.image_sampling for f in feeds], owner, dev)
        k_cap = max(f.job.k_cap for f in feeds)
        cands_all = policy_candidates(batch, state, self.tables, guidance, text, image_s, k_cap,
                                      columns=slice(self.tables.first_visual, self.tables.vocab_size))
        p = cands_all.rows(torch.tensor(cond_rows, device=dev))

        # 1. acceptance of every draft fed (draft j of a lane is verified by the lane's query j)
        lanes = [(f, lane, m) for f in feeds for lane, m in f.lanes]
        verify, tokens, proposals, draft_owner = [], [], [], []
        for (f, lane, m), mine in zip(lanes, lane_queries):
            for j in range(m):
                verify.append(mine[j])
                tokens.append(lane.drafts[j])
                proposals.append(lane.proposals[j])
                draft_owner.append(f.job)
        kept: list[bool] = []
        if verify:
            q = _stack_candidates(proposals, dev)
            tok_t = torch.tensor(tokens, device=dev)
            uniform = torch.cat([self._uniform(job, 1) for job in draft_owner])
            kept = accept(p.rows(torch.tensor(verify, device=dev)), tok_t, q.prob_of(tok_t), uniform).tolist()
        # 2. per lane: how many drafts survive, where the next token comes from
        new_src: list[tuple[int, int | None]] = []  # (candidate row, index into proposals for a residual)
        at = 0
        accepted_n = []
        for (_, _, m), mine in zip(lanes, lane_queries):
            a = 0
            while a < m and kept[at + a]:
                a += 1
            accepted_n.append(a)
            new_src.append((mine[a], at + a if a < m else None))
            at += m
        # 3. draw the new tokens (residual after a rejection) and the refreshed drafts, all at once
        vocab = self.tables.vocab_size
        base_rows = torch.tensor([s for s, _ in new_src], device=dev)
        new_c = p.rows(base_rows)
        rejected = [i for i, (_, r) in enumerate(new_src) if r is not None]
        if rejected:
            res = residual(p.rows(base_rows[rejected]),
                           _stack_candidates([proposals[int(new_src[i][1] or 0)] for i in rejected], dev), vocab)
            probs = new_c.probs.clone()
            probs[rejected] = res.probs
            new_c = Candidates(probs, new_c.ids)
        draft_rows: list[list[int]] = []  # per lane: candidate rows of the next drafts (-1: a forced row end)
        for (f, lane, m), mine, a in zip(lanes, lane_queries, accepted_n):
            nxt, width = lane.next + a + 1, _width(f.job)
            want = max(0, min(f.job.schedule.draft_len - 1, lane.end - nxt))
            tail = [mine[j] for j in range(m + 1) if not is_row_end(lane.next + j, width)]
            src = []
            for d in range(want):
                off, j = nxt + d, a + 1 + d
                if is_row_end(off, width):
                    src.append(-1)  # forced: the row end itself
                else:
                    src.append(mine[j] if j <= m else (tail[-1] if tail else mine[m]))
            draft_rows.append(src)
        flat_src = [s for src in draft_rows for s in src if s >= 0]
        sources = Candidates(torch.cat([new_c.probs] + ([p.probs[flat_src]] if flat_src else [])),
                             torch.cat([new_c.ids] + ([p.ids[flat_src]] if flat_src else [])))
        job_of = [f.job for f, _, _ in lanes] + [f.job for (f, _, _), src in zip(lanes, draft_rows) for s in src if s >= 0]
        noise = torch.cat([self._noise(job, sources.probs.shape[1]) for job in job_of])
        drawn = draw(sources, noise).tolist()
        # 4. host bookkeeping: bodies, cache entries that stay, next drafts, streaming
        eol = self.tok.ids.eol
        k = len(lanes)
        for li, ((f, lane, _), a) in enumerate(zip(lanes, accepted_n)):
            job, image = f.job, f.job.image
            assert image is not None
            for j in range(a):
                image.body[lane.next + j] = lane.drafts[j]
                _add_cell(job, lane.next + j, image.width, lane.drafts[j])
                for r, row in enumerate(job.rows):
                    self.filled[row.slot, image.bases[r] + lane.next + j] = True
            token = int(drawn[li])
            image.body[lane.next + a] = token
            _add_cell(job, lane.next + a, image.width, token)
            lane.next += a + 1
            drafts, props = [], []
            for s in draft_rows[li]:
                if s < 0:
                    drafts.append(eol)
                    props.append(_one_hot(eol, dev))
                else:
                    drafts.append(int(drawn[k]))
                    props.append((p.probs[s], p.ids[s]))
                    k += 1
            lane.drafts, lane.proposals = drafts, props
        for f in feeds:
            self._stream_image(f.job)

    def _stream_image(self, job: Job) -> None:
        image = job.image
        assert image is not None
        ready = []
        while image.emitted < len(image.body) and image.body[image.emitted] is not None:
            ready.append(image.body[image.emitted])
            image.emitted += 1
        self._emit(job, [int(t) for t in ready if t is not None])
        if image.emitted == len(image.body):
            self._close_image(job)

    def _close_image(self, job: Job) -> None:
        """Back to token-by-token decoding: every body token not in the cache yet (the last rows' last
        tokens, EOI) is pending, and the policy state is the one after EOI."""
        image = job.image
        assert image is not None
        n = len(image.body)
        for r, row in enumerate(job.rows):
            base = image.bases[r]
            row.pending = [(int(image.body[o]), base + o) for o in range(n)  # type: ignore[arg-type]
                           if not bool(self.filled[row.slot, base + o])]
            row.next_pos = base + n
        job.state.mode.fill_(TEXT)
        job.state.k.fill_(n)
        job.mode = TEXT
        job.image = None

    def _uniform(self, job: Job, n: int) -> torch.Tensor:
        gen = job.generator if job.generator is not None else self.fallback
        return torch.rand(n, generator=gen, device=self.device)

    def _noise(self, job: Job, width: int) -> torch.Tensor:
        """Exp(1) noise for one candidate row of ``job``: its own ``k_cap + TIE_MARGIN`` numbers (the rest
        1, where the probabilities are 0 anyway), so a seeded request draws the same whatever shares the batch."""
        gen = job.generator if job.generator is not None else self.fallback
        noise = torch.ones(1, width, device=self.device)
        noise[:, :min(job.k_cap + TIE_MARGIN, width)].exponential_(generator=gen)
        return noise


def _width(job: Job) -> int:
    assert job.image is not None
    return job.image.width


def _add_cell(job: Job, offset: int, width: int, token: int) -> None:
    """Record a drawn visual token as ``(r·W + c, id)`` (row ends are not cells)."""
    r, c = divmod(offset, width + 1)
    if c < width:
        job.cells.append((r * width + c, token))


def _one_hot(token: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(1, device=device), torch.tensor([token], device=device)


def _stack_candidates(rows: list[tuple[torch.Tensor, torch.Tensor]], device) -> Candidates:
    """Candidate rows of different widths as one padded :class:`Candidates` (padding: probability 0)."""
    width = max(r[0].shape[0] for r in rows)
    probs = torch.zeros(len(rows), width, device=device)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, (pr, ix) in enumerate(rows):
        probs[i, :pr.shape[0]] = pr
        ids[i, :ix.shape[0]] = ix
    return Candidates(probs, ids)


def _columns(settings, owner: list[int], device) -> SamplingColumns:
    """Per-row sampling columns from per-job settings (``owner``: the job of each row)."""
    top_k = torch.tensor([settings[o].top_k for o in owner], device=device)
    top_p = torch.tensor([settings[o].top_p for o in owner], device=device)
    temp = torch.tensor([settings[o].temperature for o in owner], device=device)
    return SamplingColumns(top_k, top_p, temp)


def run_requests(core: NativeCore, requests: list[GenerationRequest], join_every: int = 0
                 ) -> dict[str, list[TokenDelta]]:
    """Decode ``requests`` to the end on ``core``; each one's deltas. ``join_every = k > 0``: one request
    joins every ``k`` steps (requests at different points share passes); 0: all at once, as slots allow.
    (Tests, tools and the benchmark; the service runs its own loop.)"""
    waiting = [core.make_job(r) for r in requests]
    active: list[Job] = []
    deltas: dict[str, list[TokenDelta]] = {r.request_id: [] for r in requests}
    tick = 0
    while waiting or active:
        if waiting and (join_every == 0 or tick % join_every == 0):
            while waiting and core.admit(waiting[0]):
                active.append(waiting.pop(0))
                if join_every:
                    break
        if not active:
            raise RuntimeError("a request needs more slots than the core has")
        for job, delta in zip(list(active), core.step(active)):
            deltas[job.req.request_id].append(delta)
            if delta.finished:
                core.release(job)
                active.remove(job)
        tick += 1
    return deltas


def ids_of(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]
