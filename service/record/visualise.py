"""Write a Story record (``.pb``) out as plain files, optionally with a slideshow video.

CLI (``python -m service vis``; also ``python -m service.record.visualise``)::

    python -m service vis RECORD.pb --out DIR [--video] [--fps N]
    python -m service vis RECORDS_DIR --out DIR [--video] [--fps N]

The files are named exactly as the release's visualiser names them, because users' scripts read
those names (docs/design.md §7). A file is written straight into ``--out``. A directory is scanned
recursively for ``*.pb``, ``*.proto`` and ``*.bin``; each record goes to
``--out/<relative path without the extension>/``.

Layout of one record:

================================  ===========================================================
``000_question.txt``              ``Story.question`` and a newline (always written)
``000_global_cot.txt``            ``Story.summary`` and a newline; only when not blank
``{i:03d}_reference_image.png``   reference image i (0, 1, ...)
``{n:03d}_text.txt``              segment n's ``asr`` and a newline, written even when empty
``{n:03d}_{j:02d}_image.png``     image j (from 00) of segment n
``{n:03d}_{j:02d}_image_cot.txt`` that image's ``chain_of_thought``; only when not blank
``video.mp4``                     with ``--video``
================================  ===========================================================

The counter n runs over every segment of every clip in order. It starts at 1, or at the number of
reference images when there are any (so with two references the first text is ``002_text.txt``);
both are the release's rules. Images are written as PNG: PNG payloads are copied byte for byte,
other formats are decoded and re-encoded; an image with no ``image_data`` (only ``image_path``) is
skipped with a warning.

The video, as the release's: a card with the question (when not blank), the reference images, then
per segment a card with its text (when not blank) and its images; every frame has the size of the
first image (references first, 512×512 when there is none), one frame per ``1/fps`` seconds.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Iterator

from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from . import story_pb2

__all__ = ["load_story", "write_story", "write_video", "video_frames", "vis_main"]

_RECORD_SUFFIXES = (".pb", ".proto", ".bin")
_NO_IMAGE_SIZE = (512, 512)
_TEXT_MARGIN = 12
_BLOCK = 16


def load_story(path: str | Path) -> story_pb2.Story:
    return story_pb2.Story.FromString(Path(path).read_bytes())


def _png_bytes(meta: story_pb2.ImageMeta) -> bytes | None:
    img = meta.image
    if not img.image_data:
        return None
    if img.format == story_pb2.PNG or img.image_data[:8] == b"\x89PNG\r\n\x1a\n":
        return bytes(img.image_data)
    with PILImage.open(io.BytesIO(img.image_data)) as pil:
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        return buf.getvalue()


def _write_line(path: Path, text: str, written: list[Path]) -> None:
    """Text and a newline: what the release's visualiser writes (it prints each text to its file)."""
    path.write_text(text + "\n", encoding="utf-8")
    written.append(path)


def _write_png(path: Path, meta: story_pb2.ImageMeta, what: str, written: list[Path]) -> None:
    data = _png_bytes(meta)
    if data is None:
        print(f"warning: {what} has no image_data; skipped", file=sys.stderr)
        return
    path.write_bytes(data)
    written.append(path)


def _segments(story: story_pb2.Story) -> Iterator[story_pb2.Segment]:
    for clip in story.clips:
        yield from clip.segments


def first_segment_number(story: story_pb2.Story) -> int:
    """The release's counter start: the number of reference images, or 1 when there are none."""
    return len(story.reference_images) or 1


