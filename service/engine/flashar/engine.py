"""The FlashAR decoding loop: requests at different diagonals share one forward per engine step.

A request (a *job*) owns one cache slot per row (cond, and uncond when guided). Its prompt runs in a
prefill whose features draw cell (0, 0); then every engine step feeds each job's last diagonal, padded to
the longest in the batch, and draws each job's next diagonal — ``H + W − 1`` logit-producing forwards per
image. Guidance, the visual-only vocabulary and the sampler are applied to every drawn cell of the batch
at once; the host reads the drawn ids back once per step (to stream finished rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.engine.flashar.checkpoint import FlashARConfig
from service.engine.flashar.fusion import corner_logits, fused_logits
from service.engine.flashar.network import Chunk, FlashARNetwork
from service.engine.flashar.schedule import diagonal_rows, header_ids, native_row, num_steps, rows_completed_by
from service.engine.policy.rules import effective_top_k, sample
from service.types import GenerationRequest, SamplingSettings

#: The unconditional prompt of the FlashAR release's GenEval runs: the T2I template, empty prompt (§3).
FLASHAR_UNCOND_TEXT = "You are a helpful assistant for t2i task. USER:  ASSISTANT: "


@dataclass
class Job:
    """One request's decoding state."""

    request_id: str
    prompts: list[list[int]]  # cond[, uncond], each ending with the image header (… IMG)
    height: int
    width: int
    scale: float
    sampling: SamplingSettings
    generator: torch.Generator | None
    header: list[int]
    eol: int
    eoi: int
    slots: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # backbone cache length per row
    image_len: int = 0  # vertical cache length (image tokens fed), the same for every row
    step: int = 0  # the next diagonal to draw
    grid: list[int] = field(default_factory=list)  # drawn ids, flat r·W + c (0 where not drawn yet)

    @property
    def prefix_len(self) -> int:
        """``P``: image cell ``q`` sits at position ``P + q`` in every row (the uncond row has a gap)."""
        return max(len(p) for p in self.prompts)

    @property
    def done(self) -> bool:
        return self.step >= num_steps(self.height, self.width)

    def capacity(self) -> int:
        return self.prefix_len + self.height * self.width + min(self.height, self.width)


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one job: its new tokens in Emu3.5's layout, and whether it ended."""

    job: Job
    token_ids: list[int]
    finished: bool
    cells: list[tuple[int, int]]  # (r·W + c, id) drawn in this step


