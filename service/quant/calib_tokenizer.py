"""The Emu3.5 tokenizer behind the small slice of the Hugging Face tokenizer API msModelSlim calls.

msModelSlim tokenises each calibration sample with ``tokenizer(text, return_tensors="pt",
padding=True)`` (and, batched, ``add_special_tokens=False``), then reads ``input_ids`` and
``attention_mask``. Emu3.5 ships a tiktoken tokenizer that ``AutoTokenizer`` cannot load, so the
adapter hands msModelSlim this object instead. Samples are written with token *names* (control and
visual tokens), so encoding allows special tokens: that is how visual tokens reach calibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import BatchEncoding

from service.tokenizer import Emu35Tokenizer


class CalibrationTokenizer:
    """Callable like a Hugging Face tokenizer; pads on the right with Emu3.5's PAD."""

    def __init__(self, tokenizer: Emu35Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.ids.pad
        self.eos_token_id = tokenizer.ids.eos
        self.bos_token_id = tokenizer.ids.bos
        self.padding_side = "right"

    @classmethod
    def from_dir(cls, path: str | Path) -> "CalibrationTokenizer":
        return cls(Emu35Tokenizer.from_dir(path))

    def encode(self, text: str, add_special_tokens: bool = False, **_: object) -> list[int]:
        # Emu3.5 prompts carry BOS explicitly in the text; nothing is added.
        return self.tokenizer.encode(text, allow_special=True)

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None, padding: bool | str = False,
                 add_special_tokens: bool = True, **_: object) -> BatchEncoding:
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t) for t in texts]
        width = max((len(r) for r in rows), default=0)
        ids = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        if return_tensors == "pt":
            return BatchEncoding({"input_ids": torch.tensor(ids, dtype=torch.long),
                                  "attention_mask": torch.tensor(mask, dtype=torch.long)})
        if isinstance(text, str):
            return BatchEncoding({"input_ids": ids[0], "attention_mask": mask[0]})
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    def decode(self, ids: Sequence[int], **_: object) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.pad_token_id])
