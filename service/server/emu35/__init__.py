"""Emu3.5's own endpoints (``/v1/t2i``, ``/v1/x2i``, ``/v1/guidance``, ``/v1/narrative``,
``/v1/generate``): protocol models, rendering of answers and events, the serving class, the routes."""
