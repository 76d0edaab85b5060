"""Emu3.5's decoding rules as a vLLM v1 logits processor (passed with ``logits_processors=``).

One instance serves the whole persistent batch. Its state follows vLLM's batch changes (added, removed,
moved rows) and each row's live output ids; the per-step work is the batched tensor code of
``service.engine.policy.rules``. The processor also samples: it applies CFG across the cond/uncond rows of a
pair, the text or image top-k/top-p/temperature of the row's current mode, per-request seeded draws, and
then hands vLLM a row that is -inf everywhere but the chosen token, so vLLM's own sampler (greedy, as the
engine configures it) can only pick that token. The uncond row of a pair is given its cond row's token,
which keeps the pair in lockstep.

A pair whose halves are not both in the batch, or whose halves have produced different numbers of
tokens (one was preempted, or one prefill finished a step later), is failed: both rows are forced to
write PAD, which the engine passes as a stop token and reports as an error. Wrong tokens are never
continued. In the ``reference`` uncond mode (design.md §5.2) the cond row runs alone outside images
and each image's uncond row joins at its first pixel: there the uncond row must have produced exactly
the tokens the cond row wrote since its last IMG, and a cond row about to draw a pixel without its
uncond row is failed.

A row that vLLM leaves out of a step (the pair scheduler does that to a reference cond waiting for its
image's uncond) is removed from the batch and added back later with the same output list; its state
(rules state, generator, counters) is parked meanwhile and restored, so seeded draws continue.

Host work follows vLLM's own processors (``vllm/v1/sample/logits_processor/builtin.py``): per-row settings
and pair links live in pinned CPU mirrors (numpy views) that a batch change writes row by row, then
sends to the device with one non-blocking copy per packed tensor; each step's new tokens go the same way
through a small ring of pinned slots. Nothing in a step builds a device tensor from a Python list or reads
a device value back; the only per-row host work left is reading vLLM's per-row Python output lists.

Rows whose ``SamplingParams.extra_args`` carry no Emu3.5 spec pass through untouched, except the
engine's start-up probe (``pairing.PROBE_KEY``): its row is forced to the token that says whether the
pair scheduler admitted it, which proves that this processor and that scheduler are really running.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from service.engine.policy.pairing import COND, EXTRA_KEY, UNCOND, RowSpec, probe_answer
from service.engine.policy.rules import (
    HEADER,
    PIXELS,
    TEXT,
    Guidance,
    RowState,
    SamplingColumns,
    VocabTables,
    advance,
    effective_top_k,
    host_mode,
    next_tokens,
)
from service.tokenizer import Emu35Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    spec: RowSpec
    out: list[int]  # vLLM's live output-id list of the request
    seen: int  # output ids already folded into the row state
    gen: torch.Generator | None
    draws: int
    mode: int = TEXT  # host-side mirror of the row's rules mode (picks the sampling columns)
    img_at: int = 0  # output ids up to and including the row's latest IMG (reference-mode drift check)


@dataclass
class _Parked:
    """A row vLLM took out of the batch, kept until it comes back (or is pushed out by newer ones)."""

    row: _Row
    state: torch.Tensor  # the row's RowState entries, stacked (device)


class _Columns:
    """Per-row settings as packed (fields, rows) tensors: a pinned CPU mirror with a numpy view that the
    host writes row by row, and its device copy, refreshed with one non-blocking copy per batch change."""

    LONG = ("text_k", "img_k", "leader", "cond_rows", "uncond_rows")
    FLOAT = ("text_p", "text_t", "img_p", "img_t", "scale")
    BOOL = ("managed", "orphan")

    def __init__(self, rows: int, device: torch.device, pin: bool) -> None:
        self.host = {dt: torch.zeros((len(names), rows), dtype=dt, pin_memory=pin)
                     for dt, names in ((torch.long, self.LONG), (torch.float32, self.FLOAT), (torch.bool, self.BOOL))}
        self.dev = {dt: torch.zeros_like(t, device=device) for dt, t in self.host.items()}
        self.np = {name: self.host[dt][i].numpy() for dt, names in self._groups() for i, name in enumerate(names)}
        self.on_device = {name: self.dev[dt][i] for dt, names in self._groups() for i, name in enumerate(names)}
        self.np["text_k"][:] = self.np["img_k"][:] = 1
        for name in ("text_p", "text_t", "img_p", "img_t", "scale"):
            self.np[name][:] = 1.0
        self.np["leader"][:] = np.arange(rows)

    def _groups(self):
        return ((torch.long, self.LONG), (torch.float32, self.FLOAT), (torch.bool, self.BOOL))

    def clear(self, i: int) -> None:
        """Row ``i`` back to the settings of a row the processor does not manage."""
        for name in ("text_k", "img_k", "text_p", "text_t", "img_p", "img_t", "scale"):
            self.np[name][i] = 1
        self.np["managed"][i] = False

    def move(self, src: int, dst: int, swap: bool) -> None:
        for name in ("text_k", "img_k", "text_p", "text_t", "img_p", "img_t", "scale", "managed"):
            col = self.np[name]
            if swap:
                col[src], col[dst] = col[dst], col[src]
            else:
                col[dst] = col[src]
        if not swap:
            self.clear(src)

    def push(self) -> None:
        for dt, host in self.host.items():
            self.dev[dt].copy_(host, non_blocking=True)


class _TokenSlots:
    """Pinned (token, active) slots for the ids a step folds into the row state. Slots are used in turn,
    so the host never rewrites one whose non-blocking copy may still be queued."""

    SLOTS = 4

    def __init__(self, rows: int, device: torch.device, pin: bool) -> None:
        self.host = torch.zeros((self.SLOTS, 2, rows), dtype=torch.long, pin_memory=pin)
        self.np = self.host.numpy()
        self.dev = torch.zeros((self.SLOTS, 2, rows), dtype=torch.long, device=device)
        self.next = 0

    def take(self) -> int:
        slot, self.next = self.next, (self.next + 1) % self.SLOTS
        self.np[slot] = 0
        return slot

    def send(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's tokens and active mask on the device."""
        self.dev[slot].copy_(self.host[slot], non_blocking=True)
        return self.dev[slot, 0], self.dev[slot, 1].bool()


