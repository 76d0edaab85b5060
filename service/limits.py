"""Every request limit of the service, one constant each.

The API models, the multipart reader, the task planner and the prompt builder all check against these,
so a limit changes in one place and every message names the same number.
"""

from __future__ import annotations

#: Reference images one generation may take (the release's prompts are built for up to three).
MAX_REFERENCE_IMAGES = 3
#: Characters of one user prompt.
MAX_PROMPT_CHARS = 100_000
#: Largest seed (seeds travel through vLLM as signed 64-bit integers).
MAX_SEED = 2**63 - 1
#: Pixels of a generated (and resized reference) image.
MIN_IMAGE_AREA = 256
MAX_IMAGE_AREA = 4096 * 4096
#: Classifier-free guidance scale.
MIN_GUIDANCE_SCALE = 1.0
MAX_GUIDANCE_SCALE = 50.0
#: Sampling temperature.
MAX_TEMPERATURE = 100.0
#: Bytes of a request body on routes that take no images (a prompt of MAX_PROMPT_CHARS, JSON-escaped, fits).
MAX_TEXT_BODY_BYTES = 2 * 2**20
#: Previews decoded per image at most, whatever ``preview_every_rows`` asks: a preview is a full VQ
#: decode on the shared worker, so a stream asking for one every row would slow every other request.
MAX_PREVIEWS_PER_IMAGE = 8
#: Images one OpenAI-style request may ask for (each is a generation of its own).
MAX_IMAGES_PER_REQUEST = 4
#: Partial images one streamed OpenAI-style image may have (OpenAI's ``partial_images``: 0–3).
MAX_PARTIAL_IMAGES = 3
#: Most elongated OpenAI-style ``size``: the longer side at most this many times the shorter (1:3 … 3:1).
MAX_SIZE_ASPECT = 3
#: Bytes of a request body that buy its sender one more second beyond ``--body-timeout``: an upload at
#: least this fast is never cut off, a trickle (a client sending a byte at a time) is cut off at about the
#: timeout.
BODY_BYTES_PER_EXTRA_SECOND = 64 * 1024
