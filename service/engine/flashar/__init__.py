"""The FlashAR engine: Emu3.5-Image post-trained to draw an H×W grid in H+W−1 anti-diagonal steps.

``checkpoint`` recognises and strictly loads the format; ``network`` is the transformer (backbone, its
KV cache, the vertical branch and its own cache, the full-sequence form the oracle uses); ``schedule``
knows the diagonals and Emu3.5's token layout; ``fusion`` mixes the two heads; ``engine`` batches
requests at different diagonals into one forward; ``async_engine`` puts it behind the engine API.

What the engine relies on from FlashAR (format, masks, fusion, what the tests check) is written down in
``docs/flashar.md``; "the spec" and section numbers (§N) in this package refer to that page.
"""

from service.engine.flashar.checkpoint import (
    FlashARConfig,
    check_flashar_checkpoint,
    is_flashar_checkpoint,
    load_flashar_weights,
)

__all__ = ["FlashARConfig", "check_flashar_checkpoint", "is_flashar_checkpoint", "load_flashar_weights"]