def write_story(story: story_pb2.Story, out_dir: str | Path, video: bool = False, fps: float = 1.0) -> list[Path]:
    """Write ``story`` into ``out_dir`` (created if needed) in the release's layout; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    _write_line(out / "000_question.txt", story.question, written)
    if story.summary.strip():
        _write_line(out / "000_global_cot.txt", story.summary, written)
    for i, meta in enumerate(story.reference_images):
        _write_png(out / f"{i:03d}_reference_image.png", meta, f"reference image {i}", written)
    for n, segment in enumerate(_segments(story), start=first_segment_number(story)):
        _write_line(out / f"{n:03d}_text.txt", segment.asr, written)
        for j, meta in enumerate(segment.images):
            _write_png(out / f"{n:03d}_{j:02d}_image.png", meta, f"segment {n:03d} image {j}", written)
            if meta.chain_of_thought.strip():
                _write_line(out / f"{n:03d}_{j:02d}_image_cot.txt", meta.chain_of_thought, written)
    if video:
        path = out / "video.mp4"
        write_video(video_frames(story), path, fps=fps)
        written.append(path)
    return written


# --------------------------------------------------------------------------- video rendering


def _decoded(meta: story_pb2.ImageMeta) -> PILImage.Image | None:
    if not meta.image.image_data:
        return None
    with PILImage.open(io.BytesIO(meta.image.image_data)) as pil:
        return pil.convert("RGB")


def video_frames(story: story_pb2.Story) -> list[PILImage.Image]:
    """The release's frame sequence: question card, references, then per segment a text card and
    its images, all at the first image's size (references first; 512×512 without any image)."""
    refs = [im for im in (_decoded(m) for m in story.reference_images) if im is not None]
    segments = [(seg.asr, [im for im in (_decoded(m) for m in seg.images) if im is not None])
                for seg in _segments(story)]
    first = refs[:1] or [im for _, ims in segments for im in ims][:1]
    size = first[0].size if first else _NO_IMAGE_SIZE
    fit = lambda im: im if im.size == size else im.resize(size, PILImage.Resampling.LANCZOS)  # noqa: E731
    frames: list[PILImage.Image] = []
    if story.question.strip():
        frames.append(text_card(story.question, size))
    frames += [fit(im) for im in refs]
    for text, images in segments:
        if text.strip():
            frames.append(text_card(text, size))
        frames += [fit(im) for im in images]
    return frames


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    """The bitmap fallback font only encodes latin-1; replace what it cannot draw."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy wrap to ``width`` pixels; words longer than a line (or CJK runs) break anywhere."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            candidate = word if not line else line + " " + word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # the word alone does not fit: break by character
                if draw.textlength(line + ch, font=font) <= width or not line:
                    line += ch
                else:
                    lines.append(line)
                    line = ch
        lines.append(line)
    return lines


def text_card(text: str, size: tuple[int, int]) -> PILImage.Image:
    """White text wrapped on a black frame of ``size``; lines that do not fit are cut."""
    font = _font()
    card = PILImage.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(card)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 3)
    line_h = ascent + descent + 4
    y = _TEXT_MARGIN
    for line in _wrap(_drawable(text, font), font, max(1, size[0] - 2 * _TEXT_MARGIN), draw):
        if y + line_h > size[1]:
            break
        draw.text((_TEXT_MARGIN, y), line, fill=(255, 255, 255), font=font)
        y += line_h
    return card


def _padded(frame: PILImage.Image) -> PILImage.Image:
    """Pad right and bottom to multiples of 16 (H.264 in yuv420p needs even sides)."""
    w, h = frame.size
    pw, ph = -(-w // _BLOCK) * _BLOCK, -(-h // _BLOCK) * _BLOCK
    if (pw, ph) == (w, h):
        return frame
    canvas = PILImage.new("RGB", (pw, ph), (0, 0, 0))
    canvas.paste(frame, (0, 0))
    return canvas


def write_video(frames: list[PILImage.Image], path: str | Path, fps: float = 1.0) -> None:
    """Encode the frames (all of one size) as H.264, yuv420p, with imageio-ffmpeg."""
    import imageio_ffmpeg  # lazily: only the --video path needs ffmpeg

    if not frames:
        frames = [PILImage.new("RGB", _NO_IMAGE_SIZE)]
    rendered = [_padded(f) for f in frames]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        rendered[0].size,
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=_BLOCK,
        ffmpeg_log_level="error",
    )
    writer.send(None)  # start the generator
    try:
        for frame in rendered:
            writer.send(frame.tobytes())
    finally:
        writer.close()


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service vis",
        description="Write Emu3.5 Story records (.pb) out as text/PNG files (and a video).",
    )
    p.add_argument("record", type=Path,
                   help="a record, or a directory scanned recursively for *.pb, *.proto and *.bin")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--video", action="store_true", help="also write video.mp4 (the release's frame sequence)")
    p.add_argument("--fps", type=float, default=1.0, help="video: frames per second (default 1, as the release)")
    return p


def vis_main(argv: list[str]) -> int:
    """Entry point of ``python -m service vis``; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.fps <= 0:
        print("error: --fps must be > 0", file=sys.stderr)
        return 2
    src: Path = args.record
    if src.is_dir():
        records = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in _RECORD_SUFFIXES)
        jobs = [(pb, args.out / pb.relative_to(src).with_suffix("")) for pb in records]
        if not jobs:
            print(f"error: no *.pb, *.proto or *.bin files under {src}", file=sys.stderr)
            return 1
    elif src.is_file():
        jobs = [(src, args.out)]
    else:
        print(f"error: {src} does not exist", file=sys.stderr)
        return 1

    failures = 0
    for pb, out in jobs:
        try:
            story = load_story(pb)
            write_story(story, out, video=args.video, fps=args.fps)
        except Exception as exc:  # noqa: BLE001 - keep going over a directory; report at the end
            failures += 1
            print(f"error: {pb}: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            print(f"{pb} -> {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(vis_main(sys.argv[1:]))
