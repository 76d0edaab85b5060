"""The native engine: Emu3 checkpoints (the release's format) decoded with a schedule chosen per request.

``network`` is the transformer over a position-indexed slot cache; ``visibility`` the one rule that
says which entries a query sees; ``schedule`` the lanes of ``ar``/``jacobi``/``zipar`` and their pass
formulas; ``speculative`` SJD's acceptance rule; ``core`` the batched decoding loop; ``async_engine``
puts it behind the engine API; ``oracle`` recomputes ZipAR from scratch for the tests.
"""

from service.engine.native.async_engine import AsyncNativeEngine
from service.engine.native.schedule import DEFAULT_DRAFT_LEN, DEFAULT_WINDOW, Schedule

__all__ = ["DEFAULT_DRAFT_LEN", "DEFAULT_WINDOW", "AsyncNativeEngine", "Schedule"]