class FlashARCore:
    """The network, its two slot caches and the batched draw; single-threaded (one caller at a time)."""

    def __init__(self, net: FlashARNetwork, slots: int, fallback_seed: int | None = None) -> None:
        self.net = net
        self.cfg: FlashARConfig = net.cfg
        self.cache, self.vcache = net.new_caches(slots, 64)
        self.free = list(range(slots))
        self.device = net.devices[-1]
        self.fallback = torch.Generator(self.device).manual_seed(
            fallback_seed if fallback_seed is not None else torch.seed() % (2**63))
        self.forwards = 0  # logit-producing forward passes since start

    # ---- jobs ------------------------------------------------------------------------------------
    def make_job(self, req: GenerationRequest, header: list[int], uncond: list[int] | None, eol: int, eoi: int) -> Job:
        """A job for a T2I request whose prompts get ``header`` appended (``req.target_grid`` is set)."""
        assert req.target_grid is not None
        h, w = req.target_grid
        prompts = [list(req.cond_prompt) + header]
        if req.guided and uncond is not None:
            prompts.append(list(uncond) + header)
        gen = torch.Generator(self.device).manual_seed(req.seed) if req.seed is not None else None
        return Job(req.request_id, prompts, h, w, float(req.cfg_scale) if len(prompts) == 2 else 1.0,
                   req.image_sampling, gen, header, eol, eoi, grid=[0] * (h * w))

    def admissible(self, jobs: list[Job]) -> list[Job]:
        """The longest head of ``jobs`` (in order) whose rows all fit the free slots."""
        room, taken = len(self.free), []
        for job in jobs:
            if len(job.prompts) > room:
                break
            room -= len(job.prompts)
            taken.append(job)
        return taken

    def release(self, job: Job) -> None:
        self.free.extend(job.slots)
        job.slots = []

    # ---- steps -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def admit(self, jobs: list[Job]) -> list[StepOutput]:
        """Prefill every row of ``jobs`` in one forward and draw their cell (0, 0)."""
        for job in jobs:
            job.slots = [self.free.pop(0) for _ in job.prompts]
        prompts = [p for job in jobs for p in job.prompts]
        width = max(len(p) for p in prompts)
        self._grow(max([width] + [job.capacity() for job in jobs]))
        pad = self.cfg.token_ids.get("pad_token_id", 0)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
        lengths = torch.tensor([len(p) for p in prompts])
        chunk = Chunk(torch.tensor([s for job in jobs for s in job.slots]), torch.arange(width)[None].repeat(len(prompts), 1),
                      lengths, torch.arange(width)[None].repeat(len(prompts), 1), causal=True)
        h_h, x_s = self.net.prefill(ids, chunk, self.cache)
        self.forwards += 1
        last = (lengths - 1).to(h_h.device)
        rows = torch.arange(len(prompts), device=h_h.device)
        logits = corner_logits(self.net, h_h[rows, last], x_s.to(h_h.device)[rows, last])
        for job in jobs:
            job.lengths = [len(p) for p in job.prompts]
        row_of = row_offsets(jobs)
        cond = torch.tensor([row_of[i] for i in range(len(jobs))])
        uncond = torch.tensor([row_of[i] + len(job.prompts) - 1 for i, job in enumerate(jobs)])
        return self._draw(jobs, logits, cond, uncond, [[0] for _ in jobs])

    @torch.inference_mode()
    def advance(self, jobs: list[Job]) -> list[StepOutput]:
        """One forward feeding each job's last diagonal (padded to the longest), then draw the next ones."""
        fed = [list(diagonal_rows(job.step - 1, job.height, job.width)) for job in jobs]
        n = max(len(f) for f in fed)
        # every row writes n entries (its padding past its valid length): room for the longest row
        self._grow(max(length for job in jobs for length in job.lengths) + n)
        slots, write, vwrite, valid, vvalid, pos, ids = [], [], [], [], [], [], []
        for job, rows in zip(jobs, fed):
            flat = [r * job.width + (job.step - 1 - r) for r in rows]
            flat_padded = flat + [flat[-1]] * (n - len(flat))
            for row, slot in enumerate(job.slots):
                slots.append(slot)
                write.append(list(range(job.lengths[row], job.lengths[row] + n)))
                vwrite.append(list(range(job.image_len, job.image_len + n)))
                valid.append(job.lengths[row] + len(flat))
                vvalid.append(job.image_len + len(flat))
                pos.append([job.prefix_len + q for q in flat_padded])
                ids.append([job.grid[q] for q in flat_padded])
        slots_t, pos_t = torch.tensor(slots), torch.tensor(pos)
        chunk = Chunk(slots_t, torch.tensor(write), torch.tensor(valid), pos_t, causal=False)
        vchunk = Chunk(slots_t, torch.tensor(vwrite), torch.tensor(vvalid), pos_t, causal=False)
        h_h, h_v = self.net.step(torch.tensor(ids), chunk, vchunk, self.cache, self.vcache)
        self.forwards += 1
        for job, rows in zip(jobs, fed):
            job.lengths = [length + len(rows) for length in job.lengths]
            job.image_len += len(rows)
        # targets: every cell of each job's next diagonal, for each of its rows (features flattened [R·n])
        left, up, has_left, has_up, cells = [], [], [], [], []
        row_base = 0
        for job, rows in zip(jobs, fed):
            first_fed = rows[0]
            targets = list(diagonal_rows(job.step, job.height, job.width))
            cells.append([r * job.width + (job.step - r) for r in targets])
            for _ in job.slots:
                for r in targets:
                    c = job.step - r
                    left.append(row_base * n + (r - first_fed if c > 0 else 0))
                    up.append(row_base * n + (r - 1 - first_fed if r > 0 else 0))
                    has_left.append(c > 0)
                    has_up.append(r > 0)
                row_base += 1
        d = h_h.shape[-1]
        logits = fused_logits(self.net, h_h.reshape(-1, d), h_v.reshape(-1, d), torch.tensor(left), torch.tensor(up),
                              torch.tensor(has_left), torch.tensor(has_up))
        cond: list[int] = []
        uncond: list[int] = []
        base = 0
        for job, flat in zip(jobs, cells):
            k = len(flat)
            cond += range(base, base + k)
            uncond += range(base + (len(job.slots) - 1) * k, base + len(job.slots) * k)
            base += len(job.slots) * k
        return self._draw(jobs, logits, torch.tensor(cond), torch.tensor(uncond), cells)

    def _draw(self, jobs: list[Job], logits: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
              cells: list[list[int]]) -> list[StepOutput]:
        """Guidance on the fused logits, then the image sampler, for every drawn cell of the batch at once;
        the one host read-back of the step; the jobs' grids and streams advance."""
        guided, settings, gens, draws = [], [], [], []
        visual = logits.shape[-1]
        for job, flat in zip(jobs, cells):
            k = effective_top_k(job.sampling.top_k, visual)
            for _ in flat:
                guided.append(job.scale)
                settings.append((job.sampling.top_k, job.sampling.top_p, job.sampling.temperature))
                gens.append(job.generator)
                draws.append(k)
        dev = logits.device
        z_c, z_u = logits[cond.to(dev)], logits[uncond.to(dev)]
        z = choose_logits(z_c, z_u, torch.tensor(guided, device=dev))
        cols = torch.tensor(settings, device=dev, dtype=torch.float64)
        chosen = sample(z, cols[:, 0].long(), cols[:, 1].float(), cols[:, 2].float(), max(draws), gens, draws,
                        self.fallback)
        ids = (chosen + self.cfg.visual_offset).tolist()
        out, at = [], 0
        for job, flat in zip(jobs, cells):
            drawn = []
            for q in flat:
                job.grid[q] = ids[at]
                drawn.append((q, ids[at]))
                at += 1
            tokens = list(job.header) if job.step == 0 else []
            for r in rows_completed_by(job.step, job.height, job.width):
                tokens += native_row(job.grid[r * job.width:(r + 1) * job.width], r, job.height, job.eol, job.eoi)
            job.step += 1
            out.append(StepOutput(job, tokens, job.done, drawn))
        return out

    def _grow(self, capacity: int) -> None:
        if capacity > self.cache.capacity:
            self.cache.grow(capacity)
            self.vcache.grow(capacity)


