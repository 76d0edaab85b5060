"""Write a synthetic tokenizer in the upstream Emu3.5 file layout with the real id layout.

Real BPE ranks cannot be shipped, so we write 151,643 unique byte strings instead: the 256 single
bytes first, in the byte-level-BPE order Qwen (and GPT-2) use (printable bytes 33..126, 161..172,
174..255, then the rest), so ``'!'`` is rank 0, ``'*'`` rank 9 and ``'0'..'9'`` ranks 15..24 exactly
as in the real file. Then common English words (with and without a leading space), then every pair of
printable ASCII characters and, to fill up, triples. Every multi-byte token has a one-shorter prefix in
the table, so BPE can reach it. Because the rank count matches, every special token id and the visual
id range equal the real ones (vocabulary 282,926).
"""

from __future__ import annotations

import base64
import itertools
from pathlib import Path

from service.tokenizer import TIKTOKEN_FILE, VISION_CONTROL, VISION_FILE, VISUAL_TOKEN_FORMAT

NUM_BPE_RANKS = 151_643
NUM_VISUAL_TOKENS = 131_072

_WORDS = (
    "the a an of and to in is it that on for with as at by from this be are was he she they we you "
    "cat dog bird house tree city street river mountain sky sun moon night day light water fire "
    "red blue green yellow white black small big old new happy little quiet bright "
    "walks runs sits looks finds opens makes draws paints writes sees holds "
    "once upon time story step first then next finally image picture scene photo "
    "how make cook bake cake bread tea coffee garden flower robot car boat train "
    "assistant helpful task user generate response interleaved text images please"
).split()


def byte_level_order() -> list[int]:
    """The 256 byte values in byte-level BPE rank order (printable first, then the rest)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    rest = [b for b in range(256) if b not in set(printable)]
    return printable + rest


def synthetic_ranks(n: int = NUM_BPE_RANKS) -> list[bytes]:
    """``n`` unique byte strings, single bytes first; deterministic."""
    tokens: list[bytes] = [bytes([b]) for b in byte_level_order()]
    seen = set(tokens)

    def add(tok: bytes) -> None:
        if tok not in seen and len(tokens) < n:
            seen.add(tok)
            tokens.append(tok)

    printable = [chr(c) for c in range(32, 127)]
    for a, b in itertools.product(printable, repeat=2):
        add((a + b).encode())
    for word in _WORDS:  # grow each word one byte at a time so every prefix exists
        for form in (word, " " + word):
            for end in range(2, len(form) + 1):
                add(form[:end].encode())
    for a, b, c in itertools.product(printable, repeat=3):
        if len(tokens) >= n:
            break
        add((a + b + c).encode())
    if len(tokens) != n:
        raise RuntimeError(f"could only make {len(tokens)} synthetic ranks, need {n}")
    return tokens


def write_tokenizer(out_dir: Path) -> Path:
    """Write ``emu3.tiktoken`` and ``emu3_vision_tokens.txt`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(synthetic_ranks())]
    (out_dir / TIKTOKEN_FILE).write_text("".join(lines), encoding="utf-8")
    vision = list(VISION_CONTROL) + [VISUAL_TOKEN_FORMAT.format(c) for c in range(NUM_VISUAL_TOKENS)]
    (out_dir / VISION_FILE).write_text("\n".join(vision) + "\n", encoding="utf-8")
    return out_dir
