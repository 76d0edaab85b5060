"""The Emu3.5 tokenizer: Qwen's byte-level BPE (via tiktoken) plus the Emu3.5 special and visual tokens.

The upstream layout is two files in one folder:

* ``emu3.tiktoken`` — one ``base64(token_bytes) rank`` line per BPE token (151,643 ranks);
* ``emu3_vision_tokens.txt`` — ``<|image token|>``, ``<|image start|>``, ``<|image end|>``, then one
  ``<|visual token NNNNNN|>`` line per codebook entry.

Special tokens are numbered right after the BPE ranks: ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, ``<|extra_0|>`` … ``<|extra_204|>``, then the vision lines. Role ids (BOS, EOS, BOI …)
are looked up by token *name*, never hard-coded, so a tokenizer with another layout still works.

Only the ~211 control tokens are registered with tiktoken as special tokens. The 131,072 visual tokens
are handled here: registering them with tiktoken makes its special-token regex so large that encoding
a short prompt takes ~70 ms instead of ~40 µs, and the service never needs to re-tokenise visual text
anyway (prompts are assembled as id lists; codes map to ids arithmetically).
"""

from __future__ import annotations

import base64
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import tiktoken

TIKTOKEN_FILE = "emu3.tiktoken"
VISION_FILE = "emu3_vision_tokens.txt"

#: Qwen's pre-tokenisation pattern (design.md §2).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_EXTRA_TOKENS = 205
LEADING_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS)
)
IMAGE_TOKEN = "<|image token|>"
IMAGE_START = "<|image start|>"
IMAGE_END = "<|image end|>"
VISION_CONTROL = (IMAGE_TOKEN, IMAGE_START, IMAGE_END)
VISUAL_TOKEN_FORMAT = "<|visual token {:06d}|>"
_VISUAL_TOKEN_RE = re.compile(r"<\|visual token (\d{6})\|>")

#: Role → token name (design.md §2). The ids follow from the files.
ROLE_TOKENS: Mapping[str, str] = {
    "bos": "<|extra_203|>",
    "eos": "<|extra_204|>",
    "pad": "<|endoftext|>",
    "eol": "<|extra_200|>",
    "eof": "<|extra_201|>",
    "tms": "<|extra_202|>",
    "img": IMAGE_TOKEN,
    "boi": IMAGE_START,
    "eoi": IMAGE_END,
    "bss": "<|extra_100|>",
    "ess": "<|extra_101|>",
    "bog": "<|extra_60|>",
    "eog": "<|extra_61|>",
    "boc": "<|extra_50|>",
    "eoc": "<|extra_51|>",
}


class TokenizerFormatError(ValueError):
    """The tokenizer files do not follow the upstream Emu3.5 layout."""