def choose_logits(z_c: torch.Tensor, z_u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on fused logits, ``z_u + s·(z_c − z_u)`` per cell (§8); ``s = 1`` (or a
    cell whose uncond index is its cond one) leaves the cond logits as they are."""
    return z_u + scale[:, None] * (z_c - z_u)


def row_offsets(jobs: list[Job]) -> list[int]:
    """Index of each job's first (cond) row in the batch's rows."""
    offsets, at = [], 0
    for job in jobs:
        offsets.append(at)
        at += len(job.prompts)
    return offsets


def flashar_header(tok, height: int, width: int) -> list[int]:
    """``BOI H * W IMG`` with the tokenizer's digit and star ids."""
    ids = tok.ids

    def one(ch: str) -> int:
        (t,) = tok.encode(ch, allow_special=False)
        return t

    return header_ids(height, width, ids.boi, ids.img, one, one("*"))


def flashar_uncond(tok) -> list[int]:
    """The FlashAR release's unconditional prefix text part: ``BOS <template, empty prompt> BSS``."""
    return [tok.ids.bos, *tok.encode(FLASHAR_UNCOND_TEXT, allow_special=False), tok.ids.bss]


def run_jobs(core: FlashARCore, jobs: list[Job], join_every: int = 0) -> dict[str, list[int]]:
    """Decode ``jobs`` to the end on ``core`` and return each one's tokens (Emu3.5's layout). With
    ``join_every = k > 0`` one job joins every ``k`` steps, so jobs run at different diagonals side by
    side; 0 admits them all at once. (Tests, tools and the benchmark; the service runs its own loop.)"""
    waiting, active = list(jobs), list[Job]()
    tokens: dict[str, list[int]] = {job.request_id: [] for job in jobs}
    tick = 0
    while waiting or active:
        joining = []
        if waiting and (join_every == 0 or tick % join_every == 0):
            joining = core.admissible(waiting if join_every == 0 else waiting[:1])
            waiting = waiting[len(joining):]
        outputs = core.advance(active) if active else []
        outputs += core.admit(joining) if joining else []
        active = []
        for out in outputs:
            tokens[out.job.request_id] += out.token_ids
            if out.finished:
                core.release(out.job)
            else:
                active.append(out.job)
        tick += 1
    return tokens
