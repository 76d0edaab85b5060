"""OpenAI's image API (``/v1/images/generations``, ``/v1/images/edits``) on Emu3.5's T2I and X2I: how its
fields map, its models, rendering, the serving class, the routes."""