class Emu35LogitsProcessor(LogitsProcessor):
    """Batch-wide Emu3.5 rules + sampling (design.md §5)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        tok = Emu35Tokenizer.from_dir(vllm_config.model_config.tokenizer)
        seed = getattr(vllm_config.model_config, "seed", None) or 0
        self._setup(VocabTables.from_tokenizer(tok, device), tok.ids.pad,
                    int(vllm_config.scheduler_config.max_num_seqs), device, int(seed), bool(is_pin_memory))

    @classmethod
    def for_tables(cls, tables: VocabTables, kill_token: int, max_rows: int,
                   device: torch.device | str = "cpu", seed: int = 0, pin: bool = False) -> "Emu35LogitsProcessor":
        """A processor over hand-made vocabulary tables (unit tests, small vocabularies)."""
        self = cls.__new__(cls)
        self._setup(tables, kill_token, max_rows, torch.device(device), seed, pin)
        return self

    def _setup(self, tables: VocabTables, kill_token: int, max_rows: int, device: torch.device, seed: int,
               pin: bool) -> None:
        self.device = device
        self.tables = tables
        self.vocab = tables.vocab_size
        self.kill_token = kill_token
        self.max_rows = max_rows
        self.state = RowState.empty(self.max_rows, device)
        self.rows: list[_Row | None] = [None] * self.max_rows
        self.probes: dict[int, int] = {}  # row index -> the token the start-up probe must produce
        self.batch_size = 0
        # identical on every tensor-parallel rank, so unseeded rows draw the same tokens everywhere
        self.fallback = torch.Generator(device).manual_seed(int(seed))
        n = self.max_rows
        self.cols = _Columns(n, device, pin)
        self.slots = _TokenSlots(n, device, pin)
        on = self.cols.on_device
        self.managed, self.orphan, self.leader = on["managed"], on["orphan"], on["leader"]
        self.text_k, self.img_k, self.text_p, self.img_p = on["text_k"], on["img_k"], on["text_p"], on["img_p"]
        self.text_t, self.img_t = on["text_t"], on["img_t"]
        self.pairs: list[tuple[int, int]] = []  # (cond row, uncond row) of every complete pair
        self.lone_image_conds: list[int] = []  # reference-mode cond rows whose image uncond is not in the batch
        # host mirrors of each row's counters, so the per-step lockstep check is array arithmetic
        self.seen = np.zeros(n, dtype=np.int64)
        self.img_at = np.zeros(n, dtype=np.int64)
        self.in_pixels = np.zeros(n, dtype=bool)
        self.image_only = np.zeros(n, dtype=bool)
        self.pair_c = np.zeros(0, dtype=np.int64)
        self.pair_u = np.zeros(0, dtype=np.int64)
        self.lone_c = np.zeros(0, dtype=np.int64)
        self.managed_rows: list[int] = []
        self.deciders = np.zeros(n, dtype=bool)  # managed rows that are not uncond: they pick the columns
        self.gens: list[torch.Generator | None] = [None] * n
        self.draws: list[int] = [1] * n
        # rows out of the batch, by id() of their output list (kept alive here, so the id stays theirs);
        # finished requests are parked too (a removal does not say why), hence the bound
        self.parked: OrderedDict[int, _Parked] = OrderedDict()
        self.max_parked = 4 * max_rows
        self.k_cap = 1
        self.any_managed = False
        self.all_managed = False
        self.any_orphan = False
        self.guidance: Guidance | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Reject a malformed Emu3.5 spec when the request comes in (vLLM 0.32 calls this)."""
        try:
            RowSpec.from_extra(sampling_params.extra_args)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"malformed extra_args[{EXTRA_KEY!r}]: {e}") from e

    def is_argmax_invariant(self) -> bool:
        return False

    # ---- batch bookkeeping ----------------------------------------------------------------------
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self._apply_batch_update(batch_update)

    def _apply_batch_update(self, bu: BatchUpdate) -> None:
        for index in bu.removed:
            self._park(index)
            self.rows[index] = None
            self.cols.clear(index)
            self.probes.pop(index, None)
        for added in bu.added:
            index, params, out = added[0], added[1], added[-1]
            extra = getattr(params, "extra_args", None)
            self.probes.pop(index, None)
            answer = probe_answer(extra)
            if answer is not None:
                self.probes[index] = answer
            spec = RowSpec.from_extra(extra)
            if spec is None:
                self.rows[index] = None
                self.cols.clear(index)
                continue
            if not self._unpark(index, out):
                gen = None
                if spec.seed is not None:
                    gen = torch.Generator(self.device).manual_seed(spec.seed)
                draws = max(effective_top_k(spec.text.top_k, self.vocab),
                            effective_top_k(spec.image.top_k, self.vocab))
                self.rows[index] = _Row(spec, out, 0, gen, draws)
                h, w = spec.target_grid or (0, 0)
                self.state.reset_rows(index, h, w)
            self._write_settings(index, spec)
        for a, b, direction in bu.moved:
            pa, pb = self.probes.pop(a, None), self.probes.pop(b, None)
            swap = direction == MoveDirectionality.SWAP
            if swap:
                self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
                self.state.swap_rows(a, b)
                pa, pb = pb, pa
            else:
                self.rows[b], self.rows[a] = self.rows[a], None
                self.state.copy_row(a, b)
                pa, pb = None, pa
            self.cols.move(a, b, swap)
            for index, answer in ((a, pa), (b, pb)):
                if answer is not None:
                    self.probes[index] = answer
        self.batch_size = bu.batch_size
        self._rebuild_maps()

    def _write_settings(self, i: int, s: RowSpec) -> None:
        """Row ``i``'s sampling settings into the host mirror (sent with the rest in ``_rebuild_maps``)."""
        c = self.cols.np
        c["managed"][i] = True
        c["scale"][i] = s.cfg_scale
        c["text_k"][i], c["text_p"][i], c["text_t"][i] = s.text.top_k, s.text.top_p, s.text.temperature
        c["img_k"][i], c["img_p"][i], c["img_t"][i] = s.image.top_k, s.image.top_p, s.image.temperature

    def _park(self, index: int) -> None:
        row = self.rows[index]
        if row is None:
            return
        state = torch.stack([t[index] for t in self.state.tensors()])
        self.parked[id(row.out)] = _Parked(row, state)
        while len(self.parked) > self.max_parked:
            self.parked.popitem(last=False)

    def _unpark(self, index: int, out: list[int]) -> bool:
        """Put a row that comes back into the batch at ``index`` as it was; False for a new row."""
        parked = self.parked.pop(id(out), None)
        if parked is None or parked.row.out is not out:
            return False
        self.rows[index] = parked.row
        for t, value in zip(self.state.tensors(), parked.state):
            t[index] = value
        return True

    def _rebuild_maps(self) -> None:
        """Pair links and host mirrors, recomputed only when the batch changes; one non-blocking copy per
        packed settings tensor sends them to the device. The host mirror is rewritten only at the next
        batch change, after vLLM has read back a step's tokens, so the copy has completed by then."""
        n = self.max_rows
        c = self.cols.np
        leader, orphan = c["leader"], c["orphan"]
        leader[:] = np.arange(n)
        orphan[:] = False
        cond_at: dict[str, int] = {}
        uncond_at: dict[str, int] = {}
        self.managed_rows = []
        self.deciders[:] = False
        self.gens = [None] * n
        self.draws = [1] * n
        k_cap = 1
        for i, row in enumerate(self.rows[: self.batch_size]):
            if row is None:
                continue
            s = row.spec
            self.managed_rows.append(i)
            self.seen[i], self.img_at[i] = row.seen, row.img_at
            self.in_pixels[i], self.image_only[i] = row.mode == PIXELS, s.image_only
            self.deciders[i] = s.role != UNCOND
            self.gens[i] = row.gen if s.role != UNCOND else None
            self.draws[i] = row.draws
            k_cap = max(k_cap, row.draws)
            if s.role == COND:
                cond_at[s.pair_id] = i
            elif s.role == UNCOND:
                uncond_at[s.pair_id] = i
        c["managed"][self.batch_size:] = False
        pairs = []
        lone = []
        for pair, u in uncond_at.items():
            ci = cond_at.get(pair)
            if ci is None:
                logger.error("emu35: uncond row of pair %s has no cond row in the batch; failing it", pair)
                orphan[u] = True
                continue
            leader[u] = ci
            pairs.append((ci, u))
        for pair, ci in cond_at.items():
            if pair in uncond_at:
                continue
            if self.rows[ci].spec.image_only:  # type: ignore[union-attr]
                lone.append(ci)  # runs alone outside images; failed only if it must draw a pixel alone
                continue
            logger.error("emu35: cond row of pair %s has no uncond row in the batch; failing it", pair)
            orphan[ci] = True
        self.pairs = pairs
        self.pair_c = np.array([p for p, _ in pairs], dtype=np.int64)
        self.pair_u = np.array([u for _, u in pairs], dtype=np.int64)
        self.lone_image_conds = lone
        self.lone_c = np.array(lone, dtype=np.int64)
        c["cond_rows"][: len(pairs)] = self.pair_c
        c["uncond_rows"][: len(pairs)] = self.pair_u
        self.cols.push()
        on = self.cols.on_device
        npairs = len(pairs)
        self.guidance = Guidance(on["cond_rows"][:npairs], on["uncond_rows"][:npairs],
                                 on["scale"].index_select(0, on["cond_rows"][:npairs]))
        self.any_orphan = bool(orphan.any())
        self.k_cap = k_cap
        self.any_managed = bool(self.managed_rows)
        self.all_managed = len(self.managed_rows) == self.batch_size

    def _feed_new_tokens(self) -> None:
        """Fold each row's newly generated ids into its state (normally one id per row per step)."""
        pending: list[tuple[int, list[int]]] = []
        for i in self.managed_rows:
            row = self.rows[i]
            if row is None or len(row.out) <= row.seen:
                continue
            new = []
            for t in row.out[row.seen:]:
                if t < 0:  # an async-scheduling placeholder: read it next time
                    break
                new.append(t)
                before, row.mode = row.mode, host_mode(row.mode, t, self.tables)
                if before == HEADER and row.mode == PIXELS:
                    row.img_at = self.img_at[i] = row.seen + len(new)
            row.seen += len(new)
            self.seen[i] = row.seen
            self.in_pixels[i] = row.mode == PIXELS
            if new:
                pending.append((i, new))
        if not pending:
            return
        for step in range(max(len(new) for _, new in pending)):
            slot = self.slots.take()
            host = self.slots.np[slot]
            for i, new in pending:
                if step < len(new):
                    host[0, i], host[1, i] = new[step], 1
            tokens, active = self.slots.send(slot)
            advance(self.state, tokens, self.tables, active)

    # ---- the step -------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.any_managed:
            logits = self._apply_rules(logits)
        if self.probes:
            self._answer_probes(logits)
        return logits

    def _answer_probes(self, logits: torch.Tensor) -> None:
        """Force each probe row to its answer (start-up only: a Python loop over a handful of rows)."""
        for index, answer in self.probes.items():
            if index < logits.shape[0]:
                logits[index].fill_(float("-inf"))
                logits[index, answer] = 0.0

    def _columns(self, rows: int) -> slice:
        """The sampling columns from the host mode mirror (uncond rows take their cond row's token, so only
        the other rows decide; a reference uncond row starts after IMG and never sees BOI)."""
        deciders = self.deciders[:rows]
        pixels = int(np.count_nonzero(self.in_pixels[:rows] & deciders))
        if pixels and pixels == int(np.count_nonzero(deciders)):
            return slice(self.tables.first_visual, self.vocab)
        return slice(0, self.tables.first_visual) if pixels == 0 else slice(None)

    def _apply_rules(self, logits: torch.Tensor) -> torch.Tensor:
        self._feed_new_tokens()  # the live lists are complete only now (async scheduling fills them late)
        rows = logits.shape[0]
        text = SamplingColumns(self.text_k[:rows], self.text_p[:rows], self.text_t[:rows])
        image = SamplingColumns(self.img_k[:rows], self.img_p[:rows], self.img_t[:rows])
        managed = None if self.all_managed else self.managed[:rows]
        if not self.all_managed:
            original = logits.clone()
        tokens = next_tokens(logits, self.state.view(rows), self.tables, self.guidance, text, image, self.k_cap,
                             self.gens[:rows], self.draws[:rows], self.fallback, managed, self._columns(rows))
        tokens = tokens[self.leader[:rows]]  # the uncond row takes its cond row's token
        broken = self._broken_rows(rows)
        if broken is not None:
            tokens = torch.where(broken, torch.full_like(tokens, self.kill_token), tokens)
        # hand vLLM rows that are -inf except the chosen token, so its greedy pick is our token
        logits.fill_(float("-inf"))
        logits.scatter_(1, tokens[:, None], 0.0)
        if not self.all_managed:
            logits = torch.where(self.managed[:rows, None], logits, original)
        return logits

    def _broken_rows(self, rows: int) -> torch.Tensor | None:
        """Rows of pairs that lost lockstep, from the host counters (array arithmetic; no device read)."""
        c, u = self.pair_c, self.pair_u
        inside = (c < rows) & (u < rows)
        c, u = c[inside], u[inside]
        drift = self.seen[c] - np.where(self.image_only[c], self.img_at[c], 0) - self.seen[u]
        lone = self.lone_c[self.lone_c < rows]
        alone = lone[self.in_pixels[lone]]
        if not drift.any() and not alone.size and not self.any_orphan:
            return None
        broken = self.orphan[:rows].clone()
        for ci, ui, d in zip(c[drift != 0], u[drift != 0], drift[drift != 0]):  # failures only
            logger.error("emu35: pair %s drifted apart (%d tokens); failing it", self.rows[ci].spec.pair_id, d)
            broken[int(ci)] = broken[int(ui)] = True
        for ci in alone:
            logger.error("emu35: cond row of pair %s must draw a pixel without its uncond row; failing it",
                         self.rows[ci].spec.pair_id)
            broken[int(ci)] = True
        return broken
