"""Images in and out of the API: base64 / data URLs / uploads → checked PIL images; PIL → PNG base64.

Every way an upload can be bad ends in an :class:`APIError` with a reason: not base64, an unsupported
data-URL type, too many bytes (413), not an image or truncated, a format we do not read, or more
pixels than allowed (checked from the header, before decoding, so a decompression bomb costs nothing).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from service.server.core.errors import APIError, bad_request

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S)
_MIMES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/bmp", "image/gif"}
_OUTPUT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def image_bytes_from_text(text: str, max_bytes: int, param: str) -> bytes:
    """A base64 string or a ``data:image/…;base64,`` URL → raw bytes."""

    payload = text
    if text[:8].lower().startswith(("http://", "https://")):
        raise bad_request("image URLs are not fetched: send the image itself, as base64, a data URL "
                          "(data:image/png;base64,…) or a multipart file upload", "image_url_not_supported", param)
    if text.startswith("data:"):
        m = _DATA_URL.match(text)
        if m is None:
            raise bad_request("a data URL image must look like data:image/png;base64,…", "invalid_image", param)
        mime = (m.group("mime") or "").lower()
        if mime not in _MIMES:
            raise bad_request(f"unsupported image type {mime or '(none)'!r} in data URL", "unsupported_image_type", param)
        payload = m.group("data")
    if len(payload) > (max_bytes * 4) // 3 + 8:
        raise APIError(413, f"image is larger than {max_bytes} bytes", "image_too_large", param)
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image is not valid base64", "invalid_base64", param) from None
    if not raw:
        raise bad_request("image is empty", "invalid_image", param)
    return raw


def open_image(raw: bytes, max_bytes: int, max_pixels: int, param: str) -> Image.Image:
    """Raw bytes → an RGB PIL image, fully decoded (call in a worker thread: decoding is CPU work)."""
    if len(raw) > max_bytes:
        raise APIError(413, f"image is larger than {max_bytes} bytes", "image_too_large", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            if im.format not in ACCEPTED_FORMATS:
                raise bad_request(f"unsupported image format {im.format}; send PNG, JPEG, WebP, BMP or GIF",
                                  "unsupported_image_type", param)
            if im.width * im.height > max_pixels:
                raise bad_request(f"image is {im.width}×{im.height} pixels, more than the {max_pixels} allowed",
                                  "image_too_many_pixels", param)
            im.load()
            return im.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request("image has too many pixels (decompression bomb)", "image_too_many_pixels", param) from None
    except UnidentifiedImageError:  # PIL's message names an in-memory buffer object: say it plainly
        raise bad_request("not a readable image: the bytes are not PNG, JPEG, WebP, BMP or GIF", "invalid_image",
                          param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise bad_request(f"not a readable image: {exc}", "invalid_image", param) from None


def encode_image(image: Image.Image, fmt: str = "png", quality: int | None = None) -> bytes:
    buf = io.BytesIO()
    kind = _OUTPUT[fmt]
    kwargs = {"quality": quality} if quality is not None and kind in ("JPEG", "WEBP") else {}
    if kind == "PNG":
        kwargs["compress_level"] = 1  # the images are the product; speed over a few % of size
    image.save(buf, format=kind, **kwargs)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
