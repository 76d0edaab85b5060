"""The Emu3.5 language-model checkpoint format: ``config.json`` (``model_type: "Emu3"``) + safetensors.

Emu3.5's transformer has exactly Qwen3's shapes and weight names (design.md §1), so loading means mapping
the ``Emu3`` config onto a Qwen3 one and loading the weights unchanged. This module is the one place
that knows the mapping; the reference engine and the vLLM plugin both use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_TYPE = "Emu3"
ARCHITECTURE = "Emu3ForCausalLM"

#: Config keys copied verbatim onto a Qwen3 config.
QWEN3_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_dropout",
    "initializer_range",
)

#: Token-id fields an Emu3.5 config carries (design.md §1).
TOKEN_ID_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "img_token_id",
    "boi_token_id",
    "eoi_token_id",
    "eol_token_id",
    "eof_token_id",
)


class CheckpointError(ValueError):
    """The folder is not an Emu3.5 language-model checkpoint."""


@dataclass(frozen=True)
class Emu3Config:
    """The parsed ``config.json`` of an Emu3.5 checkpoint."""

    raw: dict[str, Any]

    @classmethod
    def from_dir(cls, path: str | Path) -> "Emu3Config":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{path} has no config.json")
        raw = json.loads(file.read_text(encoding="utf-8"))
        if raw.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{file}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        missing = [k for k in QWEN3_KEYS[:6] if k not in raw]
        if missing:
            raise CheckpointError(f"{file}: missing keys {missing}")
        return cls(raw)

    @property
    def head_dim(self) -> int:
        return int(self.raw.get("head_dim") or self.raw["hidden_size"] // self.raw["num_attention_heads"])

    @property
    def token_ids(self) -> dict[str, int]:
        return {k: int(self.raw[k]) for k in TOKEN_ID_KEYS if k in self.raw}

    def qwen3_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a Qwen3 config describing the same network."""
        kw = {k: self.raw[k] for k in QWEN3_KEYS if k in self.raw}
        kw["head_dim"] = self.head_dim
        kw.setdefault("hidden_act", "silu")
        kw.setdefault("rope_theta", 1_000_000.0)
        kw["tie_word_embeddings"] = False
        kw["attention_bias"] = False
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k in self.raw:
                kw[k] = self.raw[k]
        return kw


def write_config(path: Path, raw: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