@dataclass(frozen=True)
class SpecialIds:
    """Ids of every role token, plus the visual-token range. Derived from the tokenizer files."""

    bos: int
    eos: int
    pad: int
    eol: int
    eof: int
    tms: int
    img: int
    boi: int
    eoi: int
    bss: int
    ess: int
    bog: int
    eog: int
    boc: int
    eoc: int
    first_visual: int
    num_visual: int

    @property
    def last_visual(self) -> int:
        return self.first_visual + self.num_visual - 1


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Read a ``base64 rank`` file; ranks must be 0..N-1 with no gaps (ids are positional)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerFormatError(f"{path}:{line_no}: expected 'base64 rank', got {line[:80]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFormatError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def read_vision_tokens(path: Path) -> list[str]:
    """Read the vision token names and check the layout: 3 control tokens then visual tokens 0..N-1."""
    with open(path, encoding="utf-8") as f:
        names = [line.rstrip("\r\n") for line in f if line.strip()]
    if tuple(names[:3]) != VISION_CONTROL:
        raise TokenizerFormatError(f"{path}: first lines must be {VISION_CONTROL}, got {names[:3]}")
    for code, name in enumerate(names[3:]):
        if name != VISUAL_TOKEN_FORMAT.format(code):
            raise TokenizerFormatError(f"{path}: line {code + 4} is {name!r}, expected visual token {code}")
    return names


class Emu35Tokenizer:
    """Encode/decode text with special tokens, and map visual codes ↔ ids arithmetically."""

    def __init__(self, mergeable_ranks: dict[bytes, int], vision_tokens: Sequence[str], name: str = "emu3"):
        self.num_bpe_tokens = len(mergeable_ranks)
        control = list(LEADING_SPECIALS) + list(vision_tokens[:3])
        self._special_ids = {tok: self.num_bpe_tokens + i for i, tok in enumerate(control)}
        self._special_names = {i: tok for tok, i in self._special_ids.items()}
        self._encoding = tiktoken.Encoding(
            name, pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks, special_tokens=self._special_ids
        )
        first_visual = self.num_bpe_tokens + len(control)
        num_visual = len(vision_tokens) - 3
        self.vocab_size = first_visual + num_visual
        self.ids = SpecialIds(
            **{role: self._special_ids[tok] for role, tok in ROLE_TOKENS.items()},
            first_visual=first_visual,
            num_visual=num_visual,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "Emu35Tokenizer":
        """Load the upstream file layout (``emu3.tiktoken`` + ``emu3_vision_tokens.txt``)."""
        path = Path(path)
        for fname in (TIKTOKEN_FILE, VISION_FILE):
            if not (path / fname).is_file():
                raise FileNotFoundError(f"tokenizer folder {path} has no {fname}")
        return cls(read_tiktoken_ranks(path / TIKTOKEN_FILE), read_vision_tokens(path / VISION_FILE))

    # ---- text ---------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Encode text. With ``allow_special`` control and visual token names become their ids;
        without it they are encoded as plain text (what user-supplied prompts need).

        Text is normalised to Unicode NFC first, as the release's tokenizer does, so a decomposed
        accent (``Cafe\u0301``) and a precomposed one (``Caf\u00e9``) give the same ids."""
        text = unicodedata.normalize("NFC", text)
        if not allow_special:
            return self._encoding.encode(text, disallowed_special=())
        ids: list[int] = []
        pos = 0
        for m in _VISUAL_TOKEN_RE.finditer(text):
            code = int(m.group(1))
            if code >= self.ids.num_visual:
                continue  # not a token of this vocabulary: left as text
            ids.extend(self._encoding.encode(text[pos : m.start()], allowed_special="all"))
            ids.append(self.ids.first_visual + code)
            pos = m.end()
        ids.extend(self._encoding.encode(text[pos:], allowed_special="all"))
        return ids

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode ids to text; visual ids are written as their token names."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if self.is_visual(i):
                if run:
                    out.append(self._encoding.decode(run, errors=errors))
                    run = []
                out.append(VISUAL_TOKEN_FORMAT.format(i - self.ids.first_visual))
            elif 0 <= i < self.ids.first_visual:
                run.append(i)
            else:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if run:
            out.append(self._encoding.decode(run, errors=errors))
        return "".join(out)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of non-visual ids: streaming decoders need them to hold back a UTF-8 character
        split across tokens instead of emitting U+FFFD."""
        try:
            return self._encoding.decode_bytes([int(i) for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} has no byte form (visual or out of range)") from None

    def token_id(self, name: str) -> int:
        """Id of a single named token (special, visual, or a single BPE token)."""
        if name in self._special_ids:
            return self._special_ids[name]
        m = _VISUAL_TOKEN_RE.fullmatch(name)
        if m and int(m.group(1)) < self.ids.num_visual:
            return self.ids.first_visual + int(m.group(1))
        return self._encoding.encode_single_token(name.encode("utf-8"))

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (``<|endoftext|>`` … ``<|image end|>``), not visual tokens."""
        return token_id in self._special_names

    # ---- digits (image headers) ---------------------------------------------------------------
    @cached_property
    def digit_ids(self) -> tuple[int, ...]:
        """Ids of ``'0'`` … ``'9'``; each digit is one token under Qwen's split pattern."""
        return tuple(self._encoding.encode_single_token(str(d).encode()) for d in range(10))

    @cached_property
    def star_id(self) -> int:
        """Id of ``'*'``, the separator in an image header ``H*W``."""
        return self._encoding.encode_single_token(b"*")

    @cached_property
    def _digit_of_id(self) -> dict[int, int]:
        return {tok: d for d, tok in enumerate(self.digit_ids)}

    def encode_number(self, n: int) -> list[int]:
        """Digits of a non-negative integer as one token each (no BPE round trip)."""
        if n < 0:
            raise ValueError(f"cannot encode negative number {n}")
        return [self.digit_ids[int(c)] for c in str(n)]

    def digit_value(self, token_id: int) -> int | None:
        """The digit a token stands for, or None when it is not a digit token."""
        return self._digit_of_id.get(token_id)

    # ---- visual tokens ------------------------------------------------------------------------
    def is_visual(self, token_id: int) -> bool:
        return self.ids.first_visual <= token_id <= self.ids.last_visual

    def visual_id(self, code: int) -> int:
        if not 0 <= code < self.ids.num_visual:
            raise ValueError(f"visual code {code} outside codebook of {self.ids.num_visual}")
        return self.ids.first_visual + code

    def visual_code(self, token_id: int) -> int:
        if not self.is_visual(token_id):
            raise ValueError(f"token id {token_id} is not a visual token")
        return token_id - self.ids.first_visual

    def codes_to_ids(self, codes: np.ndarray) -> np.ndarray:
        """Vectorised code → id (any shape)."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.ids.num_visual):
            raise ValueError(f"visual codes must lie in [0, {self.ids.num_visual})")
        return codes + self.ids.first_visual

    def ids_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """Vectorised id → code (any shape)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < self.ids.first_visual or ids.max() > self.ids.last_visual):
            raise ValueError("not all ids are visual tokens")
        return ids - self.ids.first_visual
