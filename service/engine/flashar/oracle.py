"""The oracle of the FlashAR engine's tests: every step recomputes the whole sequence, no cache.

At step ``s`` each row's ``[prefix (right-padded to P) | H·W grid]`` — cells not drawn yet hold PAD —
runs through :meth:`FlashARNetwork.full` under the spec's explicit 4-D mask (§5), and the features of
diagonal ``s − 1`` are read from that output. Fusion, guidance and sampling are the engine's own, so
any difference in ids is a difference between the cached and the full-sequence network.
"""

from __future__ import annotations

import torch

from service.engine.flashar.engine import FlashARCore, Job, StepOutput, row_offsets
from service.engine.flashar.fusion import corner_logits, fused_logits
from service.engine.flashar.schedule import diagonal_rows


class OracleCore(FlashARCore):
    """:class:`FlashARCore` with the cached forwards replaced by full recomputation."""

    def _full(self, job: Job) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, pad = job.prefix_len, self.cfg.token_ids.get("pad_token_id", 0)
        drawn = set()
        for s in range(job.step):
            drawn |= {r * job.width + s - r for r in diagonal_rows(s, job.height, job.width)}
        grid = [job.grid[q] if q in drawn else pad for q in range(job.height * job.width)]
        ids = torch.tensor([prompt + [pad] * (p - len(prompt)) + grid for prompt in job.prompts])
        valid = torch.tensor([[i < len(prompt) for i in range(p)] for prompt in job.prompts])
        return self.net.full(ids, valid, (job.height, job.width))

    @torch.inference_mode()
    def admit(self, jobs: list[Job]) -> list[StepOutput]:
        for job in jobs:
            job.slots = [self.free.pop(0) for _ in job.prompts]
        pre_h, pre_b = [], []
        for job in jobs:
            h_h, x_s, _ = self._full(job)
            for row, prompt in enumerate(job.prompts):
                pre_h.append(h_h[row, len(prompt) - 1])
                pre_b.append(x_s[row, len(prompt) - 1])
        logits = corner_logits(self.net, torch.stack(pre_h), torch.stack(pre_b))
        offsets = row_offsets(jobs)
        cond = torch.tensor(offsets)
        uncond = torch.tensor([o + len(job.prompts) - 1 for o, job in zip(offsets, jobs)])
        return self._draw(jobs, logits, cond, uncond, [[0] for _ in jobs])

    @torch.inference_mode()
    def advance(self, jobs: list[Job]) -> list[StepOutput]:
        parts: list[torch.Tensor] = []
        cond: list[int] = []
        uncond: list[int] = []
        cells: list[list[int]] = []
        base = 0
        for job in jobs:
            h_h, _, h_v = self._full(job)
            hw, p = job.height * job.width, job.prefix_len
            targets = list(diagonal_rows(job.step, job.height, job.width))
            flat = [r * job.width + job.step - r for r in targets]
            cells.append(flat)
            left = torch.tensor([q - 1 if q % job.width else q for q in flat])
            up = torch.tensor([q - job.width if q >= job.width else q for q in flat])
            has_left = torch.tensor([q % job.width > 0 for q in flat])
            has_up = torch.tensor([q >= job.width for q in flat])
            for row in range(len(job.prompts)):
                parts.append(fused_logits(self.net, h_h[row, p:p + hw], h_v[row], left, up, has_left, has_up))
            k = len(flat)
            cond += range(base, base + k)
            uncond += range(base + (len(job.prompts) - 1) * k, base + len(job.prompts) * k)
            base += len(job.prompts) * k
        return self._draw(jobs, torch.cat(parts), torch.tensor(cond), torch.tensor(uncond), cells)
