"""Batch generation: ``python -m service generate`` (``emu35-generate``).

The offline counterpart of the HTTP layer, and like it an upper layer over :mod:`service.task`: a list
of prompts (a release config file or JSONL) goes through one engine, every prompt at once up to the
engine's slots, and each answer is written as the release's ``{save_path}/proto/{name}.pb`` record.

``items`` is what one prompt is; ``release_config`` and ``jsonl`` read the two input formats into
items; ``shard`` splits them between workers; ``records`` writes and finds records; ``progress``
reports; ``run`` drives the engine; ``cli`` is the command line. Lower layers never import this.
"""
