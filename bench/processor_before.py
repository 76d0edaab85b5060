"""THE "BEFORE" OF bench/processor_step.py: the processor as it was before issue 25 (device tensors rebuilt
from Python lists on every batch change, new tokens sent unpinned every step). Kept only so the bench
reports before and after in one run; the service uses service/engine/in_vllm/processor.py.

Emu3.5's decoding rules as a vLLM v1 logits processor (passed with ``logits_processors=``).

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

Rows whose ``SamplingParams.extra_args`` carry no Emu3.5 spec pass through untouched, except the
engine's start-up probe (``pairing.PROBE_KEY``): its row is forced to the token that says whether the
pair scheduler admitted it, which proves that this processor and that scheduler are really running.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

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
    sampling_columns,
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


class Emu35LogitsProcessor(LogitsProcessor):
    """Batch-wide Emu3.5 rules + sampling (design.md §5)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        tok = Emu35Tokenizer.from_dir(vllm_config.model_config.tokenizer)
        seed = getattr(vllm_config.model_config, "seed", None) or 0
        self._setup(VocabTables.from_tokenizer(tok, device), tok.ids.pad,
                    int(vllm_config.scheduler_config.max_num_seqs), device, int(seed))

    @classmethod
    def for_tables(cls, tables: VocabTables, kill_token: int, max_rows: int,
                   device: torch.device | str = "cpu", seed: int = 0) -> "Emu35LogitsProcessor":
        """A processor over hand-made vocabulary tables (unit tests, small vocabularies)."""
        self = cls.__new__(cls)
        self._setup(tables, kill_token, max_rows, torch.device(device), seed)
        return self

    def _setup(self, tables: VocabTables, kill_token: int, max_rows: int, device: torch.device, seed: int) -> None:
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
        self.managed = torch.zeros(n, dtype=torch.bool, device=device)
        self.orphan = torch.zeros(n, dtype=torch.bool, device=device)
        self.pairs: list[tuple[int, int]] = []  # (cond row, uncond row) of every complete pair
        self.lone_image_conds: list[int] = []  # reference-mode cond rows whose image uncond is not in the batch
        # rows out of the batch, by id() of their output list (kept alive here, so the id stays theirs);
        # finished requests are parked too (a removal does not say why), hence the bound
        self.parked: OrderedDict[int, _Parked] = OrderedDict()
        self.max_parked = 4 * max_rows
        self.leader = torch.arange(n, dtype=torch.long, device=device)
        self.text_k = torch.ones(n, dtype=torch.long, device=device)
        self.img_k = torch.ones(n, dtype=torch.long, device=device)
        self.text_p = torch.ones(n, device=device)
        self.img_p = torch.ones(n, device=device)
        self.text_t = torch.ones(n, device=device)
        self.img_t = torch.ones(n, device=device)
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
                continue
            if self._unpark(index, out):
                continue
            gen = None
            if spec.seed is not None:
                gen = torch.Generator(self.device).manual_seed(spec.seed)
            draws = max(effective_top_k(spec.text.top_k, self.vocab), effective_top_k(spec.image.top_k, self.vocab))
            self.rows[index] = _Row(spec, out, 0, gen, draws)
            h, w = spec.target_grid or (0, 0)
            self.state.reset_rows(index, h, w)
        for a, b, direction in bu.moved:
            pa, pb = self.probes.pop(a, None), self.probes.pop(b, None)
            if direction == MoveDirectionality.SWAP:
                self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
                self.state.swap_rows(a, b)
                pa, pb = pb, pa
            else:
                self.rows[b], self.rows[a] = self.rows[a], None
                self.state.copy_row(a, b)
                pa, pb = None, pa
            for index, answer in ((a, pa), (b, pb)):
                if answer is not None:
                    self.probes[index] = answer
        self.batch_size = bu.batch_size
        self._rebuild_maps()

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
        """Pair links and per-row settings, recomputed only when the batch changes."""
        n = self.max_rows
        managed, leader = [False] * n, list(range(n))
        cols = {k: [1.0] * n for k in ("scale", "tp", "tt", "ip", "it")}
        tk, ik = [1] * n, [1] * n
        cond_at: dict[str, int] = {}
        uncond_at: dict[str, int] = {}
        k_cap = 1
        for i, row in enumerate(self.rows[: self.batch_size]):
            if row is None:
                continue
            s = row.spec
            managed[i] = True
            cols["scale"][i] = s.cfg_scale
            tk[i], cols["tp"][i], cols["tt"][i] = s.text.top_k, s.text.top_p, s.text.temperature
            ik[i], cols["ip"][i], cols["it"][i] = s.image.top_k, s.image.top_p, s.image.temperature
            k_cap = max(k_cap, row.draws)
            if s.role == COND:
                cond_at[s.pair_id] = i
            elif s.role == UNCOND:
                uncond_at[s.pair_id] = i
        orphan = [False] * n
        pairs = []
        lone = []
        for pair, u in uncond_at.items():
            c = cond_at.get(pair)
            if c is None:
                logger.error("emu35: uncond row of pair %s has no cond row in the batch; failing it", pair)
                orphan[u] = True
                continue
            leader[u] = c
            pairs.append((c, u))
        for pair, c in cond_at.items():
            if pair in uncond_at:
                continue
            if self.rows[c].spec.image_only:  # type: ignore[union-attr]
                lone.append(c)  # runs alone outside images; failed only if it must draw a pixel alone
                continue
            logger.error("emu35: cond row of pair %s has no uncond row in the batch; failing it", pair)
            orphan[c] = True
        dev = self.device
        self.managed.copy_(torch.tensor(managed, device=dev))
        self.orphan.copy_(torch.tensor(orphan, device=dev))
        self.pairs = pairs
        self.lone_image_conds = lone
        self.any_orphan = any(orphan)
        self.leader.copy_(torch.tensor(leader, device=dev))
        self.text_k.copy_(torch.tensor(tk, device=dev))
        self.img_k.copy_(torch.tensor(ik, device=dev))
        self.text_p.copy_(torch.tensor(cols["tp"], device=dev))
        self.text_t.copy_(torch.tensor(cols["tt"], device=dev))
        self.img_p.copy_(torch.tensor(cols["ip"], device=dev))
        self.img_t.copy_(torch.tensor(cols["it"], device=dev))
        self.k_cap = k_cap
        self.any_managed = any(managed)
        self.all_managed = all(managed[: self.batch_size])
        self.guidance = Guidance(
            torch.tensor([c for c, _ in pairs], dtype=torch.long, device=dev),
            torch.tensor([u for _, u in pairs], dtype=torch.long, device=dev),
            torch.tensor([cols["scale"][c] for c, _ in pairs], dtype=torch.float32, device=dev),
        )

    def _feed_new_tokens(self) -> None:
        """Fold each row's newly generated ids into its state (normally one id per row per step)."""
        pending: list[tuple[int, list[int]]] = []
        for i, row in enumerate(self.rows[: self.batch_size]):
            if row is not None and len(row.out) > row.seen:
                new = []
                for t in row.out[row.seen:]:
                    if t < 0:  # an async-scheduling placeholder: read it next time
                        break
                    new.append(t)
                    before, row.mode = row.mode, host_mode(row.mode, t, self.tables)
                    if before == HEADER and row.mode == PIXELS:
                        row.img_at = row.seen + len(new)
                row.seen += len(new)
                if new:
                    pending.append((i, new))
        if not pending:
            return
        for step in range(max(len(new) for _, new in pending)):
            tokens = torch.zeros(self.max_rows, dtype=torch.long)
            active = torch.zeros(self.max_rows, dtype=torch.bool)
            for i, new in pending:
                if step < len(new):
                    tokens[i], active[i] = new[step], True
            advance(self.state, tokens.to(self.device), self.tables, active.to(self.device))

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

    def _apply_rules(self, logits: torch.Tensor) -> torch.Tensor:
        self._feed_new_tokens()  # the live lists are complete only now (async scheduling fills them late)
        rows = logits.shape[0]
        gens = [row.gen if row is not None and row.spec.role != UNCOND else None for row in self.rows[:rows]]
        draws = [row.draws if row is not None else 1 for row in self.rows[:rows]]
        text = SamplingColumns(self.text_k[:rows], self.text_p[:rows], self.text_t[:rows])
        image = SamplingColumns(self.img_k[:rows], self.img_p[:rows], self.img_t[:rows])
        managed = None if self.all_managed else self.managed[:rows]
        if not self.all_managed:
            original = logits.clone()
        # uncond rows take their cond row's token, so only the other rows decide the columns (a reference
        # uncond row starts after IMG and never sees BOI, so its own mode says nothing)
        columns = sampling_columns([row.mode == PIXELS for row in self.rows[:rows]
                                    if row is not None and row.spec.role != UNCOND], self.tables)
        tokens = next_tokens(logits, self.state.view(rows), self.tables, self.guidance, text, image, self.k_cap,
                             gens, draws, self.fallback, managed, columns)
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
        """Rows of pairs that lost lockstep (host-side list lengths only; no device read)."""
        drifted = [(c, u) for c, u in self.pairs if c < rows and u < rows and self._drift(c, u) != 0]
        alone = [c for c in self.lone_image_conds if c < rows and self.rows[c].mode == PIXELS]  # type: ignore[union-attr]
        if not drifted and not alone and not self.any_orphan:
            return None
        broken = self.orphan[:rows].clone()
        for c, u in drifted:
            logger.error("emu35: pair %s drifted apart (%d tokens); failing it",
                         self.rows[c].spec.pair_id, self._drift(c, u))  # type: ignore[union-attr]
            broken[c] = broken[u] = True
        for c in alone:
            logger.error("emu35: cond row of pair %s must draw a pixel without its uncond row; failing it",
                         self.rows[c].spec.pair_id)  # type: ignore[union-attr]
            broken[c] = True
        return broken

    def _drift(self, c: int, u: int) -> int:
        """Tokens the uncond row of a pair is behind (+) or ahead (−) of where its cond row says it must
        be: all of the cond row's tokens in lockstep, those since its latest IMG in reference mode."""
        cond, uncond = self.rows[c], self.rows[u]
        assert cond is not None and uncond is not None
        expected = cond.seen - cond.img_at if cond.spec.image_only else cond.seen
        return expected - uncond.seen

