"""A batch as read from its input: the prompts in order, where records go, the checkpoint paths it names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service.batch.items import Item, ItemError


class InputError(ValueError):
    """The input as a whole cannot run (a config that raises, an unknown ``task_type``): nothing starts.
    ``field`` names the setting at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class ModelPaths:
    """Checkpoint folders an input names (the release config's ``model_path`` / ``vq_path`` /
    ``tokenizer_path``); command-line flags win over them."""

    model: str | None = None
    vq_model: str | None = None
    tokenizer: str | None = None


@dataclass(frozen=True)
class BatchJob:
    """Every prompt in input order (each an :class:`Item` or the :class:`ItemError` that stops it)."""

    entries: list[Item | ItemError]
    save_path: Path | None = None  # records go to {save_path}/proto (the release's layout)
    paths: ModelPaths = field(default_factory=ModelPaths)
    #: A release config: its image_area and max_new_tokens are settings of the whole run (a --image-area
    #: flag or --demo wins over the first; the context caps the second), not a JSONL line's own request.
    release_config: bool = False

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]
