"""The API's models, below both commands that read them: the HTTP layer (``emu35-serve``) answers with them
and the batch command reads a JSONL line as the same request ``POST /v1/generate`` takes."""
